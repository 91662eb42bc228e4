//! Whether this host announces its service addresses (VIPs), decided from
//! what the core knows: the host can serve while at least `min_up`
//! replicas take clients (UP, READY, listening) and the operator has not
//! drained the host. Host-level rise and fall keep a flapping replica from
//! flapping the route; an operator's drain withdraws at once. The shell
//! carries the decision out as routes in the announce table (see
//! `system::vip`), which outlive the agent: a restarted agent starts from
//! what the kernel holds, and does not withdraw while its first checks of
//! the replicas are under way.

use crate::config::AnnounceConfig;
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

/// What a start does with the service addresses an earlier start put on
/// `lo` (`earlier`) that `vips` no longer lists: those whose routes it
/// found announced (and withdraws now) stay on `lo` while the router
/// converges, as a withdrawn VIP always does, and are kept for the next
/// start (second list); the others leave `lo` now (first list).
pub fn dropped(
    earlier: &[IpAddr],
    vips: &[IpAddr],
    announced: &[IpAddr],
) -> (Vec<IpAddr>, Vec<IpAddr>) {
    earlier
        .iter()
        .copied()
        .filter(|v| !vips.contains(v))
        .partition(|v| !announced.contains(v))
}

/// Why the host is announced or not, as `mtlb status` and /stats say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Announced: enough replicas take clients.
    Serving { up: u16 },
    /// Withdrawn by `mtlb host drain`.
    Drained,
    /// Fewer than `min_up` replicas take clients.
    TooFewUp { up: u16, min_up: u16 },
    /// Able to serve, announced once that has held `rise`.
    Rising { up: u16 },
    /// Unable to serve, withdrawn if that holds `fall`.
    Falling { up: u16, min_up: u16 },
}

/// A change for the shell to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub announce: bool,
    pub why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// What the kernel holds (as found at start, then as written);
    /// `None`: not known to be all or none of the VIPs (some found at
    /// start, or a write failed part way), rewritten at the next decision.
    announced: Option<bool>,
    /// Until then (a takeover's first checks), an announced host that
    /// cannot serve is not withdrawn.
    grace_until: Option<Instant>,
    /// Since when the host has been able to serve (`None`: it is not).
    able_since: Option<Instant>,
    /// Since when it has been unable (`None`: it is able).
    unable_since: Option<Instant>,
    why: Why,
    /// Changes made by this agent.
    changes: u64,
    /// A write failed: try again no sooner than this.
    retry_at: Option<Instant>,
}

impl Announcement {
    /// Starts from what the kernel holds: `Some(true)` when every VIP's
    /// route is there (an earlier agent's decision, taken over as it
    /// stands), `Some(false)` when none is, `None` otherwise.
    pub fn new(announced: Option<bool>) -> Self {
        Self {
            announced,
            grace_until: None,
            able_since: None,
            unable_since: None,
            why: Why::TooFewUp { up: 0, min_up: 0 },
            changes: 0,
            retry_at: None,
        }
    }

    /// Whether the kernel holds the announcement (`false` while that is
    /// not known: see `pending`).
    pub fn announced(&self) -> bool {
        self.announced == Some(true)
    }

    /// A write failed or the start found some VIPs only: the next decision
    /// writes them all.
    pub fn pending(&self) -> bool {
        self.announced.is_none()
    }

    /// Keeps an announced host announced until `until` whatever its
    /// replicas say: after a takeover, the replicas an earlier agent had
    /// not proven are checked first.
    pub fn grace(&mut self, until: Instant) {
        self.grace_until = Some(until);
    }

