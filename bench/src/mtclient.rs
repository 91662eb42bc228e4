//! Complete MTProxy clients at a paced rate, for the stop phase.
//!
//! One client: a new connection, the obfuscated2 `dd` handshake (padded
//! intermediate tag, DC 2) and one frame carrying an unencrypted
//! `req_pq_multi`; it is served when a frame comes back that decrypts to
//! that message (the middle-proxy stand-in echoes every forwarded message
//! through the official server). A client that gets anything else was
//! refused, reset, closed without an answer or timed out: what a Telegram
//! app would see as a failed connection.
//!
//! The protocol is the agent's `mtproxy` check's
//! (mtlb-userspace/src/checks/mtproxy.rs, where it is explained) and the
//! test fixture probe.py's; it is written again here because the bench
//! cannot depend on the agent crate (xtask builds the bench before the
//! eBPF toolchain that crate's build needs is installed), and the Python
//! client costs too much CPU per client for a few hundred clients per
//! second on two cores.
//!
//! The load is open loop: client `i` starts at `i / rate` seconds whatever
//! the others are doing (a tokio task each, on one thread), so a slow or
//! failing replica does not slow the arrivals down.

use aes::cipher::{KeyIvInit as _, StreamCipher as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Ctr = ctr::Ctr128BE<aes::Aes256>;

/// How a client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its request came back through the proxy.
    Served,
    /// connect() refused (RST to the SYN).
    Refused,
    /// Reset after the connection was accepted.
    Reset,
    /// Closed (FIN) before a whole answer.
    Closed,
    /// No answer within the client's timeout.
    TimedOut,
    /// Bytes came back that do not answer the request.
    Garbage,
    /// Any other error (e.g. no local port).
    Other,
}

impl Outcome {
    pub const FAILED: [Outcome; 6] = [
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Closed,
        Outcome::TimedOut,
        Outcome::Garbage,
        Outcome::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::Refused => "refused",
            Outcome::Reset => "reset",
            Outcome::Closed => "closed without answer",
            Outcome::TimedOut => "timed out",
            Outcome::Garbage => "wrong answer",
            Outcome::Other => "other error",
        }
    }

    fn of_io(e: &std::io::Error) -> Outcome {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Outcome::Reset,
            _ => Outcome::Other,
        }
    }
}

/// A 64-byte header as sent (0..56 clear, 56..64 encrypted) and the
/// client-to-proxy and proxy-to-client ciphers.
fn handshake(secret: &[u8; 16]) -> ([u8; 64], Ctr, Ctr) {
    let mut h: [u8; 64];
    loop {
        h = rand::random();
        let start = [h[0], h[1], h[2], h[3]];
        let reserved = [
            *b"HEAD",
            *b"POST",
            *b"GET ",
            *b"OPTI",
            [0xee; 4],
            [0xdd; 4],
            [0x16, 0x03, 0x01, 0x02],
        ];
        if h[0] != 0xef && !reserved.contains(&start) && h[4..8] != [0; 4] {
            break;
        }
    }
    h[56..60].copy_from_slice(&[0xdd; 4]);
    h[60..62].copy_from_slice(&2i16.to_le_bytes());
    let key = |material: &[u8]| -> [u8; 32] {
        Sha256::new()
            .chain_update(material)
            .chain_update(secret)
            .finalize()
            .into()
    };
    let mut rev: [u8; 48] = h[8..56].try_into().expect("48 bytes");
    rev.reverse();
    let mut enc = Ctr::new(&key(&h[8..40]).into(), h[40..56].into());
    let dec = Ctr::new(&key(&rev[..32]).into(), rev[32..48].into());
    let mut wire = h;
    enc.apply_keystream(&mut wire);
    wire[..56].copy_from_slice(&h[..56]);
    (wire, enc, dec)
}

