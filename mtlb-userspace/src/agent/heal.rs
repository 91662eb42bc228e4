//! Bounds on the kernel's handshake counts.
//!
//! The programs count a handshake +1 toward its slot when its request
//! socket is created, and the child that establishes takes the -1, with no
//! per-flow state (a hash insert and delete per connection cost more than
//! everything else they do). The kernel says nothing when a request socket
//! dies without a child (SYN flood, client gone, full accept queue), so
//! such a +1 stays; and a child whose +1 was cleared already takes a -1 it
//! no longer has. What bounds the count: a handshake older than the
//! handshake timeout no longer counts, and every +1 follows an assignment
//! by sk_lookup (SLOT_TOTALS.assigned), so the handshakes in flight are at
//! most the slot's assignments within that time, and never below zero. A
//! slot without a registered listener has none in flight.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The clamped value for a raw count `raw` (the kernel's word read as
/// i64), or `None` when it is in range already.
pub fn clamp(raw: i64, most: Option<u64>) -> Option<u64> {
    let want = raw.max(0) as u64;
    let want = most.map_or(want, |m| want.min(m));
    (want as i64 != raw).then_some(want)
}

/// Per-slot totals of assignments (SLOT_TOTALS.assigned) sampled over
/// time, enough to tell how many were made within a window.
#[derive(Debug, Default)]
pub struct Assignments {
    samples: VecDeque<(Instant, Vec<u64>)>,
}

impl Assignments {
    /// Records the totals at `now`, forgetting samples no window of
    /// `keep` needs.
    pub fn record(&mut self, now: Instant, totals: Vec<u64>, keep: Duration) {
        // Keep the newest sample that is at least `keep` old, and all
        // after it.
        while self.samples.len() >= 2 && now.duration_since(self.samples[1].0) >= keep {
            self.samples.pop_front();
        }
        self.samples.push_back((now, totals));
    }

    /// Assignments to `slot` from at least `window` ago until the newest
    /// sample: an upper bound on the handshakes in flight that started
    /// within `window`. `None` until samples span the window (just
    /// started, or taken over).
    pub fn within(&self, slot: usize, window: Duration) -> Option<u64> {
        let (newest_t, newest) = self.samples.back()?;
        // The newest sample at least `window` older than the newest one.
        let (_, old) = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| newest_t.duration_since(*t) >= window)?;
        let now = newest.get(slot).copied().unwrap_or(0);
        let then = old.get(slot).copied().unwrap_or(0);
        // A slot scaled away and back, or counters of replaced maps:
        // fewer than before means no bound from this pair.
        now.checked_sub(then)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(3000);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn clamp_keeps_counts_in_range() {
        assert_eq!(clamp(3, Some(5)), None);
        assert_eq!(clamp(3, None), None);
        assert_eq!(clamp(7, Some(5)), Some(5));
        assert_eq!(clamp(-1, Some(5)), Some(0), "an uncharged -1");
        assert_eq!(clamp(-2, None), Some(0));
        assert_eq!(clamp(0, Some(0)), None);
        assert_eq!(clamp(4, Some(0)), Some(0), "no listener: none in flight");
        // The raw u64 word of -1, read as i64.
        assert_eq!(clamp(u64::MAX as i64, Some(9)), Some(0));
    }

    #[test]
    fn no_bound_before_samples_span_the_window() {
        let t0 = Instant::now();
        let mut a = Assignments::default();
        assert_eq!(a.within(0, W), None);
        a.record(at(t0, 0), vec![10], W);
        a.record(at(t0, 2750), vec![15], W);
        assert_eq!(a.within(0, W), None);
        a.record(at(t0, 3000), vec![16], W);
        assert_eq!(a.within(0, W), Some(6));
    }

    #[test]
    fn the_bound_counts_assignments_of_the_last_window_only() {
        let t0 = Instant::now();
        let mut a = Assignments::default();
        // 100 assigned in the first second, then none: after the window
        // nothing can still be in flight.
        let mut total = 0;
        for ms in (0..=8000).step_by(250) {
            if ms <= 1000 {
                total += 25;
            }
            a.record(at(t0, ms), vec![total, 0], W);
        }
        assert_eq!(a.within(0, W), Some(0));
        assert_eq!(a.within(1, W), Some(0));
        // A new burst counts at once.
        a.record(at(t0, 8250), vec![total + 40, 0], W);
        assert_eq!(a.within(0, W), Some(40));
        // Samples kept stay few: about the window's worth.
        assert!(a.samples.len() <= 14, "{}", a.samples.len());
    }

    #[test]
    fn a_steady_rate_bounds_by_at_least_a_window_of_it() {
        let t0 = Instant::now();
        let mut a = Assignments::default();
        for (i, ms) in (0..=10_000).step_by(250).enumerate() {
            a.record(at(t0, ms), vec![10 * i as u64], W);
        }
        // 10 per 250 ms: 3 s hold at least 120.
        assert!(a.within(0, W).unwrap() >= 120);
    }

    #[test]
    fn counters_that_went_back_give_no_bound() {
        let t0 = Instant::now();
        let mut a = Assignments::default();
        a.record(at(t0, 0), vec![50], W);
        a.record(at(t0, 3000), vec![2], W);
        assert_eq!(a.within(0, W), None);
        assert_eq!(a.within(5, W), Some(0), "a slot never seen");
    }
}
