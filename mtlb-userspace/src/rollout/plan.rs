//! What a rollout does, decided from the replicas' states alone: which
//! replicas, which are skipped and why, whether it may start or go on,
//! the command for each, and when a restarted replica is back.

use crate::config::replica_name;
use mtlb_common::{
    Status,
    state::{Admin, ListenerState, Oper, ReplicaState},
};
use std::fmt;

/// Each configured replica's state as STATUS shows it (`None`: nothing
/// published for that slot).
pub type States = [Option<ReplicaState>];

/// The slots `names` picks ("mtp2", or "2" as `{n}` numbers them), in slot
/// order, each once; every one of `replicas` when `names` is empty.
pub fn select(names: &[String], replicas: u32) -> Result<Vec<u32>, String> {
    if names.is_empty() {
        return Ok((0..replicas).collect());
    }
    let mut slots = names
        .iter()
        .map(|n| {
            let n = n.trim();
            n.strip_prefix("mtp")
                .unwrap_or(n)
                .parse::<u32>()
                .ok()
                .filter(|k| (1..=replicas).contains(k))
                .map(|k| k - 1)
                .ok_or_else(|| {
                    format!(
                        "no replica {n:?}: {replicas} are configured, mtp1..mtp{replicas} (or 1..{replicas})"
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    slots.sort_unstable();
    slots.dedup();
    Ok(slots)
}

/// Why a selected replica is not restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The operator put it in DRAIN or MAINT, and it stays so: readying
    /// it after the restart would undo the operator's choice, and leaving
    /// it out unasked would be a surprise.
    Operator(Admin),
    /// READY, but it takes no clients (DOWN, or no listener): there is
    /// nothing to drain, and whether to restart a broken replica is the
    /// operator's call; the rollout would stop at it if it did not come
    /// back.
    NotTaking(ReplicaState),
    /// Nothing published for it.
    Unknown,
}

impl Skip {
    /// Why `state` is skipped; `None` when it takes clients and is
    /// restarted.
    pub fn of(state: Option<ReplicaState>) -> Option<Self> {
        match state {
            None => Some(Self::Unknown),
            Some(s) if s.admin != Admin::Ready => Some(Self::Operator(s.admin)),
            Some(s) if !s.takes_connections() => Some(Self::NotTaking(s)),
            Some(_) => None,
        }
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Operator(a) => write!(f, "in {} (the operator's), left as it is", a.as_str()),
            Self::NotTaking(s) => write!(f, "{s}, takes no clients: restart it by hand"),
            Self::Unknown => f.write_str("no state published for it"),
        }
    }
}

/// The replicas taking clients (UP and READY).
pub fn taking(states: &States) -> Vec<u32> {
    (0..states.len() as u32)
        .filter(|s| states[*s as usize].is_some_and(|st| st.takes_connections()))
        .collect()
}

/// "mtp1 UP, mtp2 DRAIN, mtp3 DOWN": every replica's state, for messages.
pub fn describe(states: &States) -> String {
    states
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(s) => format!("{} {s}", replica_name(i)),
            None => format!("{} unknown", replica_name(i)),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the rollout must not start: with fewer than two replicas taking
/// clients, taking one out could leave none.
pub fn refusal(states: &States) -> Option<String> {
    let n = taking(states).len();
    (n < 2).then(|| {
        format!(
            "{n} of {} replicas take clients (UP and READY): {}; a rollout takes one out at a time and needs another to take its clients",
            states.len(),
            describe(states)
        )
    })
}

/// Whether a replica other than `slot` takes clients: the rollout goes
/// on to `slot` only then.
pub fn other_taking(states: &States, slot: u32) -> bool {
    taking(states).iter().any(|s| *s != slot)
}

/// The operator's command for replica `slot`: `{n}` is its number
/// (1-based, as in `mtp{n}`), `{name}` its name.
pub fn command_for(template: &str, slot: u32) -> String {
    template
        .replace("{name}", &replica_name(slot as usize))
        .replace("{n}", &(slot + 1).to_string())
}

/// Whether `template` tells replicas apart: without a placeholder every
/// replica runs the same command.
pub fn has_placeholder(template: &str) -> bool {
    template.contains("{n}") || template.contains("{name}")
}

/// A replica's slot as the maps show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub status: Status,
    /// Cookie of the listener registered by the kernel (LISTENERS; 0:
    /// none).
    pub listener: u64,
    /// Cookie of the listener a check has proven (BACKENDS).
    pub verified: u64,
    /// The kernel steers only to proven listeners (checks on).
    pub require_verified: bool,
}

/// What is remembered of a replica before its restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Before {
    pub listener: u64,
    pub transitions_up: u64,
}

impl Before {
    pub fn of(r: &Reading) -> Self {
        Self {
            listener: r.listener,
            transitions_up: r.status.transitions_up,
        }
    }
}

/// `Ok` once the replica is back: a listener other than the one it had
/// is registered, the agent has checked it (when checks are on) and has
/// brought the replica UP since (STATUS may still show the old listener
/// UP for an instant after the kernel registered the new one). `Err`
/// says what is still missing.
pub fn back(before: &Before, now: &Reading) -> Result<(), String> {
    let reason = || {
        let r = &now.status.reason;
        let n = r.iter().position(|b| *b == 0).unwrap_or(r.len());
        match String::from_utf8_lossy(&r[..n]) {
            s if s.is_empty() => String::new(),
            s => format!(" (last check: {s})"),
        }
    };
    if now.listener == 0 {
        return Err("no listener registered".into());
    }
    if now.listener == before.listener {
        return Err("still its old listener: the command did not restart it".into());
    }
    if now.require_verified && now.verified != now.listener {
        return Err(format!(
            "a new listener, no check passed on it yet{}",
            reason()
        ));
    }
    let state = ReplicaState::read(&now.status).ok_or("no state published for it")?;
    if state.listener != ListenerState::Registered
        || state.oper.oper != Oper::Up
        || now.status.transitions_up <= before.transitions_up
    {
        return Err(format!("a new listener, {}{}", state.oper, reason()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtlb_common::{STATE_DOWN, STATE_DRAIN, STATE_UP, state::OperState};

    fn st(oper: Oper, admin: Admin, listener: ListenerState) -> Option<ReplicaState> {
        Some(ReplicaState {
            oper: OperState {
                oper,
                progress: 0,
                rise: 2,
                fall: 2,
            },
            admin,
            listener,
        })
    }

    fn up() -> Option<ReplicaState> {
        st(Oper::Up, Admin::Ready, ListenerState::Registered)
    }

    #[test]
    fn selects_by_name_or_number_in_slot_order() {
        let sel =
            |names: &[&str]| select(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>(), 3);
        assert_eq!(sel(&[]), Ok(vec![0, 1, 2]));
        assert_eq!(sel(&["mtp3", "1", "mtp1"]), Ok(vec![0, 2]));
        let e = sel(&["mtp4"]).unwrap_err();
        assert_eq!(
            e,
            "no replica \"mtp4\": 3 are configured, mtp1..mtp3 (or 1..3)"
        );
        assert!(sel(&["0"]).is_err());
        assert!(sel(&["mtpx"]).is_err());
    }

    #[test]
    fn operator_choices_and_replicas_without_clients_are_skipped() {
        use ListenerState::*;
        assert_eq!(Skip::of(up()), None);
        let drain = st(Oper::Up, Admin::Drain, Registered);
        assert_eq!(Skip::of(drain), Some(Skip::Operator(Admin::Drain)));
        assert_eq!(
            Skip::of(drain).unwrap().to_string(),
            "in DRAIN (the operator's), left as it is"
        );
        let maint = st(Oper::Down, Admin::Maint, Missing);
        assert_eq!(Skip::of(maint), Some(Skip::Operator(Admin::Maint)));
        let down = st(Oper::Down, Admin::Ready, Registered);
        assert_eq!(
            Skip::of(down).unwrap().to_string(),
            "DOWN, takes no clients: restart it by hand"
        );
        let gone = st(Oper::Up, Admin::Ready, Missing);
        assert!(matches!(Skip::of(gone), Some(Skip::NotTaking(_))));
        assert_eq!(Skip::of(None), Some(Skip::Unknown));
    }

    #[test]
    fn needs_two_replicas_taking_clients_to_start_and_another_for_each_step() {
        let drain = st(Oper::Up, Admin::Drain, ListenerState::Registered);
        let down = st(Oper::Down, Admin::Ready, ListenerState::Missing);
        let one = [up(), drain, down];
        assert_eq!(
            refusal(&one).unwrap(),
            "1 of 3 replicas take clients (UP and READY): mtp1 UP, mtp2 DRAIN, mtp3 DOWN; \
             a rollout takes one out at a time and needs another to take its clients"
        );
        assert!(refusal(&[up(), up(), None]).is_none());
        assert!(refusal(&[]).is_some());
        assert!(!other_taking(&one, 0));
        assert!(other_taking(&one, 1));
        assert!(other_taking(&[up(), up()], 1));
    }

    #[test]
    fn placeholders_are_the_number_and_the_name() {
        assert_eq!(
            command_for("docker restart mtproxy{n} # {name} {n}", 1),
            "docker restart mtproxy2 # mtp2 2"
        );
        assert_eq!(command_for("echo ${HOME}", 0), "echo ${HOME}");
        assert!(has_placeholder("x{name}") && !has_placeholder("systemctl restart x"));
    }

    fn reading(listener: u64, verified: u64, state: u32, oper: u32, ups: u64) -> Reading {
        let mut status = Status {
            state,
            oper,
            registered: (listener != 0) as u32,
            rise: 2,
            fall: 2,
            transitions_up: ups,
            ..Status::default()
        };
        status.reason[..19].copy_from_slice(b"Layer4 check passed");
        Reading {
            status,
            listener,
            verified,
            require_verified: true,
        }
    }

    #[test]
    fn back_once_a_new_listener_is_proven_and_up() {
        let old = reading(7, 7, STATE_DRAIN, STATE_UP, 1);
        let before = Before::of(&old);
        assert_eq!(
            back(&before, &old).unwrap_err(),
            "still its old listener: the command did not restart it"
        );
        let gone = reading(0, 0, STATE_DRAIN, STATE_DOWN, 1);
        assert_eq!(back(&before, &gone).unwrap_err(), "no listener registered");
        // The kernel registered the new one; the agent has not checked it.
        let unproven = reading(9, 0, STATE_DRAIN, STATE_DOWN, 1);
        assert_eq!(
            back(&before, &unproven).unwrap_err(),
            "a new listener, no check passed on it yet (last check: Layer4 check passed)"
        );
        // Checks off: STATUS still shows the old listener UP.
        let stale = Reading {
            require_verified: false,
            ..reading(9, 0, STATE_DRAIN, STATE_UP, 1)
        };
        assert!(back(&before, &stale).is_err());
        let up = reading(9, 9, STATE_DRAIN, STATE_UP, 2);
        assert_eq!(back(&before, &up), Ok(()));
        let unchecked = Reading {
            require_verified: false,
            ..reading(9, 0, STATE_DRAIN, STATE_UP, 2)
        };
        assert_eq!(back(&before, &unchecked), Ok(()));
        let down = reading(9, 9, STATE_DRAIN, STATE_DOWN, 2);
        assert!(
            back(&before, &down)
                .unwrap_err()
                .starts_with("a new listener, DOWN")
        );
    }
}
