//! The serve loop: waits for the next thing to happen (a signal, a control
//! request, a check result, a listener event, time passing), reads what the
//! core needs from the kernel, and hands it to `apply.rs` to step the core
//! and carry out its effects. Decisions live in `core.rs`.

use super::{
    Agent,
    apply::{CheckDone, Flow},
    effect::{Event, Fact, Signal},
    render::emit,
};
use crate::control;
use mtlb_common::ListenEvent;
use std::time::{Duration, Instant};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinSet,
    time::{Interval, MissedTickBehavior},
};

/// The agent's signal handlers. Install them before [`Agent::start`]: a
/// signal that arrives while starting is then handled (cleanly) once the
/// loop runs, instead of killing the process with programs attached.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// How often the known owners' children are looked for (see `serve`).
const OWNERS_EVERY_MS: u64 = 30_000;

fn every(ms: u64) -> Interval {
    let mut t = tokio::time::interval(Duration::from_millis(ms));
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

impl Agent {
    /// Runs until SIGINT or SIGTERM. Teardown is up to the caller
    /// ([`Agent::shutdown`], or dropping the agent).
    pub async fn serve(&mut self, mut sig: Signals) {
        let listeners = self.poll_listeners().unwrap_or_default();
        let verified = std::mem::take(&mut self.seeded);
        let mut checks: JoinSet<CheckDone> = JoinSet::new();
        self.run(
            Event::Started {
                listeners,
                verified,
            },
            None,
            &mut checks,
        );
        // Listener events from the kernel wake the loop at once (a
        // returning replica is checked the moment it listens); without the
        // ring buffer the 100 ms poll still finds every change.
        let mut events = self
            .dataplane
            .maps_mut()
            .take_events()
            // SAFETY: the ring buffer owns its fd, and the AsyncFd owns
            // the ring buffer: the fd outlives its registration.
            .and_then(|rb| unsafe { tokio::io::unix::AsyncFd::register(rb) }.ok());
        if events.is_none() {
            emit(&Fact::NoListenEvents);
        }

        let (tx, mut rx) = mpsc::channel::<control::Incoming>(16);
        if let Some(l) = self.control.take() {
            // Retried every 100 ms while it lasts (out of descriptors):
            // told once a minute.
            let mut told = super::throttle::Throttle::default();
            tokio::spawn(control::accept(
                l,
                tx,
                control::Limits::default(),
                move |e| {
                    if let Some(more) = told.event((), Instant::now()) {
                        emit(&Fact::ControlAcceptFailed {
                            error: format!("{e} ({more} more since the last line)"),
                        })
                    }
                },
            ));
        }
        // Registration itself happens in the kernel at listen(); this only
        // notices it, so 100 ms is plenty.
        let mut poll = every(100);
        let mut scan_ms = self.state.cfg().scan_interval_ms;
        let mut scan = every(scan_ms);
        // Handshakes that never completed stop counting within a tick.
        let mut expire = every(250);
        // Workers a replica forks (or respawns) after its listener
        // registered and came UP: the known owners' children, looked at
        // cheaply (`owners_again`); registrations and UP changes scan
        // every process at once (seconds of CPU with 100k connections
        // held, so never on a timer).
        let mut owners = every(OWNERS_EVERY_MS);
        let mut owners_scan: Option<
            tokio::task::JoinHandle<
                Result<super::listeners::OwnerPids, crate::kernel::registry::RegistryError>,
            >,
        > = None;
        loop {
            let due = self
                .state
                .next_check_due()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let mut reply = None;
            let mut written = None;
            let mut evs = Vec::with_capacity(3);
            tokio::select! {
                _ = sig.int.recv() => evs.push(Event::Signal(Signal::Interrupt)),
                _ = sig.term.recv() => evs.push(Event::Signal(Signal::Terminate)),
                _ = sig.hup.recv() => evs.push(Event::Signal(Signal::Hangup)),
                Some((req, r, w)) = rx.recv() => {
                    reply = Some(r);
                    written = Some(w);
                    evs.push(Event::Control(req));
                }
                _ = tokio::time::sleep_until(due) => evs.push(Event::ChecksDue),
                Some(done) = checks.join_next(), if !checks.is_empty() => {
                    let Ok((slot, generation, cookie, result)) = done else { continue };
                    evs.push(Event::CheckDone { slot, generation, cookie, result });
                }
                Ok(mut guard) = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                    let mut kinds = Vec::new();
                    while let Some(item) = guard.get_inner_mut().next() {
                        if item.len() >= std::mem::size_of::<ListenEvent>() {
                            // SAFETY: the programs write whole ListenEvents;
                            // read unaligned from the ring's bytes.
                            kinds.push(unsafe {
                                std::ptr::read_unaligned(item.as_ptr().cast::<ListenEvent>())
                            });
                        }
                    }
                    guard.clear_ready();
                    drop(guard);
                    evs = self.on_listen_events(kinds);
                }
                _ = poll.tick() => {
                    if let Some(changes) = self.poll_listeners() {
                        evs.push(Event::Listeners(changes));
                    }
                    if let Some(samples) = self.sample_queues() {
                        evs.push(Event::Queues(samples));
                    }
                    // A mark whose event the ring lost is found here.
                    // (None of them: nothing for the core.)
                    if let Some(marks) = self.stop_marks().filter(|m| !m.is_empty()) {
                        evs.push(Event::StopMarks(marks));
                    }
                    evs.push(Event::Elapsed);
                }
                _ = expire.tick() => evs.push(self.assigned()),
                _ = owners.tick() => {
                    // Not while a full scan runs: it finds them all.
                    if owners_scan.is_none() && !self.owner_fds.is_empty() {
                        match crate::kernel::registry::listener_inodes(self.registry.known()) {
                            Ok(inodes) => {
                                let known = std::mem::take(&mut self.owner_fds);
                                owners_scan = Some(tokio::task::spawn_blocking(move || {
                                    Ok(crate::kernel::registry::owners_again(&inodes, &known))
                                }));
                            }
                            Err(e) => self.owners_found(Err(e)),
                        }
                    }
                }
                done = async { owners_scan.as_mut().expect("guarded").await }, if owners_scan.is_some() => {
                    owners_scan = None;
                    if let Ok(found) = done {
                        self.owners_found(found);
                    }
                }
                _ = scan.tick() => {
                    emit(&Fact::Scanning);
                    if let Some(changes) = self.adopt_missing() {
                        evs.push(Event::Listeners(changes));
                    }
                }
            };
            let mut reply = reply;
            for ev in evs {
                if self.run(ev, reply.take(), &mut checks) == Flow::Stop {
                    // Stopped by a control request (`mtlb remove`): its
                    // answer goes out first.
                    if let Some(w) = written {
                        let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
                    }
                    return;
                }
            }
            // One scan at a time, in a blocking thread: it reads every
            // process's fd table, which must not hold up checks or steering
            // decisions. Asked again meanwhile: another scan after it.
            if self.owners_wanted && owners_scan.is_none() {
                self.owners_wanted = false;
                // sock_diag here (this thread is in the namespace), /proc
                // there.
                match crate::kernel::registry::listener_inodes(self.registry.known()) {
                    Ok(inodes) => {
                        owners_scan = Some(tokio::task::spawn_blocking(move || {
                            crate::kernel::registry::owner_pids(&inodes)
                        }))
                    }
                    Err(e) => self.owners_found(Err(e)),
                }
            }
            // A reload may have changed the scan interval.
            if self.state.cfg().scan_interval_ms != scan_ms {
                scan_ms = self.state.cfg().scan_interval_ms;
                scan = every(scan_ms);
            }
        }
    }
}
