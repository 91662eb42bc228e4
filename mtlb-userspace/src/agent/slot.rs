//! One replica slot: the agent's whole record of replica `i` (`mtp{i+1}`):
//! its health, the operator's choices, its listener, its check schedule and
//! what the kernel was last told about it.

use crate::{
    checks::{
        health::{Admin, DownCause, Health, Oper, Thresholds},
        queue::QueueWatch,
    },
    config::{Config, replica_name},
};
use mtlb_common::{
    Backend, Status,
    state::{ListenerState, ReplicaState},
};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub(super) health: Health,
    pub(super) admin: Admin,
    /// Cookie of the registered listener (0: none; sockets' cookies never
    /// are 0).
    pub(super) listener_cookie: u64,
    /// How to show that listener when it goes ("127.0.0.1:10001 (IPv4)").
    pub(super) listener_desc: String,
    /// Cookie of the listener a check has proven (0: none): the kernel
    /// steers to this slot only while it is the registered one.
    pub(super) verified: u64,
    /// Operator's weight (`mtlb backend NAME weight N`), over the config's.
    pub(super) weight_override: Option<u32>,
    /// Scaled away by a reload: draining until its connections close.
    pub(super) removing: bool,
    pub(super) queue: QueueWatch,
    /// Stalled, but kept UP as the last replica taking connections (said
    /// once).
    pub(super) stall_kept: bool,
    /// When it last came UP, for slowstart.
    pub(super) up_since: Option<Instant>,
    pub(super) last_change: Instant,
    pub(super) last_change_unix_ms: u64,
    /// Time DOWN before the current period.
    pub(super) downtime: Duration,
    pub(super) transitions_up: u64,
    pub(super) transitions_down: u64,
    pub(super) check_failures: u64,
    pub(super) check: CheckSchedule,
    /// Told to stop (a stop signal to a process holding its listener):
    /// what, and when the agent heard of it.
    pub(super) stopping: Option<(StopMark, Instant)>,
    /// The last stop mark handled, (cookie, at_ns): a mark is acted on
    /// once, however often it is read.
    pub(super) stop_seen: (u64, u64),
    /// What BACKENDS and STATUS hold for this slot, as last written.
    pub(super) written_backend: Option<Backend>,
    pub(super) written_status: Option<Status>,
}

/// A slot's stop mark as read from the kernel (see `mtlb_common::Stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMark {
    /// The listener marked.
    pub cookie: u64,
    /// When (bpf_ktime_get_ns): with the cookie, tells one mark from the next.
    pub at_ns: u64,
    pub pid: u32,
    pub signal: u32,
    /// The listener's accept queue when the mark was read (`None`: not
    /// found): connections no balancer can move any more.
    pub queued: Option<u32>,
}

/// When this slot's next check runs, and which results still count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSchedule {
    pub next: Instant,
    /// Results of checks launched under another generation (before a
    /// reload) are dropped.
    pub generation: u64,
    /// The generation of the check in flight, if one is.
    pub running: Option<u64>,
}

