//! Complete MTProxy clients at a paced rate, open loop, for tests: the
//! bench's load (`mtlb_bench::mtclient::Paced`: client `i` starts at
//! `i / rate` seconds whatever the others are doing, each a new
//! connection, the obfuscated2 `dd` handshake and one frame answered
//! through the proxy and its upstream), started inside a test's
//! namespace, with its records summed up as a test asserts on them.

use crate::{BALANCED, Netns, scaled};
use mtlb_bench::mtclient::{Outcome, Paced};
use std::time::Duration;

/// What a [`PacedClients`] run saw.
#[derive(Debug)]
pub struct PacedOutcome {
    pub served: usize,
    /// Each failed client: when it started (since the run began) and how
    /// it failed (`Outcome::label`: "refused", "reset", …).
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
pub struct PacedClients(Paced);

impl PacedClients {
    /// Starts `rate` clients a second to the balanced port of `ns` with
    /// `secret` (as the agent's config spells it: `dd` and 32 hex digits).
    pub fn start(ns: &Netns, rate: u32, secret: &str) -> Self {
        let Some(mtlb::checks::mtproxy::Secret::Obfuscated(key)) =
            mtlb::checks::mtproxy::Secret::parse(secret)
        else {
            panic!("not a dd secret: {secret}");
        };
        let file = ns.file.try_clone().unwrap();
        // The load's thread is spawned from one in the namespace, so its
        // sockets are made there.
        let paced = std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            Paced::start(
                BALANCED.parse().unwrap(),
                key,
                rate as f64,
                scaled(Duration::from_secs(5)),
            )
        })
        .join()
        .unwrap();
        Self(paced)
    }

    /// Time since the run began, on the clock of the failures' `at`.
    pub fn elapsed(&self) -> Duration {
        Duration::from_secs_f64(self.0.now())
    }

    /// Stops starting clients, waits for those under way; what they saw.
    pub fn finish(self) -> PacedOutcome {
        let records = self.0.finish().expect("the client thread");
        let mut out = PacedOutcome {
            served: 0,
            failed: Vec::new(),
            elapsed: Duration::from_secs_f64(records.last().map_or(0.0, |r| r.at)),
        };
        for r in records {
            if r.outcome == Outcome::Served {
                out.served += 1;
            } else {
                out.failed
                    .push((Duration::from_secs_f64(r.at), r.outcome.label().into()));
            }
        }
        out
    }
}
