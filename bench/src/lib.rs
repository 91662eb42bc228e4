//! `cargo xtask bench`: mtlb against direct connections, HAProxy, nginx
//! `stream` and IPVS, in one run, on the same backends, in a network
//! namespace of its own (loopback only), as issue #11 asks.
//!
//! Phases (each bounded in count and time):
//! 0. held: 1k, 10k, 100k, 1M connections held open through mtlb (first, so
//!    that no TIME_WAIT sockets of the load phases are about).
//! 1. rounds: 11 interleaved rounds; each runs every mode once, direct
//!    and mtlb back to back (`round_order`): connection rate (CLIENT_THREADS
//!    threads of connect + 1 byte + 1 byte + close for RATE_SECS), connect
//!    latency, two bulk streams at once for BULK_SECS; CPU of the balancer process,
//!    of the whole machine, and BPF run time of mtlb's programs. The agent
//!    runs only for the mtlb mode (started and stopped around it), so that
//!    direct and the anchors pay nothing of mtlb's sock_ops.
//! 2. failover: ~2000 requests/s for 3 s through each balancer, one
//!    backend killed after 1 s.
//! 3. profile: `bpftool prog profile` and `perf record` under mtlb load.
//! 4. micro: `mtlb_steer` alone at 2, 16 and 64 replicas, run by the
//!    kernel on a synthetic lookup (`micro.rs`), no client traffic.
//! 5. steering: BPF cost at 2, 16 and 64 replicas.
//! 6. stop: official MTProxy replicas in Docker under a paced load of
//!    complete clients, `docker stop mtproxy2` and back, through mtlb and
//!    through HAProxy as the seed configures it (`stop.rs`).
//!
//! Backends are separate processes (`xtask bench-backend`) in a cgroup of
//! their own, `<cgroup2>/mtlb-bench-<pid>/replicas`, given to mtlb as
//! `replica_cgroup` unless MTLB_BENCH_REPLICA_CGROUP=0. The clients are
//! threads of this process, outside that cgroup.

mod agent;
mod anchors;
pub mod backend;
mod bpf;
pub mod docker;
mod held;
mod load;
pub mod micro;
pub use load::hold_main;
pub mod model;
pub mod mtclient;
mod profile;
pub mod report;
mod stats;
pub mod stop;
mod stopview;
mod summary;