    pub fn why(&self) -> Why {
        self.why
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Decides at `now`, with `up` replicas taking clients and the host
    /// `drained` or not; a change is returned once and taken as done.
    pub fn decide(
        &mut self,
        cfg: &AnnounceConfig,
        now: Instant,
        up: u16,
        drained: bool,
    ) -> Option<Change> {
        if cfg.vips.is_empty() {
            return None;
        }
        let able = up >= cfg.min_up;
        if able {
            self.unable_since = None;
            self.able_since.get_or_insert(now);
        } else {
            self.able_since = None;
            self.unable_since.get_or_insert(now);
        }
        let held = |since: Option<Instant>, ms: u64| {
            since.is_some_and(|t| now.duration_since(t) >= Duration::from_millis(ms))
        };
        let min_up = cfg.min_up;
        let was = self.announced == Some(true);
        let in_grace = self.grace_until.is_some_and(|t| now < t);
        let (want, why) = if drained {
            (false, Why::Drained)
        } else if able && (was || held(self.able_since, cfg.rise_ms)) {
            (true, Why::Serving { up })
        } else if able {
            (false, Why::Rising { up })
        } else if was && (in_grace || !held(self.unable_since, cfg.fall_ms)) {
            (true, Why::Falling { up, min_up })
        } else {
            (false, Why::TooFewUp { up, min_up })
        };
        self.why = why;
        if self.announced == Some(want) || self.retry_at.is_some_and(|t| now < t) {
            return None;
        }
        self.announced = Some(want);
        self.retry_at = None;
        self.changes += 1;
        Some(Change {
            announce: want,
            why,
        })
    }

    /// Writing the last change failed, maybe part way: what the kernel
    /// holds is not known; decided again and written whole a second later.
    pub fn failed(&mut self, now: Instant) {
        self.announced = None;
        self.changes = self.changes.saturating_sub(1);
        self.retry_at = Some(now + Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// A dropped VIP leaves lo at once unless it was announced a moment
    /// ago; one still listed stays whatever happened to it.
    #[test]
    fn dropped_vips_go_unless_just_withdrawn() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let earlier = [ip("192.0.2.80"), ip("192.0.2.81"), ip("2001:db8::80")];
        let vips = [ip("192.0.2.80")];
        let announced = [ip("192.0.2.80"), ip("2001:db8::80")];
        assert_eq!(
            dropped(&earlier, &vips, &announced),
            (vec![ip("192.0.2.81")], vec![ip("2001:db8::80")])
        );
        assert_eq!(dropped(&[], &vips, &announced), (vec![], vec![]));
        assert_eq!(dropped(&earlier, &earlier, &[]), (vec![], vec![]));
    }

    fn cfg() -> AnnounceConfig {
        AnnounceConfig {
            vips: vec!["192.0.2.80".parse::<IpAddr>().unwrap()],
            min_up: 1,
            rise_ms: 3000,
            fall_ms: 1000,
            table: 4242,
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn announced_once_able_for_rise_withdrawn_once_unable_for_fall() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(false));
        assert_eq!(a.decide(&c, t0, 1, false), None);
        assert_eq!(a.why(), Why::Rising { up: 1 });
        assert_eq!(a.decide(&c, t0 + MS(2999), 1, false), None);
        let ch = a.decide(&c, t0 + MS(3000), 2, false).unwrap();
        assert!(ch.announce);
        assert_eq!(ch.why, Why::Serving { up: 2 });
        assert_eq!(a.decide(&c, t0 + MS(4000), 0, false), None);
        assert_eq!(a.why(), Why::Falling { up: 0, min_up: 1 });
        let ch = a.decide(&c, t0 + MS(5000), 0, false).unwrap();
        assert!(!ch.announce);
        assert_eq!(ch.why, Why::TooFewUp { up: 0, min_up: 1 });
        assert_eq!(a.changes(), 2);
    }

    #[test]
    fn a_replica_flapping_within_fall_keeps_the_route() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        for i in 0..20 {
            let up = if i % 2 == 0 { 0 } else { 1 };
            assert_eq!(a.decide(&c, t0 + MS(i * 500), up, false), None, "tick {i}");
        }
        assert!(a.announced());
    }

    #[test]
    fn a_flap_after_a_withdrawal_waits_for_rise_again() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        a.decide(&c, t0, 0, false);
        assert!(!a.decide(&c, t0 + MS(1000), 0, false).unwrap().announce);
        assert_eq!(a.decide(&c, t0 + MS(1100), 1, false), None);
        assert_eq!(a.decide(&c, t0 + MS(1200), 0, false), None);
        assert_eq!(a.decide(&c, t0 + MS(1300), 1, false), None);
        assert_eq!(a.decide(&c, t0 + MS(4299), 1, false), None);
        assert!(a.decide(&c, t0 + MS(4300), 1, false).unwrap().announce);
    }

