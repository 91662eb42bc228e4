//! Phase `stop`: the seed's failover case under load, through mtlb and
//! through HAProxy, on the same replicas in one run (issue #21, point 1).
//!
//! Two official MTProxy servers run as Docker containers `mtproxy1` and
//! `mtproxy2` (`--network host`, the image `cargo xtask mtproxy-image`
//! builds, the command line of the mtproxy role), with the middle-proxy
//! stand-in (tests/fixtures/mtproxy/middle_proxy.py) as their Telegram.
//! Complete clients (`mtclient`) arrive at a fixed rate; after BEFORE_SECS
//! `docker stop mtproxy2`, STOPPED_SECS later `docker start mtproxy2`,
//! AFTER_SECS more of load. The modes alternate, REPS stops each.

use crate::{
    agent, anchors,
    docker::Dockerd,
    model::{Mode, Stop, StopRep, StopWindow},
    mtclient::{self, Outcome},
    stats,
};
use anyhow::{Context as _, bail};
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// New clients per second (issue #21 asks for at least 300).
pub const RATE: f64 = 400.0;
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
pub const BEFORE_SECS: f64 = 3.0;
/// Longer than HAProxy takes to mark a server DOWN with its default
/// checks (fall 3 × inter 2 s).
pub const STOPPED_SECS: f64 = 10.0;
/// Longer than either balancer takes to take the replica back (rise 2 ×
/// inter 2 s).
pub const AFTER_SECS: f64 = 10.0;
pub const REPS: usize = 5;

/// Stops per mode (MTLB_BENCH_STOP_REPS overrides, for a quick try).
fn reps_n() -> usize {
    std::env::var("MTLB_BENCH_STOP_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(REPS)
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const IMAGE: &str = "mtlb-bench/mtproxy:local";
/// The stand-in's port; the replicas' client ports are 10000 and 10001,
/// their stats ports 11000 and 11001 (the role's defaults).
const MIDDLE_PROXY_PORT: u16 = 20443;
/// HAProxy's frontend; the seed's is 443, which mtlb has here.
pub const HAPROXY: &str = "127.0.0.1:8446";

/// What the phase needs from outside the bench: the replica image's root
/// file system and a Python with the stand-in's dependencies.
pub struct Peers {
    pub rootfs: PathBuf,
    pub python: PathBuf,
    pub fixtures: PathBuf,
}

/// The official server as the mtproxy role starts it (`-M` workers 1, the
/// role's default; `-c` lowered as in the Docker test: the containers'
/// open-file limit is below the server's default 65536 + 16).
fn replica_command(i: u16) -> String {
    format!(
        "exec /usr/local/bin/mtproto-proxy -u nobody -H {} -p {} --http-stats -S {SECRET} \
         --aes-pwd /data/proxy-secret /data/proxy-multi.conf -M 1 -c 4096",
        10000 + i,
        11000 + i
    )
}

/// mtlb's config as the mtlb role writes it (roles/mtlb/templates/mtlb.toml.j2
/// with the role's defaults): every check setting at mtlb's default.
fn mtlb_config() -> String {
    format!(
        "replica_address = \"127.0.0.1\"\nbase_port = 10000\nreplica_uids = [0, 65534]\n\
         algorithm = \"leastconn\"\nsecret = \"dd{SECRET}\"\n\n[check]\nkind = \"mtproxy\"\nstats_base_port = 11000\n"
    )
}

/// HAProxy as the seed describes it: TCP mode, `balance leastconn`, a
/// health check per server. The seed gives no check timings, so they are
/// HAProxy's defaults (inter 2s, rise 2, fall 3), as are retries (3, to
/// the same server: no `option redispatch`). Left out: `transparent` and
/// `usesrc clientip` (TPROXY), which need policy routing and a TPROXY rule
/// for the replicas' answers to come back through HAProxy; they change
/// the source address HAProxy connects to a replica from, not which
/// replica it picks, its checks, or what a stopping replica does to the
/// connection. The stats socket replaces the seed's stats page (8404 is
/// mtlb's here).
fn haproxy_config(dir: &Path) -> String {
    format!(
        "global\n  maxconn 8000\n  stats socket {}/haproxy-stop.sock mode 600 level admin\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\
         frontend mtproxy\n  bind {HAPROXY}\n  default_backend mtproxy\n\
         backend mtproxy\n  balance leastconn\n  server mtp1 127.0.0.1:10000 check\n  server mtp2 127.0.0.1:10001 check\n",
        dir.display()
    )
}

fn secret_bytes() -> [u8; 16] {
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&SECRET[2 * i..2 * i + 2], 16).expect("hex");
    }
    k
}

