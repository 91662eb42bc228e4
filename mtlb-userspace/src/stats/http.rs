//! The stats endpoint (default 127.0.0.1:8404, as HAProxy's stats were):
//! `/metrics` (Prometheus), `/stats` (HTML, one row per replica),
//! `/stats;csv` or `/stats?format=csv`, `/healthz`.
//!
//! Every request reads the kernel's maps at that moment (per-CPU values
//! summed), except the byte counters, which scrapes within a second
//! share; nothing here is on the data path, so a scrape
//! never blocks steering.

use super::{
    bytes::Shared,
    history::{self, History},
    page,
    snapshot::{self, Bytes, Snapshot},
    textfmt,
};
use crate::kernel::maps::{Maps, MapsError};
use axum::{
    Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use mtlb_common::{STATE_DOWN, STATE_DRAIN, STATE_MAINT, STATE_UP};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

pub struct Source {
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
    /// (sampled by `history::sample` on the stats thread).
    history: Mutex<History>,
    /// When the agent started serving, for the page's uptime.
    started: Instant,
}

/// Scrapes within this share one reading of the byte counters. Everything
/// else (states, counts, checks) is read fresh for each.
pub const BYTES_MAX_AGE: Duration = Duration::from_secs(1);
/// How long a scrape waits for a fresh reading before it serves the last
/// one: readings of a few thousand connections take less, of a hundred
/// thousand more.
pub const BYTES_WAIT: Duration = Duration::from_millis(20);

impl Source {
    /// `maps` serves the requests; the byte readings get a handle of their
    /// own from the pins in `pin_dir`. The sparklines' history takes a
    /// sample every `sample_every`.
    pub fn new(maps: Maps, pin_dir: PathBuf, sample_every: Duration) -> Result<Self, SourceError> {
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
        .map_err(SourceError::Thread)?;
        Ok(Self {
            maps: Mutex::new(maps),
            pin_dir,
            served_bytes: Mutex::new(HashMap::new()),
            bytes,
            history: Mutex::new(History::new(sample_every)),
            started: Instant::now(),
        })
    }

    pub(super) fn history_every(&self) -> Duration {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .every()
    }

    /// Adds one sample of every replica's active connections to the
    /// history (a read of the mmap'ed counters; no byte reading).
    pub(super) fn sample_history(&self) {
        let now = Instant::now();
        let active = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            history::read_active(&maps)
        };
        match active {
            Ok(a) => self
                .history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(now, a),
            Err(e) => tracing::debug!("sampling active connections: {e}"),
        }
    }

    fn snapshot(&self) -> Result<Snapshot, MapsError> {
        // Before the maps' lock: a slow first reading holds no one else.
        let bytes = self.bytes.get(Duration::from_secs(5)).unwrap_or_default();
        // A panic elsewhere while holding the lock leaves the handles as
        // they were: reading through them is still sound.
        let mut s = {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            snapshot::collect(&maps, &self.pin_dir, &bytes)?
        };
        let mut served = self.served_bytes.lock().unwrap_or_else(|p| p.into_inner());
        monotonic_bytes(&mut s, &mut served);
        Ok(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("starting the byte counter thread")]
    Thread(#[source] std::io::Error),
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

pub fn router(src: Arc<Source>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/stats;csv", get(stats_csv))
        .route("/healthz", get(healthz))
        .with_state(src)
}

fn failed(e: MapsError) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("reading the maps: {}\n", crate::error::report(&e)),
    )
        .into_response()
}

/// OpenMetrics for clients that ask for it (Prometheus does), the
/// Prometheus text format for the rest (curl, promtool): see `textfmt`.
async fn metrics(State(src): State<Arc<Source>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match src.snapshot() {
        Ok(s) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            render_metrics(&s),
        )
            .into_response(),
        Ok(s) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            textfmt::from_openmetrics(&render_metrics(&s)),
        )
            .into_response(),
        Err(e) => failed(e),
    }
}

async fn stats(
    State(src): State<Arc<Source>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match src.snapshot() {
        Ok(s) if q.get("format").is_some_and(|f| f == "csv") => csv(&s),
        Ok(s) => Html(src.page(&s)).into_response(),
        Err(e) => failed(e),
    }
}

async fn stats_csv(State(src): State<Arc<Source>>) -> Response {
    match src.snapshot() {
        Ok(s) => csv(&s),
        Err(e) => failed(e),
    }
}

