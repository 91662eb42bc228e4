//! Peers other than the stand-in replicas: Python fixtures (mtprotoproxy,
//! fake DC, clients), the official MTProxy server, the middle-proxy stand-in
//! and a stats-endpoint stand-in.

use crate::*;
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// The Python of the test peers' environment (made by `cargo xtask test`).
pub fn python() -> String {
    std::env::var("MTLB_PYTHON").expect(
        "MTLB_PYTHON must name the Python with mtprotoproxy and telethon (cargo xtask test sets it)",
    )
}

pub fn fixture(name: &str) -> String {
    format!("{}/fixtures/mtproxy/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The fake Telegram DC on 127.0.0.1:`port`: echoes MTProto frames, and
/// keeps an idle connection as long as a held client does
/// ([`HOLD_UNTIL_KILLED`]): dropped earlier, the replica would close the
/// client's connection that a test counts on.
pub fn fake_dc(ns: &Netns, port: u16) -> PyProcess {
    PyProcess::start(
        ns,
        "fake_dc.py",
        &[&port.to_string(), "--idle", HOLD_UNTIL_KILLED],
    )
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
/// guard is dropped).
pub fn py_first_line(ns: &Netns, script: &str, args: &[&str]) -> (Killed, String) {
    let mut child = spawn_fixture(ns, script, args, Stdio::null());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Killed(child), line)
}

/// `--hold` for a Telethon client that keeps its connection until the test
/// ends it (telethon_client.py's cap): a hold timed to the test would end
/// early on a slow machine, and the connection the test counts on with it.
pub const HOLD_UNTIL_KILLED: &str = "900";

/// A child process killed when dropped, a failing test's included.
pub struct Killed(pub Child);

impl std::ops::Deref for Killed {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

    /// Sends `sig` (the process keeps running until it acts on it).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits (bounded) until it has exited, and reaps it.
    pub fn wait_exit(&mut self) {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + wait_limit();
        while c.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "mtproto-proxy on {} did not exit",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
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
