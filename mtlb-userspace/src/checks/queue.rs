//! Hung replica detection from the listener's accept queue.
//!
//! A replica whose process is alive but not accepting still completes TCP
//! handshakes in the kernel, so connect checks pass while its accept queue
//! grows. A busy replica's queue grows too, under a burst: what tells them
//! apart is whether it accepts at all. Connections that entered the queue
//! are counted by the kernel programs (established on the slot); those
//! accepted are that count less the queue's length (from sock_diag). No
//! accept for `stall_ms` while connections wait: stalled.

use std::time::{Duration, Instant};

/// Accept-queue watch of one replica.
#[derive(Debug, Default, Clone)]
pub struct QueueWatch {
    /// Since when connections have waited with no accept seen.
    waiting_since: Option<Instant>,
    /// Accepted so far, by the last sample's reckoning.
    last_accepted: Option<i64>,
    pub len: u32,
    pub max: u32,
}

impl QueueWatch {
    /// Takes a sample: `len` queued of `max`, `entered` connections steered
    /// to it so far. True when stalled: connections have waited `stall`
    /// without one accept.
    pub fn sample(
        &mut self,
        len: u32,
        max: u32,
        entered: u64,
        now: Instant,
        stall: Duration,
    ) -> bool {
        self.len = len;
        self.max = max;
        // Direct connections (health checks) enter uncounted: while they
        // wait, this reckoning drops; it rises only with accepts.
        let accepted = entered as i64 - len as i64;
        let progress = self.last_accepted.is_some_and(|a| accepted > a);
        self.last_accepted = Some(accepted);
        if len == 0 {
            self.waiting_since = None;
        } else if progress || self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        self.waiting_since
            .is_some_and(|t| now.duration_since(t) >= stall)
    }

    /// No listener: nothing queued.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(2);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_queue_nobody_drains_stalls() {
        let t0 = Instant::now();
        let mut q = QueueWatch::default();
        assert!(!q.sample(0, 128, 10, at(t0, 0), STALL));
        assert!(!q.sample(3, 128, 13, at(t0, 100), STALL));
        assert!(!q.sample(3, 128, 13, at(t0, 1500), STALL));
        // A health check's connection joins the queue: still no accept.
        assert!(q.sample(4, 128, 13, at(t0, 2200), STALL));
        // Accepting again clears it.
        assert!(!q.sample(2, 128, 13, at(t0, 2300), STALL));
        assert!(!q.sample(0, 128, 13, at(t0, 5000), STALL));
    }

    #[test]
    fn a_busy_replica_whose_queue_grows_is_not_stalled() {
        let t0 = Instant::now();
        let mut q = QueueWatch::default();
        // 300/s arrive, 100/s accepted: the queue grows 20 per 100 ms.
        for i in 0..100u64 {
            let entered = 30 * i;
            let accepted = 10 * i;
            let len = (entered - accepted) as u32;
            assert!(
                !q.sample(len, 4096, entered, at(t0, 100 * i), STALL),
                "sample {i}"
            );
        }
    }

    #[test]
    fn a_full_queue_that_drains_is_not_stalled() {
        let t0 = Instant::now();
        let mut q = QueueWatch::default();
        for i in 0..50u64 {
            assert!(!q.sample(129, 128, 1000 + i, at(t0, 100 * i), STALL));
        }
        // Full and not draining: stalled after `stall`.
        for i in 50..69u64 {
            assert!(!q.sample(129, 128, 1049, at(t0, 100 * i), STALL), "{i}");
        }
        assert!(q.sample(129, 128, 1049, at(t0, 100 * 70), STALL));
    }
}
