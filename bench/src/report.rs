//! BENCHMARKS.md from one run's typed record (`model::Run`).
//!
//! The figures are formatted and the targets judged here, in Rust; the
//! page's layout and its prose about the method are the template
//! `templates/BENCHMARKS.md.j2`.

use crate::model::{
    Count, HeldLevel, Meta, Mode, Perf, Range, Rounds, Run, Spread, Steering, TargetKey,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

const TEMPLATE: &str = include_str!("../templates/BENCHMARKS.md.j2");

/// The committed run, relative to the workspace root: what `--report-only`
/// renders when target/bench.json does not exist (a fresh checkout).
pub const COMMITTED_RUN: &str = "bench/last-run.json";

/// "median (min–max)", or "—".
fn range(r: Option<&Range>, d: usize) -> String {
    r.map_or("—".into(), |r| {
        format!("{:.d$} ({:.d$}–{:.d$})", r.median, r.min, r.max)
    })
}

fn spread(s: &Spread) -> String {
    format!(
        "**{:.3}** [IQR {:.3}–{:.3}; {:.3}–{:.3}]",
        s.median, s.q1, s.q3, s.min, s.max
    )
}

fn num(v: Option<f64>, d: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.d$}"))
}

/// A symbol in a Markdown table cell.
fn sym(s: &str) -> String {
    format!("`{}`", s.replace('|', "\\|"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    NotJudged,
}

impl Verdict {
    fn of(met: Option<bool>) -> Verdict {
        match met {
            Some(true) => Verdict::Met,
            Some(false) => Verdict::Missed,
            None => Verdict::NotJudged,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotJudged => "not judged",
        }
    }
}

pub struct Target {
    pub key: TargetKey,
    pub what: String,
    pub value: String,
    pub verdict: Verdict,
}

fn target(key: TargetKey, what: &str, value: String, met: Option<bool>) -> Target {
    Target {
        key,
        what: what.into(),
        value,
        verdict: Verdict::of(met),
    }
}

/// "; the target lies inside the IQR …" when the verdict is a coin toss,
/// or the spread is wider than the ±0.03 a rerun should agree within.
fn wide(s: &Spread, target: f64) -> &'static str {
    if s.q1 <= target && target <= s.q3 {
        "; the target lies inside the IQR: verdict unreliable"
    } else if (s.q3 - s.q1) / 2.0 > 0.03 {
        "; spread wider than ±0.03"
    } else {
        ""
    }
}

fn ratio_target(key: TargetKey, what: &str, s: Option<&Spread>, min: f64) -> Target {
    match s {
        Some(s) => target(
            key,
            what,
            format!(
                "{:.3} (IQR {:.3}–{:.3}{})",
                s.median,
                s.q1,
                s.q3,
                wide(s, min)
            ),
            Some(s.median >= min),
        ),
        None => target(key, what, "not run".into(), None),
    }
}

/// Every target, in table order; "not run" when its phase did not run.
pub fn targets(run: &Run) -> Vec<Target> {
    use TargetKey::*;
    let mut out = Vec::new();
    let rounds = run.rounds.as_ref();
    let mtlb_ratio = rounds.and_then(|r| r.ratios.iter().find(|x| x.mode == Mode::Mtlb));
    out.push(ratio_target(
        RateRatio,
        "mtlb connection rate ≥ 0.98 × direct (median of paired ratios)",
        mtlb_ratio.map(|x| &x.rate),
        0.98,
    ));
    out.push(ratio_target(
        BulkRatio,
        "mtlb bulk throughput ≥ 0.99 × direct",
        mtlb_ratio.map(|x| &x.bulk),
        0.99,
    ));
    out.push(match (&run.previous, mtlb_ratio) {
        (Some(p), Some(m)) => {
            let (dr, db) = (m.rate.median - p.rate, m.bulk.median - p.bulk);
            target(
                Rerun,
                "a rerun agrees within ±0.03 (mtlb/direct ratios vs the previous target/bench.json)",
                format!(
                    "rate {dr:+.3}, bulk {db:+.3} (previous {:.3}, {:.3})",
                    p.rate, p.bulk
                ),
                Some(dr.abs() <= 0.03 && db.abs() <= 0.03),
            )
        }
        _ => target(
            Rerun,
            "a rerun agrees within ±0.03",
            "no previous target/bench.json made the same way (same settings and mtlb binary) to compare with".into(),
            None,
        ),
    });
    let what = "BPF time of all mtlb programs per connection ≤ 0.6 µs (2 replicas)";
    let bpf = rounds.and_then(|r| r.modes.iter().find(|m| m.mode == Mode::Mtlb)?.bpf_us);
    out.push(match (rounds, bpf) {
        (None, _) => target(BpfPerConn, what, "not run".into(), None),
        // Zero means the run counters did not move: not a measurement.
        (Some(_), Some(b)) if b.median > 0.0 => target(
            BpfPerConn,
            what,
            format!("{:.3} µs", b.median),
            Some(b.median <= 0.6),
        ),
        (Some(_), _) => target(
            BpfPerConn,
            what,
            "not measured: run_time_ns did not advance".into(),
            None,
        ),
    });
    let what = "≤ 3 runs of mtlb's programs per connection, all programs";
    out.push(match rounds {
        Some(r) if !r.mtlb_programs.is_empty() => {
            let runs: f64 = r
                .mtlb_programs
                .values()
                .map(|p| p.runs_per_conn.median)
                .sum();
            target(RunsPerConn, what, format!("{runs:.2}"), Some(runs <= 3.0))
        }
        Some(_) => target(RunsPerConn, what, "not measured".into(), None),
        None => target(RunsPerConn, what, "not run".into(), None),
    });
    let what = "whole-machine CPU per connection ≤ direct's + 3 µs";
    let machine = |m: Mode| {
        Some(
            rounds?
                .modes
                .iter()
                .find(|x| x.mode == m)?
                .machine_us
                .median,
        )
    };
    out.push(match (machine(Mode::Mtlb), machine(Mode::Direct)) {
        (Some(m), Some(d)) => target(
            CpuOverDirect,
            what,
            format!("{m:.1} µs against {d:.1} µs ({:+.1})", m - d),
            Some(m <= d + 3.0),
        ),
        _ => target(CpuOverDirect, what, "not run".into(), None),
    });
    let what = "mtlb BPF time ≤ 1/60 of HAProxy's process CPU per connection";
    out.push(match rounds.and_then(|r| r.bpf_vs_haproxy) {
        Some(b) => target(
            BpfVsHaproxy,
            what,
            format!("{:.4} (= 1/{:.0})", b.median, 1.0 / b.median),
            Some(b.median <= 1.0 / 60.0),
        ),
        None => target(BpfVsHaproxy, what, "not run".into(), None),
    });
    for (n, alg, lim, key) in [
        (2u16, "leastconn", 150.0, SkLookup2),
        (64, "leastconn", 250.0, SkLookup64),
        (64, "random", 250.0, SkLookup64Random),
    ] {
        let v = run.steering.as_ref().and_then(|st| {
            st.iter()
                .find(|s| s.replicas == n && s.algorithm == alg)
                .and_then(|s| s.sk_lookup.as_ref()?.ns_per_run)
                .map(|r| r.median)
        });
        out.push(target(
            key,
            &format!(
                "sk_lookup ≤ {lim:.0} ns per run at {n} replicas, {alg} (under the bench's clients)"
            ),
            v.map_or("not run".into(), |v| format!("{v:.0} ns")),
            v.map(|v| v <= lim),
        ));
    }
    held_targets(run.held.as_deref(), &mut out);
    let what = "no failed request on failover through mtlb";
    let fo = run
        .failover
        .as_ref()
        .and_then(|f| f.iter().find(|x| x.mode == Mode::Mtlb));
    out.push(match fo {
        Some(x) => target(
            FailoverMtlb,
            what,
            format!("{} of {}", x.failed, x.requests),
            Some(x.failed == 0),
        ),
        None => target(FailoverMtlb, what, "not run".into(), None),
    });
    out
}

fn held_targets(held: Option<&[HeldLevel]>, out: &mut Vec<Target>) {
    use TargetKey::*;
    let not = if held.is_some() {
        "not reached"
    } else {
        "not run"
    };
    for (level, name, metrics_ms, keys) in [
        (
            100_000,
            "100k",
            50.0,
            [
                Held100k,
                IdleCpu100k,
                MetricsP99100k,
                ControlP99100k,
                Rss100k,
            ],
        ),
        (
            1_000_000,
            "1M",
            100.0,
            [Held1m, IdleCpu1m, MetricsP991m, ControlP991m, Rss1m],
        ),
    ] {
        let top = held.and_then(|h| h.iter().find(|l| l.level == level));
        out.push(target(
            keys[0],
            &format!("{name} connections held open through mtlb"),
            top.map_or(not.into(), |l| format!("{} held", l.held)),
            held.map(|_| top.is_some_and(|l| l.held == level)),
        ));
        let judge = |key, what: &str, v: Option<Option<f64>>, lim: f64, unit: &str| match v {
            Some(Some(v)) => target(key, what, format!("{v:.2} {unit}"), Some(v <= lim)),
            Some(None) => target(key, what, "not measured".into(), None),
            None => target(key, what, not.into(), None),
        };
        out.push(judge(
            keys[1],
            &format!("agent idle CPU ≤ 1 % of a core at {name} held"),
            top.map(|l| Some(l.agent_idle_cpu_pct)),
            1.0,
            "%",
        ));
        out.push(judge(
            keys[2],
            &format!("/metrics p99 ≤ {metrics_ms:.0} ms at {name} held (4 concurrent scrapers)"),
            top.map(|l| l.metrics_ms_p99),
            metrics_ms,
            "ms",
        ));
        out.push(judge(
            keys[3],
            &format!("control command p99 ≤ 20 ms at {name} held"),
            top.map(|l| l.control_ms_p99),
            20.0,
            "ms",
        ));
        out.push(judge(
            keys[4],
            &format!("agent RSS ≤ 64 MiB at {name} held"),
            top.map(|l| l.agent_rss_mib),
            64.0,
            "MiB",
        ));
    }
}

/// What the template shows: every figure already formatted.
#[derive(Serialize)]
struct View<'a> {
    meta: &'a Meta,
    minutes: String,
    mem_gib: String,
    foreign_max_pct: String,
    other_mtlb: String,
    rounds: Option<RoundsView>,
    not_run: Vec<(String, String)>,
    ipvs_not_run: Option<&'a str>,
    failover: Option<Vec<Vec<String>>>,
    stop: Option<crate::stopview::StopView>,
    steering: Option<Vec<Vec<String>>>,
    micro: Option<Vec<Vec<String>>>,
    /// Whether the micro phase ran with the kernel's run-time stats on.
    micro_run_stats: bool,
    held: Option<HeldView>,
    profile: Option<ProfileView>,
    errors: Vec<(String, String)>,
    targets: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct RoundsView {
    labels: Vec<&'static str>,
    metrics: Vec<Vec<String>>,
    ratios: Vec<Vec<String>>,
    cpu: Vec<Vec<String>>,
    bpf_vs_haproxy: Option<String>,
    programs: Vec<Vec<String>>,
    bulk_bpf_runs: Option<String>,
}

/// The rounds table: one row per figure some mode has, a cell per mode.
fn metric_rows(r: &Rounds) -> Vec<Vec<String>> {
    let row = |label: &str, cell: &dyn Fn(&crate::model::ModeRounds) -> String| {
        std::iter::once(label.to_string())
            .chain(r.modes.iter().map(cell))
            .collect::<Vec<_>>()
    };
    type Col = fn(&crate::model::ModeRounds) -> Option<Range>;
    let optional: [(&str, Col, usize); 9] = [
        (
            "new connections/s (request + reply each)",
            |m| Some(m.rate),
            0,
        ),
        (
            "bulk throughput, all streams (MB/s)",
            |m| Some(m.bulk_mbs),
            0,
        ),
        ("connect latency p50 (µs)", |m| m.connect_p50_us, 1),
        ("connect latency p99 (µs)", |m| m.connect_p99_us, 1),
        (
            "whole machine CPU per connection, less processes outside the bench (µs)",
            |m| Some(m.machine_us),
            1,
        ),
        (
            "balancer process CPU per connection (µs)",
            |m| m.balancer_us,
            2,
        ),
        ("mtlb BPF time per connection (µs)", |m| m.bpf_us, 3),
        (
            "mtlb agent process CPU per connection (µs)",
            |m| m.agent_us,
            3,
        ),
        (
            "CPU of processes outside the bench (% of the machine)",
            |m| Some(m.foreign_pct),
            1,
        ),
    ];
    let mut metrics: Vec<Vec<String>> = optional
        .iter()
        // A row only when some mode has the figure.
        .filter(|(_, col, _)| r.modes.iter().any(|m| col(m).is_some()))
        .map(|(label, col, d)| row(label, &|m| range(col(m).as_ref(), *d)))
        .collect();
    metrics.push(row(
        "rate runs repeated for outside load (all rounds)",
        &|m| m.repeated.to_string(),
    ));
    metrics.push(row("failed requests (all rounds)", &|m| {
        m.failed.to_string()
    }));

    metrics
}

/// CPU per connection of each balancer, and how it was measured.
fn cpu_rows(r: &Rounds, run: &Run) -> Vec<Vec<String>> {
    let not_run = |m: Mode| run.not_run.get(&m).map_or("", String::as_str);
    let by = |m: Mode| r.modes.iter().find(|x| x.mode == m);
    let mut cpu = Vec::new();
    if let Some(m) = by(Mode::Mtlb).filter(|m| m.bpf_us.is_some()) {
        cpu.push(vec![
            "mtlb".into(),
            format!(
                "{} µs BPF; agent process {} µs",
                range(m.bpf_us.as_ref(), 3),
                range(m.agent_us.as_ref(), 3)
            ),
            "bpf_stats run time of all mtlb programs / connections; agent utime+stime / connections"
                .into(),
        ]);
    }
    for (mode, how) in [
        (Mode::Haproxy, "process utime+stime / connections"),
        (Mode::Nginx, "master + workers utime+stime / connections"),
    ] {
        cpu.push(match by(mode).and_then(|m| m.balancer_us) {
            Some(s) => vec![
                mode.label().into(),
                format!("{} µs", range(Some(&s), 2)),
                how.into(),
            ],
            None => vec![
                mode.label().into(),
                format!("not run: {}", not_run(mode)),
                String::new(),
            ],
        });
    }
    cpu.push(match &r.ipvs_kernel_us {
        Some(s) => vec![
            "IPVS".into(),
            format!("{} µs", range(Some(s), 2)),
            "whole-machine busy CPU per connection minus direct's, same round".into(),
        ],
        None => vec![
            "IPVS".into(),
            format!("not run: {}", not_run(Mode::Ipvs)),
            "(would be: whole-machine CPU per connection minus direct's, same round)".into(),
        ],
    });

    cpu
}

fn rounds_view(r: &Rounds, run: &Run) -> RoundsView {
    let mut ratios: Vec<Vec<String>> = r
        .ratios
        .iter()
        .map(|x| vec![x.mode.label().into(), spread(&x.rate), spread(&x.bulk)])
        .collect();
    if run.not_run.contains_key(&Mode::Ipvs) {
        ratios.push(vec!["IPVS".into(), "not run".into(), "not run".into()]);
    }
    RoundsView {
        labels: r.modes.iter().map(|m| m.mode.label()).collect(),
        metrics: metric_rows(r),
        ratios,
        cpu: cpu_rows(r, run),
        bpf_vs_haproxy: r.bpf_vs_haproxy.as_ref().map(spread),
        programs: r
            .mtlb_programs
            .iter()
            .map(|(p, x)| {
                vec![
                    p.clone(),
                    range(x.ns_per_run.as_ref(), 0),
                    range(Some(&x.runs_per_conn), 2),
                    range(Some(&x.ns_per_conn), 0),
                ]
            })
            .collect(),
        bulk_bpf_runs: r.bulk_bpf_runs.as_ref().map(|b| range(Some(b), 0)),
    }
}

fn micro_rows(m: &[crate::model::MicroRaw]) -> Vec<Vec<String>> {
    m.iter()
        .map(|x| {
            let s = crate::stats::summary(&x.ns_per_run);
            let f = crate::stats::summary(&x.floor_ns_per_run);
            vec![
                x.replicas.to_string(),
                x.algorithm.clone(),
                range(s.range().as_ref(), 0),
                range(f.range().as_ref(), 0),
                format!("{} × {}", x.ns_per_run.len(), x.repeat),
                x.listeners_chosen.to_string(),
            ]
        })
        .collect()
}

fn steering_rows(st: &[Steering]) -> Vec<Vec<String>> {
    st.iter()
        .map(|s| {
            let c = |p: Option<&crate::model::ProgramCost>, ns: bool, d: usize| {
                p.map_or("—".into(), |p| {
                    range(
                        if ns {
                            p.ns_per_run.as_ref()
                        } else {
                            Some(&p.runs_per_conn)
                        },
                        d,
                    )
                })
            };
            let (sl, so) = (s.sk_lookup.as_ref(), s.sock_ops.as_ref());
            vec![
                s.replicas.to_string(),
                s.algorithm.clone(),
                c(sl, true, 0),
                c(sl, false, 2),
                c(so, true, 0),
                c(so, false, 2),
                range(Some(&s.bpf_ns_per_conn), 0),
            ]
        })
        .collect()
}

#[derive(Serialize)]
struct HeldView {
    rows: Vec<Vec<String>>,
    /// Levels above 0 (the map-entry table's columns); None without a
    /// level-0 baseline.
    entry_levels: Option<Vec<u64>>,
    entries: Vec<Vec<String>>,
    profiles: Vec<AgentProfileView>,
}

#[derive(Serialize)]
struct AgentProfileView {
    held: u64,
    error: Option<String>,
    during: String,
    secs: u32,
    idle_cpu: String,
    rows: Vec<Vec<String>>,
}

fn held_view(h: &[HeldLevel]) -> HeldView {
    let rows = h
        .iter()
        .map(|l| {
            vec![
                l.held.to_string(),
                l.opened.as_ref().map_or("—".into(), |o| {
                    format!("{} ({}, {:.0} s)", o.added, o.failed, o.secs)
                }),
                num(l.mtlb_active_connections, 0),
                format!("{:.2}", l.agent_idle_cpu_pct),
                format!(
                    "{} / {}",
                    num(l.metrics_ms_p50, 1),
                    num(l.metrics_ms_p99, 1)
                ),
                format!(
                    "{} / {}",
                    num(l.control_ms_p50, 2),
                    num(l.control_ms_p99, 2)
                ),
                num(l.agent_rss_mib, 1),
                format!("{:.2}", l.maps_memlock_mib),
            ]
        })
        .collect();
    let base = h.iter().find(|l| l.held == 0);
    let levels: Vec<&HeldLevel> = h.iter().filter(|l| l.held != 0).collect();
    let mut entries = Vec::new();
    if let Some(base) = base {
        for (name, b) in &base.map_entries {
            let mut row = vec![format!("{name} ({}, {})", b.kind, b.max_entries)];
            for l in &levels {
                let e = l.map_entries.get(name).map(|e| &e.count);
                row.push(match (e, &b.count) {
                    (Some(Count::Entries(a)), Count::Entries(z)) => format!(
                        "{:.3} ({a} entries)",
                        (*a as f64 - *z as f64) / l.held as f64
                    ),
                    (Some(Count::Error(e)), _) | (_, Count::Error(e)) => {
                        format!("cannot count: {e}")
                    }
                    (None, _) => "cannot count: not listed".into(),
                });
            }
            entries.push(row);
        }
    }
    let profiles = h
        .iter()
        .filter_map(|l| {
            let p = l.agent_profile.as_ref()?;
            let mut v = AgentProfileView {
                held: l.held,
                error: None,
                during: p.during.clone(),
                secs: 0,
                idle_cpu: format!("{:.1}", l.agent_idle_cpu_pct),
                rows: Vec::new(),
            };
            match &p.perf {
                Err(e) => v.error = Some(e.clone()),
                Ok(perf) => {
                    v.secs = perf.secs;
                    let (ch, se) = (&perf.children, &perf.self_);
                    let cell = |rows: &[crate::model::Sym], i: usize| {
                        rows.get(i).map_or((String::new(), String::new()), |r| {
                            (format!("{:.1}", r.pct), sym(&r.symbol))
                        })
                    };
                    for i in 0..ch.len().max(se.len()).min(15) {
                        let (a, b) = cell(ch, i);
                        let (c, d) = cell(se, i);
                        v.rows.push(vec![a, b, String::new(), c, d]);
                    }
                }
            }
            Some(v)
        })
        .collect();
    HeldView {
        rows,
        entry_levels: base.map(|_| levels.iter().map(|l| l.held).collect()),
        entries,
        profiles,
    }
}

#[derive(Serialize)]
struct ProfileView {
    bpftool_ok: Vec<(String, String)>,
    bpftool_err: Vec<(String, String)>,
    perf_error: Option<String>,
    perf: Option<PerfView>,
}

#[derive(Serialize)]
struct PerfView {
    secs: u32,
    hz: u32,
    top: Vec<Vec<String>>,
    bpf_prog_pct_total: String,
    bpf_prog_rows: String,
    conns_per_sec: String,
    cpus: usize,
    bpf_prog_us: String,
    bpf_machinery_us: String,
    machinery_rows: String,
    programs: Vec<Vec<String>>,
}

fn perf_view(p: &Perf, run: &Run) -> PerfView {
    let cpus = run.meta.cpus as f64;
    let rows = p
        .bpf_prog_rows
        .iter()
        .map(|r| format!("`{}` {:.2} %", r.symbol, r.pct))
        .collect::<Vec<_>>();
    // The programs' own time from the samples, against bpf_stats'.
    let programs = ["mtlb_steer", "mtlb_sockops"]
        .iter()
        .map(|name| {
            let pct: f64 = p
                .bpf_prog_rows
                .iter()
                .filter(|r| r.symbol.ends_with(&format!("_{name}")))
                .map(|r| r.pct)
                .sum();
            let per_conn = pct / 100.0 * cpus / p.conns_per_sec * 1e9;
            let stats = run.rounds.as_ref().and_then(|r| r.mtlb_programs.get(*name));
            let runs = stats.map(|s| s.runs_per_conn.median);
            vec![
                name.to_string(),
                format!("{per_conn:.0}"),
                num(runs.map(|r| per_conn / r), 0),
                num(stats.and_then(|s| s.ns_per_run).map(|r| r.median), 0),
            ]
        })
        .collect();
    PerfView {
        secs: p.secs,
        hz: p.hz,
        top: p
            .top
            .iter()
            .map(|r| vec![format!("{:.2}", r.pct), sym(&r.symbol)])
            .collect(),
        bpf_prog_pct_total: format!("{:.2}", p.bpf_prog_pct_total),
        bpf_prog_rows: if rows.is_empty() {
            String::new()
        } else {
            format!(" ({})", rows.join(", "))
        },
        conns_per_sec: format!("{:.0}", p.conns_per_sec),
        cpus: run.meta.cpus,
        bpf_prog_us: format!("{:.2}", p.bpf_prog_us),
        bpf_machinery_us: format!("{:.2}", p.bpf_machinery_us),
        machinery_rows: p
            .bpf_machinery_rows
            .iter()
            .take(12)
            .map(|r| format!("`{}` {:.2} %", r.symbol.trim_start_matches("[k] "), r.pct))
            .collect::<Vec<_>>()
            .join(", "),
        programs,
    }
}

/// The Markdown of one run.
pub fn render(run: &Run) -> anyhow::Result<String> {
    let meta = &run.meta;
    let targets = targets(run)
        .into_iter()
        .map(|t| {
            let reason = match t.verdict {
                Verdict::Missed => run
                    .reasons
                    .get(&t.key)
                    .filter(|r| !r.is_empty())
                    .map_or("—", String::as_str),
                _ => "",
            };
            vec![t.what, t.value, t.verdict.text().into(), reason.into()]
        })
        .collect();
    let profile = run.profile.as_ref().map(|p| {
        let mut v = ProfileView {
            bpftool_ok: Vec::new(),
            bpftool_err: Vec::new(),
            perf_error: None,
            perf: None,
        };
        for (prog, r) in &p.bpftool_prog_profile {
            match r {
                Ok(t) => v.bpftool_ok.push((prog.clone(), t.clone())),
                Err(e) => v.bpftool_err.push((prog.clone(), e.clone())),
            }
        }
        match &p.perf {
            Ok(perf) if perf.conns_per_sec > 0.0 => v.perf = Some(perf_view(perf, run)),
            Ok(_) => v.perf_error = Some("no connections during the recording".into()),
            Err(e) => v.perf_error = Some(e.clone()),
        }
        v
    });
    let view = View {
        meta,
        minutes: format!("{:.0}", meta.secs / 60.0),
        mem_gib: format!("{:.0}", meta.mem_gib),
        foreign_max_pct: format!("{:.0}", meta.foreign_max_pct),
        other_mtlb: meta.other_mtlb_programs_at_start.join(", "),
        rounds: run.rounds.as_ref().map(|r| rounds_view(r, run)),
        not_run: [Mode::Haproxy, Mode::Nginx]
            .iter()
            .filter_map(|m| Some((m.label().into(), run.not_run.get(m)?.clone())))
            .collect(),
        ipvs_not_run: run.not_run.get(&Mode::Ipvs).map(String::as_str),
        failover: run.failover.as_ref().map(|fo| {
            let mut rows: Vec<Vec<String>> = fo
                .iter()
                .map(|x| {
                    vec![
                        x.mode.label().into(),
                        x.requests.to_string(),
                        x.failed.to_string(),
                    ]
                })
                .collect();
            for m in [Mode::Haproxy, Mode::Nginx, Mode::Ipvs] {
                if let Some(e) = run.not_run.get(&m) {
                    rows.push(vec![
                        m.label().into(),
                        format!("not run: {e}"),
                        String::new(),
                    ]);
                }
            }
            rows
        }),
        stop: run
            .stop
            .as_ref()
            .map(|s| crate::stopview::view(s, run.stop_earlier.as_ref())),
        steering: run.steering.as_deref().map(steering_rows),
        micro: run.micro.as_deref().map(micro_rows),
        micro_run_stats: run.micro.iter().flatten().any(|m| m.run_stats),
        held: run.held.as_deref().map(held_view),
        profile,
        errors: run
            .errors
            .iter()
            .map(|(k, v)| (k.clone(), v.replace('\n', " ")))
            .collect(),
        targets,
    };
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()?,
    );
    env.add_template("BENCHMARKS.md", TEMPLATE)?;
    Ok(env
        .get_template("BENCHMARKS.md")?
        .render(minijinja::value::Serde(&view))?)
}

