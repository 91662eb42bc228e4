//! The recent past of each replica's active connections, for the stats
//! page's sparklines.
//!
//! Sampled on the stats thread at a fixed interval (`stats_sample_ms`),
//! never per request: a page that refreshes itself, or many people looking
//! at it, neither adds samples nor skews them. Bounded: [`CAPACITY`]
//! samples of at most `MAX_REPLICAS` counts each (about 30 KiB). Samples
//! come in as values: the collector reads them from the mmap'ed CONNS
//! array (no syscall per replica), so sampling costs the agent's loop
//! nothing and no connection is looked at.

use mtlb_common::MAX_REPLICAS;
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Samples kept: with the default 10 s interval, ten minutes.
pub const CAPACITY: usize = 60;

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Active connections by slot.
    active: Vec<u64>,
}

/// A bounded ring of samples, all slots read at the same instant (so a
/// total is the sum of one sample).
#[derive(Debug, Clone)]
pub struct History {
    every: Duration,
    samples: VecDeque<Sample>,
}

impl History {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            samples: VecDeque::with_capacity(CAPACITY),
        }
    }

    /// The sampling interval.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// How far back a full ring reaches.
    pub fn window(&self) -> Duration {
        self.every * CAPACITY as u32
    }

    /// Adds one sample (active connections by slot), dropping the oldest
    /// once full.
    pub fn record(&mut self, at: Instant, mut active: Vec<u64>) {
        active.truncate(MAX_REPLICAS as usize);
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample { at, active });
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `slot`'s samples within the window, oldest first, as (age at `now`,
    /// count). Samples from before the slot existed (scaled up since) have
    /// no count for it and are left out.
    pub fn series(&self, slot: usize, now: Instant) -> Vec<(Duration, u64)> {
        self.points(now, |s| s.active.get(slot).copied())
    }

    /// The sum over all slots of each sample, like [`Self::series`].
    pub fn total(&self, now: Instant) -> Vec<(Duration, u64)> {
        self.points(now, |s| {
            Some(s.active.iter().fold(0u64, |a, b| a.saturating_add(*b)))
        })
    }

    fn points(&self, now: Instant, value: impl Fn(&Sample) -> Option<u64>) -> Vec<(Duration, u64)> {
        let window = self.window();
        self.samples
            .iter()
            .filter_map(|s| {
                let age = now.saturating_duration_since(s.at);
                (age <= window).then_some((age, value(s)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_ring_is_bounded_and_drops_the_oldest() {
        let t0 = Instant::now();
        let mut h = History::new(10 * S);
        for i in 0..(CAPACITY as u64 + 25) {
            h.record(t0 + 10 * S * i as u32, vec![i, 2 * i]);
        }
        assert_eq!(h.len(), CAPACITY);
        let now = t0 + 10 * S * (CAPACITY as u32 + 24);
        let s = h.series(1, now);
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s.first().unwrap(), &(10 * S * (CAPACITY as u32 - 1), 50));
        assert_eq!(
            s.last().unwrap(),
            &(Duration::ZERO, 2 * (CAPACITY as u64 + 24))
        );
    }

    #[test]
    fn no_more_than_max_replicas_counts_are_kept() {
        let mut h = History::new(S);
        h.record(Instant::now(), vec![1; 1000]);
        assert_eq!(h.samples[0].active.len(), MAX_REPLICAS as usize);
    }

    #[test]
    fn slots_added_later_have_only_their_own_samples() {
        let t0 = Instant::now();
        let mut h = History::new(S);
        h.record(t0, vec![1]);
        h.record(t0 + S, vec![2, 5]);
        let now = t0 + 2 * S;
        assert_eq!(h.series(0, now), vec![(2 * S, 1), (S, 2)]);
        assert_eq!(h.series(1, now), vec![(S, 5)]);
        assert_eq!(h.series(7, now), vec![]);
        assert_eq!(h.total(now), vec![(2 * S, 1), (S, 7)]);
    }

    #[test]
    fn samples_older_than_the_window_are_not_shown() {
        let t0 = Instant::now();
        let mut h = History::new(S);
        h.record(t0, vec![9]);
        h.record(t0 + 30 * S, vec![1]);
        // 61 s after the first: outside 60 × 1 s.
        assert_eq!(h.series(0, t0 + 61 * S), vec![(31 * S, 1)]);
    }
}
