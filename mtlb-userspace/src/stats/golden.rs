//! /metrics and the CSV, byte for byte: scrapers, alert rules and scripts
//! reading columns by position depend on both, so any change to them shows
//! here as a diff against the files in `testdata/`.

use super::testutil::state;
use super::{
    csv, metrics,
    snapshot::{BackendRow, ProgStat, Snapshot},
    textfmt,
};
use mtlb_common::state::{Admin, ListenerState, Oper, ReplicaState};
use std::collections::BTreeMap;

fn row(slot: u16, state: ReplicaState) -> BackendRow {
    let n = u64::from(slot) + 1;
    BackendRow {
        name: format!("mtp{n}"),
        address: format!("127.0.0.1:{}", 10000 + slot),
        state,
        up: state.takes_connections(),
        active: 7 * n,
        handshakes: n - 1,
        total: 1000 * n + 3,
        weight: slot as u32 + 1,
        check: "passed".into(),
        check_reason: "Layer4 check passed".into(),
        check_duration_ms: 3 * n as u32,
        check_failures: n,
        transitions_up: 2 * n,
        transitions_down: n,
        since_change_s: 7980.46 * n as f64,
        downtime_s: 4.25 * n as f64,
        accept_queue: slot as u32,
        queue_stalled: false,
        stopping: false,
        stop_signals: 0,
        stop_queued: 0,
        bytes_in: 3 << (10 * n),
        bytes_out: (5 << (10 * n)) + 1,
    }
}

/// Every state, a change under way both ways, a failed and a missing check,
/// a stalled queue, a reason that needs CSV quoting, bpf_stats on.
fn fixed() -> Snapshot {
    use Admin::*;
    use ListenerState::*;
    use Oper::*;
    let mut b = vec![
        row(0, state(Up, 0, Ready, Registered)),
        row(1, state(Up, 1, Ready, Registered)),
        row(2, state(Down, 1, Ready, Registered)),
        row(3, state(Down, 0, Ready, Missing)),
        row(4, state(Up, 0, Drain, Registered)),
        row(5, state(Down, 0, Maint, Registered)),
    ];
    b[2].check = "failed".into();
    b[2].check_reason = "Layer7 wrong status, \"not MTProxy\"".into();
    b[3].check = "-".into();
    b[3].check_reason = String::new();
    b[3].check_duration_ms = 0;
    b[1].queue_stalled = true;
    b[1].stopping = true;
    b[1].stop_signals = 2;
    b[1].stop_queued = 3;
    b[1].accept_queue = 129;
    Snapshot {
        port: 443,
        backends: b,
        lookups: 1_234_567,
        no_backend: 2,
        flow_hits: 5,
        cookie_synacks: 6,
        steer_errors: BTreeMap::from([
            ("eafnosupport".to_string(), 0),
            ("no_socket".to_string(), 1),
            ("tag_miss".to_string(), 3),
        ]),
        check_errors: BTreeMap::from([("files".to_string(), 7), ("memory".to_string(), 0)]),
        announce: Some(super::snapshot::AnnounceRow {
            vips: vec![
                "192.0.2.80".parse().unwrap(),
                "2001:db8:ff::80".parse().unwrap(),
            ],
            announced: false,
            why: "drained by operator".into(),
            changes: 3,
        }),
        programs: vec![
            ProgStat {
                name: "mtlb_steer".into(),
                run_count: 1_000_000,
                run_time_ns: 187_000_123,
            },
            ProgStat {
                name: "mtlb_sockops".into(),
                run_count: 8_000_000,
                run_time_ns: 2_500_000_000,
            },
        ],
    }
}

/// The build's version varies, and so does the order of the samples
/// within a family (prometheus-client keeps them in a `HashMap`: the order
/// differs from one process to the next, so no reader can rely on it).
/// Everything else is fixed: the families, their order, HELP and TYPE
/// lines, every sample line.
fn canonical(s: String) -> String {
    let s = s.replace(env!("CARGO_PKG_VERSION"), "VERSION");
    let mut out = String::with_capacity(s.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        samples.sort_unstable();
        for l in samples.drain(..) {
            out.push_str(l);
            out.push('\n');
        }
    };
    for line in s.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

#[test]
fn openmetrics_is_unchanged() {
    assert_eq!(
        canonical(metrics::render(&fixed())),
        include_str!("testdata/metrics.openmetrics.txt")
    );
}

#[test]
fn prometheus_text_is_unchanged() {
    assert_eq!(
        canonical(textfmt::from_openmetrics(&metrics::render(&fixed()))),
        include_str!("testdata/metrics.prometheus.txt")
    );
}

#[test]
fn csv_is_unchanged() {
    assert_eq!(csv::render(&fixed()), include_str!("testdata/stats.csv"));
}

/// Writes the files above from today's renderers (run once by hand with
/// `--ignored` when a change to the output is intended, then review the
/// diff).
#[test]
#[ignore]
fn write_golden_files() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/stats/testdata");
    let om = metrics::render(&fixed());
    std::fs::write(
        format!("{dir}/metrics.openmetrics.txt"),
        canonical(om.clone()),
    )
    .unwrap();
    std::fs::write(
        format!("{dir}/metrics.prometheus.txt"),
        canonical(textfmt::from_openmetrics(&om)),
    )
    .unwrap();
    std::fs::write(format!("{dir}/stats.csv"), csv::render(&fixed())).unwrap();
}
