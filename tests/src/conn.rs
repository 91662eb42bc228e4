//! Clients: connects, greetings, the connect loop, who holds a connection.

use crate::*;
use std::{
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
