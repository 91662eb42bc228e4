//! What the stats endpoint serves from: the maps' handles, the shared
//! byte readings, the counters last served and the sparklines' history.
//! Every request reads the kernel's maps at that moment (per-CPU values
//! summed), except the byte counters, which scrapes within a second share;
//! nothing here is on the data path, so a scrape never blocks steering.
//! No HTTP here: the `http` module serves what [`Collector::snapshot`] reads.

use super::{
    bytes::Shared,
    history::History,
    snapshot::{self, Bytes, Snapshot},
};
use crate::{
    checks::health::LocalFault,
    kernel::maps::{Maps, MapsError},
};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Scrapes within this share one reading of the byte counters. Everything
/// else (states, counts, checks) is read fresh for each.
pub const BYTES_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a scrape waits for a fresh reading before it serves the last
/// one: readings of a few thousand connections take less, of a hundred
/// thousand more.
pub const BYTES_WAIT: Duration = Duration::from_millis(20);

/// What only the agent's loop knows, served by /metrics, /stats and
/// /healthz: health checks it could not run, by kind, and the host's
/// announcement.
#[derive(Debug, Default)]
pub struct AgentReport {
    counts: [std::sync::atomic::AtomicU64; LocalFault::ALL.len()],
    last: Mutex<Option<Instant>>,
    announce: Mutex<Option<snapshot::AnnounceRow>>,
}

impl AgentReport {
    /// The announcement as the loop decided it last (`None`: no VIPs).
    pub fn set_announce(&self, row: Option<snapshot::AnnounceRow>) {
        *lock(&self.announce) = row;
    }

    pub fn count(&self, f: LocalFault) {
        let i = LocalFault::ALL
            .iter()
            .position(|x| *x == f)
            .expect("listed");
        self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.last) = Some(Instant::now());
    }

    /// Every kind, counted or not (a counter is there from the start).
    pub fn counts(&self) -> std::collections::BTreeMap<String, u64> {
        LocalFault::ALL
            .iter()
            .zip(&self.counts)
            .map(|(f, n)| {
                (
                    f.as_str().to_string(),
                    n.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Whether a check could not run within `within`.
    pub fn recent(&self, within: Duration) -> bool {
        lock(&self.last).is_some_and(|t| t.elapsed() < within)
    }
}

pub struct Collector {
    maps: Mutex<Maps>,
    pin_dir: PathBuf,
    /// Byte counters last served, by replica: a connection that closes
    /// while a reading is made can be missed by it, and a counter must
    /// never go back.
    served_bytes: Mutex<HashMap<String, (u64, u64)>>,
    /// The replicas' byte counters: the one part of a snapshot whose cost
    /// grows with connections (a sock_diag message each), so readings are
    /// shared and made off the request path (see `stats::bytes`).
    bytes: Shared<Bytes>,
    /// Active connections over the last minutes, for the page's sparklines
    /// (sampled by [`Collector::sample_history`] on the stats thread).
    history: Mutex<History>,
    /// When the agent started serving, for the page's uptime.
    started: Instant,
    report: std::sync::Arc<AgentReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("starting the byte counter thread")]
    Thread(#[source] std::io::Error),
}

/// A panic elsewhere while holding one of the locks leaves what it guards
/// as it was: the maps' handles, counters and samples are still sound.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Collector {
    /// `maps` serves the requests; the byte readings get a handle of their
    /// own from the pins in `pin_dir`. The sparklines' history takes a
    /// sample every `sample_every`.
    pub fn new(
        maps: Maps,
        pin_dir: PathBuf,
        sample_every: Duration,
        report: std::sync::Arc<AgentReport>,
    ) -> Result<Self, CollectorError> {
        let reader = Maps::from_pins(&pin_dir)?;
        let bytes = Shared::start(BYTES_MAX_AGE, BYTES_WAIT, move || {
            match snapshot::bytes(&reader) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("reading byte counters: {}", crate::error::report(&e));
                    None
                }
            }
        })
        .map_err(CollectorError::Thread)?;
        Ok(Self {
            maps: Mutex::new(maps),
            pin_dir,
            served_bytes: Mutex::new(HashMap::new()),
            bytes,
            history: Mutex::new(History::new(sample_every)),
            started: Instant::now(),
            report,
        })
    }

    /// One reading of everything, byte counters never below what was
    /// served before.
    pub fn snapshot(&self) -> Result<Snapshot, MapsError> {
        // Before the maps' lock: a slow first reading holds no one else.
        let bytes = self.bytes.get(Duration::from_secs(5)).unwrap_or_default();
        let mut s = snapshot::collect(&lock(&self.maps), &self.pin_dir, &bytes)?;
        monotonic_bytes(&mut s, &mut lock(&self.served_bytes));
        s.check_errors = self.report.counts();
        s.announce = lock(&self.report.announce).clone();
        Ok(s)
    }

    /// Whether the agent could not run a check within `within`.
    pub fn faulted_within(&self, within: Duration) -> bool {
        self.report.recent(within)
    }

    /// How long the agent has served.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The sparklines' history as it is now, for rendering (which changes
    /// nothing: a page refreshing itself is a pure re-read).
    pub fn history(&self) -> MutexGuard<'_, History> {
        lock(&self.history)
    }

    /// Adds one sample of every replica's active connections to the
    /// history (a read of the mmap'ed counters; no byte reading).
    pub fn sample_history(&self) {
        let now = Instant::now();
        let active = read_active(&lock(&self.maps));
        match active {
            Ok(a) => lock(&self.history).record(now, a),
            Err(e) => tracing::debug!("sampling active connections: {e}"),
        }
    }

    /// Samples the history every `stats_sample_ms`, the first at once, for
    /// as long as the stats thread runs. A failed reading is skipped (the
    /// sparkline shows a gap in time, not a made-up value).
    pub async fn sample_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.history().every());
        // A late tick (a slow first byte reading holding the thread) is not
        // made up for with a burst of samples.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample_history();
        }
    }
}

/// Active connections (established and in handshake) of each configured
/// slot, from the mmap'ed counters: what a history sample holds.
fn read_active(maps: &Maps) -> Result<Vec<u64>, MapsError> {
    let replicas = maps.settings()?.replicas as usize;
    Ok(maps.counts(replicas))
}

/// Never less than served before, per replica and direction.
fn monotonic_bytes(s: &mut Snapshot, served: &mut HashMap<String, (u64, u64)>) {
    for b in &mut s.backends {
        let last = served.entry(b.name.clone()).or_default();
        b.bytes_in = b.bytes_in.max(last.0);
        b.bytes_out = b.bytes_out.max(last.1);
        *last = (b.bytes_in, b.bytes_out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testutil::snap;

    #[test]
    fn byte_counters_never_go_back() {
        let mut served = HashMap::new();
        let mut s = snap();
        monotonic_bytes(&mut s, &mut served);
        let mut dip = snap();
        dip.backends[0].bytes_in = 50;
        dip.backends[0].bytes_out = 250;
        monotonic_bytes(&mut dip, &mut served);
        assert_eq!(
            (dip.backends[0].bytes_in, dip.backends[0].bytes_out),
            (100, 250)
        );
    }
}
