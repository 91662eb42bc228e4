//! Replica states, with HAProxy's meanings.
//!
//! Operational state comes from health checks: a replica that is UP goes
//! DOWN after `fall` consecutive failed checks (showing "UP 1/3", "UP 2/3"
//! while falling) and comes back after `rise` consecutive successes
//! ("DOWN 1/2" while rising). A stalled accept queue forces it DOWN at once.
//! Administrative state is the operator's: READY, DRAIN (no new
//! connections, existing ones continue), MAINT (likewise, and shown as
//! maintenance). Only a replica that is UP and READY gets new connections.

pub use mtlb_common::state::{Admin, Oper, OperState};
use std::time::Duration;

/// Result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// HAProxy-style reason, e.g. "Layer4 connection problem".
    pub reason: String,
    /// Detail, e.g. the OS error.
    pub info: Option<String>,
    pub duration: Duration,
    /// The check could not run for a reason of the agent's own (out of
    /// file descriptors or memory): it says nothing about the replica.
    pub local: Option<LocalFault>,
}

/// Why the agent itself could not run a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LocalFault {
    /// EMFILE, ENFILE: the agent's or the system's open-file limit.
    Files,
    /// ENOMEM, ENOBUFS.
    Memory,
}

impl LocalFault {
    pub const ALL: [LocalFault; 2] = [LocalFault::Files, LocalFault::Memory];

    /// The agent's own shortage behind `e`, if it is one. A connection
    /// refused, reset or timed out is the replica's answer; running out of
    /// descriptors or memory before a packet is sent is not.
    pub fn of(e: &std::io::Error) -> Option<Self> {
        match e.raw_os_error()? {
            libc::EMFILE | libc::ENFILE => Some(Self::Files),
            libc::ENOMEM | libc::ENOBUFS => Some(Self::Memory),
            _ => None,
        }
    }

    /// The `reason` label of `mtlb_agent_check_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Files => "files",
            Self::Memory => "memory",
        }
    }
}

impl CheckResult {
    pub fn pass(reason: impl Into<String>, duration: Duration) -> Self {
        Self {
            ok: true,
            reason: reason.into(),
            info: None,
            duration,
            local: None,
        }
    }

    pub fn fail(reason: impl Into<String>, info: Option<String>, duration: Duration) -> Self {
        Self {
            ok: false,
            reason: reason.into(),
            info,
            duration,
            local: None,
        }
    }

    /// A failure on an OS error `e`, with `info` telling it; marked as the
    /// agent's own when it is (see [`LocalFault::of`]).
    pub fn io_fail(
        reason: impl Into<String>,
        e: &std::io::Error,
        info: String,
        duration: Duration,
    ) -> Self {
        Self {
            local: LocalFault::of(e),
            ..Self::fail(reason, Some(info), duration)
        }
    }
}

/// Check timing and thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub inter: Duration,
    pub fastinter: Duration,
    pub downinter: Duration,
}

impl Thresholds {
    pub fn of(cfg: &crate::config::Config) -> Self {
        let c = &cfg.check;
        Self {
            rise: c.rise,
            fall: c.fall,
            inter: Duration::from_millis(c.inter_ms),
            fastinter: Duration::from_millis(c.fastinter_ms),
            downinter: Duration::from_millis(c.downinter_ms),
        }
    }
}

/// Why a replica is DOWN, which decides how it comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownCause {
    /// Its checks failed (or it was never seen): `rise` passing checks
    /// bring it back.
    Checks,
    /// Its listener closed: a new listener brings it back at once (the
    /// kernel steers to it from listen() on), and checks keep watching.
    Listener,
    /// Its accept queue stalled: checks count as failed while it stays
    /// stalled, then `rise` passing checks bring it back.
    Stalled,
    /// A process holding its listener was sent a stop signal: it takes no
    /// new connection; its listener closing (then a new one) or the end of
    /// the grace (then its checks) decides what comes next.
    Stopping,
}

/// Health of one replica: the check state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    oper: Oper,
    /// Consecutive results against the current state (failures while UP,
    /// successes while DOWN).
    count: u32,
    /// Why it is DOWN (meaningless while UP).
    cause: DownCause,
    last: Option<CheckResult>,
    /// Set while the accept queue is stalled: the replica stays DOWN.
    stalled: bool,
}

/// What a check result (or a forced change) did to the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Same state, counter moved: "DOWN 1/2" / "UP 1/3".
    Progress,
    /// State changed.
    Changed(Oper),
    /// Nothing to report (steady state, result as before).
    Steady,
}