use anyhow::{Context as _, bail};
use backend::{Backend, Cgroup};
use model::{Failover, HeldLevel, Meta, Mode, Profile, RoundRow, Run, SteeringRaw, SteeringRep};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// Interleaved rounds (MTLB_BENCH_ROUNDS overrides, for a quick try).
fn rounds_n() -> usize {
    std::env::var("MTLB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(11)
}
pub const RATE_SECS: f64 = 2.0;
pub const BULK_SECS: f64 = 1.5;
pub const LATENCY_N: usize = 1000;
/// (replicas, algorithm) of the micro and steering phases: the exact scan
/// at each count, and random(2) where it differs most from it.
const PICKS: &[(u16, &str)] = &[
    (2, "leastconn"),
    (16, "leastconn"),
    (64, "leastconn"),
    (64, "random"),
];
pub const STEERING_REPS: usize = 3;
/// Test runs of the micro phase at each replica count, and the program
/// runs in each.
pub const MICRO_REPS: usize = 7;
pub const MICRO_REPEAT: u32 = 200_000;
const FAILOVER_RATE: f64 = 2000.0;
/// Share of the machine that processes outside the bench may use during a
/// rate run before it is run again, and how many runs at most.
pub const FOREIGN_MAX: f64 = 0.05;
const ATTEMPTS: usize = 3;

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

pub const PHASES: &[&str] = &[
    "held", "rounds", "failover", "profile", "micro", "steering", "stop",
];

const BACKEND_PORTS: [u16; 2] = [10000, 10001];

/// Makes a child get SIGTERM when the thread that spawned it dies (the
/// bench spawns every child from its main thread), so nothing outlives
/// the bench, whatever stops it.
pub fn die_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

fn replica_cgroup_enabled() -> bool {
    std::env::var("MTLB_BENCH_REPLICA_CGROUP").map_or(true, |v| v.trim() != "0")
}

/// The namespace, the temp dir and the sysctls of a run; undone on drop.
struct Env {
    ns: String,
    dir: PathBuf,
    home_ns: std::fs::File,
    ns_ino: u64,
    stats: RunStats,
}

impl Env {
    fn create() -> anyhow::Result<Env> {
        let ns = format!("mtlb-bench-{}", std::process::id());
        let dir = std::env::temp_dir().join(&ns);
        std::fs::create_dir_all(&dir)?;
        let home_ns = std::fs::File::open("/proc/thread-self/ns/net")?;
        if !Command::new("ip")
            .args(["netns", "add", &ns])
            .status()?
            .success()
        {
            bail!("ip netns add {ns} failed");
        }
        let mut env = Env {
            ns: ns.clone(),
            dir,
            home_ns,
            ns_ino: 0,
            stats: RunStats::on()?,
        };
        let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
        env.ns_ino = file.metadata()?.ino();
        // The main thread (which spawns every child and measures) lives in
        // the namespace from here on.
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()?;
        // The namespace's own sysctls (net.* are per namespace).
        for (k, v) in [
            ("net/ipv4/ip_local_port_range", "1024 65535"),
            // Not the balanced port, the anchors' or the backends'.
            ("net/ipv4/ip_local_reserved_ports", "443,8000-10199"),
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/core/somaxconn", "65535"),
            ("net/ipv4/tcp_max_syn_backlog", "65535"),
        ] {
            std::fs::write(format!("/proc/sys/{k}"), v).with_context(|| format!("sysctl {k}"))?;
        }
        raise_nofile();
        // Orphaned descendants (a killed backend's workers) come to this
        // process, which reaps them.
        // SAFETY: prctl with an int argument.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        Ok(env)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = nix::sched::setns(self.home_ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
        // An agent that died without cleaning up leaves pinned links
        // (sock_ops on the cgroup root): remove them.
        let pins = Path::new("/sys/fs/bpf/mtlb").join(self.ns_ino.to_string());
        if self.ns_ino != 0 && pins.exists() {
            let _ = std::fs::remove_dir_all(&pins);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// RLIMIT_NOFILE as high as this process may set it (children inherit
/// it): 400k, or the hard limit when raising that is not permitted (no
/// CAP_SYS_RESOURCE, as in some sandboxes). Held connections and
/// backends are spread over processes under it.
fn raise_nofile() {
    let want = libc::rlimit {
        rlim_cur: 400_000,
        rlim_max: 400_000,
    };
    // SAFETY: setrlimit/getrlimit with valid structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            let mut cur = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
            cur.rlim_cur = cur.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
        }
    }
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The kernel's run-time statistics (run_time_ns, run_cnt) for the run:
/// on for the phases that read them, off while the micro phase times test
/// runs (with them on, each run also pays their two clock reads, a fixed
/// ~75 ns that would hide the program's own cost). The sysctl is restored
/// on drop.
struct RunStats {
    before: Option<String>,
    /// BPF_ENABLE_STATS descriptor: stats stay on while it is open, even
    /// if something else on the host writes 0 to the sysctl (one global
    /// switch). Taken while they are paused.
    fd: std::sync::Mutex<Option<std::os::fd::OwnedFd>>,
}

impl RunStats {
    fn on() -> anyhow::Result<RunStats> {
        let before = std::fs::read_to_string(BPF_STATS_SYSCTL).ok();
        std::fs::write(BPF_STATS_SYSCTL, "1").context("kernel.bpf_stats_enabled")?;
        Ok(RunStats {
            before,
            fd: std::sync::Mutex::new(bpf_enable_stats()),
        })
    }

    /// Stats off until the guard drops (unless another process keeps them
    /// on: the micro phase checks).
    fn paused(&self) -> anyhow::Result<StatsPaused<'_>> {
        drop(self.fd.lock().expect("stats lock").take());
        std::fs::write(BPF_STATS_SYSCTL, "0").context("kernel.bpf_stats_enabled")?;
        Ok(StatsPaused(self))
    }
}

impl Drop for RunStats {
    fn drop(&mut self) {
        if let Some(v) = &self.before {
            let _ = std::fs::write(BPF_STATS_SYSCTL, v.trim());
        }
    }
}

struct StatsPaused<'a>(&'a RunStats);

impl Drop for StatsPaused<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, "1");
        *self.0.fd.lock().expect("stats lock") = bpf_enable_stats();
    }
}

