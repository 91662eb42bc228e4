//! The listener glue: reads what the kernel knows about replica listeners
//! (registrations, listen events, accept queues, assignment totals) and
//! turns it into the core's events; what to make of it is the core's.

use super::{
    Agent,
    adopt::{adopt, refused},
    effect::{BindWhy, Event, Fact, QueueReading, Reading, Registration, Registrations, StopMark},
    render::emit,
};
use crate::{
    config::Config,
    error::report,
    kernel::registry::{self, RefuseWhy},
};
use mtlb_common::{
    EV_CLOSED, EV_REFUSED_BIND, EV_REFUSED_BIND_CGROUP, EV_REFUSED_OWNER, EV_REFUSED_TAKEN,
    EV_REGISTERED, EV_STOPPING, ListenEvent,
};
use std::net::SocketAddr;

/// pid -> bitmask of the slots whose listener it holds.
pub(super) type OwnerPids = registry::Owners;

impl Agent {
    /// Every slot's registration now, with how to show each listener.
    pub(super) fn poll_listeners(&mut self) -> Option<Registrations> {
        let cfg = self.state.cfg();
        let views = match self
            .registry
            .poll(self.dataplane.maps_mut(), self.state.slots().len())
        {
            Ok(v) => v,
            Err(e) => {
                self.failures.read(Reading::Registrations, report(&e));
                return None;
            }
        };
        Some(
            views
                .into_iter()
                .enumerate()
                .map(|(slot, view)| {
                    let view = view?;
                    let slot = slot as u32;
                    let (addr, v6only) = match self.registry.addr_of(view.cookie) {
                        Some((a, v)) => (Some(a), v),
                        None => (registry::find_addr(cfg, slot), None),
                    };
                    let addr = show(addr, cfg, slot);
                    let family = registry::family_name(view.family, v6only);
                    Some(Registration {
                        cookie: view.cookie,
                        desc: format!("{addr} ({family}, via {})", registry::how_name(view.how)),
                        short: format!("{addr} ({family})"),
                    })
                })
                .collect(),
        )
    }

