//! Stand-in replicas: plain TCP servers in a thread or a process of their own.

use crate::*;
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
};

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

/// The `mtlb-test-replica` binary: `$MTLB_TEST_REPLICA`, else the one
/// built with the tests.
fn replica_bin() -> String {
    std::env::var("MTLB_TEST_REPLICA").unwrap_or_else(|_| {
        // Next to the test binary's deps directory.
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(|d| d.parent())
            .unwrap()
            .join("mtlb-test-replica")
            .to_string_lossy()
            .into_owned()
    })
}

/// How to start a `mtlb-test-replica`.
#[derive(Default)]
struct Spawn<'a> {
    /// Run as this uid (through setpriv).
    uid: Option<u32>,
    v6only: bool,
    /// Accepts per second at most (0: no limit).
    rate: u32,
    /// Moves itself into this cgroup before it binds.
    cgroup_procs: Option<PathBuf>,
    /// `MTLB_TEST_ON_TERM`.
    on_term: Option<&'a str>,
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
        Self::spawn(
            ns,
            name,
            addr,
            Spawn {
                uid,
                v6only,
                ..Spawn::default()
            },
        )
    }

    /// Like `start`, with what SIGTERM does to it (`MTLB_TEST_ON_TERM`:
    /// "linger:MS" shuts down as the official server does, "ignore").
    pub fn start_on_term(ns: &Netns, name: &str, addr: &str, on_term: &str) -> Self {
        Self::spawn(
            ns,
            name,
            addr,
            Spawn {
                on_term: Some(on_term),
                ..Spawn::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A busy replica: it accepts at most `rate` connections a second.
    pub fn start_busy(ns: &Netns, name: &str, addr: &str, rate: u32) -> Self {
        Self::spawn(
            ns,
            name,
            addr,
            Spawn {
                rate,
                ..Spawn::default()
            },
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Like `start`, in cgroup `cg` (it moves itself there before it
    /// binds, so its sockets are created there).
    pub fn start_in(ns: &Netns, name: &str, addr: &str, cg: &Cgroup) -> Self {
        Self::start_as_in(ns, name, addr, None, cg)
    }

    /// Like `start_in`, as `uid` (see `start_as`).
    pub fn start_as_in(ns: &Netns, name: &str, addr: &str, uid: Option<u32>, cg: &Cgroup) -> Self {
        Self::try_start_as_in(ns, name, addr, uid, cg).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// Like `start_as_in`; `Err` with what the replica said when it could
    /// not listen.
    pub fn try_start_as_in(
        ns: &Netns,
        name: &str,
        addr: &str,
        uid: Option<u32>,
        cg: &Cgroup,
    ) -> Result<Self, String> {
        Self::spawn(
            ns,
            name,
            addr,
            Spawn {
                uid,
                cgroup_procs: Some(cg.path.join("cgroup.procs")),
                ..Spawn::default()
            },
        )
    }

    fn spawn(ns: &Netns, name: &str, addr: &str, o: Spawn<'_>) -> Result<Self, String> {
        let Spawn {
            uid,
            v6only,
            rate,
            cgroup_procs,
            on_term,
        } = o;
        let bin = replica_bin();
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
        if let Some(t) = on_term {
            cmd.env("MTLB_TEST_ON_TERM", t);
        }
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

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replicas `mtp1..=mtpN` on 127.0.0.1:10000.. in processes of their own
/// that a shell command restarts, as `mtlb rollout --exec` does:
/// [`command`](Self::command) stops replica N's process, waits until its
/// port is free and starts a new one there. Each process's pid is in a
/// file, so a test tells a restarted replica by its new pid; dropping the
/// set kills them.
pub struct RestartableReplicas {
    dir: TempDir,
    count: u16,
}

impl RestartableReplicas {
    /// Writes the restart script; starts no replica.
    pub fn new(count: u16) -> Self {
        Self::with_start(
            count,
            &format!("'{}' \"mtp$n\" \"127.0.0.1:$port\"", replica_bin()),
        )
    }

    /// Like `new`, with the shell command line that starts replica `$n` on
    /// `$port` in the foreground (the script puts it in the background and
    /// keeps its pid), e.g. an official server's.
    pub fn with_start(count: u16, start: &str) -> Self {
        let dir = TempDir::new("replicas");
        let script = format!(
            r#"# Restarts stand-in replica $1 (mtp$1): stops its process, if it
# has one, and starts a new one on the same port.
set -eu
n=$1
dir='{dir}'
port=$((10000 + n - 1))
if [ -e "$dir/fail-mtp$n" ]; then
    echo "mtp$n: not restarting (the test says so)" >&2
    exit 3
fi
if [ -e "$dir/mtp$n.pid" ]; then
    kill "$(cat "$dir/mtp$n.pid")"
    # The new one can listen once the old listener has closed.
    i=0
    while ss -Hltn "sport = :$port" | grep -q .; do
        i=$((i + 1))
        [ "$i" -le 1000 ] || {{ echo "port $port still taken" >&2; exit 4; }}
        sleep 0.01
    done
    echo "$n" >>"$dir/restarts"
    echo "mtp$n: stopped, starting a new one"
fi
{start} >"$dir/mtp$n.log" 2>&1 </dev/null &
echo $! >"$dir/mtp$n.pid"
"#,
            dir = dir.path.display(),
        );
        std::fs::write(dir.path.join("restart.sh"), script).unwrap();
        Self { dir, count }
    }

    /// Starts every replica inside `ns` (the agent finds them listening,
    /// or sees them listen).
    pub fn start_all(ns: &Netns, count: u16) -> Self {
        let set = Self::new(count);
        for n in 1..=count {
            set.start(ns, n);
        }
        set
    }

    /// Starts replica `n` (1-based) inside `ns` with the script.
    pub fn start(&self, ns: &Netns, n: u16) {
        let mut cmd = Command::new("sh");
        cmd.arg(self.dir.path.join("restart.sh")).arg(n.to_string());
        ns.run_inside(&mut cmd);
        let (status, _, err) = run_bounded(&mut cmd, wait_limit());
        assert!(status.success(), "starting mtp{n}: {status}: {err}");
    }

    /// The restart command for `mtlb rollout --exec`.
    pub fn command(&self) -> String {
        format!("sh '{}' {{n}}", self.dir.path.join("restart.sh").display())
    }

    /// The pid of replica `n`'s process now.
    pub fn pid(&self, n: u16) -> u32 {
        let path = self.dir.path.join(format!("mtp{n}.pid"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
    }

    /// Every replica's pid, mtp1 first.
    pub fn pids(&self) -> Vec<u32> {
        (1..=self.count).map(|n| self.pid(n)).collect()
    }

    /// The replicas the command has restarted, in order (not the first
    /// starts).
    pub fn restarts(&self) -> Vec<u16> {
        std::fs::read_to_string(self.dir.path.join("restarts"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// Makes the command fail (exit 3) for replica `n`, leaving its
    /// process as it is.
    pub fn fail_for(&self, n: u16) {
        std::fs::write(self.dir.path.join(format!("fail-mtp{n}")), "").unwrap();
    }

    /// A directory of the set's own, for a test's files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir.path
    }
}

impl Drop for RestartableReplicas {
    fn drop(&mut self) {
        for n in 1..=self.count {
            let pid = std::fs::read_to_string(self.dir.path.join(format!("mtp{n}.pid")));
            if let Some(pid) = pid.ok().and_then(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
