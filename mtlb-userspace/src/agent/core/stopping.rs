//! Replicas told to stop. The kernel marks a slot the instant a process
//! holding its listener is sent a stop signal (and steers around it from
//! then on); here the agent takes the mark in: the replica is DOWN with
//! the reason, its checks wait, and the mark ends with its listener (the
//! process exited: a new listener is checked as any other) or with the
//! grace (the process ignored the signal: checked again as usual).

use super::{State, say};
use crate::{
    agent::effect::{Effect, Fact, Inputs, StopMark},
    agent::reconcile,
    checks::{
        health::{CheckResult, DownCause},
        reason,
    },
};
use std::time::Duration;

/// "SIGTERM", or "signal 40" for one mtlb does not watch.
pub fn signal_name(sig: u32) -> String {
    match sig {
        mtlb_common::SIGINT => "SIGINT".into(),
        mtlb_common::SIGQUIT => "SIGQUIT".into(),
        mtlb_common::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

impl State {
    /// The kernel's stop marks, read now: a new mark of a slot's listener
    /// takes the replica DOWN ("stopping (SIGTERM to pid P)").
    pub(super) fn stop_marks(
        &mut self,
        marks: Vec<Option<StopMark>>,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        for slot in 0..self.slots.len() {
            let Some(m) = marks.get(slot).copied().flatten() else {
                continue;
            };
            let s = &mut self.slots[slot];
            if s.stop_seen == (m.cookie, m.at_ns) {
                continue;
            }
            if s.listener_cookie == 0 || m.cookie != s.listener_cookie {
                // A mark of a listener this slot does not hold: one that
                // closed (its next listener is never skipped for it, and
                // `stop_done` tidied it if it was ours), or one registered
                // since the registrations were read, taken in on the next
                // reading.
                continue;
            }
            s.stop_seen = (m.cookie, m.at_ns);
            s.stopping = Some((m, inp.now));
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: None,
                queued: m.queued.unwrap_or(0) as u64,
            });
            let why = format!(
                "{} ({} to pid {})",
                reason::STOPPING,
                signal_name(m.signal),
                m.pid
            );
            // What waits in its accept queue was accepted by the kernel
            // before the signal: no balancer can move it.
            let info = m
                .queued
                .filter(|q| *q > 0)
                .map(|q| format!("{q} connections were in its accept queue"));
            let ev = s.health.force_down(
                DownCause::Stopping,
                CheckResult::fail(why, info, Duration::ZERO),
            );
            // A check in flight was launched before the signal: its result
            // says nothing now.
            let g = self.next_generation();
            let s = &mut self.slots[slot];
            s.check.generation = g;
            s.check.running = None;
            self.health_event(slot, ev, inp, out);
        }
        self.apply(inp, out);
    }

    /// Stop marks whose grace is over with their listener still there:
    /// lifted, and the replica checked as usual (UP again after `rise`
    /// passing checks; at once when checks are off).
    pub(super) fn stop_graces(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        let grace = Duration::from_millis(self.cfg.stop_grace_ms);
        let verify = reconcile::verifies(&self.cfg);
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let Some((m, since)) = s.stopping else {
                continue;
            };
            if inp.now.duration_since(since) < grace {
                continue;
            }
            s.stopping = None;
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: Some(m.cookie),
                queued: 0,
            });
            say(
                out,
                Fact::StopGraceOver {
                    name: s.name.clone(),
                    pid: m.pid,
                    signal: m.signal,
                    grace,
                },
            );
            s.health.stop_lifted();
            if verify {
                self.check_now(slot, out);
            } else {
                let ev = s.health.listener_back(CheckResult::pass(
                    reason::LISTENER_REGISTERED,
                    Duration::ZERO,
                ));
                self.health_event(slot, ev, inp, out);
            }
        }
        self.apply(inp, out);
    }

    /// The listener of a stopping slot closed: the mark has done its job.
    pub(super) fn stop_done(&mut self, slot: usize, out: &mut Vec<Effect>) {
        if let Some((m, _)) = self.slots[slot].stopping.take() {
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: Some(m.cookie),
                queued: 0,
            });
        }
    }
}