/// bpf(BPF_ENABLE_STATS, BPF_STATS_RUN_TIME).
fn bpf_enable_stats() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .inspect_err(|e| {
            eprintln!("bench: BPF_ENABLE_STATS failed ({e}); relying on kernel.bpf_stats_enabled")
        })
        .ok()
}

/// mtlb programs attached to the cgroup2 root before the bench starts
/// any agent (another agent on the host, or one left behind): they run on
/// every socket the bench makes.
fn other_mtlb_programs() -> Vec<String> {
    let Some(m) = backend::cgroup2_mount() else {
        return Vec::new();
    };
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&m)
        .output();
    let Ok(out) = out else { return Vec::new() };
    #[derive(serde::Deserialize)]
    struct Attached {
        id: u64,
        #[serde(default)]
        name: String,
    }
    let attached: Vec<Attached> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    attached
        .into_iter()
        .filter(|p| p.name.starts_with("mtlb_"))
        .map(|p| format!("{} (id {})", p.name, p.id))
        .collect()
}

/// The soft RLIMIT_NOFILE of this process.
pub fn nofile_limit() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    cur.rlim_cur
}

/// Namespaces, cgroups and temp dirs of earlier runs whose process is gone
/// (killed before it could clean up).
fn cleanup_stale() {
    let dead = |name: &str| {
        name.strip_prefix("mtlb-bench-")
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if dead(&n) {
                eprintln!("bench: removing stale namespace {n}");
                let _ = Command::new("ip").args(["netns", "del", &n]).status();
            }
        }
    }
    if let Some(m) = backend::cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(&m)
    {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if dead(&n) {
                let top = e.path();
                let rep = top.join("replicas");
                let _ = std::fs::write(rep.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(200));
                let _ = std::fs::remove_dir(&rep);
                let _ = std::fs::remove_dir(&top);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            if dead(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// What every phase needs.
struct Setup<'a> {
    mtlb: &'a Path,
    ns: &'a str,
    dir: &'a Path,
    cg: &'a Cgroup,
    use_cg: bool,
    ns_ino: u64,
    stats: &'a RunStats,
}

impl Setup<'_> {
    fn agent(&self, replicas: u16) -> anyhow::Result<agent::Agent> {
        self.agent_with(replicas, "", self.use_cg)
    }

    /// An agent with `extra` config, in the backends' cgroup when `use_cg`.
    fn agent_with(&self, replicas: u16, extra: &str, use_cg: bool) -> anyhow::Result<agent::Agent> {
        let rel = self.cg.relative();
        agent::Agent::start(&agent::AgentOpts {
            mtlb: self.mtlb,
            ns: self.ns,
            dir: self.dir,
            replicas,
            replica_cgroup: use_cg.then_some(rel.as_str()),
            extra,
        })
        .map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            if use_cg && log.contains("replica_cgroup") {
                e.context(format!(
                    "this mtlb does not take `replica_cgroup` yet; run with MTLB_BENCH_REPLICA_CGROUP=0\n{log}"
                ))
            } else {
                e.context(log)
            }
        })
    }

    fn backend(&self, port: u16) -> anyhow::Result<Backend> {
        Backend::start(port, Some(&self.cg.replicas), 1)
    }
}

pub use report::rewrite as report_only;

/// The phases `--only` names (all when None), checked.
pub fn phases(only: Option<&str>) -> anyhow::Result<Vec<&str>> {
    let phases: Vec<&str> = match only {
        Some(o) => o.split(',').map(str::trim).collect(),
        None => PHASES.to_vec(),
    };
    for p in &phases {
        if !PHASES.contains(p) {
            bail!("unknown phase {p}; phases: {}", PHASES.join(", "));
        }
    }
    Ok(phases)
}

