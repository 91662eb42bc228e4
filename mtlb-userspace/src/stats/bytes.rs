//! Shared, bounded-latency readings of the replicas' byte counters.
//!
//! A reading costs one sock_diag message per open connection (see
//! `snapshot::bytes`): a few milliseconds at a thousand connections, tens to
//! hundreds at a hundred thousand. So readings are made on a thread of
//! their own, at most one at a time, and shared: a scrape that finds the
//! last reading older than `max_age` asks for a new one and waits for it at
//! most `wait`, then serves the last reading it has (never a partial one).
//! At small scale every scrape gets a fresh reading; at large scale a
//! scrape stays fast and its byte counters are one reading old. A reading
//! also stays fresh for `DUTY` times as long as it took, so that scrapers
//! asking back to back keep the reading thread busy a tenth of the time,
//! not all of it (at a million connections a reading takes most of a
//! second of kernel time, taken from the machine's clients). No scrapes,
//! no readings.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

/// A reading is fresh for at least this many times its own duration.
const DUTY: u32 = 10;

#[derive(Debug)]
struct State<T> {
    /// The last reading and when it was started.
    last: Option<(Instant, T)>,
    /// How long the last reading took.
    took: Duration,
    /// A reading is under way.
    asked: bool,
    /// When the reading under way was asked for.
    asked_at: Instant,
}

/// Readings of `T` made by `read` on a thread of their own.
pub struct Shared<T> {
    inner: Arc<(Mutex<State<T>>, Condvar)>,
    max_age: Duration,
    wait: Duration,
}

impl<T: Clone + Send + 'static> Shared<T> {
    /// Starts the reading thread. `read` returns `None` when it could not
    /// read (the last reading stays).
    pub fn start(
        max_age: Duration,
        wait: Duration,
        mut read: impl FnMut() -> Option<T> + Send + 'static,
    ) -> std::io::Result<Self> {
        let inner = Arc::new((
            Mutex::new(State {
                last: None,
                took: Duration::ZERO,
                asked: false,
                asked_at: Instant::now(),
            }),
            Condvar::new(),
        ));
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("mtlb-bytes".into())
            .spawn(move || {
                loop {
                    // Gone with its last user.
                    let Some(inner) = weak.upgrade() else { return };
                    let (lock, cv) = &*inner;
                    {
                        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                        while !st.asked {
                            let (g, _) = cv
                                .wait_timeout(st, Duration::from_secs(1))
                                .unwrap_or_else(|p| p.into_inner());
                            st = g;
                            if !st.asked && Arc::strong_count(&inner) == 1 {
                                return;
                            }
                        }
                    }
                    let started = Instant::now();
                    let reading = read();
                    let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                    st.took = started.elapsed();
                    if let Some(r) = reading {
                        st.last = Some((started, r));
                    }
                    st.asked = false;
                    cv.notify_all();
                }
            })?;
        Ok(Self {
            inner,
            max_age,
            wait,
        })
    }

    /// The newest reading: a fresh one if it comes within `wait`, else the
    /// last one; `None` only before the first reading completes (the very
    /// first call waits for it up to `first_wait`).
    pub fn get(&self, first_wait: Duration) -> Option<T> {
        let (lock, cv) = &*self.inner;
        let asked_at = Instant::now();
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |st: &State<T>| {
            let age = self.max_age.max(st.took * DUTY);
            st.last.as_ref().is_some_and(|(t, _)| t.elapsed() < age)
        };
        if fresh(&st) {
            return st.last.as_ref().map(|(_, r)| r.clone());
        }
        if !st.asked {
            st.asked = true;
            st.asked_at = asked_at;
            cv.notify_all();
        }
        let budget = if st.last.is_some() {
            self.wait
        } else {
            first_wait
        };
        // From when the reading under way was asked for: scrapes that come
        // while a long reading runs do not each wait again (the server
        // answers one scrape at a time, so their waits would add up).
        let deadline = st.asked_at + budget;
        // Wait for a reading started after we asked (or any, the first
        // time), or the deadline.
        loop {
            let done = st.last.as_ref().is_some_and(|(t, _)| *t >= asked_at) || !st.asked;
            if done {
                break;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let (g, _) = cv.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner());
            st = g;
        }
        st.last.as_ref().map(|(_, r)| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn fast_readings_are_always_fresh_and_shared_within_max_age() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let s = Shared::start(Duration::from_millis(200), SEC, move || {
            Some(n2.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .unwrap();
        assert_eq!(s.get(SEC), Some(1));
        // Within max_age: the same reading, no new one.
        assert_eq!(s.get(SEC), Some(1));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(s.get(SEC), Some(2), "older than max_age: read again");
    }

    #[test]
    fn a_slow_reading_does_not_hold_a_scrape_past_its_wait() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let s = Shared::start(Duration::ZERO, Duration::from_millis(100), move || {
            let k = n2.fetch_add(1, Ordering::SeqCst);
            if k > 0 {
                std::thread::sleep(Duration::from_millis(1000));
            }
            Some(k + 1)
        })
        .unwrap();
        assert_eq!(s.get(SEC), Some(1), "the first reading is waited for");
        let t = Instant::now();
        // A new reading is asked for, slow: the last one is served.
        assert_eq!(s.get(SEC), Some(1));
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
        // Asked again meanwhile: still one reading under way, not two, and
        // the wait for it is over: served at once, not after another 100 ms.
        let t = Instant::now();
        assert_eq!(s.get(SEC), Some(1));
        assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(n.load(Ordering::SeqCst), 2);
        // The slow reading has landed.
        let got = s.get(SEC).unwrap();
        assert!(got >= 2, "{got}");
    }

    #[test]
    fn a_slow_reading_stays_fresh_ten_times_as_long_as_it_took() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let s = Shared::start(Duration::from_millis(10), SEC, move || {
            std::thread::sleep(Duration::from_millis(50));
            Some(n2.fetch_add(1, Ordering::SeqCst) + 1)
        })
        .unwrap();
        assert_eq!(s.get(SEC), Some(1));
        // Past max_age but within ten times the 50 ms it took.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(s.get(SEC), Some(1));
        assert_eq!(n.load(Ordering::SeqCst), 1, "no second reading yet");
        // Past both: read again.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(s.get(SEC), Some(2));
    }

    #[test]
    fn a_failed_reading_keeps_the_last_one() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let s = Shared::start(Duration::ZERO, SEC, move || {
            let k = n2.fetch_add(1, Ordering::SeqCst);
            (k == 0).then_some(7)
        })
        .unwrap();
        assert_eq!(s.get(SEC), Some(7));
        // Until the reading is stale (ten times the little it took) and a
        // second one, failed, has been made.
        for _ in 0..1000 {
            assert_eq!(s.get(SEC), Some(7));
            if n.load(Ordering::SeqCst) >= 2 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no second reading in a second");
    }
}