/// The request: a padded-intermediate frame around an unencrypted
/// req_pq_multi (auth_key_id 0, msg_id, length 20, constructor, nonce);
/// returns (frame, message).
fn request() -> (Vec<u8>, Vec<u8>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let msg_id = ((now.as_secs() << 32) | u64::from(now.subsec_nanos())) & !3;
    let mut msg = vec![0u8; 8];
    msg.extend_from_slice(&msg_id.to_le_bytes());
    msg.extend_from_slice(&20u32.to_le_bytes());
    msg.extend_from_slice(&0xbe7e8ef1u32.to_le_bytes());
    msg.extend_from_slice(&rand::random::<[u8; 16]>());
    let pad = usize::from(rand::random::<u8>() % 16);
    let mut frame = ((msg.len() + pad) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&msg);
    frame.extend((0..pad).map(|_| rand::random::<u8>()));
    (frame, msg)
}

/// One complete client against `addr`.
pub async fn client(addr: SocketAddr, secret: &[u8; 16], timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, exchange(addr, secret)).await {
        Ok(o) => o,
        Err(_) => Outcome::TimedOut,
    }
}

async fn exchange(addr: SocketAddr, secret: &[u8; 16]) -> Outcome {
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::of_io(&e),
    };
    let (wire, mut enc, mut dec) = handshake(secret);
    let (mut frame, msg) = request();
    enc.apply_keystream(&mut frame);
    let mut out = wire.to_vec();
    out.extend_from_slice(&frame);
    if let Err(e) = s.write_all(&out).await {
        return Outcome::of_io(&e);
    }
    let mut plain = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) => return Outcome::Closed,
            Ok(n) => n,
            Err(e) => return Outcome::of_io(&e),
        };
        let mut chunk = buf[..n].to_vec();
        dec.apply_keystream(&mut chunk);
        plain.extend_from_slice(&chunk);
        if plain.len() < 4 {
            continue;
        }
        let len =
            (u32::from_le_bytes(plain[..4].try_into().expect("4 bytes")) & 0x7fff_ffff) as usize;
        if !(msg.len()..=4096).contains(&len) {
            return Outcome::Garbage;
        }
        if plain.len() >= 4 + len {
            return if plain[4..4 + msg.len()] == msg[..] {
                Outcome::Served
            } else {
                Outcome::Garbage
            };
        }
    }
}

/// One client of a paced load: when it started (seconds after the load
/// started), how it ended and how long it took (ms).
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub at: f64,
    pub outcome: Outcome,
    pub ms: f64,
}

/// Clients started at a fixed rate on a thread of their own until
/// `finish`.
pub struct Paced {
    stop: Arc<AtomicBool>,
    t0: Instant,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<Record>>>,
}

impl Paced {
    /// Starts `rate` clients per second against `addr`, each given up
    /// after `timeout`. The thread is spawned from the caller's, so the
    /// clients connect from its network namespace.
    pub fn start(addr: SocketAddr, secret: [u8; 16], rate: f64, timeout: Duration) -> Paced {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(paced(addr, secret, rate, timeout, t0, flag)))
        });
        Paced { stop, t0, thread }
    }

    /// Seconds since the load started (the clients' `at` scale).
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Stops starting clients, waits for those under way (each ends
    /// within its timeout) and returns every client's record, in start
    /// order.
    pub fn finish(self) -> anyhow::Result<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut v = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        v.sort_by(|a, b| a.at.total_cmp(&b.at));
        Ok(v)
    }
}

async fn paced(
    addr: SocketAddr,
    secret: [u8; 16],
    rate: f64,
    timeout: Duration,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Record> {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(t0),
        Duration::from_secs_f64(1.0 / rate),
    );
    // A late tick is made up at once: the arrivals keep their rate.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let at = t0.elapsed().as_secs_f64();
        tasks.spawn(async move {
            let t = Instant::now();
            let outcome = client(addr, &secret, timeout).await;
            Record {
                at,
                outcome,
                ms: t.elapsed().as_secs_f64() * 1e3,
            }
        });
        while let Some(r) = tasks.try_join_next() {
            out.extend(r.ok());
        }
    }
    while let Some(r) = tasks.join_next().await {
        out.extend(r.ok());
    }
    out
}