    /// Whether `replica_cgroup` is now another cgroup than the one whose id
    /// the bind hooks judge by (removed and made again, e.g. its slice
    /// stopped and started): every bind of the replicas is refused then,
    /// and sock_ops stays on the cgroup that is gone.
    fn replica_cgroup_recreated(&self) -> Option<Event> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = self.replica_cgroup_dir.as_ref()?;
        let now = std::fs::metadata(dir).ok()?.ino();
        let was = self.dataplane.maps().replica_cgroup().ok()?;
        (was != 0 && now != was).then(|| Event::ReplicaCgroupRecreated {
            path: dir.clone(),
            was,
            now,
        })
    }

    /// Listener events from the kernel, as events for the core:
    /// registrations and closes are read from the maps at once; refusals
    /// are explained (owner, pid).
    pub(super) fn on_listen_events(&mut self, evs: Vec<ListenEvent>) -> Vec<Event> {
        let mut out = Vec::new();
        let mut changed = false;
        let mut scan = false;
        let mut stop = false;
        for ev in evs {
            let why = match ev.kind {
                EV_STOPPING => {
                    stop = true;
                    continue;
                }
                EV_REGISTERED | EV_CLOSED => {
                    changed = true;
                    continue;
                }
                EV_REFUSED_OWNER => {
                    // Not marked at bind: bound before the agent ran, or by
                    // someone else. The scan tells which (it reads the
                    // owner), adopting the first kind and reporting the
                    // other.
                    scan = true;
                    continue;
                }
                EV_REFUSED_TAKEN => RefuseWhy::Taken,
                EV_REFUSED_BIND => {
                    // The socket never got its port: nothing to look up.
                    out.push(Event::BindRefused {
                        slot: ev.slot,
                        addr: event_addr(&ev),
                        uid: ev.refused_uid(),
                        why: BindWhy::Owner,
                    });
                    continue;
                }
                EV_REFUSED_BIND_CGROUP => {
                    let mount = crate::system::mounts::cgroup2_mount();
                    out.push(Event::BindRefused {
                        slot: ev.slot,
                        addr: event_addr(&ev),
                        uid: ev.uid,
                        why: BindWhy::Cgroup {
                            id: ev.cookie,
                            path: mount
                                .and_then(|m| crate::system::mounts::cgroup_path(&m, ev.cookie)),
                        },
                    });
                    if let Some(e) = self.replica_cgroup_recreated() {
                        out.push(e);
                    }
                    continue;
                }
                _ => continue,
            };
            let addr = event_addr(&ev);
            match self.registry.explain(ev.slot, addr, why) {
                Ok(Some(r)) => emit(&refused(self.state.cfg(), &r)),
                Ok(None) => {}
                Err(e) => self.failures.read(Reading::RefusedListener, report(&e)),
            }
        }
        // One scan for however many refusals came in this batch.
        if scan {
            let cfg = self.state.cfg().clone();
            changed |= adopt(
                &cfg,
                &mut self.registry,
                self.dataplane.maps_mut(),
                &mut self.failures,
            );
        }
        if changed && let Some(changes) = self.poll_listeners() {
            out.push(Event::Listeners(changes));
        }
        if stop && let Some(marks) = self.stop_marks() {
            out.push(Event::StopMarks(marks));
        }
        out
    }

    /// The kernel's stop marks of the slots in use, each with the accept
    /// queue of its listener now (read only when some slot is marked);
    /// empty when no slot is marked.
    pub(super) fn stop_marks(&mut self) -> Option<Vec<Option<StopMark>>> {
        let maps = self.dataplane.maps();
        let mut marks = Vec::with_capacity(self.state.slots().len());
        for slot in 0..self.state.slots().len() as u32 {
            match maps.stopping(slot) {
                Ok(m) => marks.push(m),
                Err(e) => {
                    self.failures.read(Reading::StopMarks, report(&e));
                    return None;
                }
            }
        }
        if marks.iter().all(Option::is_none) {
            return Some(Vec::new());
        }
        let queues: std::collections::HashMap<u64, u32> = registry::listeners()
            .map(|ls| ls.into_iter().map(|l| (l.cookie, l.queued)).collect())
            .unwrap_or_default();
        Some(
            marks
                .into_iter()
                .map(|m| {
                    m.map(|m| StopMark {
                        cookie: m.cookie,
                        at_ns: m.at_ns,
                        pid: m.pid,
                        signal: m.signal,
                        queued: queues.get(&m.cookie).copied(),
                    })
                })
                .collect(),
        )
    }

    /// Writes what a scan for the listeners' owners found into OWNER_PIDS
    /// (the stop-signal watch's table).
    pub(super) fn owners_found(&mut self, found: Result<OwnerPids, registry::RegistryError>) {
        let r = found.map_err(|e| report(&e)).and_then(|owners| {
            let r = self
                .dataplane
                .maps_mut()
                .set_owner_pids(&owners.pids)
                .map_err(|e| report(&e));
            self.owner_fds = owners.fds;
            r
        });
        if let Err(error) = r
            && self
                .owners_failed
                .event((), std::time::Instant::now())
                .is_some()
        {
            emit(&Fact::OwnersUnknown { error });
        }
    }

    /// Adopts listeners on replica ports that did not register themselves;
    /// the adopted ones, read back as registrations.
    pub(super) fn adopt_missing(&mut self) -> Option<Registrations> {
        let cfg = self.state.cfg().clone();
        if adopt(
            &cfg,
            &mut self.registry,
            self.dataplane.maps_mut(),
            &mut self.failures,
        ) {
            self.poll_listeners()
        } else {
            None
        }
    }

    /// Every slot's accept queue (sock_diag) and what entered it (the
    /// kernel's count).
    pub(super) fn sample_queues(&self) -> Option<Vec<Option<QueueReading>>> {
        let listeners = registry::listeners().ok()?;
        let known = self.registry.known();
        Some(
            (0..self.state.slots().len())
                .map(|slot| {
                    // The registered socket's queue (by cookie): another
                    // listener on the same port says nothing about it.
                    let cookie = known.get(slot).copied().flatten()?.cookie;
                    listeners
                        .iter()
                        .find(|l| l.cookie == cookie)
                        .map(|l| QueueReading {
                            queued: l.queued,
                            backlog: l.backlog,
                            entered: self
                                .dataplane
                                .maps()
                                .slot_totals(slot as u32)
                                .map_or(0, |t| t.established),
                        })
                })
                .collect(),
        )
    }

    /// Assignments so far per slot, and which slots have a listener: what
    /// bounds their handshake counts.
    pub(super) fn assigned(&self) -> Event {
        let slots = self.state.slots().len();
        let known = self.registry.known();
        Event::Assigned {
            totals: (0..slots as u32)
                .map(|s| {
                    self.dataplane
                        .maps()
                        .slot_totals(s)
                        .map_or(0, |t| t.assigned)
                })
                .collect(),
            listening: (0..slots)
                .map(|s| known.get(s).copied().flatten().is_some())
                .collect(),
        }
    }
}

/// The local address of a listener event.
fn event_addr(ev: &ListenEvent) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(ev.addr);
    let ip = ip
        .to_ipv4_mapped()
        .filter(|_| ev.family == mtlb_common::AF_INET)
        .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
    SocketAddr::new(ip, ev.port)
}

fn show(addr: Option<SocketAddr>, cfg: &Config, slot: u32) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| {
        SocketAddr::new(cfg.replica_address, cfg.replica_port(slot as usize)).to_string()
    })
}