/// The stand-in, stopped on drop.
struct MiddleProxy {
    child: Option<Child>,
}

impl MiddleProxy {
    fn start(p: &Peers, secret_file: &Path, dir: &Path) -> anyhow::Result<MiddleProxy> {
        let log = std::fs::File::create(dir.join("middle_proxy.log"))?;
        let mut c = Command::new(&p.python);
        c.arg(p.fixtures.join("middle_proxy.py"))
            .arg(MIDDLE_PROXY_PORT.to_string())
            .arg(secret_file)
            .args(["--lifetime", "3600"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        super::die_with_parent(&mut c);
        let mut child = c.spawn().context("starting middle_proxy.py")?;
        let mut first = String::new();
        let mut out = child.stdout.take().expect("piped");
        let mut b = [0u8; 1];
        while !first.ends_with('\n') && out.read(&mut b)? == 1 {
            first.push(b[0] as char);
        }
        if first.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("middle_proxy.py did not start: {first:?}");
        }
        Ok(MiddleProxy { child: Some(child) })
    }
}

impl Drop for MiddleProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            anchors::terminate(&mut c, Some(Duration::from_secs(5)));
        }
    }
}

/// `show stat` on HAProxy's stats socket: is server `name` UP?
fn haproxy_up(sock: &Path, name: &str) -> Option<bool> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"show stat\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    // pxname,svname,…: the 18th field is the status: "UP", "UP 1/3"
    // (failing, still given connections), "DOWN", "DOWN 1/2" (passing,
    // not yet given connections), "MAINT", …
    let f: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(&format!("mtproxy,{name},")))?
        .split(',')
        .collect();
    Some(f.get(17)?.starts_with("UP"))
}

