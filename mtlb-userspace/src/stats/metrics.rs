//! `/metrics`: a [`Snapshot`] as OpenMetrics, through prometheus-client
//! ([`super::textfmt`] turns it into the older text format for readers
//! that do not ask for OpenMetrics). Names follow the HAProxy exporter's
//! meanings (see README "Metrics"). Families are written in the order they
//! are registered here, per replica first, then the agent's own; scrapers
//! and alert rules depend on every name, label and HELP text, so a change
//! shows in the golden files of `stats::golden`. prometheus-client's
//! registry is called `prom::Registry` here, apart from the agent's
//! registry of replica listeners.

use super::snapshot::{BackendRow, ProgStat, Snapshot};
use mtlb_common::{STATE_DOWN, STATE_DRAIN, STATE_MAINT, STATE_UP};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::{self as prom, Metric},
};
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge>;
type GF = Family<Labels, Gauge<f64, AtomicU64>>;
type C = Family<Labels, Counter>;
type CF = Family<Labels, Counter<f64, AtomicU64>>;

/// The whole of `/metrics` for `s`.
pub fn render(s: &Snapshot) -> String {
    let mut r = prom::Registry::default();
    let load = Load::register(&mut r);
    let checks = Checks::register(&mut r);
    let queue = Queue::register(&mut r);
    let traffic = Traffic::register(&mut r);
    let stops = Stops::register(&mut r);
    for b in &s.backends {
        let l = backend(&b.name);
        load.observe(b, &l);
        checks.observe(b, &l);
        queue.observe(b, &l);
        traffic.observe(b, &l);
        stops.observe(b, &l);
    }
    steering(&mut r, s);
    build_info(&mut r);
    programs(&mut r, &s.programs);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

fn backend(name: &str) -> Labels {
    vec![("backend".into(), name.into())]
}

/// `l` with one more label.
fn with(l: &Labels, name: &str, value: &str) -> Labels {
    let mut l = l.clone();
    l.push((name.into(), value.into()));
    l
}

/// Registers a labelled metric family under `name` and returns it.
fn family<F: Metric + Clone + Default>(r: &mut prom::Registry, name: &str, help: &str) -> F {
    let f = F::default();
    r.register(name, help, f.clone());
    f
}

/// Whether a replica takes connections, and how many it has.
struct Load {
    up: G,
    state: G,
    active: G,
    total: C,
    weight: G,
}

impl Load {
    fn register(r: &mut prom::Registry) -> Self {
        Self {
            up: family(
                r,
                "mtlb_backend_up",
                "1 when the replica takes new connections (UP and READY)",
            ),
            state: family(
                r,
                "mtlb_backend_state",
                "Replica state, one-hot over UP, DOWN, DRAIN, MAINT",
            ),
            active: family(
                r,
                "mtlb_backend_active_connections",
                "Connections now (established and in handshake), exact from the kernel",
            ),
            total: family(
                r,
                "mtlb_backend_connections",
                "Steered connections established",
            ),
            weight: family(r, "mtlb_backend_weight", "Effective weight"),
        }
    }

    fn observe(&self, b: &BackendRow, l: &Labels) {
        self.up.get_or_create(l).set(b.up as i64);
        let word = b.state.state_word();
        for (name, w) in [
            ("UP", STATE_UP),
            ("DOWN", STATE_DOWN),
            ("DRAIN", STATE_DRAIN),
            ("MAINT", STATE_MAINT),
        ] {
            self.state
                .get_or_create(&with(l, "state", name))
                .set((word == w) as i64);
        }
        self.active.get_or_create(l).set(b.active as i64);
        self.total.get_or_create(l).inc_by(b.total);
        self.weight.get_or_create(l).set(b.weight as i64);
    }
}

/// What the health checks found, and what they changed.
struct Checks {
    duration: GF,
    failures: C,
    transitions: C,
    downtime: CF,
}

impl Checks {
    fn register(r: &mut prom::Registry) -> Self {
        Self {
            duration: family(
                r,
                "mtlb_backend_check_duration_seconds",
                "Duration of the last health check",
            ),
            failures: family(r, "mtlb_backend_check_failures", "Failed health checks"),
            transitions: family(
                r,
                "mtlb_backend_transitions",
                "State changes, by the state entered",
            ),
            downtime: family(r, "mtlb_backend_downtime_seconds", "Time spent DOWN"),
        }
    }

    fn observe(&self, b: &BackendRow, l: &Labels) {
        self.duration
            .get_or_create(l)
            .set(b.check_duration_ms as f64 / 1000.0);
        self.failures.get_or_create(l).inc_by(b.check_failures);
        for (to, n) in [("UP", b.transitions_up), ("DOWN", b.transitions_down)] {
            self.transitions.get_or_create(&with(l, "to", to)).inc_by(n);
        }
        self.downtime.get_or_create(l).inc_by(b.downtime_s);
    }
}

/// The replica's listener: its accept queue and handshakes in flight.
struct Queue {
    length: G,
    stalled: G,
    handshakes: G,
}

impl Queue {
    fn register(r: &mut prom::Registry) -> Self {
        Self {
            length: family(
                r,
                "mtlb_backend_accept_queue",
                "Accept queue length of the replica's listener",
            ),
            stalled: family(
                r,
                "mtlb_backend_accept_queue_stalled",
                "1 while connections wait in the replica's accept queue and none is accepted (the agent's verdict: DOWN for it, or kept as the last replica taking connections)",
            ),
            handshakes: family(
                r,
                "mtlb_backend_handshakes",
                "Connections steered to the replica whose handshake is not complete yet",
            ),
        }
    }

    fn observe(&self, b: &BackendRow, l: &Labels) {
        self.length.get_or_create(l).set(b.accept_queue as i64);
        self.stalled.get_or_create(l).set(b.queue_stalled as i64);
        self.handshakes
            .get_or_create(l)
            .set(b.handshakes.min(i64::MAX as u64) as i64);
    }
}

/// Replicas told to stop (a stop signal to a process holding the
/// listener).
struct Stops {
    stopping: G,
    signals: C,
    queued: C,
}

impl Stops {
    fn register(r: &mut prom::Registry) -> Self {
        Self {
            stopping: family(
                r,
                "mtlb_backend_stopping",
                "1 while a process holding the replica's listener has been sent a stop signal and the replica takes no new connection",
            ),
            signals: family(
                r,
                "mtlb_backend_stop_signals",
                "Stop signals (SIGTERM, SIGINT, SIGQUIT) to a process holding the replica's listener",
            ),
            queued: family(
                r,
                "mtlb_backend_stop_queued_connections",
                "Connections in the replica's accept queue when it was sent a stop signal: accepted by the kernel before the signal, no balancer can move them",
            ),
        }
    }

    fn observe(&self, b: &BackendRow, l: &Labels) {
        self.stopping.get_or_create(l).set(b.stopping as i64);
        self.signals.get_or_create(l).inc_by(b.stop_signals);
        self.queued.get_or_create(l).inc_by(b.stop_queued);
    }
}

/// Bytes through the replica's connections.
struct Traffic {
    received: C,
    sent: C,
}

impl Traffic {
    fn register(r: &mut prom::Registry) -> Self {
        Self {
            received: family(
                r,
                "mtlb_backend_bytes_received",
                "Bytes received from clients by the replica's connections",
            ),
            sent: family(
                r,
                "mtlb_backend_bytes_sent",
                "Bytes sent to clients by the replica's connections (acknowledged)",
            ),
        }
    }

    fn observe(&self, b: &BackendRow, l: &Labels) {
        self.received.get_or_create(l).inc_by(b.bytes_in);
        self.sent.get_or_create(l).inc_by(b.bytes_out);
    }
}

/// A counter family without labels, holding `n`.
fn counter(r: &mut prom::Registry, name: &str, help: &str, n: u64) {
    family::<C>(r, name, help).get_or_create(&vec![]).inc_by(n);
}

/// The balanced port's counters, from sk_lookup and sock_ops.
fn steering(r: &mut prom::Registry, s: &Snapshot) {
    counter(
        r,
        "mtlb_lookups",
        "sk_lookup runs for the balanced port",
        s.lookups,
    );
    counter(
        r,
        "mtlb_no_backend",
        "Connections refused because no replica could take them",
        s.no_backend,
    );
    counter(
        r,
        "mtlb_flow_hits",
        "SYN-cookie ACKs kept on their replica by the flow table",
        s.flow_hits,
    );
    counter(
        r,
        "mtlb_cookie_synacks",
        "SYN-ACKs with a SYN cookie sent by replica listeners",
        s.cookie_synacks,
    );
    by_reason(
        r,
        "mtlb_steer_errors",
        "Steering errors and bookkeeping misses, by reason",
        &s.steer_errors,
    );
    by_reason(
        r,
        "mtlb_agent_check_errors",
        "Health checks the agent could not run for a shortage of its own (files: out of file descriptors, memory), by reason; replicas keep their state",
        &s.check_errors,
    );
    if let Some(a) = &s.announce {
        let announced: G = family(
            r,
            "mtlb_vip_announced",
            "Whether this host announces the service address (the route BIRD exports is in the announce table), 1 or 0",
        );
        let changes: C = family(
            r,
            "mtlb_vip_announcement_changes",
            "Announcements and withdrawals of the service address by this agent",
        );
        for vip in &a.vips {
            let l = vec![("vip".to_string(), vip.to_string())];
            announced.get_or_create(&l).set(i64::from(a.announced));
            changes.get_or_create(&l).inc_by(a.changes);
        }
    }
}

/// A counter family with one sample per `reason`.
fn by_reason(
    r: &mut prom::Registry,
    name: &str,
    help: &str,
    counts: &std::collections::BTreeMap<String, u64>,
) {
    let f: C = family(r, name, help);
    for (reason, n) in counts {
        f.get_or_create(&vec![("reason".into(), reason.clone())])
            .inc_by(*n);
    }
}

fn build_info(r: &mut prom::Registry) {
    r.register(
        "mtlb_build",
        "Build information",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );
}

/// Run statistics of the BPF programs; no families at all while the
/// kernel does not count (an empty `programs`).
fn programs(r: &mut prom::Registry, programs: &[ProgStat]) {
    if programs.is_empty() {
        return;
    }
    let runs: C = family(
        r,
        "mtlb_program_runs",
        "Runs of each mtlb BPF program (kernel.bpf_stats_enabled)",
    );
    let time: CF = family(
        r,
        "mtlb_program_run_time_seconds",
        "Run time of each mtlb BPF program (kernel.bpf_stats_enabled)",
    );
    for p in programs {
        let l = vec![("program".to_string(), p.name.clone())];
        runs.get_or_create(&l).inc_by(p.run_count);
        time.get_or_create(&l).inc_by(p.run_time_ns as f64 / 1e9);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{testutil::snap, textfmt};

    #[test]
    fn metrics_text() {
        let m = render(&snap());
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
        let m = render(&s);
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
        let t = textfmt::from_openmetrics(&render(&snap()));
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
        let metrics = render(&snap());
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
}
