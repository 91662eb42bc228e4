//! What bringing the agent up and down did, as typed facts (rendered to
//! log lines in `render.rs`).

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