    #[test]
    fn drain_withdraws_at_once_and_ready_announces_what_was_able_for_rise() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        let ch = a.decide(&c, t0, 2, true).unwrap();
        assert_eq!((ch.announce, ch.why), (false, Why::Drained));
        assert_eq!(a.decide(&c, t0 + MS(100), 2, true), None);
        // Able all along: ready announces at once.
        assert!(a.decide(&c, t0 + MS(5000), 2, false).unwrap().announce);
    }

    #[test]
    fn a_takeover_keeps_the_route_of_an_able_host() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        assert_eq!(a.decide(&c, t0, 1, false), None);
        assert_eq!(a.why(), Why::Serving { up: 1 });
    }

    #[test]
    fn min_up_counts() {
        let c = AnnounceConfig {
            min_up: 2,
            rise_ms: 0,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(false));
        assert_eq!(a.decide(&c, t0, 1, false), None);
        assert_eq!(a.why(), Why::TooFewUp { up: 1, min_up: 2 });
        assert!(a.decide(&c, t0, 2, false).unwrap().announce);
    }

    #[test]
    fn a_failed_write_is_tried_again_a_second_later() {
        let c = AnnounceConfig {
            rise_ms: 0,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(false));
        assert!(a.decide(&c, t0, 1, false).unwrap().announce);
        a.failed(t0);
        assert!(!a.announced() && a.pending());
        assert_eq!(a.decide(&c, t0 + MS(500), 1, false), None);
        assert!(a.decide(&c, t0 + MS(1000), 1, false).unwrap().announce);
        assert_eq!(a.changes(), 1);
    }

    #[test]
    fn a_write_failed_part_way_is_rewritten_whichever_way_it_goes() {
        let c = AnnounceConfig {
            rise_ms: 0,
            ..cfg()
        };
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        // The withdrawal (of a drain) fails after the first VIP.
        assert!(!a.decide(&c, t0, 2, true).unwrap().announce);
        a.failed(t0);
        // The host is ready again before the retry: announced whole, though
        // the state before the failure was "announced".
        let ch = a.decide(&c, t0 + MS(1000), 2, false).unwrap();
        assert!(ch.announce);
        assert!(a.announced() && !a.pending());
    }

    #[test]
    fn a_start_that_finds_some_vips_only_writes_them_all() {
        let c = AnnounceConfig {
            rise_ms: 0,
            ..cfg()
        };
        let mut a = Announcement::new(None);
        assert!(a.decide(&c, Instant::now(), 1, false).unwrap().announce);
        let mut a = Announcement::new(None);
        assert!(!a.decide(&c, Instant::now(), 0, false).unwrap().announce);
    }

    #[test]
    fn a_takeover_waits_for_its_first_checks_before_withdrawing() {
        let c = cfg();
        let t0 = Instant::now();
        let mut a = Announcement::new(Some(true));
        a.grace(t0 + MS(2500));
        // Unproven replicas count as down until checked.
        assert_eq!(a.decide(&c, t0, 0, false), None);
        assert_eq!(a.decide(&c, t0 + MS(2000), 0, false), None);
        assert_eq!(a.decide(&c, t0 + MS(2400), 1, false), None);
        assert!(a.announced());
        // Past the grace, the usual fall.
        assert_eq!(a.decide(&c, t0 + MS(2600), 0, false), None);
        assert!(!a.decide(&c, t0 + MS(3600), 0, false).unwrap().announce);
    }

    #[test]
    fn no_vips_decides_nothing() {
        let c = AnnounceConfig {
            vips: vec![],
            ..cfg()
        };
        let mut a = Announcement::new(Some(false));
        assert_eq!(a.decide(&c, Instant::now(), 2, false), None);
    }
}
