//! The agent's view of each replica: health, operator state, weight, and
//! what the kernel should be told (BACKENDS).

use crate::{
    config::{Config, replica_name},
    health::{Admin, Health, Oper},
    queue::QueueWatch,
};
use mtlb_common::{Backend, STATE_DOWN, STATE_DRAIN, STATE_MAINT, STATE_UP, Status};
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    pub health: Health,
    pub admin: Admin,
    /// Operator's weight (`mtlb backend NAME weight N`), over the config's.
    pub weight_override: Option<u32>,
    /// When it last came UP, for slowstart.
    pub up_since: Option<Instant>,
    pub last_change: Instant,
    pub queue: QueueWatch,
    /// Scaled away by a reload: draining until its connections close.
    pub removing: bool,
    pub registered: bool,
    /// DOWN because its listener went away (not because checks failed): a
    /// new listener brings it back UP at once.
    pub down_by_listener: bool,
    pub transitions_up: u64,
    pub transitions_down: u64,
    pub check_failures: u64,
    /// Time DOWN before the current period.
    pub downtime: Duration,
    pub last_change_unix_ms: u64,
}

impl Replica {
    pub fn new(slot: usize, oper: Oper, now: Instant) -> Self {
        Self {
            name: replica_name(slot),
            health: Health::new(oper),
            admin: Admin::Ready,
            weight_override: None,
            up_since: (oper == Oper::Up).then_some(now),
            last_change: now,
            queue: QueueWatch::default(),
            removing: false,
            registered: false,
            down_by_listener: false,
            transitions_up: 0,
            transitions_down: 0,
            check_failures: 0,
            downtime: Duration::ZERO,
            last_change_unix_ms: unix_ms(),
        }
    }

    /// Records a state change made to `health` (counts, downtime).
    pub fn changed(&mut self, to: Oper, now: Instant) {
        if to == Oper::Up {
            self.transitions_up += 1;
            self.downtime += now.duration_since(self.last_change);
            self.up_since = Some(now);
        } else {
            self.transitions_down += 1;
            self.up_since = None;
        }
        self.last_change = now;
        self.last_change_unix_ms = unix_ms();
    }

    /// What STATUS holds for this replica.
    pub fn status(&self, cfg: &Config, slot: usize, now: Instant) -> Status {
        let t = cfg.thresholds();
        let state = match self.admin {
            Admin::Maint => STATE_MAINT,
            Admin::Drain => STATE_DRAIN,
            Admin::Ready if self.health.oper == Oper::Up && self.registered => STATE_UP,
            Admin::Ready => STATE_DOWN,
        };
        let mut downtime = self.downtime;
        if self.health.oper == Oper::Down {
            downtime += now.duration_since(self.last_change);
        }
        let mut reason = [0u8; 48];
        let (check_ok, check_ms) = match &self.health.last {
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
        Status {
            state,
            count: self.health.count,
            rise: t.rise,
            fall: t.fall,
            registered: self.registered as u32,
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
        }
    }

    /// What the kernel is told (BACKENDS.enabled): the replica may take new
    /// connections whenever it has a listener. A replica that is DOWN only
    /// because its listener went away stays eligible, so that the kernel
    /// steers to it from the instant it listens again (the sk_lookup program
    /// skips slots without a listener by itself); one DOWN by its checks
    /// does not.
    pub fn eligible(&self) -> bool {
        (self.health.oper == Oper::Up || self.down_by_listener)
            && self.admin == Admin::Ready
            && !self.removing
    }

    /// Takes new connections now.
    pub fn active(&self) -> bool {
        self.registered && self.health.oper == Oper::Up && self.eligible()
    }

    pub fn weight(&self, cfg: &Config, slot: usize) -> u32 {
        self.weight_override.unwrap_or_else(|| cfg.weight(slot))
    }

    /// The BACKENDS entry: enabled only when active; weight ramped up over
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
        }
    }

    /// State as the stats page shows it: MAINT/DRAIN over health.
    pub fn label(&self, cfg: &Config) -> String {
        match self.admin {
            Admin::Maint => "MAINT".into(),
            Admin::Drain => "DRAIN".into(),
            Admin::Ready if !self.registered => "DOWN".into(),
            Admin::Ready => self.health.label(&cfg.thresholds()),
        }
    }
}

/// Operator choices kept across restarts, by replica name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub backends: BTreeMap<String, SavedBackend>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackend {
    pub admin: Admin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

pub fn state_file(dir: &Path, netns_ino: u64) -> PathBuf {
    dir.join(format!("state-{netns_ino}.json"))
}

impl Saved {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes atomically (temp file + rename).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn from_replicas(rs: &[Replica]) -> Self {
        Self {
            backends: rs
                .iter()
                .filter(|r| r.admin != Admin::Ready || r.weight_override.is_some())
                .map(|r| {
                    (
                        r.name.clone(),
                        SavedBackend {
                            admin: r.admin,
                            weight: r.weight_override,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn apply(&self, r: &mut Replica) {
        if let Some(b) = self.backends.get(&r.name) {
            r.admin = b.admin;
            r.weight_override = b.weight;
        }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_up_ready_replicas_are_enabled() {
        let cfg = Config::default();
        let now = Instant::now();
        let mut r = Replica::new(0, Oper::Down, now);
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0, "down by checks");
        r.down_by_listener = true;
        assert_eq!(
            r.backend(&cfg, 0, now).enabled,
            1,
            "waiting for its listener"
        );
        assert!(!r.active());
        let mut r = Replica::new(0, Oper::Up, now);
        r.registered = true;
        assert!(r.active());
        assert_eq!(
            r.backend(&cfg, 0, now),
            Backend {
                weight: 1,
                enabled: 1
            }
        );
        r.admin = Admin::Drain;
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0);
        assert_eq!(r.label(&cfg), "DRAIN");
        r.admin = Admin::Ready;
        r.health.oper = Oper::Down;
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0);
        r.health.oper = Oper::Up;
        r.removing = true;
        assert_eq!(r.backend(&cfg, 0, now).enabled, 0);
    }

    #[test]
    fn slowstart_ramps_weight() {
        let mut cfg = Config::default();
        cfg.check.slowstart_ms = 10_000;
        cfg.weights = vec![100];
        let t0 = Instant::now();
        let mut r = Replica::new(0, Oper::Up, t0);
        r.registered = true;
        assert_eq!(r.backend(&cfg, 0, t0).weight, 1);
        assert_eq!(r.backend(&cfg, 0, t0 + Duration::from_secs(5)).weight, 50);
        assert_eq!(r.backend(&cfg, 0, t0 + Duration::from_secs(20)).weight, 100);
    }

    #[test]
    fn saved_state_round_trips() {
        let now = Instant::now();
        let mut rs = vec![
            Replica::new(0, Oper::Up, now),
            Replica::new(1, Oper::Up, now),
        ];
        rs[1].admin = Admin::Maint;
        rs[0].weight_override = Some(3);
        let s = Saved::from_replicas(&rs);
        let dir = tempfile::tempdir().unwrap();
        let p = state_file(dir.path(), 7);
        s.store(&p).unwrap();
        let back = Saved::load(&p).unwrap();
        assert_eq!(back, s);
        let mut fresh = Replica::new(1, Oper::Up, now);
        back.apply(&mut fresh);
        assert_eq!(fresh.admin, Admin::Maint);
        assert_eq!(
            Saved::load(&dir.path().join("none.json")).unwrap(),
            Saved::default()
        );
    }
}
