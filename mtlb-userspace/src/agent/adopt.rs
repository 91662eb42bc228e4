//! Adopting replicas that were listening before they could register
//! themselves (started before the agent, or while their slot was being
//! cleared), and how a refused listener is told.

use super::{
    effect::{Fact, Reading},
    render::emit,
};
use crate::{
    config::Config,
    error::report,
    kernel::{
        maps::Maps,
        registry::{self, Refusal, Registrations},
    },
};

/// Adopts listeners on replica ports that did not register themselves and
/// whose owner may run replicas; reports the others. True when one was
/// adopted.
pub(super) fn adopt(cfg: &Config, registry: &mut Registrations, maps: &mut Maps) -> bool {
    match registry.adopt_missing(cfg, maps) {
        Ok(registry::Adoption {
            adopted,
            refused: refusals,
            failed,
        }) => {
            for e in &failed {
                emit(&Fact::AdoptFailed { error: report(e) });
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
            emit(&Fact::ReadFailed {
                what: Reading::RunningReplicas,
                error: report(&e),
            });
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
