//! Load generators (threads of the xtask, outside the replicas' cgroup):
//! short connections, one bulk stream, paced requests for failover, and
//! connections held open.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Client threads of the rate runs: enough to keep 2 cores busy with the
/// backends and the balancer.
pub const CLIENT_THREADS: usize = 3;

/// One short request: connect, send `x`, read the one-byte answer, close.
pub fn request(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 1];
    s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() && b[0] == b'y'
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    pub done: u64,
    pub failed: u64,
    pub secs: f64,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        self.done as f64 / self.secs
    }
}

/// Short requests from CLIENT_THREADS threads for `secs`; each thread goes
/// round-robin over `targets` (one address for a balancer, the backends
/// themselves for direct).
pub fn rate(targets: &[SocketAddr], secs: f64) -> Rate {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for t in 0..CLIENT_THREADS {
            let (done, failed) = (done.clone(), failed.clone());
            s.spawn(move || {
                let (mut ok, mut bad) = (0u64, 0u64);
                let mut i = t;
                while Instant::now() < end {
                    if request(targets[i % targets.len()]) {
                        ok += 1;
                    } else {
                        bad += 1;
                    }
                    i += 1;
                }
                done.fetch_add(ok, Ordering::Relaxed);
                failed.fetch_add(bad, Ordering::Relaxed);
            });
        }
    });
    Rate {
        done: done.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// connect() latency, sequential, in microseconds: (p50, p99).
pub fn connect_latency(targets: &[SocketAddr], n: usize) -> (f64, f64) {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        if let Ok(mut s) = TcpStream::connect(targets[i % targets.len()]) {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"x");
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        }
    }
    (
        super::stats::quantile(&mut lat, 0.5),
        super::stats::quantile(&mut lat, 0.99),
    )
}

/// Streams that run at once in the bulk measurement.
pub const BULK_STREAMS: usize = 2;

/// BULK_STREAMS streams at once for `secs`, stream i to `targets[i %
/// len]`: total MB/s.
pub fn bulk(targets: &[SocketAddr], secs: f64) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..BULK_STREAMS)
            .map(|i| {
                let a = targets[i % targets.len()];
                s.spawn(move || bulk_one(a, secs))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}

/// One stream for `secs`: MB/s (written and acknowledged by the sink's
/// EOF).
fn bulk_one(addr: SocketAddr, secs: f64) -> f64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let buf = vec![b'b'; 1 << 16];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        match s.write(&buf) {
            Ok(n) => sent += n as u64,
            Err(_) => break,
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut b = [0u8; 16];
    // The sink closes on EOF: everything was read.
    let _ = s.read(&mut b);
    sent as f64 / t0.elapsed().as_secs_f64() / 1e6
}

/// Paced requests at `per_sec` for `secs` from one thread; `kill` runs once
/// at `kill_at`. Returns (attempted, failed).
pub fn failover(
    addr: SocketAddr,
    per_sec: f64,
    secs: f64,
    kill_at: f64,
    kill: &mut dyn FnMut(),
) -> (u64, u64) {
    let t0 = Instant::now();
    let (mut n, mut failed) = (0u64, 0u64);
    let mut killed = false;
    let interval = Duration::from_secs_f64(1.0 / per_sec);
    let mut next = Instant::now();
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        if !killed && t0.elapsed() >= Duration::from_secs_f64(kill_at) {
            kill();
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

/// Source addresses of held connections: 127.0.0.2..=127.0.0.65, each with
/// its own ephemeral port range (28k ports by default: 1.8M in all).
const HOLD_SOURCES: u8 = 64;

/// Entry point of the hidden `xtask bench-hold` subcommand: opens `count`
/// connections to `addr` (paced at `per_sec`, given up after `secs`), says
/// `held N failed M secs S` on stdout, holds them until stdin closes, then
/// closes them and exits.
pub fn hold_main(addr: SocketAddr, count: usize, per_sec: f64, secs: f64) -> anyhow::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(count);
    let failed = hold(
        addr,
        count,
        per_sec,
        t0 + Duration::from_secs_f64(secs),
        &mut held,
    );
    println!(
        "held {} failed {failed} secs {:.3}",
        held.len(),
        t0.elapsed().as_secs_f64()
    );
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    // Reset rather than close: no 100k TIME_WAIT sockets left for the
    // phases after this one.
    for s in &held {
        let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    }
    drop(held);
    Ok(())
}

/// Opens `n` more connections to `addr` and keeps them in `held`; each one
/// is confirmed by the backend (`h` answered with `k`). Paced at `per_sec`,
/// given up at `deadline` or after 1000 failures. Returns how many failed.
pub fn hold(
    addr: SocketAddr,
    n: usize,
    per_sec: f64,
    deadline: Instant,
    held: &mut Vec<TcpStream>,
) -> u64 {
    let mut failed = 0u64;
    let interval = Duration::from_secs_f64(1.0 / per_sec);
    let mut next = Instant::now();
    let target = held.len() + n;
    // Spread over the source addresses whatever the process.
    let mut i = std::process::id() as usize;
    while held.len() < target && Instant::now() < deadline && failed < 1000 {
        let src = Ipv4Addr::new(127, 0, 0, 2 + (i % HOLD_SOURCES as usize) as u8);
        i += 1;
        match hold_one(src, addr) {
            Some(s) => held.push(s),
            None => failed += 1,
        }
        next += interval;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    failed
}

fn hold_one(src: Ipv4Addr, addr: SocketAddr) -> Option<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    // The port is chosen at connect(), per 4-tuple, not at bind().
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int option on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sock.bind(&SocketAddr::from((src, 0)).into()).ok()?;
    sock.connect(&addr.into()).ok()?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"h").ok()?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).ok()?;
    (b[0] == b'k').then_some(s)
}

/// `GET path` over HTTP/1.1 with `Connection: close`; the time to the
/// whole answer, in ms, or None.
pub fn http_get_ms(addr: SocketAddr, path: &str) -> Option<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    body.starts_with(b"HTTP/1.1 200")
        .then(|| t.elapsed().as_secs_f64() * 1e3)
}

/// The whole body of `GET path`, for parsing.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}
