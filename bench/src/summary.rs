//! The summaries the report shows, from the measured rows.

use crate::model::{
    Mode, ModeRounds, ProgDelta, ProgramCost, ProgramRounds, Ratios, RoundRow, Rounds, Steering,
    SteeringRaw,
};
use crate::stats::summary;
use std::collections::BTreeMap;

fn bpf_ns(bpf: &BTreeMap<String, ProgDelta>) -> f64 {
    bpf.values().map(|p| p.ns as f64).sum()
}

/// ns per run (NaN when it did not run: left out of the summaries).
fn ns_per_run(d: &ProgDelta) -> f64 {
    if d.runs > 0 {
        d.ns as f64 / d.runs as f64
    } else {
        f64::NAN
    }
}

/// Busy CPU of the machine less what processes outside the bench used,
/// per connection (µs).
fn machine_us(x: &RoundRow) -> f64 {
    (x.machine_cpu_s - x.foreign_cpu_s) / conns(x) * 1e6
}

fn conns(x: &RoundRow) -> f64 {
    (x.conns as f64).max(1.0)
}

/// A summary of a series that has at least one finite value.
fn range(v: &[f64]) -> Option<crate::model::Range> {
    summary(v).range()
}

fn nonempty_range(v: &[f64], what: &str) -> anyhow::Result<crate::model::Range> {
    range(v).ok_or_else(|| anyhow::anyhow!("no finite {what} in the rounds"))
}

pub fn rounds(rows: &[RoundRow], cpus: usize) -> anyhow::Result<Rounds> {
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| rows.iter().any(|x| x.mode == *m))
        .collect();
    let n_rounds = rows.iter().map(|x| x.round + 1).max().unwrap_or(0);
    let get = |round: usize, mode: Mode| rows.iter().find(|x| x.round == round && x.mode == mode);
    let of = |mode: Mode| rows.iter().filter(move |x| x.mode == mode);

    let mut out_modes = Vec::new();
    for &m in &modes {
        let col =
            |f: &dyn Fn(&RoundRow) -> Option<f64>| -> Vec<f64> { of(m).filter_map(f).collect() };
        out_modes.push(ModeRounds {
            mode: m,
            rate: nonempty_range(&col(&|x| Some(x.rate)), "rate")?,
            bulk_mbs: nonempty_range(&col(&|x| Some(x.bulk_mbs)), "bulk")?,
            connect_p50_us: range(&col(&|x| x.connect_p50_us)),
            connect_p99_us: range(&col(&|x| x.connect_p99_us)),
            machine_us: nonempty_range(&col(&|x| Some(machine_us(x))), "machine CPU")?,
            balancer_us: range(&col(&|x| x.balancer_cpu_s.map(|c| c / conns(x) * 1e6))),
            bpf_us: (m == Mode::Mtlb)
                .then(|| range(&col(&|x| Some(bpf_ns(&x.bpf) / conns(x) / 1e3))))
                .flatten(),
            agent_us: range(&col(&|x| x.agent_cpu_s.map(|c| c / conns(x) * 1e6))),
            // % of the whole machine (all cores) during the rate run.
            foreign_pct: nonempty_range(
                &col(&|x| Some(x.foreign_cpu_s / x.secs / (cpus.max(1) as f64) * 100.0)),
                "outside CPU",
            )?,
            repeated: of(m).map(|x| x.attempts.saturating_sub(1) as u64).sum(),
            failed: of(m).map(|x| x.failed).sum(),
        });
    }

    // Paired: each round's figure over the same round's direct figure.
    let mut ratios = Vec::new();
    for &m in modes.iter().filter(|m| **m != Mode::Direct) {
        let (mut rate, mut bulk) = (Vec::new(), Vec::new());
        for r in 0..n_rounds {
            if let (Some(x), Some(d)) = (get(r, m), get(r, Mode::Direct)) {
                rate.push(x.rate / d.rate);
                bulk.push(x.bulk_mbs / d.bulk_mbs);
            }
        }
        if let (Some(rate), Some(bulk)) = (summary(&rate).spread(), summary(&bulk).spread()) {
            ratios.push(Ratios {
                mode: m,
                rate,
                bulk,
            });
        }
    }

    let mut progs: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for x in of(Mode::Mtlb) {
        for (p, d) in &x.bpf {
            let e = progs.entry(p.clone()).or_default();
            e.0.push(ns_per_run(d));
            e.1.push(d.runs as f64 / conns(x));
        }
    }
    let mut mtlb_programs = BTreeMap::new();
    for (p, (ns, runs)) in progs {
        let per: Vec<f64> = ns
            .iter()
            .zip(&runs)
            .map(|(x, y)| if x.is_finite() { x * y } else { 0.0 })
            .collect();
        mtlb_programs.insert(
            p,
            ProgramRounds {
                ns_per_run: range(&ns),
                runs_per_conn: nonempty_range(&runs, "program runs")?,
                ns_per_conn: nonempty_range(&per, "program time")?,
            },
        );
    }
    let bulk_runs: Vec<f64> = of(Mode::Mtlb)
        .map(|x| x.bulk_bpf.values().map(|p| p.runs as f64).sum())
        .collect();

    let mut bpf_vs_haproxy = Vec::new();
    let mut ipvs_kernel_us = Vec::new();
    for r in 0..n_rounds {
        if let (Some(m), Some(h)) = (get(r, Mode::Mtlb), get(r, Mode::Haproxy))
            && let Some(hp) = h.balancer_cpu_s
        {
            bpf_vs_haproxy.push((bpf_ns(&m.bpf) / conns(m)) / (hp * 1e9 / conns(h)));
        }
        if let (Some(i), Some(d)) = (get(r, Mode::Ipvs), get(r, Mode::Direct)) {
            ipvs_kernel_us.push(machine_us(i) - machine_us(d));
        }
    }
    Ok(Rounds {
        modes: out_modes,
        ratios,
        mtlb_programs,
        bulk_bpf_runs: range(&bulk_runs),
        bpf_vs_haproxy: summary(&bpf_vs_haproxy).spread(),
        ipvs_kernel_us: range(&ipvs_kernel_us),
    })
}

