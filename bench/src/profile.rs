//! "Where the time goes": under mtlb load, `bpftool prog profile` on
//! mtlb_steer and mtlb_sockops (needs hardware counters), then a
//! whole-machine `perf record -e cpu-clock` (a software clock, which works
//! without a PMU) and the top symbols of `perf report`.

use super::{bpf, load};
use crate::model::{Perf, PerfPid, Profile, Sym};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

const PERF_SECS: u32 = 4;
const PERF_HZ: u32 = 4999;
const PROFILE_SECS: u32 = 3;
const TOP: usize = 25;

pub fn run(progs: &bpf::Progs, dir: &Path, cpus: usize) -> Profile {
    let target: SocketAddr = "127.0.0.1:443".parse().expect("address");
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    std::thread::scope(|s| {
        // Load for the whole profile, bounded in time, in 0.5 s slices.
        let (stop, done) = (&stop, &done);
        s.spawn(move || {
            let end = Instant::now() + Duration::from_secs(40);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                done.fetch_add(load::rate(&[target], 0.5).done, Ordering::Relaxed);
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let mut bpftool_prog_profile = BTreeMap::new();
        for name in ["mtlb_steer", "mtlb_sockops"] {
            let r = match progs.ids.get(name) {
                Some(&id) => bpf::profile(id, PROFILE_SECS),
                None => Err("program not found".to_string()),
            };
            bpftool_prog_profile.insert(name.to_string(), r);
        }
        let c0 = done.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let samples = perf(dir);
        // Connections during the recording (to the nearest 0.5 s slice).
        let conns_per_sec = (done.load(Ordering::Relaxed) - c0) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        // A share of all CPUs' samples, per connection (µs).
        let us = |pct: f64| pct / 100.0 * cpus as f64 / conns_per_sec * 1e6;
        Profile {
            bpftool_prog_profile,
            perf: samples.map(|p| Perf {
                secs: PERF_SECS,
                hz: PERF_HZ,
                bpf_prog_us: us(p.bpf_prog_pct_total),
                bpf_machinery_us: us(p.bpf_machinery_pct_total),
                top: p.top,
                bpf_prog_pct_total: p.bpf_prog_pct_total,
                bpf_prog_rows: p.bpf_prog_rows,
                bpf_machinery_pct_total: Some(p.bpf_machinery_pct_total),
                bpf_machinery_rows: p.bpf_machinery_rows,
                conns_per_sec,
            }),
        }
    })
}

/// What the whole-machine recording found.
struct Samples {
    top: Vec<Sym>,
    bpf_prog_pct_total: f64,
    bpf_prog_rows: Vec<Sym>,
    bpf_machinery_pct_total: f64,
    bpf_machinery_rows: Vec<Sym>,
}

fn sym((pct, symbol): &(f64, String)) -> Sym {
    Sym {
        pct: *pct,
        symbol: symbol.clone(),
    }
}

/// `perf record -p PID` for `secs`: the top symbols by self time and by
/// time including callees (where a busy agent spends its time).
pub fn perf_pid(pid: u32, dir: &Path, secs: u32) -> Result<PerfPid, String> {
    let data = dir.join("perf-agent.data");
    perf_record(&["-F", "999", "-g", "-p", &pid.to_string()], &data, secs)?;
    let report = |children: bool| -> Vec<Sym> {
        let out = Command::new("perf")
            .args(["report", "-i"])
            .arg(&data)
            .args([
                "--stdio",
                if children {
                    "--children"
                } else {
                    "--no-children"
                },
                "-g",
                "none",
                "--sort",
                "sym",
                "--percent-limit",
                "3",
            ])
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let l = l.trim();
                let (pct, rest) = l.split_once('%')?;
                let pct: f64 = pct.trim().parse().ok()?;
                // With --children: "total% self% sym".
                let sym = if children {
                    rest.trim().split_once('%')?.1.trim()
                } else {
                    rest.trim()
                };
                Some(Sym {
                    pct,
                    symbol: sym.to_string(),
                })
            })
            .take(15)
            .collect()
    };
    Ok(PerfPid {
        secs,
        self_: report(false),
        children: report(true),
    })
}

/// `perf record -e cpu-clock ARGS -o DATA -- sleep SECS`.
fn perf_record(args: &[&str], data: &Path, secs: u32) -> Result<(), String> {
    let rec = Command::new("perf")
        .args(["record", "-e", "cpu-clock"])
        .args(args)
        .arg("-o")
        .arg(data)
        .args(["--", "sleep", &secs.to_string()])
        .output();
    match rec {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "perf record: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("perf: {e}")),
    }
}

fn perf(dir: &Path) -> Result<Samples, String> {
    let data = dir.join("perf.data");
    perf_record(&["-F", &PERF_HZ.to_string(), "-a", "-g"], &data, PERF_SECS)?;
    let rep = Command::new("perf")
        .args(["report", "-i"])
        .arg(&data)
        .args([
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--sort",
            "sym",
            "--percent-limit",
            "0.01",
        ])
        .output();
    let text = match rep {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).to_string(),
        Ok(o) => {
            return Err(format!(
                "perf report: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Err(format!("perf: {e}")),
    };
    let rows: Vec<(f64, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            Some((pct.trim().parse().ok()?, rest.trim().to_string()))
        })
        .collect();
    let bpf_pct: f64 = rows
        .iter()
        .filter(|(_, s)| s.contains("bpf_prog_"))
        .map(|(p, _)| p)
        .sum();
    // Everything of the BPF machinery: the programs, the cgroup and
    // sk_lookup dispatch, the helpers and map code they call.
    let machinery = |s: &str| {
        [
            "bpf",
            "htab",
            "sock_map",
            "sk_storage",
            "sock_hash",
            "array_map",
        ]
        .iter()
        .any(|k| s.contains(k))
    };
    let machinery_rows: Vec<&(f64, String)> = rows.iter().filter(|(_, s)| machinery(s)).collect();
    let machinery_pct: f64 = machinery_rows.iter().map(|(p, _)| p).sum();
    Ok(Samples {
        top: rows.iter().take(TOP).map(sym).collect(),
        bpf_prog_pct_total: bpf_pct,
        bpf_prog_rows: rows
            .iter()
            .filter(|(_, s)| s.contains("bpf_prog_"))
            .map(sym)
            .collect(),
        bpf_machinery_pct_total: machinery_pct,
        bpf_machinery_rows: machinery_rows.into_iter().map(sym).collect(),
    })
}
