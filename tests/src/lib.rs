//! Harness for mtlb's privileged integration tests.
//!
//! Every test runs in a network namespace of its own ([`Netns`]): the test
//! thread enters it, so replicas (threads of the test process) and clients
//! live there; the agent (`$MTLB_BIN run`) is started inside it and shares
//! the host's mount namespace, so its pins are visible at
//! /sys/fs/bpf/mtlb/<netns inode>. Guards clean up namespaces, agents and
//! pins. Helpers panic with context instead of returning errors.

pub mod docker;

use mtlb::kernel::maps::Maps;
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use mtlb_common::Conns;

/// The balanced address tests connect to.
pub const BALANCED: &str = "127.0.0.1:443";

/// How much slower than this machine the tests run: `cargo xtask test
/// --kernel` sets MTLB_TEST_TIME_SCALE under emulation. Time limits scale
/// by it; what is asserted does not change.
pub fn time_scale() -> u32 {
    std::env::var("MTLB_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// `d`, scaled for a slower machine (see [`time_scale`]).
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Generous bound for anything awaited in a test.
pub fn wait_limit() -> Duration {
    scaled(Duration::from_secs(15))
}

// ------------------------------------------------------------------ netns

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace with lo up. The creating thread is moved into
/// it. Dropping it deletes the namespace and any pins left for it.
pub struct Netns {
    pub name: String,
    pub file: File,
    pub ino: u64,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Creates the namespace and moves the calling thread into it.
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is not a default value"
    )]
    pub fn new() -> Self {
        let n = Self::create();
        n.enter();
        n
    }

    /// Creates the namespace without entering it.
    pub fn create() -> Self {
        let name = format!(
            "mtlb-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        sh(Command::new("ip").args(["netns", "add", &name]));
        sh(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let ino = file.metadata().unwrap().ino();
        Self { name, file, ino }
    }

    /// Makes `cmd` start inside the namespace (keeping this mount
    /// namespace, so pins stay visible).
    pub fn run_inside(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open in the parent
        // for as long as the Netns lives.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", self.name));
    }

    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("mtlb-state-{}", self.name))
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/mtlb/{}", self.ino))
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        sh(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]));
    }

    /// Runs `nft RULE` inside the namespace.
    pub fn nft(&self, rule: &str) {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .arg(rule));
    }

    /// Slows lo down with a token bucket, so that handshakes stay in flight
    /// (SYN-ACKs queue behind the SYNs sent before them).
    pub fn slow_lo(&self, rate: &str) {
        self.tc(&[
            "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "1600", "limit",
            "1000000",
        ]);
    }

    pub fn unslow_lo(&self) {
        self.tc(&["qdisc", "del", "dev", "lo", "root"]);
    }

    /// Runs `tc ARGS` inside the namespace.
    pub fn tc(&self, args: &[&str]) {
        sh(Command::new("tc").arg("-n").arg(&self.name).args(args));
    }

    /// Starts `mtlb run ARGS` in this namespace and waits until it steers.
    pub fn agent(&self, args: &[&str]) -> Agent {
        let a = self.spawn_agent(args);
        a.wait_for("steering TCP port");
        a
    }

    /// Like `agent`, with debug logs (one line per check).
    pub fn agent_debug(&self, args: &[&str]) -> Agent {
        let a = self.spawn_agent_log(args, "debug");
        a.wait_for("steering TCP port");
        a
    }

    /// Starts `mtlb run ARGS` in this namespace without waiting.
    pub fn spawn_agent(&self, args: &[&str]) -> Agent {
        self.spawn_agent_log(args, "info")
    }

    fn spawn_agent_log(&self, args: &[&str], log: &str) -> Agent {
        let bin = std::env::var("MTLB_BIN")
            .expect("MTLB_BIN must name the mtlb binary (cargo xtask test sets it)");
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .args(args)
            // Operator state of this namespace only (inode numbers are
            // reused once a namespace is gone).
            .arg("--state-dir")
            .arg(self.state_dir())
            .env("MTLB_LOG", log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run_inside(&mut cmd);
        Agent::spawn(cmd, self.pin_dir())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = mtlb::kernel::pins::remove(&self.pin_dir());
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

// ------------------------------------------------------------------ agent

/// A running `mtlb run` with its log collected.
pub struct Agent {
    child: Option<Child>,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    pub pin_dir: PathBuf,
}

impl Agent {
    /// Runs `cmd` (which must start `mtlb run`) with its log collected.
    pub fn command(mut cmd: Command, pin_dir: PathBuf) -> Self {
        cmd.env("MTLB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Self::spawn(cmd, pin_dir)
    }

    fn spawn(mut cmd: Command, pin_dir: PathBuf) -> Self {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let l2 = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[agent] {line}");
                l2.0.lock().unwrap().push(line);
                l2.1.notify_all();
            }
            // EOF: let waiters see the end.
            l2.0.lock().unwrap().push(String::from("\u{0}EOF"));
            l2.1.notify_all();
        });
        Self {
            child: Some(child),
            log,
            reader: Some(reader),
            pin_dir,
        }
    }

    /// Waits for a log line containing `needle`; panics with the log so far
    /// on timeout or when the agent exits first.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_after(0, needle).1
    }

    /// Like `wait_for`, but only lines from index `from` on count. Returns
    /// (index, line).
    pub fn wait_for_after(&self, from: usize, needle: &str) -> (usize, String) {
        let deadline = Instant::now() + wait_limit();
        let (lock, cv) = &*self.log;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i, l.clone());
            }
            let now = Instant::now();
            if now >= deadline || lines.last().is_some_and(|l| l == "\u{0}EOF") {
                panic!(
                    "agent log has no line with {needle:?}:\n{}",
                    lines.join("\n")
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits until `needle` has appeared in `n` log lines.
    pub fn wait_count(&self, needle: &str, n: usize) {
        let mut from = 0;
        for _ in 0..n {
            from = self.wait_for_after(from, needle).0 + 1;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL: the agent dies with no cleanup, its pins stay.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
    }

    pub fn log_len(&self) -> usize {
        self.log.0.lock().unwrap().len()
    }

    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().join("\n")
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        status
    }

    /// Waits for the agent to exit by itself (e.g. on a bad config).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let deadline = Instant::now() + wait_limit();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn maps(&self) -> Maps {
        Maps::from_pins(&self.pin_dir)
            .unwrap_or_else(|e| panic!("opening pins in {}: {e}", self.pin_dir.display()))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads `slot`'s counts.
pub fn conns(maps: &Maps, slot: u32) -> Conns {
    maps.conns(slot)
        .unwrap_or_else(|e| panic!("reading CONNS[{slot}]: {e}"))
}

/// Polls the maps until `pred` holds (the kernel gives no event to wait
/// on); panics with the last counts after wait_limit().
pub fn wait_counts(maps: &Maps, slots: u32, what: &str, pred: impl Fn(&[Conns]) -> bool) {
    let deadline = Instant::now() + wait_limit();
    loop {
        let c: Vec<Conns> = (0..slots).map(|s| conns(maps, s)).collect();
        if pred(&c) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: counts stayed {c:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ replica

/// What a replica saw of one accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

struct ReplicaState {
    accepted: Vec<Accepted>,
    held: Vec<TcpStream>,
}

/// A plain TCP server standing in for an MTProxy replica: it greets each
/// connection with its name and a newline, holds it, and closes it when the
/// client does.
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    fd: i32,
    state: Arc<Mutex<ReplicaState>>,
    thread: Option<JoinHandle<()>>,
    idle: Option<TcpListener>,
}

impl Replica {
    /// Listens on `addr` (backlog 1024) in the calling thread's namespace.
    pub fn start(name: &str, addr: &str) -> Self {
        Self::start_with(name, addr, 1024, true, None)
    }

    /// `accepting == false`: never accepts (a hung replica).
    pub fn start_with(
        name: &str,
        addr: &str,
        backlog: i32,
        accepting: bool,
        v6only: Option<bool>,
    ) -> Self {
        let addr: SocketAddr = addr.parse().unwrap();
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )
        .unwrap();
        sock.set_reuse_address(true).unwrap();
        if let Some(v) = v6only {
            sock.set_only_v6(v).unwrap();
        }
        sock.bind(&addr.into())
            .unwrap_or_else(|e| panic!("{name}: bind {addr}: {e}"));
        sock.listen(backlog).unwrap();
        let listener: TcpListener = sock.into();
        let fd = listener.as_raw_fd();
        let state = Arc::new(Mutex::new(ReplicaState {
            accepted: Vec::new(),
            held: Vec::new(),
        }));
        let st = state.clone();
        let greeting = format!("{name}\n");
        if !accepting {
            // A hung replica: the socket listens, nobody accepts.
            return Self {
                name: name.into(),
                addr,
                fd,
                state,
                thread: None,
                idle: Some(listener),
            };
        }
        let thread = std::thread::spawn(move || {
            while let Ok((mut s, peer)) = listener.accept() {
                let local = s.local_addr().unwrap();
                let mut st = st.lock().unwrap();
                // Record before greeting: a client that has its greeting
                // must find its connection recorded.
                st.accepted.push(Accepted { peer, local });
                let _ = s.write_all(greeting.as_bytes());
                // Close our side when the client closes.
                // Echo what the client sends; close when it does.
                let s2 = s.try_clone().unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut s2 = s2;
                    while let Ok(n) = s2.read(&mut buf) {
                        if n == 0 || s2.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s2.shutdown(Shutdown::Both);
                });
                st.held.push(s);
            }
            // The listener closes when this thread ends.
        });
        Self {
            name: name.into(),
            addr,
            fd,
            state,
            thread: Some(thread),
            idle: None,
        }
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.state.lock().unwrap().accepted.clone()
    }

    /// Connections that came through the balanced port (health checks go
    /// to the replica's own port).
    pub fn steered(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .accepted
            .iter()
            .filter(|a| a.local.port() == 443)
            .count()
    }

    /// Stops listening: the listening socket is closed, as when the
    /// replica's process exits. Held connections stay open.
    pub fn stop_listening(&mut self) {
        self.idle = None;
        if let Some(t) = self.thread.take() {
            // shutdown() on a listening socket wakes accept() with EINVAL.
            // SAFETY: fd is the live listener until the thread ends.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
            t.join().unwrap();
        }
    }

    /// Closes every held connection (RST-free: FIN).
    pub fn close_all(&self) {
        for s in self.state.lock().unwrap().held.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop_listening();
        self.close_all();
    }
}

/// A replica in a process of its own (`mtlb-test-replica`), for tests
/// that signal it.
pub struct ReplicaProcess {
    pub child: Child,
}

impl ReplicaProcess {
    /// Starts it inside `ns` and waits until it listens.
    pub fn start(ns: &Netns, name: &str, addr: &str) -> Self {
        Self::start_as(ns, name, addr, None, false)
    }

    /// Like `start`, as `uid` (through setpriv, after entering the
    /// namespace as root) and with IPV6_V6ONLY on an IPv6 address.
    pub fn start_as(ns: &Netns, name: &str, addr: &str, uid: Option<u32>, v6only: bool) -> Self {
        Self::try_start_as(ns, name, addr, uid, v6only).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Like `start_as`; `Err` with what the replica said when it could not
    /// listen (e.g. "bind failed: Operation not permitted (os error 1)").
    pub fn try_start_as(
        ns: &Netns,
        name: &str,
        addr: &str,
        uid: Option<u32>,
        v6only: bool,
    ) -> Result<Self, String> {
        Self::spawn(ns, name, addr, uid, v6only, 0, None)
    }

    /// A busy replica: it accepts at most `rate` connections a second.
    pub fn start_busy(ns: &Netns, name: &str, addr: &str, rate: u32) -> Self {
        Self::spawn(ns, name, addr, None, false, rate, None)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Like `start`, in cgroup `cg` (it moves itself there before it
    /// binds, so its sockets are created there).
    pub fn start_in(ns: &Netns, name: &str, addr: &str, cg: &Cgroup) -> Self {
        Self::spawn(
            ns,
            name,
            addr,
            None,
            false,
            0,
            Some(cg.path.join("cgroup.procs")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn spawn(
        ns: &Netns,
        name: &str,
        addr: &str,
        uid: Option<u32>,
        v6only: bool,
        rate: u32,
        cgroup_procs: Option<PathBuf>,
    ) -> Result<Self, String> {
        let bin = std::env::var("MTLB_TEST_REPLICA").unwrap_or_else(|_| {
            // Next to the test binary's deps directory.
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(|d| d.parent())
                .unwrap()
                .join("mtlb-test-replica")
                .to_string_lossy()
                .into_owned()
        });
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={u}"))
                    .arg(format!("--regid={u}"))
                    .arg("--clear-groups")
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args([name, addr, "4096", if v6only { "v6only" } else { "dual" }])
            .arg(rate.to_string())
            .stdout(Stdio::piped());
        ns.run_inside(&mut cmd);
        if let Some(procs) = cgroup_procs {
            let procs =
                std::ffi::CString::new(procs.into_os_string().into_encoded_bytes()).unwrap();
            // SAFETY: open/write/close are async-signal-safe; writing "0"
            // moves the writing process.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "listening" {
            let _ = child.wait();
            return Err(line.trim().to_string());
        }
        Ok(Self { child })
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A cgroup (v2) of a test's own, under the cgroup2 mount; removed when
/// dropped (after the processes in it: drop those first).
pub struct Cgroup {
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as `replica_cgroup` takes it.
    pub rel: String,
}

impl Cgroup {
    pub fn new() -> Self {
        let find = || {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            // "... mount_point ... - cgroup2 ...": field 5 is the mount point.
            info.lines()
                .find(|l| {
                    l.split(" - ")
                        .nth(1)
                        .is_some_and(|t| t.starts_with("cgroup2 "))
                })
                .and_then(|l| l.split_whitespace().nth(4))
                .map(PathBuf::from)
        };
        let mount = find().unwrap_or_else(|| {
            // Where mtlb itself mounts one when there is none (a bare VM).
            std::fs::create_dir_all("/run/mtlb/cgroup2").unwrap();
            sh(Command::new("mount").args(["-t", "cgroup2", "cgroup2", "/run/mtlb/cgroup2"]));
            find().expect("cgroup2 mounted")
        });
        let rel = format!(
            "mtlb-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = mount.join(&rel);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, rel }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A killed process leaves its cgroup a moment after wait()
        // returns: bounded retries.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli_command(ns: &Netns, args: &[&str]) -> Command {
    let bin = std::env::var("MTLB_BIN").expect("MTLB_BIN");
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    ns.run_inside(&mut cmd);
    cmd
}

/// Starts `mtlb ARGS` (a CLI command) inside `ns`.
pub fn mtlb_cli_spawn(ns: &Netns, args: &[&str]) -> Child {
    cli_command(ns, args).spawn().unwrap()
}

/// Runs `mtlb ARGS` (a CLI command) inside `ns`; returns (success, output).
pub fn mtlb_cli(ns: &Netns, args: &[&str]) -> (bool, String) {
    let out = cli_command(ns, args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// ------------------------------------------------------------------ python peers

/// The Python of the test peers' environment (made by `cargo xtask test`).
pub fn python() -> String {
    std::env::var("MTLB_PYTHON").expect(
        "MTLB_PYTHON must name the Python with mtprotoproxy and telethon (cargo xtask test sets it)",
    )
}

pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/mtproxy/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A config for MTProxy replicas with the `mtproxy` check and fast timings.
/// `[check]` timings for the MTProxy tests: fast intervals, and a check
/// timeout scaled with [`time_scale`] (a check goes through a real proxy
/// and its upstream, which under emulation can take longer than 1.5 s).
pub fn fast_check_timings() -> String {
    format!(
        "inter_ms = 200\nfastinter_ms = 100\ndowninter_ms = 200\nrise = 2\nfall = 2\ntimeout_ms = {}\n",
        1500 * time_scale()
    )
}

pub fn mtproxy_config(ns: &Netns, secret: &str) -> String {
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("mtlb.toml");
    std::fs::write(
        &p,
        format!(
            "secret = \"{secret}\"\n[check]\nkind = \"mtproxy\"\n{}",
            fast_check_timings()
        ),
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

/// A real MTProxy replica (mtprotoproxy) on 127.0.0.1:`port` with `secret`
/// (32 hex digits), upstream the fake DC on `dc`; fake-TLS only when `tls`.
pub fn mtproxy_replica(ns: &Netns, port: u16, secret: &str, dc: u16, tls: bool) -> PyProcess {
    let (p, d) = (port.to_string(), dc.to_string());
    let mut args = vec![p.as_str(), secret, d.as_str()];
    if tls {
        args.extend(["--tls-domain", "example.com", "--tls-only"]);
    }
    PyProcess::start(ns, "launcher.py", &args)
}

/// Starts fixture `script` with the test peers' Python inside `ns`, stdout
/// piped.
fn spawn_fixture(ns: &Netns, script: &str, args: &[&str], stderr: Stdio) -> Child {
    let mut cmd = Command::new(python());
    cmd.arg(fixture(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr);
    ns.run_inside(&mut cmd);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {script}: {e}"))
}

/// A Python fixture process in a namespace; started when it printed
/// `ready`, killed on drop.
pub struct PyProcess {
    child: Child,
    pub output: Arc<Mutex<Vec<String>>>,
}

impl PyProcess {
    pub fn start(ns: &Netns, script: &str, args: &[&str]) -> Self {
        let mut child = spawn_fixture(ns, script, args, Stdio::piped());
        let output = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let o2 = output.clone();
        let name = script.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                o2.lock().unwrap().push(line);
            }
        });
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "{script} {args:?} exited before `ready`");
            if line.trim() == "ready" {
                break;
            }
        }
        // Keep draining stdout so the process never blocks on it.
        std::thread::spawn(move || for _ in out.lines().map_while(Result::ok) {});
        Self { child, output }
    }
}

impl PyProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then reaps it (SIGKILL past wait_limit()); returns how it
    /// exited, so that a test can require a clean stop.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + wait_limit();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "fixture did not exit on SIGTERM: {:?}",
                    self.child.wait().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The stderr lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }
}

/// Runs a Python fixture in `ns` and returns its first stdout line (the
/// process keeps running if it holds on; it is killed when the returned
/// child is dropped by the caller).
pub fn py_first_line(ns: &Netns, script: &str, args: &[&str]) -> (Child, String) {
    let mut child = spawn_fixture(ns, script, args, Stdio::null());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ official MTProxy

/// The official C MTProxy server (`MTLB_OFFICIAL_MTPROXY`, which `cargo
/// xtask test` sets when it could build it from ../shared/peers), or `None`
/// with the reason printed: the calling test then returns early (skips).
pub fn official_mtproxy() -> Option<String> {
    let bin = std::env::var("MTLB_OFFICIAL_MTPROXY").ok();
    if bin.is_none() {
        eprintln!(
            "skipped: MTLB_OFFICIAL_MTPROXY is unset (cargo xtask test sets it when \
             ../shared/peers or MTLB_PEERS holds the official MTProxy's source)"
        );
    }
    bin
}

/// A loopback stand-in for Telegram's middle proxies (fixture
/// `middle_proxy.py`) on 127.0.0.1:`port`, with a `proxy-secret` of its
/// own that official replicas pointed at it share.
pub struct MiddleProxy {
    pub port: u16,
    pub secret_file: PathBuf,
    proc: Option<PyProcess>,
    _dir: TempDir,
}

impl MiddleProxy {
    /// Starts it with a fresh random 128-byte proxy-secret (the size
    /// Telegram's own has).
    pub fn start(ns: &Netns, port: u16) -> Self {
        let dir = TempDir::new("middle-proxy");
        let secret_file = dir.path.join("proxy-secret");
        let secret: Vec<u8> = (0..128).map(|_| rand_byte()).collect();
        std::fs::write(&secret_file, secret).unwrap();
        let mut m = Self {
            port,
            secret_file,
            proc: None,
            _dir: dir,
        };
        m.restart(ns);
        m
    }

    /// Starts it again (same port, same secret) after `stop`.
    pub fn restart(&mut self, ns: &Netns) {
        assert!(self.proc.is_none(), "middle proxy already running");
        let port = self.port.to_string();
        let file = self.secret_file.to_string_lossy().into_owned();
        self.proc = Some(PyProcess::start(ns, "middle_proxy.py", &[&port, &file]));
    }

    /// Stops it with SIGTERM (it closes every connection) and requires a
    /// clean exit.
    pub fn stop(&mut self) {
        let mut p = self.proc.take().expect("middle proxy running");
        let status = p.terminate();
        assert!(status.success(), "middle_proxy.py exited with {status}");
    }

    /// A `proxy-multi.conf` for servers that reach it at 127.0.0.1: every
    /// DC (the header's id, 2 for Telethon and mtlb's check) falls to the
    /// default cluster, the stand-in.
    pub fn proxy_multi_conf(&self) -> String {
        format!("default 2;\nproxy_for 2 127.0.0.1:{};\n", self.port)
    }

    /// Its log lines so far (one per RPC connection and forwarded request).
    pub fn lines(&self) -> Vec<String> {
        self.proc.as_ref().map(|p| p.lines()).unwrap_or_default()
    }
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b[0]
}

/// A running official MTProxy server; killed (SIGKILL) and reaped when
/// dropped, its temp dir removed.
pub struct OfficialReplica {
    child: Option<Child>,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub port: u16,
    pub stats_port: u16,
    _dir: TempDir,
}

/// Starts the official server `bin` inside `ns`: clients on
/// 0.0.0.0:`port` with `secret` (32 hex digits), HTTP stats on
/// 127.0.0.1:`stats_port`, its only middle proxy `upstream` (sharing its
/// proxy-secret). Returns when it logged its main loop (it listens by
/// then).
///
/// `-M 0`: no worker processes, so the process that owns the listener and
/// the clients' sockets is the one this guard kills. Workers (`-M 1`) also
/// run here; they abort on `parent_pid == real_parent_pid` only when their
/// parent is outside their pid namespace (getppid() is 0 then, as under
/// `unshare --pid` without `--fork`), and on a host whose pids exceed 16
/// bits the server asserts on its own pid (it keeps pids in 16 bits).
pub fn official_replica(
    bin: &str,
    ns: &Netns,
    port: u16,
    stats_port: u16,
    secret: &str,
    upstream: &MiddleProxy,
) -> OfficialReplica {
    let dir = TempDir::new("official-mtproxy");
    let conf = dir.path.join("proxy-multi.conf");
    std::fs::write(&conf, upstream.proxy_multi_conf()).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args([
        "-u",
        "nobody",
        "-p",
        &stats_port.to_string(),
        "--http-stats",
    ])
    .args(["-H", &port.to_string(), "-S", secret, "--aes-pwd"])
    .arg(&upstream.secret_file)
    .arg(&conf)
    // It raises its open file limit to -c + 16 and dies when the hard
    // limit is lower (the default is 65536 connections).
    .args(["-M", "0", "-c", "4000"])
    .current_dir(&dir.path)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    ns.run_inside(&mut cmd);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
    let l2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[mtproto-proxy:{port}] {line}");
            l2.0.lock().unwrap().push(line);
            l2.1.notify_all();
        }
        l2.0.lock().unwrap().push(String::from("\u{0}EOF"));
        l2.1.notify_all();
    });
    let r = OfficialReplica {
        child: Some(child),
        log,
        port,
        stats_port,
        _dir: dir,
    };
    r.wait_for("main loop");
    r
}

impl OfficialReplica {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits for a log line containing `needle`; panics with the log on
    /// timeout or when the server exits first.
    pub fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + wait_limit();
        let (lock, cv) = &*self.log;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline || lines.last().is_some_and(|l| l == "\u{0}EOF") {
                panic!(
                    "mtproto-proxy on {} logged no {needle:?}:\n{}",
                    self.port,
                    lines.join("\n")
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// GET /stats (answered on loopback only): the body.
    pub fn stats(&self) -> String {
        http_request(&format!("127.0.0.1:{}", self.stats_port), "/stats", &[]).body
    }

    /// `name\tvalue` of its stats.
    pub fn stat(&self, name: &str) -> Option<i64> {
        self.stats().lines().find_map(|l| {
            let (k, v) = l.split_once('\t')?;
            (k == name).then(|| v.trim().parse().ok())?
        })
    }

    /// Polls its stats until `total_ready_targets` is `want` (the server
    /// notifies nothing), bounded by wait_limit().
    pub fn wait_ready_targets(&self, want: i64) {
        let deadline = Instant::now() + wait_limit();
        loop {
            let got = self.stat("total_ready_targets");
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mtproto-proxy on {}: total_ready_targets stayed {got:?}, want {want}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL and reap: its listener and every client connection close.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OfficialReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------ client

/// Connects to `addr` and reads the replica's greeting. Returns the stream
/// and the replica's name.
pub fn connect(addr: &str) -> std::io::Result<(TcpStream, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))?;
    let name = greeting(&s)?;
    Ok((s, name))
}

/// Starts `n` non-blocking connects to `addr` (SYNs sent, nothing
/// awaited).
pub fn start_connects(addr: &str, n: usize) -> Vec<socket2::Socket> {
    let addr: SocketAddr = addr.parse().unwrap();
    (0..n)
        .map(|_| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )
            .unwrap();
            s.set_nonblocking(true).unwrap();
            match s.connect(&addr.into()) {
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                other => panic!("non-blocking connect to {addr}: {other:?}"),
            }
            s
        })
        .collect()
}

/// Reads one greeting line.
pub fn greeting(s: &TcpStream) -> std::io::Result<String> {
    s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = (&*s).read(&mut b)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        name.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// `ss -Htnp` of the established connections from the balanced port inside
/// `ns`: one line per connection, with the owning process (`pid=N`).
pub fn ss_balanced(ns: &Netns) -> String {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "ss",
            "-Htnp",
            "state",
            "established",
        ])
        .arg("( sport = :443 )")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A stand-in for an MTProxy HTTP stats endpoint on `listener`: answer `i`
/// reports `ready(i)` as `total_ready_targets`.
pub fn stats_endpoint(
    listener: TcpListener,
    ready: impl Fn(usize) -> u32 + Send + 'static,
) -> Arc<AtomicU32> {
    let served = Arc::new(AtomicU32::new(0));
    let s2 = served.clone();
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate().take(100_000) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\n\r\ntotal_ready_targets\t{}\n",
                ready(i)
            );
            s2.fetch_add(1, Ordering::Relaxed);
        }
    });
    served
}

/// HTTP/1.0 GET of `path` on the stats endpoint (127.0.0.1:8404 in the
/// calling thread's namespace): (status code, body).
pub fn http_get(path: &str) -> (u16, String) {
    let r = http_request("127.0.0.1:8404", path, &[]);
    (r.code, r.body)
}

/// An HTTP response: status code, head (status line and headers), body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// HTTP/1.0 GET of `path` on `addr` (in the calling thread's namespace)
/// with extra request `headers`; panics when it cannot connect.
pub fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    HttpResponse {
        code,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `s` percent-encoded for a URL query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 in the calling thread's namespace (a
/// test's own namespace: nobody else takes it before the test does).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a failed connect() was a connection cut in flight rather than
/// one nobody took. A reset (ECONNRESET) comes only after the SYN-ACK
/// (an RST to the SYN is ECONNREFUSED): a live listener took the
/// connection and then closed with it in its queue, a replica killed with
/// the connection in flight. The client's thread had just not returned
/// from connect() yet (slow under emulation); had it, the same event would
/// be a connection reset after a successful connect. A one-at-a-time loop
/// has at most one such connection per replica killed.
pub fn cut_in_flight(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionReset
}

/// What a [`FailoverLoop`] saw.
pub struct FailoverOutcome {
    /// connect() calls that succeeded.
    pub ok: usize,
    /// connect() errors other than a cut: connections nobody took.
    pub failed: Vec<String>,
    /// Connections cut in flight ([`cut_in_flight`]).
    pub cut: usize,
    /// The connections still held.
    pub held: std::collections::VecDeque<TcpStream>,
}

impl FailoverOutcome {
    /// Every connect was taken, but for at most the one in flight when
    /// one replica died: that one is cut (connected or not by then), as it
    /// would be behind HAProxy. And the loop made more than 10.
    pub fn assert_one_replica_killed(&self) {
        assert!(
            self.failed.is_empty(),
            "failed connects during failover: {:?}",
            self.failed
        );
        assert!(
            self.cut <= 1,
            "{} connections cut by one replica's death",
            self.cut
        );
        assert!(self.ok > 10, "only {} connects in the loop", self.ok);
    }
}

/// One connection at a time to the balanced port from a thread in `ns`,
/// every 5 ms, holding each (at most `max_held`, the oldest closed first),
/// while a test kills and brings back replicas. Bounded by
/// scaled(60 s).
pub struct FailoverLoop {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<FailoverOutcome>,
}

impl FailoverLoop {
    pub fn start(ns: &Netns, max_held: usize) -> Self {
        let file = ns.file.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut r = FailoverOutcome {
                ok: 0,
                failed: Vec::new(),
                cut: 0,
                held: std::collections::VecDeque::new(),
            };
            let deadline = Instant::now() + scaled(Duration::from_secs(60));
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match TcpStream::connect(BALANCED) {
                    Ok(s) => {
                        r.ok += 1;
                        if r.held.len() == max_held {
                            r.held.pop_front();
                        }
                        r.held.push_back(s);
                    }
                    Err(e) if cut_in_flight(&e) => r.cut += 1,
                    Err(e) => r.failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            r
        });
        Self { stop, handle }
    }

    pub fn finish(self) -> FailoverOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// PIDs of processes holding an established socket on :443 whose peer is
/// `client` (from `ss -tnp` in the namespace).
pub fn holders_of(ns: &Netns, client: &str) -> Vec<u32> {
    ss_balanced(ns)
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == client))
        .flat_map(|l| {
            l.split("pid=")
                .skip(1)
                .filter_map(|p| p.split(',').next()?.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `mtlb_backend_connections_total` of `backend` from the agent's
/// /metrics (the test's namespace, default stats port).
pub fn backend_total(backend: &str) -> f64 {
    let (_, text) = http_get("/metrics");
    metric(
        &text,
        &format!("mtlb_backend_connections_total{{backend=\"{backend}\"}}"),
    )
    .unwrap_or_else(|| panic!("no total for {backend}:\n{text}"))
}

/// Waits (bounded by [`wait_limit`]) until `backend` has been given more
/// than `than` connections; returns its total.
pub fn wait_backend_total_above(backend: &str, than: f64) -> f64 {
    let deadline = Instant::now() + wait_limit();
    loop {
        let t = backend_total(backend);
        if t > than {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{backend} got no connection beyond {than} within {:?}",
            wait_limit()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory of a test's own under the temp dir, removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(what: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "mtlb-{what}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs `cmd` to its end within `limit` (killed, and the test failed,
/// past it), stdout and stderr collected through files so that a large
/// output never blocks it. Returns (status, stdout, stderr).
pub fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> (std::process::ExitStatus, Vec<u8>, String) {
    let dir = TempDir::new("out");
    let (out_path, err_path) = (dir.path.join("stdout"), dir.path.join("stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read(&out_path).unwrap(),
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

/// Value of the sample `name{labels}` in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l[sample.len()..].trim().parse().ok())
}

/// Counts of each name in `names`.
pub fn tally<'a>(
    names: impl IntoIterator<Item = &'a String>,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}
