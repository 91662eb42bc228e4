//! Adopting replicas that were listening before they could register
//! themselves (started before the agent, or while their slot was being
//! cleared), and how a refused listener is told.

use super::{
    effect::{Fact, Reading},
    render::emit,
    throttle::Throttle,
};
use crate::{
    config::Config,
    error::report,
    kernel::{
        maps::Maps,
        registry::{self, Refusal, Registrations},
    },
};

/// Failures the scans, the polls and the SYN-cookie watch meet again every
/// tick or few hundred ms while a fault lasts (no descriptors left,
/// sock_diag or pidfd_getfd refused): each kind told once a minute, with
/// how many went untold.
#[derive(Debug, Default)]
pub(super) struct Failures {
    reads: Throttle<Reading>,
    adoptions: Throttle<()>,
}

impl Failures {
    pub(super) fn read(&mut self, what: Reading, error: String) {
        if let Some(more) = self.reads.event(what, std::time::Instant::now()) {
            emit(&Fact::ReadFailed {
                what,
                error: with_untold(error, more),
            });
        }
    }

    fn adoption(&mut self, error: String) {
        if let Some(more) = self.adoptions.event((), std::time::Instant::now()) {
            emit(&Fact::AdoptFailed {
                error: with_untold(error, more),
            });
        }
    }
}

fn with_untold(error: String, more: u64) -> String {
    if more == 0 {
        error
    } else {
        format!("{error} ({more} more since the last line)")
    }
}

/// Adopts listeners on replica ports that did not register themselves and
/// whose owner may run replicas; reports the others. True when one was
/// adopted.
pub(super) fn adopt(
    cfg: &Config,
    registry: &mut Registrations,
    maps: &mut Maps,
    failures: &mut Failures,
) -> bool {
    match registry.adopt_missing(cfg, maps) {
        Ok(registry::Adoption {
            adopted,
            refused: refusals,
            failed,
        }) => {
            for e in &failed {
                failures.adoption(report(e));
            }
            for a in &adopted {
                emit(&Fact::Adopted {
                    slot: a.slot,
                    addr: a.addr,
                    pid: a.pid,
                });
            }
            for r in &refusals {
                emit(&refused(cfg, r));
            }
            !adopted.is_empty()
        }
        Err(e) => {
            failures.read(Reading::RunningReplicas, report(&e));
            false
        }
    }
}

/// A refused listener, with who owns it.
pub(super) fn refused(cfg: &Config, r: &Refusal) -> Fact {
    Fact::ListenerRefused {
        slot: r.slot,
        addr: r.addr,
        pid: r.pid,
        uid: r.uid,
        why: r.why,
        replica_uids: cfg.replica_uids.clone(),
        replica_cgroup: cfg.replica_cgroup.clone(),
    }
}
