//! The benchmark's backends: separate processes (`xtask bench-backend`),
//! each one single-threaded epoll loop on one port, so they can live in a
//! cgroup of their own (mtlb's `replica_cgroup`) and hold 100k connections.
//!
//! Protocol, chosen by the first byte a client sends:
//! * `x`: answer `y` and close (the short request of the rate runs);
//! * `b`: sink everything until EOF (bulk throughput);
//! * `h`: answer `k` and hold the connection until the client closes.

use anyhow::{Context as _, bail};
use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Entry point of the hidden `xtask bench-backend` subcommand: one
/// listening socket, served by `workers` processes (this one and forked
/// children sharing the socket), since one process may hold no more
/// descriptors than RLIMIT_NOFILE allows.
pub fn serve(port: u16, cgroup: Option<&Path>, workers: u32) -> anyhow::Result<()> {
    // Die with the bench, whatever happens to it.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if let Some(cg) = cgroup {
        // Into the replicas' cgroup before the listening socket exists, so
        // mtlb's sock_ops (attached there) sees it from the start.
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // The previous backend on this port may be exiting still.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match sock.bind(&addr.into()) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("bind {addr}")),
        }
    }
    sock.listen(65535)?;
    sock.set_nonblocking(true)?;
    let listener: TcpListener = sock.into();
    let shared = workers > 1;
    for _ in 1..workers {
        // SAFETY: this process has one thread here; the child only runs the
        // event loop.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: as above.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                return event_loop(listener.as_raw_fd(), shared);
            }
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            _ => {}
        }
    }
    // Tell the parent we listen.
    println!("listening {port}");
    event_loop(listener.as_raw_fd(), shared)
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Free,
    New,
    Sink,
    Held,
}

fn event_loop(lfd: RawFd, shared: bool) -> anyhow::Result<()> {
    // SAFETY: plain syscalls on fds this function owns; buffers are sized.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if ep < 0 {
            bail!("epoll_create1: {}", std::io::Error::last_os_error());
        }
        // Processes sharing the listener: wake one of them per connection.
        let excl = if shared {
            libc::EPOLLEXCLUSIVE as u32
        } else {
            0
        };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32 | excl,
            u64: lfd as u64,
        };
        libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, &mut ev);
        let mut state: Vec<State> = vec![State::Free; 1024];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            for e in &events[..n as usize] {
                let fd = e.u64 as RawFd;
                if fd == lfd {
                    // Accept everything queued.
                    loop {
                        let c = libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if c < 0 {
                            let e = std::io::Error::last_os_error().raw_os_error();
                            if matches!(e, Some(libc::EMFILE) | Some(libc::ENFILE)) {
                                // Full: leave the rest to the other workers.
                                libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, lfd, std::ptr::null_mut());
                            }
                            break;
                        }
                        if c as usize >= state.len() {
                            state.resize((c as usize + 1).next_power_of_two(), State::Free);
                        }
                        state[c as usize] = State::New;
                        // The request byte is often there already.
                        if !on_readable(c, &mut state, &mut buf) {
                            let mut ev = libc::epoll_event {
                                events: libc::EPOLLIN as u32,
                                u64: c as u64,
                            };
                            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c, &mut ev);
                        }
                    }
                } else if on_readable(fd, &mut state, &mut buf) {
                    // Closed (closing removes it from the epoll set).
                }
            }
        }
    }
}

/// Handles a readable connection; true when it was closed.
///
/// # Safety
/// `fd` is an open connection of this process.
unsafe fn on_readable(fd: RawFd, state: &mut [State], buf: &mut [u8]) -> bool {
    let close = |state: &mut [State]| {
        state[fd as usize] = State::Free;
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        true
    };
    loop {
        // SAFETY: buf is valid for its length.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r == 0 {
            return close(state);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return false;
            }
            return close(state);
        }
        match state[fd as usize] {
            State::New => match buf[0] {
                b'x' => {
                    // SAFETY: one byte from a static.
                    unsafe { libc::write(fd, b"y".as_ptr().cast(), 1) };
                    return close(state);
                }
                b'b' => state[fd as usize] = State::Sink,
                b'h' => {
                    // SAFETY: as above.
                    unsafe { libc::write(fd, b"k".as_ptr().cast(), 1) };
                    state[fd as usize] = State::Held;
                }
                _ => return close(state),
            },
            State::Sink | State::Held => {}
            State::Free => return close(state),
        }
    }
}

/// A running backend process.
pub struct Backend {
    child: Option<Child>,
}

impl Backend {
    /// Starts `xtask bench-backend` on `port` (in this thread's network
    /// namespace), in `cgroup` if given, with `workers` processes, and
    /// waits until it listens.
    pub fn start(port: u16, cgroup: Option<&Path>, workers: u32) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "bench-backend",
            "--port",
            &port.to_string(),
            "--workers",
            &workers.to_string(),
        ]);
        if let Some(cg) = cgroup {
            cmd.arg("--cgroup").arg(cg);
        }
        {
            use std::os::unix::process::CommandExt as _;
            // A process group of its own: killed whole, workers included.
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a backend")?;
        let out = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        if !line.starts_with("listening") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("backend on port {port} did not start");
        }
        Ok(Self { child: Some(child) })
    }

    /// SIGKILL to the whole process group: the listener and every
    /// connection of it go at once. Returns when the group is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as i32;
            // SAFETY: kill(2) on our own child's process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = c.kill();
            let _ = c.wait();
            let deadline = Instant::now() + Duration::from_secs(5);
            // The workers are reparented to this process (a child
            // subreaper, see bench::Env): reap them, until none is left.
            // SAFETY: waitpid/kill on our own process group.
            while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < deadline {
                while unsafe { libc::waitpid(-pgid, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Backends on consecutive ports from `base`.
pub fn start_many(base: u16, n: u16, cgroup: Option<&Path>) -> anyhow::Result<Vec<Backend>> {
    (0..n)
        .map(|i| Backend::start(base + i, cgroup, 1))
        .collect()
}

/// The replicas' cgroup: `<cgroup2>/mtlb-bench-<pid>/replicas`, removed on
/// drop (after its processes are gone).
pub struct Cgroup {
    pub mount: PathBuf,
    pub top: PathBuf,
    pub replicas: PathBuf,
}

impl Cgroup {
    pub fn create() -> anyhow::Result<Self> {
        let mount = cgroup2_mount().context("no cgroup2 mount found")?;
        let top = mount.join(format!("mtlb-bench-{}", std::process::id()));
        let replicas = top.join("replicas");
        std::fs::create_dir_all(&replicas)
            .with_context(|| format!("creating {}", replicas.display()))?;
        Ok(Self {
            mount,
            top,
            replicas,
        })
    }

    /// The replicas' cgroup relative to the cgroup2 mount, as mtlb's
    /// `replica_cgroup` takes it (the agent runs under `ip netns exec`,
    /// which remounts /sys, so an absolute host path may not exist there).
    pub fn relative(&self) -> String {
        self.replicas
            .strip_prefix(&self.mount)
            .unwrap_or(&self.replicas)
            .display()
            .to_string()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes may take a moment to leave after SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in [&self.replicas, &self.top] {
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Where cgroup2 is mounted, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let m = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    m.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split(' ').next() != Some("cgroup2") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}