impl Source {
    /// The HTML page of `s`, with the history as it is now (rendering
    /// changes nothing: a page refreshing itself is a pure re-read).
    fn page(&self, s: &Snapshot) -> String {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        page::render(
            s,
            &page::Context {
                version: env!("CARGO_PKG_VERSION"),
                uptime: self.started.elapsed(),
                history: &history,
                now: Instant::now(),
                wall: SystemTime::now(),
            },
        )
    }
}

fn csv(s: &Snapshot) -> Response {
    (
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        render_csv(s),
    )
        .into_response()
}

async fn healthz(State(src): State<Arc<Source>>) -> Response {
    match src.snapshot() {
        Ok(s) if s.backends.iter().any(|b| b.up) => (StatusCode::OK, "OK\n").into_response(),
        Ok(_) => (StatusCode::SERVICE_UNAVAILABLE, "no backend available\n").into_response(),
        Err(e) => failed(e),
    }
}

type Labels = Vec<(String, String)>;

fn backend(name: &str) -> Labels {
    vec![("backend".into(), name.into())]
}

/// Registers a labelled metric family under `name` and returns it.
fn family<M>(r: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: Default,
    Family<Labels, M>: prometheus_client::registry::Metric + Clone,
{
    let f = Family::<Labels, M>::default();
    r.register(name, help, f.clone());
    f
}

type G = Gauge;
type GF = Gauge<f64, AtomicU64>;
type C = Counter;
type CF = Counter<f64, AtomicU64>;

/// Prometheus text, through prometheus-client. Names follow the HAProxy
/// exporter's meanings (see README "Metrics").
pub fn render_metrics(s: &Snapshot) -> String {
    let mut r = Registry::default();
    let up = family::<G>(
        &mut r,
        "mtlb_backend_up",
        "1 when the replica takes new connections (UP and READY)",
    );
    let state = family::<G>(
        &mut r,
        "mtlb_backend_state",
        "Replica state, one-hot over UP, DOWN, DRAIN, MAINT",
    );
    let active = family::<G>(
        &mut r,
        "mtlb_backend_active_connections",
        "Connections now (established and in handshake), exact from the kernel",
    );
    let total = family::<C>(
        &mut r,
        "mtlb_backend_connections",
        "Steered connections established",
    );
    let weight = family::<G>(&mut r, "mtlb_backend_weight", "Effective weight");
    let dur = family::<GF>(
        &mut r,
        "mtlb_backend_check_duration_seconds",
        "Duration of the last health check",
    );
    let fails = family::<C>(
        &mut r,
        "mtlb_backend_check_failures",
        "Failed health checks",
    );
    let trans = family::<C>(
        &mut r,
        "mtlb_backend_transitions",
        "State changes, by the state entered",
    );
    let down = family::<CF>(&mut r, "mtlb_backend_downtime_seconds", "Time spent DOWN");
    let queue = family::<G>(
        &mut r,
        "mtlb_backend_accept_queue",
        "Accept queue length of the replica's listener",
    );
    let stalled = family::<G>(
        &mut r,
        "mtlb_backend_accept_queue_stalled",
        "1 while connections wait in the replica's accept queue and none is accepted (the agent's verdict: DOWN for it, or kept as the last replica taking connections)",
    );
    let hs = family::<G>(
        &mut r,
        "mtlb_backend_handshakes",
        "Connections steered to the replica whose handshake is not complete yet",
    );
    let rx = family::<C>(
        &mut r,
        "mtlb_backend_bytes_received",
        "Bytes received from clients by the replica's connections",
    );
    let tx = family::<C>(
        &mut r,
        "mtlb_backend_bytes_sent",
        "Bytes sent to clients by the replica's connections (acknowledged)",
    );
    for b in &s.backends {
        let l = backend(&b.name);
        up.get_or_create(&l).set(b.up as i64);
        let word = b.state.state_word();
        for (st, w) in [
            ("UP", STATE_UP),
            ("DOWN", STATE_DOWN),
            ("DRAIN", STATE_DRAIN),
            ("MAINT", STATE_MAINT),
        ] {
            let mut l = l.clone();
            l.push(("state".into(), st.into()));
            state.get_or_create(&l).set((word == w) as i64);
        }
        active.get_or_create(&l).set(b.active as i64);
        total.get_or_create(&l).inc_by(b.total);
        weight.get_or_create(&l).set(b.weight as i64);
        dur.get_or_create(&l)
            .set(b.check_duration_ms as f64 / 1000.0);
        fails.get_or_create(&l).inc_by(b.check_failures);
        for (to, n) in [("UP", b.transitions_up), ("DOWN", b.transitions_down)] {
            let mut l = l.clone();
            l.push(("to".into(), to.into()));
            trans.get_or_create(&l).inc_by(n);
        }
        down.get_or_create(&l).inc_by(b.downtime_s);
        queue.get_or_create(&l).set(b.accept_queue as i64);
        stalled.get_or_create(&l).set(b.queue_stalled as i64);
        hs.get_or_create(&l)
            .set(b.handshakes.min(i64::MAX as u64) as i64);
        rx.get_or_create(&l).inc_by(b.bytes_in);
        tx.get_or_create(&l).inc_by(b.bytes_out);
    }
    let lookups = family::<C>(
        &mut r,
        "mtlb_lookups",
        "sk_lookup runs for the balanced port",
    );
    lookups.get_or_create(&vec![]).inc_by(s.lookups);
    let nob = family::<C>(
        &mut r,
        "mtlb_no_backend",
        "Connections refused because no replica could take them",
    );
    nob.get_or_create(&vec![]).inc_by(s.no_backend);
    let flow = family::<C>(
        &mut r,
        "mtlb_flow_hits",
        "SYN-cookie ACKs kept on their replica by the flow table",
    );
    flow.get_or_create(&vec![]).inc_by(s.flow_hits);
    let cookies = family::<C>(
        &mut r,
        "mtlb_cookie_synacks",
        "SYN-ACKs with a SYN cookie sent by replica listeners",
    );
    cookies.get_or_create(&vec![]).inc_by(s.cookie_synacks);
    let errs = family::<C>(
        &mut r,
        "mtlb_steer_errors",
        "Steering errors and bookkeeping misses, by reason",
    );
    for (reason, n) in &s.steer_errors {
        errs.get_or_create(&vec![("reason".into(), reason.clone())])
            .inc_by(*n);
    }
    r.register(
        "mtlb_build",
        "Build information",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
    if !s.programs.is_empty() {
        let runs = family::<C>(
            &mut r,
            "mtlb_program_runs",
            "Runs of each mtlb BPF program (kernel.bpf_stats_enabled)",
        );
        let time = family::<CF>(
            &mut r,
            "mtlb_program_run_time_seconds",
            "Run time of each mtlb BPF program (kernel.bpf_stats_enabled)",
        );
        for p in &s.programs {
            let l = vec![("program".to_string(), p.name.clone())];
            runs.get_or_create(&l).inc_by(p.run_count);
            time.get_or_create(&l).inc_by(p.run_time_ns as f64 / 1e9);
        }
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

const COLUMNS: [&str; 16] = [
    "name",
    "address",
    "state",
    "active",
    "total",
    "weight",
    "check",
    "check_reason",
    "check_duration_ms",
    "since_change_s",
    "downtime_s",
    "accept_queue",
    "bytes_in",
    "bytes_out",
    // Added at the end: readers by position keep working.
    "handshakes",
    "queue_stalled",
];

fn cells(b: &snapshot::BackendRow) -> [String; 16] {
    [
        b.name.clone(),
        b.address.clone(),
        b.state.to_string(),
        b.active.to_string(),
        b.total.to_string(),
        b.weight.to_string(),
        b.check.clone(),
        b.check_reason.clone(),
        b.check_duration_ms.to_string(),
        format!("{:.1}", b.since_change_s),
        format!("{:.1}", b.downtime_s),
        b.accept_queue.to_string(),
        b.bytes_in.to_string(),
        b.bytes_out.to_string(),
        b.handshakes.to_string(),
        (b.queue_stalled as u8).to_string(),
    ]
}

pub fn render_csv(s: &Snapshot) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for b in &s.backends {
        let row: Vec<String> = cells(b)
            .into_iter()
            .map(|c| {
                if c.contains([',', '"']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c
                }
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtlb_common::state::{Admin, ListenerState, Oper, OperState, ReplicaState};
    use snapshot::BackendRow;

    fn st(oper: Oper, progress: u32) -> ReplicaState {
        ReplicaState {
            oper: OperState {
                oper,
                progress,
                rise: 2,
                fall: 3,
            },
            admin: Admin::Ready,
            listener: ListenerState::Registered,
        }
    }

    fn snap() -> Snapshot {
        let row = |name: &str, state: ReplicaState, up: bool, active| BackendRow {
            name: name.into(),
            address: "127.0.0.1:10000".into(),
            state,
            up,
            active,
            handshakes: 0,
            total: 10,
            weight: 1,
            check: "passed".into(),
            check_reason: "Layer4 check passed".into(),
            check_duration_ms: 3,
            check_failures: 2,
            transitions_up: 1,
            transitions_down: 1,
            since_change_s: 1.5,
            downtime_s: 0.5,
            accept_queue: 0,
            queue_stalled: false,
            bytes_in: 100,
            bytes_out: 200,
        };
        Snapshot {
            port: 443,
            backends: vec![
                row("mtp1", st(Oper::Up, 0), true, 7),
                row("mtp2", st(Oper::Down, 1), false, 3),
            ],
            lookups: 12,
            no_backend: 1,
            flow_hits: 0,
            cookie_synacks: 0,
            steer_errors: [("eafnosupport".to_string(), 0)].into(),
            programs: vec![],
        }
    }

    #[test]
    fn metrics_text() {
        let m = render_metrics(&snap());
        for want in [
            "mtlb_backend_up{backend=\"mtp1\"} 1",
            "mtlb_backend_up{backend=\"mtp2\"} 0",
            "mtlb_backend_state{backend=\"mtp2\",state=\"DOWN\"} 1",
            "mtlb_backend_state{backend=\"mtp2\",state=\"UP\"} 0",
            "mtlb_backend_active_connections{backend=\"mtp1\"} 7",
            "mtlb_backend_connections_total{backend=\"mtp1\"} 10",
            "mtlb_backend_transitions_total{backend=\"mtp1\",to=\"DOWN\"} 1",
            "mtlb_backend_bytes_received_total{backend=\"mtp1\"} 100",
            "mtlb_backend_bytes_sent_total{backend=\"mtp1\"} 200",
            "mtlb_lookups_total 12",
            "mtlb_no_backend_total 1",
            "mtlb_steer_errors_total{reason=\"eafnosupport\"} 0",
            "mtlb_build_info{version=",
            "# TYPE mtlb_backend_downtime_seconds counter",
        ] {
            assert!(m.contains(want), "missing {want:?} in\n{m}");
        }
    }

    #[test]
    fn new_signals_for_the_alert_rules() {
        let mut s = snap();
        s.backends[1].queue_stalled = true;
        s.backends[1].handshakes = 2;
        s.flow_hits = 4;
        s.cookie_synacks = 5;
        let m = render_metrics(&s);
        for want in [
            "mtlb_backend_accept_queue_stalled{backend=\"mtp1\"} 0",
            "mtlb_backend_accept_queue_stalled{backend=\"mtp2\"} 1",
            "mtlb_backend_handshakes{backend=\"mtp2\"} 2",
            "mtlb_flow_hits_total 4",
            "mtlb_cookie_synacks_total 5",
        ] {
            assert!(m.contains(want), "missing {want:?} in\n{m}");
        }
    }

    /// What curl and promtool get: counters named by their `_total`
    /// sample, the build info a gauge, no `# EOF`.
    #[test]
    fn text_format_for_promtool() {
        let t = textfmt::from_openmetrics(&render_metrics(&snap()));
        for want in [
            "# TYPE mtlb_backend_connections_total counter",
            "# HELP mtlb_lookups_total sk_lookup runs for the balanced port.",
            "# TYPE mtlb_build_info gauge",
            "mtlb_build_info{version=",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        assert!(!t.contains("# EOF") && !t.contains(" info\n"), "{t}");
    }

    /// The dashboard loads (valid JSON) and every metric it queries exists.
    #[test]
    fn dashboard_uses_existing_metrics() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/mtlb.json");
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let metrics = render_metrics(&snap());
        let mut seen = 0;
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("mtlb_") {
                        seen += 1;
                        assert!(
                            metrics
                                .lines()
                                .any(|l| l.starts_with(word)
                                    && l[word.len()..].starts_with(['{', ' '])),
                            "dashboard queries {word}, which /metrics does not have"
                        );
                    }
                }
            }
        }
        assert!(seen >= 10);
    }

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

    #[test]
    fn csv_table() {
        let c = render_csv(&snap());
        let mut l = c.lines();
        let head = l.next().unwrap();
        assert!(head.starts_with("name,address,state,active"));
        assert!(head.ends_with(",bytes_in,bytes_out,handshakes,queue_stalled"));
        assert!(
            l.next()
                .unwrap()
                .starts_with("mtp1,127.0.0.1:10000,UP,7,10,1,passed")
        );
    }
}