/// The agent's /metrics: is backend `name` up?
fn mtlb_up(name: &str) -> Option<bool> {
    let m = crate::load::http_get(agent::STATS.parse().ok()?, "/metrics")?;
    let l = m
        .lines()
        .find(|l| l.starts_with("mtlb_backend_up{") && l.contains(&format!("\"{name}\"")))?;
    Some(l.trim_end().ends_with(" 1"))
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A thread that polls whether mtp2 is up, every 50 ms, with the time
/// (load clock) of each change.
struct Watch {
    stop: Arc<AtomicBool>,
    changes: Arc<Mutex<Vec<(f64, bool)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(t0: Instant, up: impl Fn() -> Option<bool> + Send + 'static) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stop.clone(), changes.clone());
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while !s.load(Ordering::Relaxed) {
                if let Some(u) = up()
                    && last != Some(u)
                {
                    last = Some(u);
                    c.lock()
                        .expect("lock")
                        .push((t0.elapsed().as_secs_f64(), u));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watch {
            stop,
            changes,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(f64, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.changes.lock().expect("lock"))
    }
}

type UpFn = Box<dyn Fn() -> Option<bool> + Send>;

/// The balancer of `mode` ready for a stop, both replicas UP in it: the
/// agent (started here, stopped when dropped) or HAProxy (running); the
/// address clients connect to; whether it shows mtp2 UP.
fn balancer(
    s: &super::Setup,
    mode: Mode,
    hsock: &Path,
) -> anyhow::Result<(Option<agent::Agent>, SocketAddr, UpFn)> {
    if mode == Mode::Mtlb {
        // Agent::start returns once /metrics shows both UP.
        let a = s.agent_with(2, &mtlb_config(), false)?;
        return Ok((
            Some(a),
            "127.0.0.1:443".parse()?,
            Box::new(|| mtlb_up("mtp2")),
        ));
    }
    wait_until(
        "HAProxy shows mtp1 and mtp2 UP",
        Duration::from_secs(30),
        || haproxy_up(hsock, "mtp1") == Some(true) && haproxy_up(hsock, "mtp2") == Some(true),
    )?;
    let sock = hsock.to_path_buf();
    Ok((
        None,
        HAPROXY.parse()?,
        Box::new(move || haproxy_up(&sock, "mtp2")),
    ))
}

fn load_secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64().max(1e-3)
}

/// The clients of a stop by when they started: done before `docker
/// stop` was issued, started before it and still under way then (a
/// client takes a few ms, more on a busy machine), started while `docker
/// stop` ran, before the kernel delivered SIGTERM to mtproxy2's server
/// (`signal`; docker's own path to the signal takes tens of ms) and after
/// it, while mtproxy2 was stopped, from `docker start` on. Without a
/// recorded signal, every client of the `docker stop` window counts as
/// before it.
fn windows(
    records: &[mtclient::Record],
    stop: (f64, f64),
    signal: Option<f64>,
    start: (f64, f64),
) -> Vec<StopWindow> {
    let names = [
        "done before the stop",
        "under way at `docker stop`",
        "started during `docker stop`, before SIGTERM",
        "started during `docker stop`, after SIGTERM",
        "stopped",
        "from `docker start` on",
    ];
    let mut w: Vec<StopWindow> = names
        .iter()
        .map(|n| StopWindow {
            name: n.to_string(),
            clients: 0,
            failed: BTreeMap::new(),
        })
        .collect();
    for c in records {
        let i = if c.at < stop.0 {
            usize::from(c.at + c.ms / 1e3 >= stop.0)
        } else if c.at < stop.1 {
            if signal.is_some_and(|sig| c.at >= sig) {
                3
            } else {
                2
            }
        } else if c.at < start.0 {
            4
        } else {
            5
        };
        w[i].clients += 1;
        if c.outcome != Outcome::Served {
            *w[i].failed.entry(c.outcome).or_default() += 1;
        }
    }
    w
}

/// The kernel's own record of the SIGTERMs sent on this machine: a tracefs
/// instance of the bench's own with the `signal:signal_generate` event,
/// filtered to SIGTERM, on the monotonic clock. It tells when `docker
/// stop`'s signal reached mtproxy2's server, for either balancer, without
/// asking mtlb.
struct SigtermLog {
    dir: PathBuf,
}

impl SigtermLog {
    fn start() -> anyhow::Result<Self> {
        let root = Path::new("/sys/kernel/tracing");
        if !root.join("instances").exists() {
            let ok = Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(root)
                .status()?
                .success();
            anyhow::ensure!(ok, "cannot mount tracefs at {}", root.display());
        }
        let dir = root
            .join("instances")
            .join(format!("mtlb-bench-{}", std::process::id()));
        // mkdir makes a trace instance, with a buffer of its own.
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = SigtermLog { dir };
        let ev = log.dir.join("events/signal/signal_generate");
        std::fs::write(log.dir.join("trace_clock"), "mono")?;
        std::fs::write(ev.join("filter"), "sig == 15")?;
        std::fs::write(ev.join("enable"), "1")?;
        Ok(log)
    }

    /// When the first SIGTERM to `pid` recorded since the last call was
    /// generated, in seconds of CLOCK_MONOTONIC; the buffer is emptied.
    fn sigterm_to(&self, pid: u32) -> Option<f64> {
        let text = std::fs::read_to_string(self.dir.join("trace")).ok()?;
        let _ = std::fs::write(self.dir.join("trace"), "");
        // "  dockerd-123 [001] d..2.  5432.123456: signal_generate: sig=15 … pid=4321 grp=1 res=0"
        text.lines().find_map(|l| {
            let (head, rest) = l.split_once(": signal_generate: ")?;
            rest.split_whitespace()
                .any(|f| f == format!("pid={pid}"))
                .then(|| head.split_whitespace().last()?.parse::<f64>().ok())?
        })
    }
}

impl Drop for SigtermLog {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/signal/signal_generate/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// CLOCK_MONOTONIC now, in seconds: the clock of trace timestamps (and of
/// `Instant`).
fn monotonic_secs() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

/// Runs `docker args…`; when it was issued and when it returned (load
/// clock).
fn docker_timed(d: &Dockerd, args: &[&str], t0: Instant) -> anyhow::Result<(f64, f64)> {
    let a = t0.elapsed().as_secs_f64();
    d.docker(args)?;
    Ok((a, t0.elapsed().as_secs_f64()))
}

pub(crate) fn run(s: &super::Setup, p: &Peers) -> anyhow::Result<Stop> {
    let started = Instant::now();
    let dir = s.dir.join("stop");
    std::fs::create_dir_all(&dir)?;
    // Telegram's proxy secret and config as the role pins them, mounted
    // at /data in every replica.
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let secret_file = data.join("proxy-secret");
    std::fs::write(
        &secret_file,
        (0..128).map(|_| rand::random::<u8>()).collect::<Vec<_>>(),
    )?;
    std::fs::write(
        data.join("proxy-multi.conf"),
        format!("default 2;\nproxy_for 2 127.0.0.1:{MIDDLE_PROXY_PORT};\n"),
    )?;
    let _middle = MiddleProxy::start(p, &secret_file, &dir)?;
    eprintln!("bench: stop: starting dockerd and the replicas");
    let d = Dockerd::start(
        &dir.join("docker"),
        Duration::from_secs(30),
        super::die_with_parent,
    )?;
    let rootfs = p.rootfs.to_string_lossy();
    d.docker(&["import", "--change", "WORKDIR /data", &rootfs, IMAGE])?;
    let volume = format!("{}:/data:ro", data.display());
    for i in 0..2u16 {
        let name = format!("mtproxy{}", i + 1);
        let cmd = replica_command(i);
        d.docker(&[
            "run",
            "--detach",
            "--name",
            &name,
            "--network",
            "host",
            "--restart",
            "always",
            "--entrypoint",
            "/bin/sh",
            "--volume",
            &volume,
            IMAGE,
            "-c",
            &cmd,
        ])?;
    }
    let hcfg_text = haproxy_config(&dir);
    let haproxy = anchors::run_haproxy(s.ns, &dir, "haproxy-stop.cfg", &hcfg_text, HAPROXY)?;
    let hsock = dir.join("haproxy-stop.sock");
    let secret = secret_bytes();
    let mut reps = Vec::new();
    let n = reps_n();
    for rep in 0..n {
        for mode in [Mode::Mtlb, Mode::Haproxy] {
            eprintln!("bench: stop {}/{n} through {}", rep + 1, mode.label());
            let r = balancer(s, mode, &hsock).and_then(|(agent, target, up)| {
                let r = one_stop(&d, s.ns_ino, mode, rep, target, secret, up);
                drop(agent);
                r
            });
            let r = r.with_context(|| format!("stop {} through {}", rep + 1, mode.label()))?;
            eprintln!(
                "bench: {} clients at {:.0}/s, failed: {}",
                r.clients,
                r.achieved_rate,
                r.windows
                    .iter()
                    .map(|w| format!("{} {}", w.name, w.failed_total()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            reps.push(r);
        }
    }
    drop(haproxy);
    drop(d);
    Ok(Stop {
        date: None,
        commit: String::new(),
        dirty: false,
        mtlb_sha256: None,
        secs: started.elapsed().as_secs_f64(),
        rate: RATE,
        client_timeout_secs: CLIENT_TIMEOUT.as_secs_f64(),
        before_secs: BEFORE_SECS,
        stopped_secs: STOPPED_SECS,
        after_secs: AFTER_SECS,
        replica_command: replica_command(1),
        mtlb_config: mtlb_config(),
        // The socket's path is the run's temp dir: not a setting.
        haproxy_config: haproxy_config(Path::new("<bench dir>")),
        reps,
    })
}

fn one_stop(
    d: &Dockerd,
    ns_ino: u64,
    mode: Mode,
    rep: usize,
    target: SocketAddr,
    secret: [u8; 16],
    up: UpFn,
) -> anyhow::Result<StopRep> {
    let f0 = stats::foreign_cpu(ns_ino);
    let m0 = stats::machine_cpu();
    let load = mtclient::Paced::start(target, secret, RATE, CLIENT_TIMEOUT);
    let t0 = Instant::now() - Duration::from_secs_f64(load.now());
    let watch = Watch::start(t0, up);
    let sleep_until = |t: f64| {
        let now = load.now();
        if t > now {
            std::thread::sleep(Duration::from_secs_f64(t - now));
        }
    };
    let sigterms = SigtermLog::start();
    let steps = (|| {
        sleep_until(BEFORE_SECS);
        let pid: u32 = d
            .docker(&["inspect", "-f", "{{.State.Pid}}", "mtproxy2"])?
            .trim()
            .parse()
            .context("mtproxy2's pid")?;
        let stop = docker_timed(d, &["stop", "mtproxy2"], t0)?;
        // On the load clock: monotonic seconds less t0's.
        let t0_mono = monotonic_secs() - t0.elapsed().as_secs_f64();
        let signal = sigterms
            .as_ref()
            .ok()
            .and_then(|l| l.sigterm_to(pid))
            .map(|at| at - t0_mono);
        sleep_until(stop.1 + STOPPED_SECS);
        let start = docker_timed(d, &["start", "mtproxy2"], t0)?;
        sleep_until(start.1 + AFTER_SECS);
        Ok::<_, anyhow::Error>((stop, signal, start))
    })();
    let records = load.finish();
    let changes = watch.finish();
    let secs = load_secs(t0);
    let foreign = stats::foreign_delta(&f0, &stats::foreign_cpu(ns_ino));
    let share = |cpu: f64| cpu / secs / super::cpus() * 100.0;
    let (stop, signal, start) = steps?;
    let records = records?;
    let down_seen_at = changes
        .iter()
        .find(|(t, u)| *t >= stop.0 && !u)
        .map(|x| x.0);
    let up_seen_at = changes
        .iter()
        .find(|(t, u)| *t >= start.0 && *u)
        .map(|x| x.0);
    let end_at = records.last().map_or(0.0, |r| r.at);
    let windows = windows(&records, stop, signal, start);
    let mut served: Vec<f64> = records
        .iter()
        .filter(|c| c.outcome == Outcome::Served)
        .map(|c| c.ms)
        .collect();
    let mut failed: Vec<f64> = records
        .iter()
        .filter(|c| c.outcome != Outcome::Served)
        .map(|c| c.ms)
        .collect();
    let q = |v: &mut Vec<f64>, x: f64| (!v.is_empty()).then(|| crate::stats::quantile(v, x));
    Ok(StopRep {
        mode,
        rep,
        clients: records.len() as u64,
        achieved_rate: if end_at > 0.0 {
            (records.len() - 1) as f64 / end_at
        } else {
            0.0
        },
        stop_at: stop.0,
        signal_at: signal,
        stopped_at: stop.1,
        start_at: start.0,
        started_at: start.1,
        end_at,
        down_seen_at,
        up_seen_at,
        windows,
        served_ms_p50: q(&mut served, 0.5),
        served_ms_p99: q(&mut served, 0.99),
        served_ms_max: q(&mut served, 1.0),
        failed_ms_p50: q(&mut failed, 0.5),
        failed_ms_max: q(&mut failed, 1.0),
        machine_busy_pct: share(stats::machine_cpu() - m0),
        foreign_pct: share(foreign),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtclient::Record;

    #[test]
    fn a_client_under_way_at_the_stop_is_counted_apart() {
        let r = |at: f64, ms: f64, outcome| Record { at, outcome, ms };
        let records = [
            r(1.0, 2.0, Outcome::Served),
            // Started 10 ms before `docker stop`, cut 40 ms later.
            r(2.99, 50.0, Outcome::Closed),
            r(3.1, 30.0, Outcome::Reset),
            // After the SIGTERM (3.15), before `docker stop` returned.
            r(3.17, 1.0, Outcome::Served),
            r(3.2, 1.0, Outcome::Served),
            r(5.0, 3000.0, Outcome::Closed),
            r(13.5, 1.0, Outcome::Served),
        ];
        let w = windows(&records, (3.0, 3.2), Some(3.15), (13.2, 13.4));
        let got: Vec<(u64, u64)> = w.iter().map(|w| (w.clients, w.failed_total())).collect();
        assert_eq!(got, [(1, 0), (1, 1), (1, 1), (1, 0), (2, 1), (1, 0)]);
        assert_eq!(w[2].failed.get(&Outcome::Reset), Some(&1));
        // Without a recorded signal, the whole `docker stop` window is
        // "before".
        let w = windows(&records, (3.0, 3.2), None, (13.2, 13.4));
        assert_eq!((w[2].clients, w[3].clients), (2, 0));
    }
}
