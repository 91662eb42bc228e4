//! `cargo xtask bench`: mtlb against direct connections and HAProxy, in one
//! run, with the same backends, in a network namespace of its own.
//!
//! Modes, interleaved in every repetition:
//! * direct: clients connect to one backend (the physical limit);
//! * mtlb: clients connect to the balanced port 443;
//! * haproxy: Debian's HAProxy, `mode tcp`, `balance leastconn`, checks
//!   `inter 2s rise 2 fall 3` as in the original deployment, on :8443.
//!
//! The load generator and the backends are in this file (threads in the
//! namespace): a backend answers one byte and closes, or sinks a stream.
//! Results: a Markdown table of ratios and a JSON file; BENCHMARKS.md gets
//! the latest run.

use anyhow::{Context as _, bail};
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const REPS: usize = 3;
const RATE_SECS: f64 = 3.0;

/// A backend: short reply-and-close server, plus a sink for bulk streams.
struct Backend {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    fn start(port: u16) -> anyhow::Result<Self> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        sock.bind(&addr.into())?;
        sock.listen(4096)?;
        let l: TcpListener = sock.into();
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        std::thread::spawn(move || {
                            // First byte: 'b' = bulk (sink until EOF), else
                            // answer one byte and close.
                            let mut b = [0u8; 65536];
                            match s.read(&mut b) {
                                Ok(n) if n > 0 && b[0] == b'b' => {
                                    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
                                }
                                Ok(n) if n > 0 => {
                                    let _ = s.write_all(b"y");
                                }
                                _ => {}
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(_) => break,
                }
            }
            // The listener closes here: the backend is gone.
        });
        Ok(Self {
            stop,
            addr,
            thread: Some(thread),
        })
    }

    fn kill(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One short request: connect, send a byte, read the one-byte answer.
fn request(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && b[0] == b'y'
}

/// New connections per second with 2 client threads for RATE_SECS.
fn conn_rate(addr: SocketAddr) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(RATE_SECS);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            std::thread::spawn(move || {
                while Instant::now() < end {
                    if request(addr) {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let n = done.load(Ordering::Relaxed);
    (
        n as f64 / t0.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed),
    )
}

/// connect() latency, sequential, in microseconds: (p50, p99).
fn connect_latency(addr: SocketAddr) -> (f64, f64) {
    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        if let Ok(mut s) = TcpStream::connect(addr) {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            let _ = s.write_all(b"x");
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    if lat.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

/// One stream for 2 s: MB/s.
fn bulk(addr: SocketAddr) -> f64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0.0;
    };
    let buf = vec![b'b'; 1 << 16];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(2) {
        match s.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut b = [0u8; 16];
    let _ = s.read(&mut b);
    sent as f64 / t0.elapsed().as_secs_f64() / 1e6
}

/// Requests at ~2000/s for 3 s; the second backend is killed after 1 s.
/// Returns (attempted, failed).
fn failover(addr: SocketAddr, victim: &mut Backend) -> (u64, u64) {
    let t0 = Instant::now();
    let (mut n, mut failed) = (0u64, 0u64);
    let mut killed = false;
    let interval = Duration::from_micros(500);
    let mut next = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if !killed && t0.elapsed() >= Duration::from_secs(1) {
            victim.kill();
            killed = true;
        }
        n += 1;
        if !request(addr) {
            failed += 1;
        }
        next += interval;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    (n, failed)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[derive(Default, Clone)]
struct Series(Vec<f64>);

impl Series {
    fn summary(&self) -> (f64, f64, f64) {
        let mut v = self.0.clone();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&mut v), min, max)
    }
}

/// Process CPU seconds (utime + stime) from /proc/<pid>/stat.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0;
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (ut + st) / tick
}

/// Whole-machine busy CPU seconds from /proc/stat.
fn machine_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or("");
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / 100.0
}

/// (run_count, run_time_ns) of a program by name, newest instance.
fn prog_stats(name: &str) -> (u64, u64) {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "name", name])
        .output();
    let Ok(out) = out else { return (0, 0) };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let p = match &v {
        serde_json::Value::Array(a) => a
            .iter()
            .max_by_key(|p| p["id"].as_u64())
            .cloned()
            .unwrap_or_default(),
        other => other.clone(),
    };
    (
        p["run_cnt"].as_u64().unwrap_or(0),
        p["run_time_ns"].as_u64().unwrap_or(0),
    )
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn start_agent(mtlb: &Path, ns: &str, replicas: u16, dir: &Path) -> anyhow::Result<Agent> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(mtlb)
        .args(["run", "--replicas", &replicas.to_string(), "--state-dir"])
        .arg(dir)
        .arg("--config")
        .arg(dir.join("none.toml"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    std::fs::write(dir.join("none.toml"), "")?;
    let mut child = c.spawn()?;
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("mtlb exited while starting");
        }
        if line.contains("steering TCP port") {
            break;
        }
    }
    std::thread::spawn(move || for _ in err.lines().map_while(Result::ok) {});
    Ok(Agent(child))
}