fn read(path: &Path) -> anyhow::Result<Run> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (not a run record of this bench's format: a run made with another version of the bench?)",
            path.display()
        )
    })
}

/// Writes a full run's record (target/bench.json and the committed
/// bench/last-run.json) and BENCHMARKS.md; a partial run's to
/// target/bench-partial.json and target/BENCHMARKS-partial.md.
pub fn write(root: &Path, mut run: Run, full: bool) -> anyhow::Result<()> {
    if full && run.previous.is_none() {
        // The previous full run's ratios, if it was made the same way.
        if let Ok(p) = read(&root.join("target/bench.json"))
            && p.meta.same_method(&run.meta)
            && let Some(m) = p
                .rounds
                .as_ref()
                .and_then(|r| r.ratios.iter().find(|x| x.mode == Mode::Mtlb))
        {
            run.previous = Some(crate::model::Previous {
                rate: m.rate.median,
                bulk: m.bulk.median,
                date: p.meta.date.clone(),
            });
        }
    }
    if full && let Ok(committed) = read(&root.join(COMMITTED_RUN)) {
        if run.stop.is_none() {
            // A run without the stop phase keeps the committed one's.
            run.stop = committed.stop;
            run.stop_earlier = committed.stop_earlier;
        } else {
            keep_earlier_stop(&mut run, committed);
        }
    }
    let md = render(&run)?;
    let json = serde_json::to_string_pretty(&run)? + "\n";
    std::fs::create_dir_all(root.join("target"))?;
    println!("{md}");
    if full {
        std::fs::write(root.join("target/bench.json"), &json)?;
        std::fs::write(root.join(COMMITTED_RUN), &json)?;
        std::fs::write(root.join("BENCHMARKS.md"), &md)?;
        eprintln!("bench: wrote BENCHMARKS.md, {COMMITTED_RUN} and target/bench.json");
    } else {
        std::fs::write(root.join("target/bench-partial.json"), &json)?;
        std::fs::write(root.join("target/BENCHMARKS-partial.md"), &md)?;
        eprintln!(
            "bench: partial run (not every phase): wrote target/BENCHMARKS-partial.md and target/bench-partial.json"
        );
    }
    Ok(())
}

