//! What bringing the agent up and down did, as typed facts (rendered to
//! log lines in `render.rs`).

use crate::kernel::dataplane;
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

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
    /// Service addresses made local on `lo` (they were not).
    VipsAdded(Vec<IpAddr>),
    /// The service addresses were announced when the agent started (an
    /// earlier agent's decision, taken over).
    AnnouncedAtStart(Vec<IpAddr>),
    /// Routes in the announce table that are no service address (any
    /// more): withdrawn.
    StrayWithdrawn(Vec<IpAddr>),
    /// The service addresses withdrawn and taken off `lo` (mtlb removed).
    VipsRemoved(Vec<IpAddr>),
    /// `announce.table` changed: the routes left in the earlier table
    /// (`from`) withdrawn; `to` is the table now.
    OldTableWithdrawn {
        from: u32,
        to: u32,
        vips: Vec<IpAddr>,
    },
    /// Service addresses an earlier start put on `lo`, no longer in
    /// `announce.vips`: taken off `lo`.
    DroppedVipsRemoved(Vec<IpAddr>),
    /// The same, announced until this start: withdrawn, left on `lo`
    /// while the router converges, taken off by the next start.
    DroppedVipsKept(Vec<IpAddr>),
    /// Teardown failed (dropping the agent; nobody else to tell).
    TeardownFailed(String),
}

impl From<dataplane::Fact> for StartFact {
    fn from(f: dataplane::Fact) -> Self {
        Self::Dataplane(f)
    }
}