fn start_haproxy(ns: &str, dir: &Path) -> anyhow::Result<Child> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend mtp\n  bind 127.0.0.1:8443\n  default_backend mtproxy\n\
         backend mtproxy\n  balance leastconn\n  server mtp1 127.0.0.1:10000 check inter 2s rise 2 fall 3\n  server mtp2 127.0.0.1:10001 check inter 2s rise 2 fall 3\n",
    )?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "haproxy", "-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect("127.0.0.1:8443").is_err() {
        if Instant::now() > deadline {
            bail!("haproxy did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let mtlb = root.join("target/release/mtlb");
    let ns = format!("mtlb-bench-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir)?;
    if !Command::new("ip")
        .args(["netns", "add", &ns])
        .status()?
        .success()
    {
        bail!("ip netns add failed");
    }
    Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()?;
    let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // This thread does the measuring, inside the namespace.
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let result = measure(&mtlb, &ns, &dir, root);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(mtlb: &Path, ns: &str, dir: &Path, root: &Path) -> anyhow::Result<()> {
    let mut backends = vec![Backend::start(10000)?, Backend::start(10001)?];
    let agent = start_agent(mtlb, ns, 2, dir)?;
    let mut haproxy = start_haproxy(ns, dir)?;
    let hap_pid = haproxy.id();
    let modes: [(&str, SocketAddr); 3] = [
        ("direct", backends[0].addr),
        ("mtlb", "127.0.0.1:443".parse()?),
        ("haproxy", "127.0.0.1:8443".parse()?),
    ];
    let mut rate = vec![Series::default(); 3];
    let mut p50 = vec![Series::default(); 3];
    let mut p99 = vec![Series::default(); 3];
    let mut tput = vec![Series::default(); 3];
    let mut cpu_conn = vec![Series::default(); 3];
    let mut machine_conn = vec![Series::default(); 3];
    let mut failures = [0u64; 3];
    for rep in 0..REPS {
        eprintln!("bench: repetition {}/{REPS}", rep + 1);
        for (i, (mode, addr)) in modes.iter().enumerate() {
            let r0 = prog_stats("mtlb_steer").1 + prog_stats("mtlb_sockops").1;
            let hap0 = proc_cpu(hap_pid);
            let m0 = machine_cpu();
            let (r, failed) = conn_rate(*addr);
            let conns = r * RATE_SECS;
            failures[i] += failed;
            rate[i].0.push(r);
            let m1 = machine_cpu();
            machine_conn[i].0.push((m1 - m0) / conns * 1e6);
            match *mode {
                "mtlb" => {
                    let a = prog_stats("mtlb_steer");
                    let b = prog_stats("mtlb_sockops");
                    cpu_conn[i].0.push((a.1 + b.1 - r0) as f64 / conns / 1000.0);
                }
                "haproxy" => cpu_conn[i].0.push((proc_cpu(hap_pid) - hap0) / conns * 1e6),
                _ => cpu_conn[i].0.push(0.0),
            }
            let (a, b) = connect_latency(*addr);
            p50[i].0.push(a);
            p99[i].0.push(b);
            tput[i].0.push(bulk(*addr));
        }
    }
    // Failover under load, mtlb and HAProxy, each with a fresh victim.
    let mut fo = Vec::new();
    for (mode, addr) in [("mtlb", modes[1].1), ("haproxy", modes[2].1)] {
        // Both backends up and known to the balancer.
        if backends.len() < 2 {
            backends.push(Backend::start(10001)?);
        }
        std::thread::sleep(Duration::from_secs(5));
        let mut victim = backends.pop().unwrap();
        let (n, failed) = failover(addr, &mut victim);
        fo.push((mode, n, failed));
    }
    drop(agent);
    let _ = haproxy.kill();
    let _ = haproxy.wait();

    // Steering cost at 2, 16 and 64 replicas.
    let mut cost = Vec::new();
    drop(backends);
    for n in [2u16, 16, 64] {
        let bs: Vec<Backend> = (0..n)
            .map(|i| Backend::start(10000 + i))
            .collect::<Result<_, _>>()?;
        let agent = start_agent(mtlb, ns, n, dir)?;
        let s0 = prog_stats("mtlb_steer");
        let o0 = prog_stats("mtlb_sockops");
        let (r, _) = conn_rate("127.0.0.1:443".parse()?);
        let conns = r * RATE_SECS;
        let s1 = prog_stats("mtlb_steer");
        let o1 = prog_stats("mtlb_sockops");
        let per = |a: (u64, u64), b: (u64, u64)| {
            let runs = (b.0 - a.0) as f64;
            ((b.1 - a.1) as f64 / runs.max(1.0), runs / conns)
        };
        let (sl_ns, sl_runs) = per(s0, s1);
        let (so_ns, so_runs) = per(o0, o1);
        cost.push((n, sl_ns, sl_runs, so_ns, so_runs));
        drop(agent);
        drop(bs);
    }

    // Report.
    let s = |x: &Series| x.summary();
    let ratio = |a: f64, b: f64| a / b;
    let mut md = String::new();
    md.push_str("| metric | direct | mtlb | HAProxy | mtlb/direct | HAProxy/direct | mtlb/HAProxy |\n|---|---|---|---|---|---|---|\n");
    let row = |md: &mut String, name: &str, v: &[Series], fmt: &dyn Fn(f64) -> String| {
        let (d, m, h) = (s(&v[0]), s(&v[1]), s(&v[2]));
        md.push_str(&format!(
            "| {name} | {} ({}–{}) | {} ({}–{}) | {} ({}–{}) | {:.3} | {:.3} | {:.3} |\n",
            fmt(d.0),
            fmt(d.1),
            fmt(d.2),
            fmt(m.0),
            fmt(m.1),
            fmt(m.2),
            fmt(h.0),
            fmt(h.1),
            fmt(h.2),
            ratio(m.0, d.0),
            ratio(h.0, d.0),
            ratio(m.0, h.0)
        ));
    };
    row(
        &mut md,
        "new connections/s (request+reply each)",
        &rate,
        &|x| format!("{x:.0}"),
    );
    row(&mut md, "connect latency p50 (µs)", &p50, &|x| {
        format!("{x:.1}")
    });
    row(&mut md, "connect latency p99 (µs)", &p99, &|x| {
        format!("{x:.1}")
    });
    row(&mut md, "bulk throughput, one stream (MB/s)", &tput, &|x| {
        format!("{x:.0}")
    });
    row(
        &mut md,
        "whole machine CPU per connection (µs)",
        &machine_conn,
        &|x| format!("{x:.1}"),
    );
    let (mc, hc) = (s(&cpu_conn[1]), s(&cpu_conn[2]));
    md.push_str(&format!(
        "\nBalancer CPU per connection: mtlb (BPF run time of all programs) {:.3} µs ({:.3}–{:.3}); HAProxy (process CPU) {:.2} µs ({:.2}–{:.2}); mtlb/HAProxy {:.3}.\n",
        mc.0, mc.1, mc.2, hc.0, hc.1, hc.2, mc.0 / hc.0
    ));
    md.push_str(&format!(
        "\nFailed requests during the rate runs: direct {}, mtlb {}, HAProxy {}.\n",
        failures[0], failures[1], failures[2]
    ));
    md.push_str("\nFailover under load (~2000 requests/s, one backend killed after 1 s of 3 s):\n\n| balancer | requests | failed |\n|---|---|---|\n");
    for (mode, n, f) in &fo {
        md.push_str(&format!("| {mode} | {n} | {f} |\n"));
    }
    md.push_str("\nSteering cost (kernel.bpf_stats_enabled=1; stats add their own overhead):\n\n| replicas | sk_lookup ns/run | sk_lookup runs/conn | sock_ops ns/run | sock_ops runs/conn | BPF ns/conn |\n|---|---|---|---|---|---|\n");
    for (n, a, b, c, d) in &cost {
        md.push_str(&format!(
            "| {n} | {a:.0} | {b:.2} | {c:.0} | {d:.1} | {:.0} |\n",
            a * b + c * d
        ));
    }
    // The targets, judged on this run.
    let (r, t) = (s(&rate[1]).0 / s(&rate[0]).0, s(&tput[1]).0 / s(&tput[0]).0);
    let sl64 = cost.iter().find(|c| c.0 == 64).map_or(f64::NAN, |c| c.1);
    let mtlb_fail = fo.iter().find(|f| f.0 == "mtlb").map_or(u64::MAX, |f| f.2);
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    md.push_str("\nTargets:\n\n| target | this run | |\n|---|---|---|\n");
    md.push_str(&format!(
        "| mtlb connection rate >= 0.97 x direct | {r:.3} | {} |\n",
        verdict(r >= 0.97)
    ));
    md.push_str(&format!(
        "| mtlb bulk throughput >= 0.99 x direct | {t:.3} | {} |\n",
        verdict(t >= 0.99)
    ));
    md.push_str(&format!(
        "| mtlb BPF time per connection <= 1 us | {:.3} us | {} |\n",
        mc.0,
        verdict(mc.0 <= 1.0)
    ));
    md.push_str(&format!(
        "| mtlb <= 1/30 of HAProxy CPU per connection | {:.3} | {} |\n",
        mc.0 / hc.0,
        verdict(mc.0 / hc.0 <= 1.0 / 30.0)
    ));
    md.push_str(&format!(
        "| sk_lookup <= 150 ns per run at 64 replicas | {sl64:.0} ns | {} |\n",
        verdict(sl64 <= 150.0)
    ));
    md.push_str(&format!(
        "| zero failed connections on failover (mtlb) | {mtlb_fail} | {} |\n",
        verdict(mtlb_fail == 0)
    ));
    println!("{md}");
    let json = serde_json::json!({
        "reps": REPS,
        "rate": rate.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "p50_us": p50.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "p99_us": p99.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "bulk_mbs": tput.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "balancer_cpu_us_per_conn": cpu_conn.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "machine_cpu_us_per_conn": machine_conn.iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
        "failover": fo.iter().map(|(m, n, f)| serde_json::json!({"mode": m, "requests": n, "failed": f})).collect::<Vec<_>>(),
        "steering_cost": cost.iter().map(|(n, a, b, c, d)| serde_json::json!({"replicas": n, "sk_lookup_ns": a, "sk_lookup_runs_per_conn": b, "sock_ops_ns": c, "sock_ops_runs_per_conn": d})).collect::<Vec<_>>(),
    });
    let json_path = root.join("target/bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    let machine = format!(
        "{} vCPU, {}, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().map(|l| l
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string()))
            .map(|kb| format!("{} GiB RAM", kb.parse::<u64>().unwrap_or(0) / 1024 / 1024))
            .unwrap_or_default(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let doc = format!(
        "# Benchmarks\n\nCommand: `cargo xtask bench` (as root). Machine: {machine}. All traffic on loopback inside a network namespace; client, backends and balancers share the machine's cores. Each cell: median of {REPS} repetitions (min–max); modes interleaved in every repetition; failover and steering cost are single runs. \"direct\" connects to one backend while mtlb and HAProxy spread over two, so a ratio a little above 1 means the balancer cost nothing measurable here. Load generator and backends: threads of the xtask (Rust). Raw numbers: target/bench.json.\n\n{md}"
    );
    std::fs::write(root.join("BENCHMARKS.md"), doc)?;
    eprintln!("bench: wrote BENCHMARKS.md and {}", json_path.display());
    Ok(())
}