/// Runs the phases `only` names (all when None). `stop_peers` is called
/// when the stop phase runs (it may build the replica image); its error
/// is the phase's. `merge` (the stop phase alone): its figures go into
/// the committed record and BENCHMARKS.md, the other phases' stay.
pub fn run(
    root: &Path,
    only: Option<&str>,
    merge: bool,
    stop_peers: &dyn Fn() -> anyhow::Result<stop::Peers>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let phases = phases(only)?;
    if merge && phases != ["stop"] {
        bail!("--merge takes the stop phase alone (--only stop)");
    }
    let mtlb = root.join("target/release/mtlb");
    cleanup_stale();
    let env = Env::create()?;
    let cg = Cgroup::create()?;
    let setup = Setup {
        mtlb: &mtlb,
        ns: &env.ns,
        dir: &env.dir,
        cg: &cg,
        use_cg: replica_cgroup_enabled(),
        ns_ino: env.ns_ino,
        stats: &env.stats,
    };
    let other_mtlb = other_mtlb_programs();
    if !other_mtlb.is_empty() {
        eprintln!(
            "bench: warning: mtlb programs of another agent are attached on this host ({}); they run on the bench's sockets too",
            other_mtlb.join(", ")
        );
    }
    let use_cg = setup.use_cg;
    let result = measure(&setup, &phases, stop_peers);
    let cg_rel = cg.relative();
    drop(cg);
    drop(env);
    let m = result?;
    let meta = Meta {
        other_mtlb_programs_at_start: other_mtlb,
        ..meta(root, started, &phases, use_cg.then_some(cg_rel))
    };
    let mut errors = m.errors;
    let rounds = m.rounds.as_deref().and_then(|rows| {
        summary::rounds(rows, meta.cpus)
            .map_err(|e| errors.insert("rounds".into(), format!("{e:#}")))
            .ok()
    });
    let steering = m.steering.as_deref().and_then(|st| {
        summary::steering(st)
            .map_err(|e| errors.insert("steering".into(), format!("{e:#}")))
            .ok()
    });
    let stop = m.stop.map(|st| model::Stop {
        date: meta.date.clone(),
        commit: meta.commit.clone(),
        dirty: meta.dirty,
        mtlb_sha256: meta.mtlb_sha256.clone(),
        ..st
    });
    let run = Run {
        meta,
        not_run: m.not_run,
        errors,
        rounds,
        failover: m.failover,
        steering,
        micro: m.micro,
        held: m.held,
        profile: m.profile,
        stop,
        stop_earlier: None,
        previous: None,
        reasons: BTreeMap::new(),
        raw: Some(model::Raw {
            rounds: m.rounds.unwrap_or_default(),
            steering: m.steering.unwrap_or_default(),
        }),
    };
    // Every phase, or every phase but the stop phase (Docker and the
    // official server; its committed figures are kept): a full run.
    let full = phases.len() == PHASES.len()
        || (phases.len() + 1 == PHASES.len() && !phases.contains(&"stop"));
    if merge {
        report::merge_stop(root, run)
    } else {
        report::write(root, run, full)
    }
}

