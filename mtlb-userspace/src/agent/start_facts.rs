//! What bringing the agent up and down did, as typed facts, and the one
//! place they become log lines.

use crate::kernel::dataplane;
use std::{net::SocketAddr, path::PathBuf};

/// Something start-up or teardown did that the operator is told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFact {
    /// No bpffs at `configured` in this mount namespace; the host's is
    /// used through `through`.
    BpffsFromHost {
        configured: PathBuf,
        through: PathBuf,
    },
    /// A new bpffs was mounted at `at`; `private`: only this mount
    /// namespace sees it (and its pins go with it).
    BpffsMounted {
        at: PathBuf,
        private: bool,
    },
    Cgroup2Mounted(PathBuf),
    StatsListening(SocketAddr),
    Dataplane(dataplane::Fact),
    /// Teardown failed (dropping the agent; nobody else to tell).
    TeardownFailed(String),
}

impl From<dataplane::Fact> for StartFact {
    fn from(f: dataplane::Fact) -> Self {
        Self::Dataplane(f)
    }
}

/// Logs `fact` at its level, in the agent's wording.
pub fn log(fact: &StartFact) {
    use dataplane::Fact as D;
    match fact {
        StartFact::BpffsFromHost {
            configured,
            through,
        } => tracing::info!(
            "no bpffs at {} in this mount namespace (ip netns exec remounts /sys); using the host's bpffs through {}",
            configured.display(),
            through.display()
        ),
        StartFact::BpffsMounted { at, private: true } => tracing::warn!(
            "mounted a new bpffs at {}; it is private to this mount namespace, so the pins are not visible from the host and go away with it",
            at.display()
        ),
        StartFact::BpffsMounted { at, private: false } => {
            tracing::info!("mounted bpffs at {}", at.display())
        }
        StartFact::Cgroup2Mounted(at) => tracing::info!("mounted cgroup2 at {}", at.display()),
        StartFact::StatsListening(addr) => {
            tracing::info!("stats on http://{addr}/stats, metrics on http://{addr}/metrics")
        }
        StartFact::Dataplane(D::TookOver { dir }) => tracing::info!(
            "taking over the pinned state of an earlier agent in {}",
            dir.display()
        ),
        StartFact::Dataplane(D::ReplacedStale { dir, why }) => tracing::warn!(
            "found pins of an earlier agent in {} that this build cannot take over ({why}); replacing them, counts start from zero",
            dir.display()
        ),
        StartFact::Dataplane(D::ReplacedLink { path }) => {
            tracing::debug!("replaced the previous agent's link {}", path.display())
        }
        StartFact::Dataplane(D::UnpinFailed { path, error }) => {
            tracing::warn!("cannot unpin {}: {error}", path.display())
        }
        StartFact::Dataplane(D::KeepingPins { dir }) => {
            tracing::info!("keeping programs attached; pins stay in {}", dir.display())
        }
        StartFact::Dataplane(D::Detached { dir }) => {
            tracing::info!("detached; removed pins in {}", dir.display())
        }
        StartFact::Dataplane(D::Swept { dir }) => tracing::info!(
            "removed the pins of a network namespace that is gone in {}; its programs are detached",
            dir.display()
        ),
        StartFact::Dataplane(D::SweepFailed { dir, error }) => tracing::warn!(
            "cannot remove the pins of a network namespace that is gone in {}: {error}",
            dir.display()
        ),
        StartFact::TeardownFailed(report) => tracing::error!("{report}"),
    }
}

/// Logs each of `facts`, in order.
pub fn log_all(facts: impl IntoIterator<Item = StartFact>) {
    for f in facts {
        log(&f);
    }
}
