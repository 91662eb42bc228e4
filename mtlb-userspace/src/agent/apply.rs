//! Carrying out the core's effects: map writes, checks, replies, facts to
//! the journal. Effects whose outcome the core must know (a re-read
//! configuration, a saved state, new registrations) come back as events,
//! stepped in the same turn.

use super::{
    Agent, core,
    effect::{Effect, Event, Fact, Inputs, Reading, Written},
    heal,
    render::{self, emit},
    slot::unix_ms,
};
use crate::{
    checks::health::CheckResult, control::Response, error::report, kernel::cookies, system::vip,
};
use std::{collections::VecDeque, time::Duration};
use tokio::{sync::oneshot, task::JoinSet};

/// A finished check: slot, generation, listener cookie, result.
pub(super) type CheckDone = (usize, u64, u64, CheckResult);

/// Whether to go on after carrying out a step's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Stop,
}

impl Agent {
    /// Steps the core with `ev` and carries out the effects, including
    /// the events some of them produce.
    pub(super) fn run(
        &mut self,
        ev: Event,
        mut reply: Option<oneshot::Sender<Response>>,
        checks: &mut JoinSet<CheckDone>,
    ) -> Flow {
        let mut flow = Flow::Continue;
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let conns = self.dataplane.maps().counts(self.state.slots().len());
            let inp = Inputs {
                now: std::time::Instant::now(),
                unix_ms: unix_ms(),
                conns: &conns,
            };
            for effect in core::step(&mut self.state, &inp, ev) {
                match effect {
                    Effect::Say(f) => emit(&f),
                    Effect::WriteBackend { slot, backend } => {
                        let r = self.dataplane.maps_mut().set_backend(slot, backend);
                        self.written(Written::Backend(slot), r);
                    }
                    Effect::WriteStatus { slot, status } => {
                        let r = self.dataplane.maps_mut().set_status(slot, status);
                        self.written(Written::Status(slot), r);
                    }
                    Effect::WriteSettings(s) => {
                        let r = self.dataplane.maps_mut().set_settings(s);
                        self.written(Written::Settings, r);
                    }
                    Effect::SetAddresses(a) => {
                        let r = self.dataplane.maps_mut().set_addresses(&a);
                        self.written(Written::Addresses, r);
                    }
                    Effect::SetAllowedUids(uids) => {
                        let r = self.dataplane.maps_mut().set_allowed_uids(&uids);
                        self.written(Written::AllowedUids, r);
                    }
                    Effect::Save(saved) => queue.push_back(Event::Saved {
                        error: saved.store(&self.saved_path).err().map(|e| report(&e)),
                    }),
                    Effect::StartCheck {
                        slot,
                        generation,
                        cookie,
                        spec,
                    } => {
                        checks.spawn(async move {
                            // Its own task: a check that panics is a
                            // failed check, and the slot is checked again.
                            let result = tokio::spawn(spec.run()).await.unwrap_or_else(|e| {
                                CheckResult::fail(
                                    "check crashed",
                                    Some(e.to_string()),
                                    Duration::ZERO,
                                )
                            });
                            (slot, generation, cookie, result)
                        });
                    }
                    Effect::Reply(r) => {
                        if let Some(tx) = reply.take() {
                            let _ = tx.send(r);
                        }
                    }
                    Effect::ReadConfig(origin) => queue.push_back(Event::Reloaded {
                        origin,
                        result: Box::new(self.source.read()),
                    }),
                    // Adopted listeners are noticed (and checked) now, not
                    // on the next poll.
                    Effect::Adopt => {
                        if let Some(changes) = self.adopt_missing() {
                            queue.push_back(Event::Listeners(changes));
                        }
                    }
                    Effect::PollListeners => {
                        if let Some(changes) = self.poll_listeners() {
                            queue.push_back(Event::Listeners(changes));
                        }
                    }
                    Effect::BoundHandshakes { slot, most, window } => {
                        if let Some((was, now)) = self
                            .dataplane
                            .maps_mut()
                            .fix_handshakes(slot as u32, |raw| heal::clamp(raw, most))
                        {
                            emit(&Fact::HandshakesBounded {
                                slot,
                                was,
                                now,
                                window,
                            });
                        }
                    }
                    Effect::WatchCookies => {
                        match cookies::watch(self.dataplane.maps_mut(), &mut self.cookies_seen) {
                            Ok(Some(sent)) => emit(&Fact::SynCookies { sent }),
                            Ok(None) => {}
                            // Read every tick: a lasting failure (out of
                            // file descriptors) is told once a minute.
                            Err(e) => self.failures.read(Reading::SynCookies, report(&e)),
                        }
                    }
                    Effect::SettleStop {
                        slot,
                        clear,
                        queued,
                    } => {
                        let r = self
                            .dataplane
                            .maps_mut()
                            .settle_stopping(slot, clear, queued);
                        self.written(Written::Stopping(slot), r);
                    }
                    // Off the loop (it reads every process's fd table):
                    // the serve loop starts a scan after this turn.
                    Effect::FindOwners => self.owners_wanted = true,
                    Effect::Announce {
                        vips,
                        table,
                        announce,
                    } => {
                        // Every VIP is tried: one failing leaves the others
                        // as decided, and the next decision rewrites all.
                        let errors: Vec<String> = vip::write(table, &vips, announce)
                            .into_iter()
                            .map(|(v, e)| format!("{v}: {e}"))
                            .collect();
                        if !errors.is_empty() {
                            // Retried every second: told once a minute.
                            if let Some(more) = self.announce_failed.event((), inp.now) {
                                emit(&Fact::WriteFailed {
                                    what: Written::Announcement,
                                    error: format!(
                                        "{} ({more} more failures since the last line)",
                                        errors.join("; ")
                                    ),
                                });
                            }
                            self.state.announce_failed(inp.now);
                        }
                    }
                    Effect::CountLocalFault(f) => self.report.count(f),
                    Effect::Notify(n) => render::notify(&n),
                    Effect::Remove => self.keep_pins = false,
                    Effect::Stop => flow = Flow::Stop,
                }
            }
        }
        self.show_announcement();
        flow
    }

    /// Gives the stats endpoint the announcement when it changed.
    fn show_announcement(&mut self) {
        let cfg = &self.state.cfg().announce;
        if cfg.vips.is_empty() {
            return;
        }
        let a = self.state.announcement();
        let now = (a.announced(), a.why(), a.changes());
        if self.shown == Some(now) {
            return;
        }
        self.shown = Some(now);
        self.report
            .set_announce(Some(crate::stats::snapshot::AnnounceRow {
                vips: cfg.vips.clone(),
                announced: now.0,
                why: render::why_text(now.1),
                changes: now.2,
            }));
    }

    /// A failed write is reported, and a slot's row written again next
    /// time.
    fn written(&mut self, what: Written, r: Result<(), crate::kernel::maps::MapsError>) {
        let Err(e) = r else { return };
        emit(&Fact::WriteFailed {
            what,
            error: report(&e),
        });
        if let Written::Backend(slot) | Written::Status(slot) = what {
            self.state.forget_written(slot);
        }
    }
}