impl Health {
    /// UP, as HAProxy starts servers.
    pub fn up() -> Self {
        Self {
            oper: Oper::Up,
            count: 0,
            cause: DownCause::Checks,
            last: None,
            stalled: false,
        }
    }

    /// DOWN until its listener shows up (a replica not seen yet).
    pub fn waiting_for_listener() -> Self {
        Self {
            oper: Oper::Down,
            cause: DownCause::Listener,
            ..Self::up()
        }
    }

    pub fn oper(&self) -> Oper {
        self.oper
    }

    /// Consecutive checks counted toward a change.
    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn last(&self) -> Option<&CheckResult> {
        self.last.as_ref()
    }

    /// Why it is DOWN; `None` while UP.
    pub fn down_cause(&self) -> Option<DownCause> {
        (self.oper == Oper::Down).then_some(self.cause)
    }

    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// The typed operational state, for labels and STATUS.
    pub fn state(&self, t: &Thresholds) -> OperState {
        OperState {
            oper: self.oper,
            progress: self.count,
            rise: t.rise,
            fall: t.fall,
        }
    }

    /// Applies one check result.
    pub fn on_result(&mut self, r: CheckResult, t: &Thresholds) -> Transition {
        let ok = r.ok && !self.stalled;
        if !ok && self.oper == Oper::Up {
            // If it falls now, it fell by its checks.
            self.cause = DownCause::Checks;
        }
        self.last = Some(r);
        match (self.oper, ok) {
            (Oper::Up, true) | (Oper::Down, false) => {
                let was = self.count;
                self.count = 0;
                if was > 0 {
                    Transition::Progress
                } else {
                    Transition::Steady
                }
            }
            (Oper::Up, false) => {
                self.count += 1;
                if self.count >= t.fall {
                    self.oper = Oper::Down;
                    self.count = 0;
                    Transition::Changed(Oper::Down)
                } else {
                    Transition::Progress
                }
            }
            (Oper::Down, true) => {
                self.count += 1;
                if self.count >= t.rise {
                    self.oper = Oper::Up;
                    self.count = 0;
                    Transition::Changed(Oper::Up)
                } else {
                    Transition::Progress
                }
            }
        }
    }

    /// Forces DOWN at once (a stalled accept queue, the listener gone).
    /// The cause is recorded even when it was DOWN already: a replica whose
    /// listener closed while its checks failed comes back with its next
    /// listener.
    pub fn force_down(&mut self, cause: DownCause, r: CheckResult) -> Transition {
        self.last = Some(r);
        self.count = 0;
        self.cause = cause;
        if self.oper == Oper::Down {
            Transition::Steady
        } else {
            self.oper = Oper::Down;
            Transition::Changed(Oper::Down)
        }
    }

    /// Its listener is back and proven (by `why`: a passing check, or its
    /// registration when checks are off). A replica DOWN only because its
    /// listener was gone is UP again at once; one DOWN by its checks needs
    /// `rise` of them.
    pub fn listener_back(&mut self, why: CheckResult) -> Transition {
        if self.oper == Oper::Down && self.cause == DownCause::Listener {
            self.oper = Oper::Up;
            self.count = 0;
            self.last = Some(why);
            Transition::Changed(Oper::Up)
        } else {
            Transition::Steady
        }
    }

    /// A new listener failed the check that would have proven it: it is
    /// DOWN by its checks now, not waiting for a listener (so it needs
    /// `rise` passing checks, and is reported as DOWN with the reason).
    pub fn not_proven(&mut self, r: CheckResult) -> Transition {
        if self.oper == Oper::Down && self.cause == DownCause::Listener {
            self.cause = DownCause::Checks;
            self.count = 0;
            self.last = Some(r);
            Transition::Changed(Oper::Down)
        } else {
            Transition::Steady
        }
    }

    /// The stop grace ended with the listener still there: DOWN by its
    /// checks from here (`rise` passing checks bring it back).
    pub fn stop_lifted(&mut self) {
        if self.oper == Oper::Down && self.cause == DownCause::Stopping {
            self.cause = DownCause::Checks;
            self.count = 0;
        }
    }

    /// Records whether the accept queue is stalled now. Going stalled forces
    /// DOWN; recovering leaves it DOWN until `rise` checks pass.
    pub fn set_stalled(&mut self, stalled: bool, info: String) -> Transition {
        let was = self.stalled;
        self.stalled = stalled;
        if stalled && !was {
            self.force_down(
                DownCause::Stalled,
                CheckResult::fail(
                    crate::checks::reason::QUEUE_STALLED,
                    Some(info),
                    Duration::ZERO,
                ),
            )
        } else {
            Transition::Steady
        }
    }

