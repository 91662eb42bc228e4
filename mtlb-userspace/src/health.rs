//! Replica states, with HAProxy's meanings.
//!
//! Operational state comes from health checks: a replica that is UP goes
//! DOWN after `fall` consecutive failed checks (showing "UP 1/3", "UP 2/3"
//! while falling) and comes back after `rise` consecutive successes
//! ("DOWN 1/2" while rising). A stalled accept queue forces it DOWN at once.
//! Administrative state is the operator's: READY, DRAIN (no new
//! connections, existing ones continue), MAINT (likewise, and shown as
//! maintenance). Only a replica that is UP and READY gets new connections.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Oper {
    Up,
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Admin {
    #[default]
    Ready,
    Drain,
    Maint,
}

impl Admin {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ready" => Some(Self::Ready),
            "drain" => Some(Self::Drain),
            "maint" => Some(Self::Maint),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "READY",
            Self::Drain => "DRAIN",
            Self::Maint => "MAINT",
        }
    }
}

/// Result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// HAProxy-style reason, e.g. "Layer4 connection problem".
    pub reason: String,
    /// Detail, e.g. the OS error.
    pub info: Option<String>,
    pub duration: Duration,
}

impl CheckResult {
    pub fn pass(reason: impl Into<String>, duration: Duration) -> Self {
        Self {
            ok: true,
            reason: reason.into(),
            info: None,
            duration,
        }
    }

    pub fn fail(reason: impl Into<String>, info: Option<String>, duration: Duration) -> Self {
        Self {
            ok: false,
            reason: reason.into(),
            info,
            duration,
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("reason: {}", self.reason);
        if let Some(i) = &self.info {
            s.push_str(&format!(", info: \"{i}\""));
        }
        s.push_str(&format!(
            ", check duration: {}ms",
            self.duration.as_millis()
        ));
        s
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

/// Health of one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub oper: Oper,
    /// Consecutive results against the current state (failures while UP,
    /// successes while DOWN).
    pub count: u32,
    pub last: Option<CheckResult>,
    /// Set while the accept queue is stalled: the replica stays DOWN.
    pub stalled: bool,
}

/// What a check result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Same state, counter moved: "DOWN 1/2" / "UP 1/3".
    Progress,
    /// State changed.
    Changed(Oper),
    /// Nothing to report (steady state, result as before).
    Steady,
}

impl Health {
    pub fn new(oper: Oper) -> Self {
        Self {
            oper,
            count: 0,
            last: None,
            stalled: false,
        }
    }

    /// Applies one check result.
    pub fn on_result(&mut self, r: CheckResult, t: &Thresholds) -> Event {
        let ok = r.ok && !self.stalled;
        self.last = Some(r);
        match (self.oper, ok) {
            (Oper::Up, true) | (Oper::Down, false) => {
                let was = self.count;
                self.count = 0;
                if was > 0 {
                    Event::Progress
                } else {
                    Event::Steady
                }
            }
            (Oper::Up, false) => {
                self.count += 1;
                if self.count >= t.fall {
                    self.oper = Oper::Down;
                    self.count = 0;
                    Event::Changed(Oper::Down)
                } else {
                    Event::Progress
                }
            }
            (Oper::Down, true) => {
                self.count += 1;
                if self.count >= t.rise {
                    self.oper = Oper::Up;
                    self.count = 0;
                    Event::Changed(Oper::Up)
                } else {
                    Event::Progress
                }
            }
        }
    }

    /// Forces DOWN at once (a stalled accept queue, the listener gone).
    pub fn force_down(&mut self, r: CheckResult) -> Event {
        self.last = Some(r);
        self.count = 0;
        if self.oper == Oper::Down {
            Event::Steady
        } else {
            self.oper = Oper::Down;
            Event::Changed(Oper::Down)
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

    /// "UP", "DOWN", "DOWN 1/2" (rising), "UP 1/3" (falling).
    pub fn label(&self, t: &Thresholds) -> String {
        match (self.oper, self.count) {
            (Oper::Up, 0) => "UP".into(),
            (Oper::Down, 0) => "DOWN".into(),
            (Oper::Up, n) => format!("UP {n}/{}", t.fall),
            (Oper::Down, n) => format!("DOWN {n}/{}", t.rise),
        }
    }

    /// The log line for a check that moved the counter, HAProxy style.
    pub fn progress_line(&self, name: &str, t: &Thresholds) -> String {
        let r = self.last.as_ref().expect("a check ran");
        format!(
            "Health check for backend {name} {}, {}, status: {}.",
            if r.ok { "succeeded" } else { "failed" },
            r.describe(),
            self.label(t)
        )
    }

    /// The log line for a state change, HAProxy style.
    pub fn change_line(&self, name: &str, active_left: usize, conns: u64) -> String {
        let r = self.last.as_ref().expect("a check ran");
        match self.oper {
            Oper::Down => format!(
                "backend {name} is DOWN, {}. {active_left} active backends left. {conns} connections active.",
                r.describe()
            ),
            Oper::Up => format!(
                "backend {name} is UP, {}. {active_left} active backends online.",
                r.describe()
            ),
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

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = Health::new(Oper::Up);
        assert_eq!(h.on_result(bad(), &T), Event::Progress);
        assert_eq!(h.label(&T), "UP 1/3");
        assert_eq!(h.interval(&T), T.fastinter);
        assert_eq!(h.on_result(bad(), &T), Event::Progress);
        assert_eq!(h.on_result(bad(), &T), Event::Changed(Oper::Down));
        assert_eq!(h.label(&T), "DOWN");
        assert_eq!(h.interval(&T), T.downinter);
        assert_eq!(
            h.change_line("mtp2", 1, 0),
            "backend mtp2 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 1ms. 1 active backends left. 0 connections active."
        );
        assert_eq!(h.on_result(ok(), &T), Event::Progress);
        assert_eq!(h.label(&T), "DOWN 1/2");
        assert!(h.progress_line("mtp2", &T).ends_with("status: DOWN 1/2."));
        assert_eq!(h.on_result(ok(), &T), Event::Changed(Oper::Up));
        assert_eq!(h.interval(&T), T.inter);
    }

    #[test]
    fn flapping_faster_than_rise_and_fall_does_not_flip() {
        let mut h = Health::new(Oper::Up);
        for i in 0..20 {
            let e = h.on_result(if i % 2 == 0 { bad() } else { ok() }, &T);
            assert!(!matches!(e, Event::Changed(_)), "flipped at {i}");
        }
        assert_eq!(h.oper, Oper::Up);
        let mut h = Health::new(Oper::Down);
        for i in 0..20 {
            let e = h.on_result(if i % 2 == 0 { ok() } else { bad() }, &T);
            assert!(!matches!(e, Event::Changed(_)), "flipped at {i}");
        }
        assert_eq!(h.oper, Oper::Down);
    }

    #[test]
    fn stalled_queue_keeps_it_down_until_cleared() {
        let mut h = Health::new(Oper::Up);
        h.stalled = true;
        assert_eq!(
            h.force_down(CheckResult::fail(
                "accept queue stalled",
                None,
                Duration::ZERO
            )),
            Event::Changed(Oper::Down)
        );
        for _ in 0..5 {
            assert!(!matches!(h.on_result(ok(), &T), Event::Changed(_)));
        }
        h.stalled = false;
        h.on_result(ok(), &T);
        assert_eq!(h.on_result(ok(), &T), Event::Changed(Oper::Up));
    }
}
