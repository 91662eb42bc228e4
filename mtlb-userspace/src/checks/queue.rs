//! Hung replica detection from the listener's accept queue.
//!
//! A replica whose process is alive but not accepting still completes TCP
//! handshakes in the kernel, so connect checks pass while its accept queue
//! grows. For a listening socket /proc/net/tcp{,6} shows the accept queue
//! length as rx_queue and its limit as tx_queue (what `ss -lt` shows as
//! Recv-Q/Send-Q).

use std::time::{Duration, Instant};

/// Accept-queue watch of one replica.
#[derive(Debug, Default, Clone)]
pub struct QueueWatch {
    /// Since when the queue has been non-empty without draining.
    busy_since: Option<Instant>,
    last_len: u32,
    pub len: u32,
    pub max: u32,
}

impl QueueWatch {
    /// Takes a sample; returns true when the queue is stalled: full, or
    /// non-empty and not shrinking for `stall`.
    pub fn sample(&mut self, len: u32, max: u32, now: Instant, stall: Duration) -> bool {
        self.len = len;
        self.max = max;
        if len == 0 || len < self.last_len {
            // Empty, or the replica accepted since the last sample.
            self.busy_since = if len == 0 { None } else { Some(now) };
        } else if self.busy_since.is_none() {
            self.busy_since = Some(now);
        }
        self.last_len = len;
        // The kernel's queue is full when it holds more than the backlog.
        let full = max > 0 && len > max;
        full || self
            .busy_since
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

    #[test]
    fn stalls_only_when_not_draining() {
        let stall = Duration::from_secs(2);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = QueueWatch::default();
        assert!(!q.sample(0, 128, at(0), stall));
        assert!(!q.sample(3, 128, at(100), stall));
        assert!(!q.sample(3, 128, at(1500), stall));
        assert!(q.sample(4, 128, at(2200), stall));
        // Draining resets.
        assert!(!q.sample(2, 128, at(2300), stall));
        assert!(!q.sample(0, 128, at(5000), stall));
        // A busy but accepting replica never stalls.
        for i in 0..50 {
            assert!(!q.sample(
                if i % 2 == 0 { 5 } else { 4 },
                128,
                at(6000 + i * 100),
                stall
            ));
        }
        // Full is stalled at once.
        assert!(q.sample(129, 128, at(20000), stall));
    }
}
