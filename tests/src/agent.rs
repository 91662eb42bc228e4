//! The agent under test: `mtlb run` in a namespace with its log collected,
//! the state oracle (the STATUS map through the pins), the CLI.

use crate::*;
use mtlb::kernel::maps::Maps;
use mtlb_common::Status;
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

impl Netns {
    /// Starts `mtlb run ARGS` in this namespace and waits until it steers
    /// (see [`Agent::wait_answering`]).
    pub fn agent(&self, args: &[&str]) -> Agent {
        let a = self.spawn_agent(args);
        a.wait_answering(&self.control_socket(args));
        a
    }

    /// Like `agent`, with debug logs (one line per check).
    pub fn agent_debug(&self, args: &[&str]) -> Agent {
        let a = self.spawn_agent_log(args, "debug");
        a.wait_answering(&self.control_socket(args));
        a
    }

    /// The control socket of an agent run with `args` in this namespace:
    /// under `--control-dir`, else the config file's `control_dir`, else
    /// /run/mtlb.
    pub fn control_socket(&self, args: &[&str]) -> PathBuf {
        let dir = placed(args, "--control-dir", "control_dir", "/run/mtlb");
        mtlb::control::socket_path(&dir, self.ino)
    }

    /// The pin directory of an agent run with `args` in this namespace:
    /// under `--bpffs`, else the config file's `bpffs`, else /sys/fs/bpf.
    pub fn agent_pin_dir(&self, args: &[&str]) -> PathBuf {
        let root = placed(args, "--bpffs", "bpffs", "/sys/fs/bpf");
        mtlb::kernel::pins::pin_dir(&root, self.ino)
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
        Agent::spawn(cmd, self.agent_pin_dir(args))
    }
}