    /// Interval before the next check: `fastinter` while changing state,
    /// `downinter` while down, `inter` otherwise.
    pub fn interval(&self, t: &Thresholds) -> Duration {
        if self.count > 0 {
            t.fastinter
        } else if self.oper == Oper::Down {
            t.downinter
        } else {
            t.inter
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        inter: Duration::from_secs(2),
        fastinter: Duration::from_millis(500),
        downinter: Duration::from_secs(4),
    };

    fn ok() -> CheckResult {
        CheckResult::pass("Layer4 check passed", Duration::ZERO)
    }
    fn bad() -> CheckResult {
        CheckResult::fail(
            "Layer4 connection problem",
            Some("Connection refused".into()),
            Duration::from_millis(1),
        )
    }

    fn down_by_checks() -> Health {
        let mut h = Health::up();
        for _ in 0..T.fall {
            h.on_result(bad(), &T);
        }
        assert_eq!(h.down_cause(), Some(DownCause::Checks));
        h
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = Health::up();
        assert_eq!(h.on_result(bad(), &T), Transition::Progress);
        assert_eq!(h.state(&T).to_string(), "UP 1/3");
        assert_eq!(h.interval(&T), T.fastinter);
        assert_eq!(h.on_result(bad(), &T), Transition::Progress);
        assert_eq!(h.on_result(bad(), &T), Transition::Changed(Oper::Down));
        assert_eq!(h.state(&T).to_string(), "DOWN");
        assert_eq!(h.interval(&T), T.downinter);
        assert_eq!(h.on_result(ok(), &T), Transition::Progress);
        assert_eq!(h.state(&T).to_string(), "DOWN 1/2");
        assert_eq!(h.on_result(ok(), &T), Transition::Changed(Oper::Up));
        assert_eq!(h.interval(&T), T.inter);
    }

    #[test]
    fn flapping_faster_than_rise_and_fall_does_not_flip() {
        let mut h = Health::up();
        for i in 0..20 {
            let e = h.on_result(if i % 2 == 0 { bad() } else { ok() }, &T);
            assert!(!matches!(e, Transition::Changed(_)), "flipped at {i}");
        }
        assert_eq!(h.oper(), Oper::Up);
        let mut h = down_by_checks();
        for i in 0..20 {
            let e = h.on_result(if i % 2 == 0 { ok() } else { bad() }, &T);
            assert!(!matches!(e, Transition::Changed(_)), "flipped at {i}");
        }
        assert_eq!(h.oper(), Oper::Down);
    }

    #[test]
    fn stalled_queue_keeps_it_down_until_cleared() {
        let mut h = Health::up();
        assert_eq!(
            h.set_stalled(true, "3 queued of 128".into()),
            Transition::Changed(Oper::Down)
        );
        assert_eq!(h.down_cause(), Some(DownCause::Stalled));
        assert_eq!(
            h.set_stalled(true, "4 queued of 128".into()),
            Transition::Steady
        );
        for _ in 0..5 {
            assert!(!matches!(h.on_result(ok(), &T), Transition::Changed(_)));
        }
        // A new listener does not bring a stalled replica back.
        assert_eq!(h.listener_back(ok()), Transition::Steady);
        assert_eq!(h.set_stalled(false, String::new()), Transition::Steady);
        h.on_result(ok(), &T);
        assert_eq!(h.on_result(ok(), &T), Transition::Changed(Oper::Up));
    }

    #[test]
    fn a_lost_listener_comes_back_at_once_even_after_failed_checks() {
        let mut h = down_by_checks();
        assert_eq!(
            h.listener_back(ok()),
            Transition::Steady,
            "down by checks stays down"
        );
        let gone = CheckResult::fail("no listener registered", None, Duration::ZERO);
        assert_eq!(
            h.force_down(DownCause::Listener, gone.clone()),
            Transition::Steady
        );
        assert_eq!(h.listener_back(ok()), Transition::Changed(Oper::Up));
        assert_eq!(h.last().unwrap().reason, "Layer4 check passed");
        let mut h = Health::waiting_for_listener();
        assert_eq!(h.listener_back(ok()), Transition::Changed(Oper::Up));
        let mut h = Health::up();
        assert_eq!(
            h.force_down(DownCause::Listener, gone),
            Transition::Changed(Oper::Down)
        );
        // Checks failing meanwhile (nothing listens) do not change why.
        h.on_result(bad(), &T);
        assert_eq!(h.down_cause(), Some(DownCause::Listener));
    }
}