fn meta(root: &Path, started: Instant, phases: &[&str], cg: Option<String>) -> Meta {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let t = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                t.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    let stdout = |c: &mut Command| {
        c.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .ok()
    };
    Meta {
        phases: phases.iter().map(|p| p.to_string()).collect(),
        secs: started.elapsed().as_secs_f64(),
        date: stdout(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        commit: git(&["rev-parse", "--short", "HEAD"]),
        // mtlb's own sources (not the bench's) differ from the commit.
        dirty: !git(&[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            "mtlb-common",
            "mtlb-ebpf",
            "mtlb-userspace",
            "Cargo.lock",
        ])
        .is_empty(),
        mtlb_sha256: stdout(Command::new("sha256sum").arg(root.join("target/release/mtlb")))
            .and_then(|o| o.split_whitespace().next().map(str::to_string)),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_gib,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        replica_cgroup: cg,
        rounds: rounds_n(),
        rate_secs: RATE_SECS,
        bulk_secs: BULK_SECS,
        client_threads: load::CLIENT_THREADS,
        bulk_streams: load::BULK_STREAMS,
        latency_connects: LATENCY_N,
        foreign_max_pct: FOREIGN_MAX * 100.0,
        steering_reps: STEERING_REPS,
        nofile_limit: Some(nofile_limit()),
        haproxy: version("haproxy", "-v"),
        nginx: version("nginx", "-v"),
        ipvsadm: Some(version("ipvsadm", "--version")),
        bpftool: version("bpftool", "--version"),
        perf: version("perf", "--version"),
        other_mtlb_programs_at_start: Vec::new(),
    }
}

/// What the phases measured, before the summaries.
#[derive(Default)]
struct Measured {
    errors: BTreeMap<String, String>,
    not_run: BTreeMap<Mode, String>,
    held: Option<Vec<HeldLevel>>,
    rounds: Option<Vec<RoundRow>>,
    failover: Option<Vec<Failover>>,
    profile: Option<Profile>,
    steering: Option<Vec<SteeringRaw>>,
    micro: Option<Vec<model::MicroRaw>>,
    stop: Option<model::Stop>,
}

impl Measured {
    /// A phase's result, or its error (the other phases still run).
    fn record<T>(&mut self, phase: &str, r: anyhow::Result<T>) -> Option<T> {
        r.map_err(|e| {
            eprintln!("bench: phase {phase} failed: {e:#}");
            self.errors.insert(phase.into(), format!("{e:#}"));
        })
        .ok()
    }
}

fn measure(
    s: &Setup,
    phases: &[&str],
    stop_peers: &dyn Fn() -> anyhow::Result<stop::Peers>,
) -> anyhow::Result<Measured> {
    let mut out = measure_backends(s, phases)?;
    // Last: its replicas take the ports the other phases' backends hold.
    if phases.contains(&"stop") {
        eprintln!("bench: stop");
        let r = stop_peers().and_then(|p| stop::run(s, &p));
        out.stop = out.record("stop", r);
    }
    Ok(out)
}

/// The phases on the bench's own backends.
fn measure_backends(s: &Setup, phases: &[&str]) -> anyhow::Result<Measured> {
    let mut out = Measured::default();
    let want = |p: &str| phases.contains(&p);
    if want("held") {
        // Backends with enough processes for the top level under the
        // descriptor limit (leastconn puts about half on each). First, so
        // that no TIME_WAIT sockets of the other phases are about.
        let top = held::LEVELS.last().copied().unwrap_or(0) as u64;
        let workers = (top * 6 / 10 / nofile_limit().saturating_sub(500).max(1000) + 1) as u32;
        let r = (|| {
            let _hb = [
                Backend::start(BACKEND_PORTS[0], Some(&s.cg.replicas), workers)?,
                Backend::start(BACKEND_PORTS[1], Some(&s.cg.replicas), workers)?,
            ];
            let a = s.agent(2)?;
            held::run(&a, s.dir)
        })();
        out.held = out.record("held", r);
    }
    if !["rounds", "failover", "profile", "micro", "steering"]
        .iter()
        .any(|p| want(p))
    {
        return Ok(out);
    }
    let started = (|| {
        Ok::<_, anyhow::Error>(vec![
            s.backend(BACKEND_PORTS[0])?,
            s.backend(BACKEND_PORTS[1])?,
        ])
    })();
    let mut backends = match started {
        Ok(b) => b,
        Err(e) => {
            for p in ["rounds", "failover", "profile", "micro", "steering"] {
                if want(p) {
                    out.record::<()>(p, Err(anyhow::anyhow!("the backends did not start: {e:#}")));
                }
            }
            return Ok(out);
        }
    };
    if want("rounds") || want("failover") {
        let haproxy = anchors::start_haproxy(s.ns, s.dir).map_err(|e| format!("{e:#}"));
        let nginx = anchors::start_nginx(s.ns, s.dir).map_err(|e| format!("{e:#}"));
        let ipvs = anchors::Ipvs::start(s.ns);
        for (m, r) in [
            (Mode::Haproxy, haproxy.as_ref().err()),
            (Mode::Nginx, nginx.as_ref().err()),
            (Mode::Ipvs, ipvs.as_ref().err()),
        ] {
            if let Some(e) = r {
                eprintln!("bench: {} not run: {e}", m.label());
                out.not_run.insert(m, e.clone());
            }
        }
        let an = Anchors {
            haproxy: haproxy.ok(),
            nginx: nginx.ok(),
            ipvs: ipvs.is_ok(),
        };
        if want("rounds") {
            let r = rounds(s, &an);
            out.rounds = out.record("rounds", r);
        }
        if want("failover") {
            let r = failover(s, &mut backends, &an);
            out.failover = out.record("failover", r);
        }
        drop(an);
        drop(ipvs);
    }
    if want("profile") {
        eprintln!("bench: profile");
        let r = s.agent(2).map(|a| {
            let progs = bpf::Progs::find(&a.pin_dir);
            profile::run(&progs, s.dir, cpus() as usize)
        });
        out.profile = out.record("profile", r);
    }
    if want("micro") {
        let r = micro(s);
        out.micro = out.record("micro", r);
    }
    if want("steering") {
        let r = steering(s);
        out.steering = out.record("steering", r);
    }
    drop(backends);
    Ok(out)
}

struct Anchors {
    haproxy: Option<anchors::Proc>,
    nginx: Option<anchors::Proc>,
    ipvs: bool,
}

impl Anchors {
    fn available(&self, mode: Mode) -> bool {
        match mode {
            Mode::Haproxy => self.haproxy.is_some(),
            Mode::Nginx => self.nginx.is_some(),
            Mode::Ipvs => self.ipvs,
            Mode::Direct | Mode::Mtlb => true,
        }
    }

    fn cpu(&self, mode: Mode) -> Option<f64> {
        match mode {
            Mode::Haproxy => self.haproxy.as_ref().map(|p| p.cpu()),
            Mode::Nginx => self.nginx.as_ref().map(|p| p.cpu()),
            _ => None,
        }
    }
}

fn addr(a: &str) -> SocketAddr {
    a.parse().expect("address")
}

fn backend_addrs() -> Vec<SocketAddr> {
    BACKEND_PORTS
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect()
}

fn mode_targets(mode: Mode) -> Vec<SocketAddr> {
    match mode {
        Mode::Direct => backend_addrs(),
        Mode::Mtlb => vec![addr("127.0.0.1:443")],
        Mode::Haproxy => vec![addr(anchors::HAPROXY)],
        Mode::Nginx => vec![addr(anchors::NGINX)],
        Mode::Ipvs => vec![addr(anchors::IPVS)],
    }
}

/// The order of round `r`: direct and mtlb back to back, which of them
/// first alternating, so that each paired ratio compares two runs made
/// moments apart (the machine drifts by more than the gap being judged
/// over a round); the pair and the other modes move through the positions
/// from round to round.
fn round_order(modes: &[Mode], r: usize) -> Vec<Mode> {
    let paired = [Mode::Direct, Mode::Mtlb];
    if !paired.iter().all(|m| modes.contains(m)) {
        return (0..modes.len())
            .map(|i| modes[(i + r) % modes.len()])
            .collect();
    }
    let mut others: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| !paired.contains(m))
        .collect();
    if !others.is_empty() {
        let k = r % others.len();
        others.rotate_left(k);
    }
    let at = (r / 2) % (others.len() + 1);
    let pair = if r.is_multiple_of(2) {
        paired
    } else {
        [Mode::Mtlb, Mode::Direct]
    };
    others.splice(at..at, pair);
    others
}