/// The stop phase of `committed` becomes `run`'s earlier one when it was
/// measured with another mtlb binary (the figures before a change, next
/// to those after it); else `committed`'s earlier one stays.
fn keep_earlier_stop(run: &mut Run, committed: Run) {
    let Some(new) = &run.stop else { return };
    run.stop_earlier = match committed.stop {
        Some(old) if old.mtlb_sha256 != new.mtlb_sha256 => Some(old),
        _ => committed.stop_earlier,
    };
}

/// `cargo xtask bench --only stop --merge`: the stop phase of `run` goes
/// into the committed record (and target/bench.json, the last full run
/// here, which `--report-only` renders first), the other phases' figures
/// stay; BENCHMARKS.md is rendered again.
pub fn merge_stop(root: &Path, run: Run) -> anyhow::Result<()> {
    let Some(stop) = run.stop else {
        anyhow::bail!(
            "the stop phase measured nothing: {}",
            run.errors.get("stop").map_or("", String::as_str)
        );
    };
    let committed = root.join(COMMITTED_RUN);
    let mut md = None;
    for path in [root.join("target/bench.json"), committed.clone()] {
        if path != committed && !path.exists() {
            continue;
        }
        let mut into = read(&path)?;
        let old = Run {
            stop: into.stop.take(),
            stop_earlier: into.stop_earlier.take(),
            ..into.clone()
        };
        into.stop = Some(stop.clone());
        keep_earlier_stop(&mut into, old);
        std::fs::write(&path, serde_json::to_string_pretty(&into)? + "\n")?;
        if path == committed {
            md = Some(render(&into)?);
        }
    }
    if let Some(md) = md {
        std::fs::write(root.join("BENCHMARKS.md"), &md)?;
        println!("{md}");
    }
    eprintln!("bench: merged the stop phase into {COMMITTED_RUN} and wrote BENCHMARKS.md");
    Ok(())
}

