//! Telling a repeated event at most once a minute per key (a slot, a kind
//! of fault), with how many went untold in between: a lasting problem
//! stays in the journal without flooding it.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

const EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Throttle<K> {
    /// Per key: when it was last told, and how many since.
    told: HashMap<K, (Instant, u64)>,
}

impl<K> Default for Throttle<K> {
    fn default() -> Self {
        Self {
            told: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash> Throttle<K> {
    /// Another `key` event at `now`: `Some(untold)` when it is to be told
    /// (the first, or a minute after the last told), with how many were not
    /// told since; `None` when it is only counted.
    pub fn event(&mut self, key: K, now: Instant) -> Option<u64> {
        match self.told.get_mut(&key) {
            Some((last, untold)) if now.duration_since(*last) < EVERY => {
                *untold += 1;
                None
            }
            Some((last, untold)) => {
                *last = now;
                Some(std::mem::take(untold))
            }
            None => {
                self.told.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_a_minute_per_key_with_the_untold_count() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.event(1, t0), Some(0));
        assert_eq!(t.event(2, t0), Some(0), "keys are apart");
        for s in 1..60 {
            assert_eq!(t.event(1, t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(t.event(1, t0 + EVERY), Some(59));
        assert_eq!(t.event(1, t0 + EVERY), None);
    }
}