/// Phase 1: interleaved rounds.
fn rounds(s: &Setup, an: &Anchors) -> anyhow::Result<Vec<RoundRow>> {
    let modes: Vec<Mode> = Mode::ALL.into_iter().filter(|m| an.available(*m)).collect();
    let mut rows = Vec::new();
    let n = rounds_n();
    for r in 0..n {
        let order = round_order(&modes, r);
        eprintln!(
            "bench: round {}/{n}: {}",
            r + 1,
            order
                .iter()
                .map(|m| m.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (pos, &mode) in order.iter().enumerate() {
            let targets = mode_targets(mode);
            let agent = if mode == Mode::Mtlb {
                let a = s.agent(2)?;
                // Let its start-up work settle.
                std::thread::sleep(Duration::from_secs(1));
                Some(a)
            } else {
                None
            };
            let progs = agent
                .as_ref()
                .map(|a| bpf::Progs::find(&a.pin_dir))
                .unwrap_or_default();
            // A rate run during which processes outside the bench took
            // more than FOREIGN_MAX of the machine is run again (at most
            // ATTEMPTS times in all); the quietest one is kept.
            let mut best: Option<(f64, RoundRow)> = None;
            let mut attempts = 0;
            for _ in 0..ATTEMPTS {
                attempts += 1;
                let b0 = progs.sample();
                let p0 = an.cpu(mode);
                let a0 = agent.as_ref().map(|a| a.cpu());
                let f0 = stats::foreign_cpu(s.ns_ino);
                let m0 = stats::machine_cpu();
                let rate = load::rate(&targets, RATE_SECS);
                let m1 = stats::machine_cpu();
                let foreign = stats::foreign_delta(&f0, &stats::foreign_cpu(s.ns_ino));
                let a1 = agent.as_ref().map(|a| a.cpu());
                let p1 = an.cpu(mode);
                let b1 = progs.sample();
                let share = foreign / rate.secs / cpus();
                let row = RoundRow {
                    round: r,
                    position: pos,
                    mode,
                    attempts: 0,
                    conns: rate.done,
                    failed: rate.failed,
                    secs: rate.secs,
                    rate: rate.per_sec(),
                    machine_cpu_s: m1 - m0,
                    foreign_cpu_s: foreign,
                    balancer_cpu_s: p0.zip(p1).map(|(a, b)| b - a),
                    agent_cpu_s: a0.zip(a1).map(|(a, b)| b - a),
                    bpf: bpf::delta(&b0, &b1),
                    bulk_bpf: BTreeMap::new(),
                    bulk_mbs: 0.0,
                    connect_p50_us: None,
                    connect_p99_us: None,
                };
                if best.as_ref().is_none_or(|(b, _)| share < *b) {
                    best = Some((share, row));
                }
                if share <= FOREIGN_MAX {
                    break;
                }
                eprintln!(
                    "bench: {}: {:.0} % of the machine used outside the bench; again",
                    mode.label(),
                    share * 100.0
                );
            }
            let (_, mut row) = best.expect("one attempt");
            let (lat50, lat99) = load::connect_latency(&targets, LATENCY_N);
            // Direct: one stream to each backend.
            let bb0 = progs.sample();
            let bulk = load::bulk(&targets, BULK_SECS);
            let bb1 = progs.sample();
            drop(agent);
            // What mtlb's programs did during the bulk streams (nothing
            // should run per segment).
            row.bulk_bpf = bpf::delta(&bb0, &bb1);
            row.attempts = attempts;
            row.bulk_mbs = bulk;
            row.connect_p50_us = lat50.is_finite().then_some(lat50);
            row.connect_p99_us = lat99.is_finite().then_some(lat99);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Phase 2: failover under load, each balancer with the second backend
/// killed after 1 s of 3 s, then restarted.
fn failover(s: &Setup, backends: &mut Vec<Backend>, an: &Anchors) -> anyhow::Result<Vec<Failover>> {
    let mut out = Vec::new();
    for mode in [Mode::Mtlb, Mode::Haproxy, Mode::Nginx, Mode::Ipvs] {
        if !an.available(mode) {
            continue;
        }
        let restarted = if backends.len() < 2 {
            backends.push(s.backend(BACKEND_PORTS[1])?);
            true
        } else {
            false
        };
        // Let the balancer see the restarted backend as up: HAProxy's
        // checks (rise 2, inter 2s) and nginx's fail_timeout (10 s).
        if restarted {
            match mode {
                Mode::Haproxy => std::thread::sleep(Duration::from_secs(7)),
                Mode::Nginx => std::thread::sleep(Duration::from_secs(11)),
                _ => std::thread::sleep(Duration::from_secs(1)),
            }
        }
        let agent = if mode == Mode::Mtlb {
            Some(s.agent(2)?)
        } else {
            None
        };
        eprintln!("bench: failover through {}", mode.label());
        let target = mode_targets(mode)[0];
        let mut kill = || {
            if let Some(mut b) = backends.pop() {
                b.kill();
            }
        };
        let (requests, failed) = load::failover(target, FAILOVER_RATE, 3.0, 1.0, &mut kill);
        out.push(Failover {
            mode,
            requests,
            failed,
        });
        drop(agent);
    }
    if backends.len() < 2 {
        backends.push(s.backend(BACKEND_PORTS[1])?);
    }
    Ok(out)
}

/// For the micro and steering phases (PICKS): an agent with `n` replicas
/// picking by `algorithm`, over the two bench backends and `n - 2` more.
fn with_replicas<T>(
    s: &Setup,
    n: u16,
    algorithm: &str,
    f: impl FnOnce(&agent::Agent) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let _extra = backend::start_many(
        BACKEND_PORTS[1] + 1,
        n.saturating_sub(2),
        Some(&s.cg.replicas),
    )?;
    let a = s.agent_with(n, &format!("algorithm = \"{algorithm}\"\n"), s.use_cg)?;
    f(&a)
}

fn micro(s: &Setup) -> anyhow::Result<Vec<model::MicroRaw>> {
    let _paused = s.stats.paused()?;
    let mut out = Vec::new();
    for &(n, alg) in PICKS {
        eprintln!("bench: micro: mtlb_steer test runs at {n} replicas, {alg}");
        out.push(with_replicas(s, n, alg, |a| micro_at(a, n, alg))?);
    }
    Ok(out)
}

/// MICRO_REPS test runs of the agent's sk_lookup program, each from
/// another client port, so that each starts from another random slot.
fn micro_at(a: &agent::Agent, n: u16, algorithm: &str) -> anyhow::Result<model::MicroRaw> {
    let prog = micro::prog_of_pinned_link(&a.pin_dir.join("link_sk_lookup"))
        .context("the agent's sk_lookup program")?;
    if micro::run_stats_on(&prog)? {
        bail!(
            "the kernel's run-time stats stay on (kernel.bpf_stats_enabled, or another process's BPF_ENABLE_STATS): every test run would time their clock reads too"
        );
    }
    let local = "127.0.0.1:443".parse()?;
    // The floor: the same program leaving at its port test (a lookup for
    // another port), through the same test-run loop.
    let other = "127.0.0.1:444".parse()?;
    let mut floor = Vec::new();
    let mut ns = Vec::new();
    let mut chosen = std::collections::BTreeSet::new();
    for i in 0..MICRO_REPS {
        let remote = std::net::SocketAddrV4::new([127, 0, 0, 2].into(), 40_000 + i as u16);
        let r = micro::sk_lookup(&prog, remote, local, MICRO_REPEAT)
            .context("BPF_PROG_TEST_RUN of mtlb_steer")?;
        // A lookup it did not steer measures an early exit, not a pick.
        if r.verdict != 1 || r.assigned == 0 {
            bail!(
                "mtlb_steer did not steer the test lookup (verdict {}, socket {}) at {n} replicas",
                r.verdict,
                r.assigned
            );
        }
        ns.push(r.ns_per_run as f64);
        chosen.insert(r.assigned);
        let f = micro::sk_lookup(&prog, remote, other, MICRO_REPEAT)
            .context("BPF_PROG_TEST_RUN of mtlb_steer")?;
        floor.push(f.ns_per_run as f64);
    }
    Ok(model::MicroRaw {
        replicas: n,
        algorithm: algorithm.into(),
        repeat: MICRO_REPEAT,
        ns_per_run: ns,
        floor_ns_per_run: floor,
        listeners_chosen: chosen.len(),
        run_stats: false,
    })
}

fn steering(s: &Setup) -> anyhow::Result<Vec<SteeringRaw>> {
    let mut out = Vec::new();
    for &(n, alg) in PICKS {
        eprintln!("bench: steering cost at {n} replicas, {alg}");
        out.push(with_replicas(s, n, alg, |a| {
            std::thread::sleep(Duration::from_millis(300));
            let progs = bpf::Progs::find(&a.pin_dir);
            let mut reps = Vec::new();
            for _ in 0..STEERING_REPS {
                let b0 = progs.sample();
                let rate = load::rate(&[addr("127.0.0.1:443")], RATE_SECS);
                let b1 = progs.sample();
                reps.push(SteeringRep {
                    conns: rate.done,
                    failed: rate.failed,
                    rate: rate.per_sec(),
                    bpf: bpf::delta(&b0, &b1),
                });
            }
            Ok(SteeringRaw {
                replicas: n,
                algorithm: alg.into(),
                reps,
            })
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every round runs each mode once, direct and mtlb adjacent and each
    /// first in turn; over 11 rounds the pair starts at every position.
    #[test]
    fn direct_and_mtlb_run_back_to_back() {
        let modes = [Mode::Direct, Mode::Mtlb, Mode::Haproxy, Mode::Nginx];
        let mut starts = std::collections::BTreeSet::new();
        let mut direct_first = 0;
        for r in 0..11 {
            let o = round_order(&modes, r);
            let mut sorted = o.clone();
            sorted.sort_by_key(|m| modes.iter().position(|x| x == m));
            assert_eq!(sorted, modes, "round {r}: {o:?}");
            let d = o.iter().position(|m| *m == Mode::Direct).unwrap();
            let m = o.iter().position(|m| *m == Mode::Mtlb).unwrap();
            assert_eq!(d.abs_diff(m), 1, "round {r}: {o:?}");
            direct_first += usize::from(d < m);
            starts.insert(d.min(m));
        }
        assert_eq!(direct_first, 6);
        assert_eq!(starts.len(), 3, "{starts:?}");
        // Without one of the pair, a plain rotation.
        let three = [Mode::Direct, Mode::Haproxy, Mode::Nginx];
        assert_eq!(
            round_order(&three, 1),
            [Mode::Haproxy, Mode::Nginx, Mode::Direct]
        );
    }
}
