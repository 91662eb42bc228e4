//! The stop phase's part of BENCHMARKS.md, formatted for the template.

use crate::{
    model::{Mode, Stop, StopRep},
    mtclient::Outcome,
    stats::summary,
};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize)]
pub struct StopView {
    pub measured: String,
    pub rate: String,
    pub timeout: String,
    pub before: String,
    pub stopped: String,
    pub after: String,
    pub reps: usize,
    pub replica_command: String,
    pub mtlb_config: String,
    pub haproxy_config: String,
    /// Window names, in order.
    pub windows: Vec<String>,
    /// Per mode: label, stops, clients, rate, failed per window, failed in
    /// all, failed per stop, failed by kind.
    pub totals: Vec<Vec<String>>,
    /// Per stop, in the order run.
    pub rows: Vec<Vec<String>>,
    /// With an earlier measurement (another mtlb binary): per mode, the
    /// earlier and the current failed clients.
    pub earlier: Option<Earlier>,
}

#[derive(Serialize)]
pub struct Earlier {
    pub measured: String,
    pub rows: Vec<Vec<String>>,
}

fn measured(s: &Stop) -> String {
    format!(
        "{}, mtlb at commit {}{}{}",
        s.date.as_deref().unwrap_or("date not recorded"),
        s.commit,
        if s.dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
        s.mtlb_sha256.as_deref().map_or(String::new(), |h| format!(
            ", binary sha256 {}…",
            &h[..12.min(h.len())]
        ))
    )
}

fn modes(s: &Stop) -> Vec<Mode> {
    let mut m: Vec<Mode> = s.reps.iter().map(|r| r.mode).collect();
    m.sort();
    m.dedup();
    m
}

fn failed(r: &StopRep) -> u64 {
    r.windows.iter().map(|w| w.failed_total()).sum()
}

/// "N of M (per stop: median (min–max))".
fn failed_of(reps: &[&StopRep]) -> String {
    let f: Vec<f64> = reps.iter().map(|r| failed(r) as f64).collect();
    let c: u64 = reps.iter().map(|r| r.clients).sum();
    let s = summary(&f);
    format!(
        "**{}** of {c} (per stop {:.0} ({:.0}–{:.0}))",
        f.iter().sum::<f64>(),
        s.median,
        s.min,
        s.max
    )
}

fn kinds(reps: &[&StopRep]) -> String {
    let mut by: BTreeMap<Outcome, u64> = BTreeMap::new();
    for w in reps.iter().flat_map(|r| &r.windows) {
        for (k, n) in &w.failed {
            *by.entry(*k).or_default() += n;
        }
    }
    by.retain(|_, n| *n > 0);
    if by.is_empty() {
        return "—".into();
    }
    Outcome::FAILED
        .iter()
        .filter_map(|k| Some(format!("{} {}", k.label(), by.get(k)?)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.1}"))
}

pub fn view(s: &Stop, earlier: Option<&Stop>) -> StopView {
    let windows: Vec<String> = s
        .reps
        .first()
        .map(|r| r.windows.iter().map(|w| w.name.clone()).collect())
        .unwrap_or_default();
    let of = |m: Mode| s.reps.iter().filter(|r| r.mode == m).collect::<Vec<_>>();
    let totals = modes(s)
        .into_iter()
        .map(|m| {
            let reps = of(m);
            let rate = summary(&reps.iter().map(|r| r.achieved_rate).collect::<Vec<_>>());
            let mut row = vec![
                m.label().to_string(),
                reps.len().to_string(),
                format!("{:.0} ({:.0}–{:.0})", rate.median, rate.min, rate.max),
            ];
            for (i, _) in windows.iter().enumerate() {
                let (f, c) = reps.iter().fold((0, 0), |(f, c), r| {
                    r.windows
                        .get(i)
                        .map_or((f, c), |w| (f + w.failed_total(), c + w.clients))
                });
                row.push(format!("{f} of {c}"));
            }
            row.push(failed_of(&reps));
            row.push(kinds(&reps));
            row
        })
        .collect();
    let rows = s
        .reps
        .iter()
        .map(|r| {
            let mut row = vec![
                (r.rep + 1).to_string(),
                r.mode.label().to_string(),
                r.clients.to_string(),
                format!("{:.0}", (r.stopped_at - r.stop_at) * 1e3),
                r.signal_at
                    .map_or("—".into(), |t| format!("{:.0}", (t - r.stop_at) * 1e3)),
                r.down_seen_at
                    .map_or("—".into(), |t| format!("{:.0}", (t - r.stop_at) * 1e3)),
                r.up_seen_at
                    .map_or("—".into(), |t| format!("{:.1}", t - r.start_at)),
            ];
            row.extend(r.windows.iter().map(|w| w.failed_total().to_string()));
            row.push(format!(
                "{} / {} / {}",
                ms(r.served_ms_p50),
                ms(r.served_ms_p99),
                ms(r.served_ms_max)
            ));
            row.push(format!("{} / {}", ms(r.failed_ms_p50), ms(r.failed_ms_max)));
            row.push(format!("{:.0} / {:.0}", r.machine_busy_pct, r.foreign_pct));
            row
        })
        .collect();
    let earlier = earlier.map(|e| Earlier {
        measured: measured(e),
        rows: modes(s)
            .into_iter()
            .chain(modes(e))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|m| {
                let cell = |st: &Stop| {
                    let reps: Vec<&StopRep> = st.reps.iter().filter(|r| r.mode == m).collect();
                    if reps.is_empty() {
                        "not run".into()
                    } else {
                        failed_of(&reps)
                    }
                };
                vec![m.label().to_string(), cell(e), cell(s)]
            })
            .collect(),
    });
    StopView {
        measured: measured(s),
        rate: format!("{:.0}", s.rate),
        timeout: format!("{:.0}", s.client_timeout_secs),
        before: format!("{:.0}", s.before_secs),
        stopped: format!("{:.0}", s.stopped_secs),
        after: format!("{:.0}", s.after_secs),
        reps: s
            .reps
            .iter()
            .filter(|r| r.mode == Mode::Mtlb)
            .count()
            .max(1),
        replica_command: s.replica_command.clone(),
        mtlb_config: s.mtlb_config.trim_end().to_string(),
        haproxy_config: s.haproxy_config.trim_end().to_string(),
        windows,
        totals,
        rows,
        earlier,
    }
}