/// `cargo xtask bench --report-only`: BENCHMARKS.md again from
/// target/bench.json if it exists (the last run on this machine), else
/// from the committed bench/last-run.json. Measures nothing and compares
/// with no previous run.
pub fn rewrite(root: &Path) -> anyhow::Result<()> {
    let local = root.join("target/bench.json");
    let path: PathBuf = if local.exists() {
        local
    } else {
        root.join(COMMITTED_RUN)
    };
    eprintln!("bench: rendering {}", path.display());
    let md = render(&read(&path)?)?;
    std::fs::write(root.join("BENCHMARKS.md"), &md)?;
    if path != root.join(COMMITTED_RUN) {
        std::fs::copy(&path, root.join(COMMITTED_RUN))?;
    }
    eprintln!("bench: wrote BENCHMARKS.md");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../last-run.json");

    #[test]
    fn the_committed_run_renders_the_committed_benchmarks_md() {
        let run: Run = serde_json::from_str(COMMITTED).expect("bench/last-run.json parses");
        let md = render(&run).expect("renders");
        let committed = include_str!("../../BENCHMARKS.md");
        if md != committed {
            let line = md
                .lines()
                .zip(committed.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(md.lines().count().min(committed.lines().count()));
            panic!(
                "BENCHMARKS.md differs from the render of bench/last-run.json from line {}: run `cargo xtask bench --report-only`",
                line + 1
            );
        }
    }

    #[test]
    fn a_missing_figure_is_an_error_not_nan() {
        let mut v: serde_json::Value = serde_json::from_str(COMMITTED).unwrap();
        let removed = v
            .pointer_mut("/rounds/modes/0")
            .and_then(|m| m.as_object_mut())
            .and_then(|m| m.remove("rate"));
        assert!(removed.is_some());
        let err = serde_json::from_value::<Run>(v).unwrap_err().to_string();
        assert!(err.contains("missing field `rate`"), "{err}");
    }

    #[test]
    fn a_missed_target_shows_its_reason_and_a_met_one_none() {
        let mut run: Run = serde_json::from_str(COMMITTED).unwrap();
        run.reasons
            .insert(TargetKey::Rss100k, "should not show".into());
        let md = render(&run).unwrap();
        let rss = md
            .lines()
            .find(|l| l.starts_with("| agent RSS ≤ 64 MiB"))
            .unwrap();
        assert!(rss.ends_with("| met |  |"), "{rss}");
        // A rate below its target, whatever the committed run measured.
        if let Some(m) = run
            .rounds
            .as_mut()
            .and_then(|r| r.ratios.iter_mut().find(|x| x.mode == Mode::Mtlb))
        {
            m.rate.median = 0.9;
        }
        run.reasons.remove(&TargetKey::RateRatio);
        let md = render(&run).unwrap();
        let rate = md
            .lines()
            .find(|l| l.starts_with("| mtlb connection rate"))
            .unwrap();
        assert!(rate.ends_with("| missed | — |"), "{rate}");
    }

    /// A stop phase of one stop per balancer, measured with binary `sha`.
    fn stop(sha: &str, failed_mtlb: u64) -> crate::model::Stop {
        use crate::{
            model::{StopRep, StopWindow},
            mtclient::Outcome,
        };
        let rep = |mode, failed: u64| StopRep {
            mode,
            rep: 0,
            clients: 9000,
            achieved_rate: 400.0,
            stop_at: 3.0,
            signal_at: Some(3.05),
            stopped_at: 3.3,
            start_at: 13.3,
            started_at: 13.5,
            end_at: 23.5,
            down_seen_at: Some(3.2),
            up_seen_at: None,
            windows: vec![
                StopWindow {
                    name: "before the stop".into(),
                    clients: 1200,
                    failed: Default::default(),
                },
                StopWindow {
                    name: "stopped".into(),
                    clients: 7800,
                    failed: [(Outcome::Closed, failed)].into_iter().collect(),
                },
            ],
            served_ms_p50: Some(1.0),
            served_ms_p99: Some(9.0),
            served_ms_max: Some(50.0),
            failed_ms_p50: None,
            failed_ms_max: None,
            machine_busy_pct: 80.0,
            foreign_pct: 5.0,
        };
        crate::model::Stop {
            date: Some("2026-12-04 02:00 UTC".into()),
            commit: "abc1234".into(),
            dirty: false,
            mtlb_sha256: Some(sha.into()),
            secs: 60.0,
            rate: 400.0,
            client_timeout_secs: 5.0,
            before_secs: 3.0,
            stopped_secs: 10.0,
            after_secs: 10.0,
            replica_command: "exec mtproto-proxy".into(),
            mtlb_config: "port = 443\n".into(),
            haproxy_config: "defaults\n".into(),
            reps: vec![rep(Mode::Mtlb, failed_mtlb), rep(Mode::Haproxy, 25)],
        }
    }

    #[test]
    fn a_stop_measured_with_another_binary_is_kept_as_the_earlier_one() {
        let base = Run {
            stop_earlier: None,
            ..serde_json::from_str(COMMITTED).unwrap()
        };
        let committed = Run {
            stop: Some(stop("aaaa", 7)),
            ..base.clone()
        };
        // Same binary: replaced, no earlier one.
        let mut run = Run {
            stop: Some(stop("aaaa", 6)),
            ..base.clone()
        };
        keep_earlier_stop(&mut run, committed.clone());
        assert!(run.stop_earlier.is_none());
        // Another binary: the committed one becomes the earlier one...
        let mut after = Run {
            stop: Some(stop("bbbb", 0)),
            ..base.clone()
        };
        keep_earlier_stop(&mut after, committed);
        assert_eq!(
            after
                .stop_earlier
                .as_ref()
                .and_then(|s| s.mtlb_sha256.as_deref()),
            Some("aaaa")
        );
        // ...and stays through a rerun of the new one.
        let mut again = Run {
            stop: Some(stop("bbbb", 1)),
            ..base
        };
        keep_earlier_stop(&mut again, after.clone());
        assert_eq!(
            again
                .stop_earlier
                .as_ref()
                .and_then(|s| s.mtlb_sha256.as_deref()),
            Some("aaaa")
        );
        let md = render(&after).unwrap();
        for want in [
            "## Replica stop under load (`docker stop`)",
            "| mtlb | 1 | 400 (400–400) | 0 of 1200 | 0 of 7800 | **0** of 9000 (per stop 0 (0–0)) | — |",
            "| HAProxy | 1 | 400 (400–400) | 0 of 1200 | 25 of 7800 | **25** of 9000 (per stop 25 (25–25)) | closed without answer 25 |",
            "| 1 | mtlb | 9000 | 300 | 50 | 200 | — | 0 | 0 | 1.0 / 9.0 / 50.0 | — / — | 80 / 5 |",
            "| mtlb | **7** of 9000 (per stop 7 (7–7)) | **0** of 9000 (per stop 0 (0–0)) |",
        ] {
            assert!(md.contains(want), "no {want:?} in:\n{md}");
        }
    }

    #[test]
    fn every_branch_of_the_template_renders() {
        use crate::model::{Previous, Profile};
        let base: Run = serde_json::from_str(COMMITTED).unwrap();
        let mut run = base.clone();
        // A previous run 0.011 and 0.021 above the committed ratios.
        let m = base
            .rounds
            .as_ref()
            .and_then(|r| r.ratios.iter().find(|x| x.mode == Mode::Mtlb))
            .expect("the committed run has mtlb's ratios");
        let (rate, bulk) = (m.rate.median + 0.011, m.bulk.median + 0.021);
        let rerun = format!("rate -0.011, bulk -0.021 (previous {rate:.3}, {bulk:.3})");
        run.previous = Some(Previous {
            rate,
            bulk,
            date: None,
        });
        run.meta.replica_cgroup = None;
        run.meta.dirty = true;
        run.meta.other_mtlb_programs_at_start = vec!["mtlb_steer (id 7)".into()];
        run.not_run.insert(Mode::Haproxy, "no haproxy".into());
        run.errors
            .insert("steering".into(), "it broke\nbadly".into());
        run.steering = None;
        run.micro = Some(vec![crate::model::MicroRaw {
            replicas: 16,
            algorithm: "random".into(),
            repeat: 1000,
            ns_per_run: vec![150.0, 120.0, 140.0],
            floor_ns_per_run: vec![40.0, 50.0, 45.0],
            listeners_chosen: 2,
            run_stats: false,
        }]);
        run.profile = Some(Profile {
            bpftool_prog_profile: [("mtlb_steer".to_string(), Ok("42 cycles".to_string()))]
                .into_iter()
                .collect(),
            perf: Err("perf: not found".into()),
        });
        if let Some(h) = run.held.as_mut() {
            h.retain(|l| l.held < 100_000);
            if let Some(l) = h.last_mut() {
                l.agent_profile = Some(crate::model::AgentProfile {
                    during: "idle".into(),
                    perf: Err("perf record: denied".into()),
                });
            }
        }
        let md = render(&run).unwrap();
        for want in [
            "(with uncommitted changes)",
            "but mtlb was not given `replica_cgroup`",
            "**Warning**: mtlb programs of another agent",
            "HAProxy: not run: no haproxy.",
            &rerun,
            "- steering: not run: it broke badly",
            "```\n42 cycles\n```",
            "- perf: perf: not found",
            "Agent profile at 10000 held: perf record: denied",
            "| 100k connections held open through mtlb | not reached | missed |",
            "| sk_lookup ≤ 150 ns per run at 2 replicas, leastconn (under the bench's clients) | not run | not judged |  |",
            "| 16 | random | 140 (120–150) | 45 (40–50) | 3 × 1000 | 2 |",
        ] {
            assert!(md.contains(want), "no {want:?} in:\n{md}");
        }
        let none = Run {
            rounds: None,
            failover: None,
            held: None,
            profile: None,
            steering: None,
            micro: None,
            ..base
        };
        let md = render(&none).unwrap();
        assert!(md.contains("| mtlb connection rate ≥ 0.98 × direct (median of paired ratios) | not run | not judged |  |"));
        assert!(!md.contains("## Held connections"));
        assert!(!md.contains("## sk_lookup alone"));
    }
}