pub fn steering(raw: &[SteeringRaw]) -> anyhow::Result<Vec<Steering>> {
    raw.iter()
        .map(|s| {
            let total: Vec<f64> = s
                .reps
                .iter()
                .map(|r| bpf_ns(&r.bpf) / (r.conns as f64).max(1.0))
                .collect();
            let cost = |name: &str| -> Option<ProgramCost> {
                let (mut ns, mut runs) = (Vec::new(), Vec::new());
                for r in &s.reps {
                    let d = r.bpf.get(name)?;
                    ns.push(ns_per_run(d));
                    runs.push(d.runs as f64 / (r.conns as f64).max(1.0));
                }
                Some(ProgramCost {
                    ns_per_run: range(&ns),
                    runs_per_conn: range(&runs)?,
                })
            };
            Ok(Steering {
                replicas: s.replicas,
                algorithm: s.algorithm.clone(),
                sk_lookup: cost("mtlb_steer"),
                sock_ops: cost("mtlb_sockops"),
                bpf_ns_per_conn: range(&total).ok_or_else(|| {
                    anyhow::anyhow!("steering at {} replicas: no repetition", s.replicas)
                })?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(round: usize, mode: Mode, rate: f64) -> RoundRow {
        RoundRow {
            round,
            position: 0,
            mode,
            attempts: 1,
            conns: 1000,
            failed: 0,
            secs: 2.0,
            rate,
            machine_cpu_s: 0.1,
            foreign_cpu_s: 0.0,
            balancer_cpu_s: None,
            agent_cpu_s: None,
            bpf: BTreeMap::new(),
            bulk_bpf: BTreeMap::new(),
            bulk_mbs: rate,
            connect_p50_us: Some(30.0),
            connect_p99_us: None,
        }
    }

    #[test]
    fn ratios_are_paired_by_round() {
        // Round 0 is slow for both modes, round 1 fast for both: paired
        // ratios are 0.5 each time, whatever the spread of the rates.
        let rows = [
            row(0, Mode::Direct, 100.0),
            row(0, Mode::Mtlb, 50.0),
            row(1, Mode::Direct, 1000.0),
            row(1, Mode::Mtlb, 500.0),
        ];
        let r = rounds(&rows, 2).unwrap();
        assert_eq!(r.ratios.len(), 1);
        assert_eq!(r.ratios[0].rate.min, 0.5);
        assert_eq!(r.ratios[0].rate.max, 0.5);
        assert_eq!(r.modes[1].rate.min, 50.0);
        // No p99 sample in any round: absent, not NaN.
        assert!(r.modes[0].connect_p99_us.is_none());
    }

    #[test]
    fn a_fresh_runs_record_round_trips_and_renders() {
        // What `run` writes after a full run: the summaries from the raw
        // rows, the rows kept; read back, it renders as it did.
        let mut rows = Vec::new();
        for round in 0..3 {
            for (mode, rate) in [
                (Mode::Direct, 1000.0),
                (Mode::Mtlb, 950.0),
                (Mode::Haproxy, 400.0),
            ] {
                let mut r = row(round, mode, rate + round as f64);
                if mode == Mode::Mtlb {
                    r.agent_cpu_s = Some(0.001);
                    r.bpf.insert(
                        "mtlb_steer".into(),
                        ProgDelta {
                            runs: 1000,
                            ns: 300_000,
                        },
                    );
                    r.bpf
                        .insert("mtlb_bind4".into(), ProgDelta { runs: 0, ns: 0 });
                    r.bulk_bpf
                        .insert("mtlb_steer".into(), ProgDelta { runs: 2, ns: 600 });
                }
                if mode == Mode::Haproxy {
                    r.balancer_cpu_s = Some(0.1);
                }
                rows.push(r);
            }
        }
        let steering_raw = vec![SteeringRaw {
            replicas: 2,
            algorithm: "leastconn".into(),
            reps: vec![crate::model::SteeringRep {
                conns: 100,
                failed: 0,
                rate: 50.0,
                bpf: [(
                    "mtlb_steer".to_string(),
                    ProgDelta {
                        runs: 100,
                        ns: 30_000,
                    },
                )]
                .into_iter()
                .collect(),
            }],
        }];
        let mut run: crate::model::Run =
            serde_json::from_str(include_str!("../last-run.json")).unwrap();
        run.rounds = Some(rounds(&rows, 2).unwrap());
        run.steering = Some(steering(&steering_raw).unwrap());
        run.raw = Some(crate::model::Raw {
            rounds: rows,
            steering: steering_raw,
        });
        let md = crate::report::render(&run).unwrap();
        let text = serde_json::to_string_pretty(&run).unwrap();
        let back: crate::model::Run = serde_json::from_str(&text).unwrap();
        assert_eq!(crate::report::render(&back).unwrap(), md);
        // bind4 never ran: no ns per run, not NaN.
        assert!(
            md.contains("| mtlb_bind4 | — | 0.00 (0.00–0.00) | 0 (0–0) |"),
            "{md}"
        );
        assert!(
            md.contains("| mtlb_steer | 300 (300–300) | 1.00 (1.00–1.00) | 300 (300–300) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| 2 | leastconn | 300 (300–300) | 1.00 (1.00–1.00) | — | — | 300 (300–300) |"
            ),
            "{md}"
        );
    }
}