impl Slot {
    /// A replica not seen yet: DOWN until its listener registers, then UP
    /// at once (as HAProxy starts servers UP) and checked from there.
    pub fn new(slot: usize, now: Instant, unix_ms: u64, check: CheckSchedule) -> Self {
        Self {
            name: replica_name(slot),
            health: Health::waiting_for_listener(),
            admin: Admin::Ready,
            listener_cookie: 0,
            listener_desc: String::new(),
            verified: 0,
            weight_override: None,
            removing: false,
            queue: QueueWatch::default(),
            stall_kept: false,
            up_since: None,
            last_change: now,
            last_change_unix_ms: unix_ms,
            downtime: Duration::ZERO,
            transitions_up: 0,
            transitions_down: 0,
            check_failures: 0,
            check,
            stopping: None,
            stop_seen: (0, 0),
            written_backend: None,
            written_status: None,
        }
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    pub fn admin(&self) -> Admin {
        self.admin
    }

    pub fn weight_override(&self) -> Option<u32> {
        self.weight_override
    }

    pub fn removing(&self) -> bool {
        self.removing
    }

    /// Whether a listener is registered in the slot.
    pub fn listener(&self) -> ListenerState {
        if self.listener_cookie != 0 {
            ListenerState::Registered
        } else {
            ListenerState::Missing
        }
    }

    /// The typed state: what the label, STATUS and the metrics show.
    pub fn state(&self, cfg: &Config) -> ReplicaState {
        ReplicaState {
            oper: self.health.state(&Thresholds::of(cfg)),
            admin: self.admin,
            listener: self.listener(),
        }
    }

    /// Records a state change made to `health` (counts, downtime).
    pub(super) fn changed(&mut self, to: Oper, now: Instant, unix_ms: u64) {
        if to == Oper::Up {
            self.transitions_up += 1;
            self.downtime += now.duration_since(self.last_change);
            self.up_since = Some(now);
        } else {
            self.transitions_down += 1;
            self.up_since = None;
        }
        self.last_change = now;
        self.last_change_unix_ms = unix_ms;
    }

    /// What the kernel is told (BACKENDS.enabled): the replica may take new
    /// connections whenever it has a listener. A replica that is DOWN only
    /// because its listener went away stays eligible, so that the kernel
    /// steers to it from the instant it listens again (the sk_lookup program
    /// skips slots without a listener by itself); one DOWN by its checks
    /// does not.
    pub fn eligible(&self) -> bool {
        (self.health.oper() == Oper::Up || self.health.down_cause() == Some(DownCause::Listener))
            && self.admin == Admin::Ready
            && !self.removing
    }

    /// Takes new connections now.
    pub fn active(&self) -> bool {
        self.listener() == ListenerState::Registered
            && self.health.oper() == Oper::Up
            && self.eligible()
    }

    pub fn weight(&self, cfg: &Config, slot: usize) -> u32 {
        self.weight_override.unwrap_or_else(|| cfg.weight(slot))
    }

    /// The BACKENDS entry: enabled only when eligible; weight ramped up over
    /// `slowstart` after coming UP.
    pub fn backend(&self, cfg: &Config, slot: usize, now: Instant) -> Backend {
        let w = self.weight(cfg, slot);
        let ss = Duration::from_millis(cfg.check.slowstart_ms);
        let w = match self.up_since {
            Some(t) if !ss.is_zero() && now.duration_since(t) < ss => {
                let frac = now.duration_since(t).as_secs_f64() / ss.as_secs_f64();
                ((w as f64 * frac).ceil() as u32).clamp(1, w)
            }
            _ => w,
        };
        Backend {
            weight: w,
            enabled: self.eligible() as u32,
            listener_cookie: self.verified,
        }
    }

    /// What STATUS holds for this replica.
    pub fn status(&self, cfg: &Config, slot: usize, now: Instant) -> Status {
        let mut downtime = self.downtime;
        if self.health.oper() == Oper::Down {
            downtime += now.duration_since(self.last_change);
        }
        let mut reason = [0u8; 48];
        let (check_ok, check_ms) = match self.health.last() {
            Some(r) => {
                let n = r.reason.len().min(reason.len());
                reason[..n].copy_from_slice(&r.reason.as_bytes()[..n]);
                (
                    r.ok as u32,
                    r.duration.as_millis().min(u32::MAX as u128) as u32,
                )
            }
            None => (2, 0),
        };
        let mut s = Status {
            weight: self.backend(cfg, slot, now).weight,
            check_ok,
            check_ms,
            accept_queue: self.queue.len,
            accept_backlog: self.queue.max,
            last_change_ms: self.last_change_unix_ms,
            downtime_ms: downtime.as_millis().min(u64::MAX as u128) as u64,
            transitions_up: self.transitions_up,
            transitions_down: self.transitions_down,
            check_failures: self.check_failures,
            reason,
            flags: if self.health.stalled() {
                mtlb_common::STATUS_STALLED
            } else if self.stall_kept {
                mtlb_common::STATUS_STALL_KEPT
            } else {
                0
            } | if self.stopping.is_some() {
                mtlb_common::STATUS_STOPPING
            } else {
                0
            },
            ..Status::default()
        };
        self.state(cfg).write(&mut s);
        s
    }
}

/// Wall-clock ms, for STATUS.last_change_ms (read by other processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::health::CheckResult;

    fn slot(now: Instant) -> Slot {
        Slot::new(
            0,
            now,
            0,
            CheckSchedule {
                next: now,
                generation: 0,
                running: None,
            },
        )
    }

    fn registered_up(now: Instant) -> Slot {
        let mut s = slot(now);
        s.listener_cookie = 1;
        s.health
            .listener_back(CheckResult::pass("", Duration::ZERO));
        s
    }

    #[test]
    fn only_up_ready_replicas_are_enabled() {
        let cfg = Config::default();
        let now = Instant::now();
        let mut r = slot(now);
        assert_eq!(
            r.backend(&cfg, 0, now).enabled,
            1,
            "waiting for its listener"
        );
        assert!(!r.active());
        r.health.force_down(
            DownCause::Checks,
            CheckResult::fail("x", None, Duration::ZERO),
        );
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0, "down by checks");
        let mut r = registered_up(now);
        assert!(r.active());
        assert_eq!(
            r.backend(&cfg, 0, now),
            Backend {
                weight: 1,
                enabled: 1,
                listener_cookie: 0,
            }
        );
        r.admin = Admin::Drain;
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0);
        assert_eq!(r.state(&cfg).to_string(), "DRAIN");
        r.admin = Admin::Ready;
        r.removing = true;
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0);
    }

    #[test]
    fn slowstart_ramps_weight() {
        let mut cfg = Config::default();
        cfg.check.slowstart_ms = 10_000;
        cfg.weights = vec![100];
        let t0 = Instant::now();
        let mut r = registered_up(t0);
        r.changed(Oper::Up, t0, 0);
        assert_eq!(r.backend(&cfg, 0, t0).weight, 1);
        assert_eq!(r.backend(&cfg, 0, t0 + Duration::from_secs(5)).weight, 50);
        assert_eq!(r.backend(&cfg, 0, t0 + Duration::from_secs(20)).weight, 100);
    }
}
