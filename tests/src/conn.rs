//! Clients: connects, greetings, the connect loop, who holds a connection.

use crate::*;
use std::{
    collections::VecDeque,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Connects to `addr` and reads the replica's greeting. Returns the stream
/// and the replica's name.
pub fn connect(addr: &str) -> std::io::Result<(TcpStream, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))?;
    let name = greeting(&s)?;
    Ok((s, name))
}

/// Whether a client gets through to a replica at `addr`: connected and
/// greeted (steering works).
pub fn can_dial(addr: &str) -> bool {
    connect(addr).is_ok()
}

/// Whether a TCP connect to `addr` fails (nothing steers or listens there).
pub fn connect_fails(addr: &str) -> bool {
    TcpStream::connect(addr).is_err()
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

/// What a [`ConnectLoop`] saw.
pub struct LoopOutcome {
    /// connect() calls that succeeded (and were greeted, when the loop
    /// awaits greetings).
    pub ok: usize,
    /// Connections nobody took (and, for a strict loop, cut ones too).
    pub failed: Vec<String>,
    /// Connections cut in flight ([`cut_in_flight`], or reset before their
    /// greeting): at most the one in flight when a replica dies with it in
    /// its accept queue.
    pub cut: usize,
    /// The connections still held.
    pub held: VecDeque<TcpStream>,
    /// Greeted connections by greeting (who took them).
    pub greeted: std::collections::BTreeMap<String, usize>,
}

impl LoopOutcome {
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

/// One connection at a time to the balanced port from a thread in a
/// namespace, paced, until [`RunningLoop::finish`]; bounded by scaled(60 s)
/// and 200,000 connections. Options: await each replica's greeting
/// ([`greet`](Self::greet)), hold connections ([`hold`](Self::hold)),
/// count a cut as a failure ([`strict`](Self::strict)).
#[derive(Clone, Copy, Debug)]
pub struct ConnectLoop {
    greet: bool,
    strict: bool,
    max_held: usize,
    pace: Duration,
    to: SocketAddr,
}

impl Default for ConnectLoop {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectLoop {
    /// Connects every 2 ms, holds nothing, awaits no greeting.
    pub fn new() -> Self {
        Self {
            greet: false,
            strict: false,
            max_held: 0,
            pace: Duration::from_millis(2),
            to: BALANCED.parse().unwrap(),
        }
    }

    /// Connects to `to` instead of the balanced port on 127.0.0.1.
    pub fn to(mut self, to: SocketAddr) -> Self {
        self.to = to;
        self
    }

    /// Reads each replica's greeting: a connection reset before it is cut.
    pub fn greet(mut self) -> Self {
        self.greet = true;
        self
    }

    /// Any error is a failure, a cut connection included (nothing may be
    /// lost, e.g. across an agent restart).
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    /// Holds the connections, at most `max_held` (the oldest closed first).
    pub fn hold(mut self, max_held: usize) -> Self {
        self.max_held = max_held;
        self
    }

    /// Waits `pace` between connections.
    pub fn pace(mut self, pace: Duration) -> Self {
        self.pace = pace;
        self
    }

    /// Starts the loop in `ns`.
    pub fn start(self, ns: &Netns) -> RunningLoop {
        let file = ns.file.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p2 = progress.clone();
        let handle = std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut r = LoopOutcome {
                ok: 0,
                failed: Vec::new(),
                cut: 0,
                held: VecDeque::new(),
                greeted: Default::default(),
            };
            let addr = self.to;
            let deadline = Instant::now() + scaled(Duration::from_secs(60));
            while !s2.load(Ordering::Relaxed) && Instant::now() < deadline && r.ok < 200_000 {
                let got = TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
                    .and_then(|s| {
                        let who = if self.greet {
                            greeting(&s).map_err(|e| {
                                // Reset before its greeting: cut.
                                std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
                            })?
                        } else {
                            String::new()
                        };
                        Ok((s, who))
                    });
                match got {
                    Ok((s, who)) => {
                        r.ok += 1;
                        p2.store(r.ok, Ordering::Relaxed);
                        if self.greet {
                            *r.greeted.entry(who).or_default() += 1;
                        }
                        if self.max_held > 0 {
                            if r.held.len() == self.max_held {
                                r.held.pop_front();
                            }
                            r.held.push_back(s);
                        }
                    }
                    Err(e) if !self.strict && cut_in_flight(&e) => r.cut += 1,
                    Err(e) => r.failed.push(e.to_string()),
                }
                std::thread::sleep(self.pace);
            }
            r
        });
        RunningLoop {
            stop,
            handle,
            progress,
        }
    }
}

/// A [`ConnectLoop`] running.
pub struct RunningLoop {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<LoopOutcome>,
    /// Connections made so far.
    progress: Arc<std::sync::atomic::AtomicUsize>,
}

impl RunningLoop {
    /// Waits until the loop has made `n` connections (bounded by
    /// [`wait_limit`]).
    pub fn wait_ok(&self, n: usize) {
        wait_until(&format!("{n} clients through the loop"), || {
            self.progress.load(Ordering::Relaxed) >= n || self.handle.is_finished()
        });
    }

    /// Stops the loop; what it saw.
    pub fn finish(self) -> LoopOutcome {
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

/// Sends `data` on a connection to a (fake) replica and reads its echo:
/// whether a held connection still works.
pub fn echo(s: &TcpStream, data: &[u8]) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = s;
    s.set_read_timeout(Some(scaled(Duration::from_secs(5))))
        .unwrap();
    if s.write_all(data).is_err() {
        return "(write failed)".into();
    }
    let mut buf = vec![0; data.len()];
    match s.read_exact(&mut buf) {
        Ok(()) => String::from_utf8_lossy(&buf).into_owned(),
        Err(e) => format!("({e})"),
    }
}
