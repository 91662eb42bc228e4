//! A replica's state, typed: operational (from checks), administrative (the
//! operator's) and its listener, with the conversions to and from the `u32`
//! words of [`Status`] that the STATUS map (and `bpftool`) carries.
//!
//! The label an operator reads ("UP", "UP 1/3", "DOWN 1/2", "DRAIN", …) is
//! rendered here and nowhere else: by the agent for its log lines, and by
//! `/stats`, `/metrics` and `mtlb status` from STATUS.

use crate::{STATE_DOWN, STATE_DRAIN, STATE_MAINT, STATE_UP, Status};
use core::fmt;

/// Operational state, as HAProxy's checks decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oper {
    Up,
    Down,
}

/// Administrative state, the operator's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admin {
    /// Takes new connections when UP.
    #[default]
    Ready,
    /// No new connections; existing ones continue.
    Drain,
    /// The same as DRAIN, shown as maintenance.
    Maint,
}

impl Admin {
    /// Parses the operator's word: "ready", "drain" or "maint".
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

/// Whether the replica has a listener registered in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerState {
    Registered,
    Missing,
}

/// Operational state with the checks counted toward a change: what HAProxy
/// shows as "UP", "UP 1/3" (falling: 1 of `fall` failures), "DOWN",
/// "DOWN 1/2" (rising: 1 of `rise` successes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperState {
    pub oper: Oper,
    /// Consecutive checks against the current state (0: steady).
    pub progress: u32,
    pub rise: u32,
    pub fall: u32,
}

impl fmt::Display for OperState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.oper, self.progress) {
            (Oper::Up, 0) => f.write_str("UP"),
            (Oper::Down, 0) => f.write_str("DOWN"),
            (Oper::Up, n) => write!(f, "UP {n}/{}", self.fall),
            (Oper::Down, n) => write!(f, "DOWN {n}/{}", self.rise),
        }
    }
}

/// Everything that decides whether a replica takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    pub oper: OperState,
    pub admin: Admin,
    pub listener: ListenerState,
}

impl ReplicaState {
    /// Takes new connections: UP, READY and listening.
    pub fn takes_connections(&self) -> bool {
        self.oper.oper == Oper::Up
            && self.admin == Admin::Ready
            && self.listener == ListenerState::Registered
    }

    /// The summary word of STATUS: MAINT/DRAIN over health; READY is UP
    /// only with a listener.
    pub fn state_word(&self) -> u32 {
        match self.admin {
            Admin::Maint => STATE_MAINT,
            Admin::Drain => STATE_DRAIN,
            Admin::Ready if self.takes_connections() => STATE_UP,
            Admin::Ready => STATE_DOWN,
        }
    }

    /// Fills the state fields of a STATUS entry.
    pub fn write(&self, s: &mut Status) {
        s.state = self.state_word();
        s.oper = match self.oper.oper {
            Oper::Up => STATE_UP,
            Oper::Down => STATE_DOWN,
        };
        s.count = self.oper.progress;
        s.rise = self.oper.rise;
        s.fall = self.oper.fall;
        s.registered = (self.listener == ListenerState::Registered) as u32;
    }

    /// Reads the state fields of a STATUS entry; `None` for an unused slot
    /// or words this build does not know.
    pub fn read(s: &Status) -> Option<Self> {
        let admin = match s.state {
            STATE_UP | STATE_DOWN => Admin::Ready,
            STATE_DRAIN => Admin::Drain,
            STATE_MAINT => Admin::Maint,
            _ => return None,
        };
        let oper = match s.oper {
            STATE_UP => Oper::Up,
            STATE_DOWN => Oper::Down,
            _ => return None,
        };
        Some(Self {
            oper: OperState {
                oper,
                progress: s.count,
                rise: s.rise,
                fall: s.fall,
            },
            admin,
            listener: if s.registered == 1 {
                ListenerState::Registered
            } else {
                ListenerState::Missing
            },
        })
    }
}

/// The label the stats page, `mtlb status` and the metrics show.
impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.admin, self.listener) {
            (Admin::Maint, _) => f.write_str("MAINT"),
            (Admin::Drain, _) => f.write_str("DRAIN"),
            // Without a listener it cannot be rising: checks that pass
            // reach something else.
            (Admin::Ready, ListenerState::Missing) => f.write_str("DOWN"),
            (Admin::Ready, ListenerState::Registered) => self.oper.fmt(f),
        }
    }
}
