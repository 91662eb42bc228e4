//! Complete MTProxy clients at a paced rate, open loop: client `i` starts
//! at `i / rate` seconds whatever the others are doing, so a slow or
//! failing replica does not slow the arrivals down (a one-at-a-time loop
//! would wait out a failure and send fewer clients into it).
//!
//! Each client is the agent's own `mtproxy` check (a new connection, the
//! obfuscated2 `dd` handshake, one frame answered through the proxy and
//! its upstream): it is served when its request came back, and anything
//! else (refused, reset, closed unanswered, timed out) is a failed client,
//! as a Telegram app would see it.

use crate::{BALANCED, Netns, scaled};
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// What a [`PacedClients`] run saw.
#[derive(Debug)]
pub struct PacedOutcome {
    pub served: usize,
    /// Each failed client: when it started (since the run began) and why.
    pub failed: Vec<(Duration, String)>,
    /// How long clients were started for.
    pub elapsed: Duration,
}

impl PacedOutcome {
    pub fn clients(&self) -> usize {
        self.served + self.failed.len()
    }

    /// Clients started per second.
    pub fn rate(&self) -> f64 {
        self.clients() as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

/// Clients running in a thread of their own inside a namespace.
pub struct PacedClients {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<PacedOutcome>,
    /// When client 0 started: `at` of each failure counts from here.
    t0: Instant,
}

impl PacedClients {
    /// Starts `rate` clients a second to the balanced port of `ns` with
    /// `secret` (as the agent's config spells it). Bounded by scaled(120 s)
    /// and 200,000 clients.
    pub fn start(ns: &Netns, rate: u32, secret: &str) -> Self {
        let file = ns.file.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let secret = secret.to_string();
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            // Sockets are made in the calling thread's namespace; the
            // runtime runs every client on this thread.
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(run(t0, rate, secret, s2))
        });
        Self { stop, handle, t0 }
    }

    /// Time since the run began, on the clock of the failures' `at`.
    pub fn elapsed(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Stops starting clients, waits for those under way; what they saw.
    pub fn finish(self) -> PacedOutcome {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

type Done = (Duration, mtlb::checks::health::CheckResult);

fn tally(out: &mut PacedOutcome, (at, r): Done) {
    if r.ok {
        out.served += 1;
    } else {
        let why = match &r.info {
            Some(i) => format!("{}: {i}", r.reason),
            None => r.reason.clone(),
        };
        out.failed.push((at, why));
    }
}

async fn run(t0: Instant, rate: u32, secret: String, stop: Arc<AtomicBool>) -> PacedOutcome {
    let addr: SocketAddr = BALANCED.parse().unwrap();
    let gap = Duration::from_secs(1) / rate.max(1);
    let timeout = scaled(Duration::from_secs(5));
    let limit = scaled(Duration::from_secs(120));
    let mut out = PacedOutcome {
        served: 0,
        failed: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut i: u32 = 0;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < limit && i < 200_000 {
        tokio::time::sleep_until((t0 + gap * i).into()).await;
        let at = t0.elapsed();
        let secret = secret.clone();
        tasks.spawn(async move {
            (
                at,
                mtlb::checks::mtproxy::check(addr, &secret, timeout).await,
            )
        });
        i += 1;
        // Reap finished clients as we go: bounded memory at any rate.
        while let Some(done) = tasks.try_join_next() {
            tally(&mut out, done.expect("a client task"));
        }
    }
    out.elapsed = t0.elapsed();
    while let Some(done) = tasks.join_next().await {
        tally(&mut out, done.expect("a client task"));
    }
    out
}