/// A directory `mtlb run ARGS` places something in: the value of `flag`,
/// else `key` in the file `--config` names, else `default`.
fn placed(args: &[&str], flag: &str, key: &str, default: &str) -> PathBuf {
    let value = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.to_string())
    };
    let from_config = || {
        let text = std::fs::read_to_string(value("--config")?).ok()?;
        let t: toml::Table = toml::from_str(&text).ok()?;
        Some(t.get(key)?.as_str()?.to_string())
    };
    PathBuf::from(
        value(flag)
            .or_else(from_config)
            .unwrap_or_else(|| default.into()),
    )
}

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

    /// Waits until the agent answers a request on its control socket
    /// `socket`: its loop runs, so it has taken its start-up decisions
    /// and written them to the maps. Bounded by [`wait_limit`]; panics
    /// with the log when the agent exits first.
    pub fn wait_answering(&self, socket: &Path) {
        let ask = || -> std::io::Result<mtlb::control::Response> {
            let mut s = std::os::unix::net::UnixStream::connect(socket)?;
            s.set_read_timeout(Some(wait_limit()))?;
            let req = mtlb::control::Request::Locate {
                name: "mtp1".into(),
            };
            writeln!(s, "{}", serde_json::to_string(&req).unwrap())?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            serde_json::from_str(&line).map_err(std::io::Error::other)
        };
        let deadline = Instant::now() + wait_limit();
        loop {
            let got = ask();
            if got.is_ok() {
                return;
            }
            let exited = self.exited();
            assert!(
                !exited && Instant::now() < deadline,
                "no answer on {} (agent exited: {exited}; last: {got:?}):\n{}",
                socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the agent's log has ended (it exited).
    fn exited(&self) -> bool {
        self.log
            .0
            .lock()
            .unwrap()
            .last()
            .is_some_and(|l| l == "\u{0}EOF")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// The agent's resident memory, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let s = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}"))
    }

    /// How many file descriptors the agent has open.
    pub fn open_fds(&self) -> usize {
        let path = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .count()
    }

    /// Sets the agent's open-file limit, soft and hard, to `n`.
    pub fn limit_open_files(&self, n: u64) {
        use rustix::process::{Pid, Resource, Rlimit, prlimit};
        let limit = Rlimit {
            current: Some(n),
            maximum: Some(n),
        };
        prlimit(Pid::from_raw(self.pid() as i32), Resource::Nofile, limit)
            .unwrap_or_else(|e| panic!("prlimit NOFILE {n} on the agent: {e}"));
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
        open_maps(&self.pin_dir)
            .unwrap_or_else(|e| panic!("opening pins in {}: {e}", self.pin_dir.display()))
    }
}

/// A replica's state as the agent publishes it in STATUS (`state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    Drain,
    Maint,
}

impl State {
    fn word(self) -> u32 {
        match self {
            State::Up => mtlb_common::STATE_UP,
            State::Down => mtlb_common::STATE_DOWN,
            State::Drain => mtlb_common::STATE_DRAIN,
            State::Maint => mtlb_common::STATE_MAINT,
        }
    }
}

/// The slot of replica `name`: "mtpN" is slot N-1.
pub fn slot_of(name: &str) -> u32 {
    name.strip_prefix("mtp")
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .unwrap_or_else(|| panic!("{name:?} is not a replica name (mtpN)"))
        - 1
}

/// Replica `slot`'s STATUS entry, read through the pins in `pin_dir`;
/// `None` while the pins are not there. The one place the harness opens
/// STATUS: the agent writes it (BACKENDS first) before it logs a change.
pub fn read_status(pin_dir: &Path, slot: u32) -> Option<Status> {
    open_maps(pin_dir).ok()?.status(slot).ok()
}

/// The agent's maps through its pins in `pin_dir`: the one place the
/// harness opens them.
pub fn open_maps(pin_dir: &Path) -> Result<Maps, mtlb::kernel::maps::MapsError> {
    Maps::from_pins(pin_dir)
}

impl Agent {
    /// Replica `name`'s STATUS entry now; panics when the pins are not
    /// there.
    pub fn status(&self, name: &str) -> Status {
        read_status(&self.pin_dir, slot_of(name))
            .unwrap_or_else(|| panic!("no STATUS in {}", self.pin_dir.display()))
    }

    /// Polls replica `name`'s STATUS until `pred` holds (the map gives no
    /// event to wait on), bounded by [`wait_limit`]; panics with the last
    /// entry and the log when it does not, or when the agent exits first.
    pub fn wait_status(&self, name: &str, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let slot = slot_of(name);
        let deadline = Instant::now() + wait_limit();
        loop {
            let st = read_status(&self.pin_dir, slot);
            if let Some(s) = st.filter(&pred) {
                return s;
            }
            let exited = self.exited();
            assert!(
                !exited && Instant::now() < deadline,
                "{name}: {what} not seen (agent exited: {exited}); STATUS {st:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until replica `name`'s state is `want`.
    pub fn wait_state(&self, name: &str, want: State) -> Status {
        self.wait_status(name, &format!("state {want:?}"), |s| s.state == want.word())
    }

    /// Waits until replica `name` is DOWN with its last check failed (a
    /// replica that never passed one starts DOWN: the failed check is
    /// what puts it DOWN by checks). Returns the entry; its reason is the
    /// check's ([`status_reason`]).
    pub fn wait_down_by_check(&self, name: &str) -> Status {
        self.wait_status(name, "DOWN by a failed check", |s| {
            s.state == State::Down.word() && s.check_ok == 0
        })
    }

    /// Waits until replica `name`'s last check passed with `reason`.
    pub fn wait_check_passed(&self, name: &str, reason: &str) -> Status {
        self.wait_status(name, &format!("a check passed with {reason:?}"), |s| {
            s.check_ok == 1 && status_reason(s) == reason
        })
    }

    /// Whether replica `name`'s state is `want` now.
    pub fn is_state(&self, name: &str, want: State) -> bool {
        self.status(name).state == want.word()
    }
}

/// The last check's reason in `s` (NUL-padded in the map).
pub fn status_reason(s: &Status) -> String {
    let n = s
        .reason
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(s.reason.len());
    String::from_utf8_lossy(&s.reason[..n]).into_owned()
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

/// Turns the kernel's program run statistics on while the descriptor it
/// returns is open, as `sysctl kernel.bpf_stats_enabled=1` would
/// (BPF_ENABLE_STATS).
pub fn bpf_run_stats() -> std::os::fd::OwnedFd {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .unwrap_or_else(|e| panic!("BPF_ENABLE_STATS: {e}"))
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

/// `mtlb ARGS` (a CLI command), to be started inside `ns`.
pub fn mtlb_cli_command(ns: &Netns, args: &[&str]) -> Command {
    let bin = std::env::var("MTLB_BIN").expect("MTLB_BIN");
    let mut cmd = Command::new(&bin);
    cmd.args(args);
    ns.run_inside(&mut cmd);
    cmd
}

/// Starts `mtlb ARGS` (a CLI command) inside `ns`.
pub fn mtlb_cli_spawn(ns: &Netns, args: &[&str]) -> Child {
    mtlb_cli_command(ns, args).spawn().unwrap()
}

/// Runs `mtlb ARGS` (a CLI command) inside `ns`; returns (success, output).
pub fn mtlb_cli(ns: &Netns, args: &[&str]) -> (bool, String) {
    cli_result(mtlb_cli_command(ns, args).output().unwrap())
}

/// Like [`mtlb_cli`], but `None` (and the command killed) when it has not
/// finished within `limit`.
pub fn mtlb_cli_within(ns: &Netns, args: &[&str], limit: Duration) -> Option<(bool, String)> {
    let child = mtlb_cli_command(ns, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    let out = rx.recv_timeout(limit).ok();
    if out.is_none() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = waiter.join();
    out.map(cli_result)
}

fn cli_result(out: std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
