//! Held connections: 1k, 10k, 100k and 1M connections open through mtlb
//! (2 replicas), and what the agent and its maps cost at each level.

use super::{agent, bpf, load, stats};
use crate::model::{AgentProfile, Count, HeldLevel, HeldSamples, MapEntries, Opened};
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const LEVELS: &[usize] = &[1_000, 10_000, 100_000, 1_000_000];
/// Connections opened per second (the backends confirm each one).
const OPEN_PER_SEC: f64 = 5_000.0;
/// How long the agent is watched doing nothing.
const IDLE_SECS: f64 = 10.0;
const SCRAPERS: usize = 4;
const SCRAPES_EACH: usize = 50;
/// The scrapers stop starting new requests after this long.
const SCRAPE_SECS_MAX: f64 = 20.0;
const CONTROL_CALLS: usize = 200;

/// Everything measured at one level.
pub fn measure_level(
    a: &agent::Agent,
    level: usize,
    n: usize,
    opened: Option<Opened>,
    dir: &Path,
) -> HeldLevel {
    eprintln!("bench: held {n}: agent idle for {IDLE_SECS} s");
    let c0 = a.cpu();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(IDLE_SECS));
    let idle_pct = (a.cpu() - c0) / t0.elapsed().as_secs_f64() * 100.0;
    // Where a busy "idle" agent spends its time.
    let mut agent_profile = (idle_pct > 5.0).then(|| AgentProfile {
        during: "idle".into(),
        perf: super::profile::perf_pid(a.pid, dir, 3),
    });

    let addr: SocketAddr = agent::STATS.parse().expect("address");
    let mut lat: Vec<f64> = Vec::new();
    let mut scrape_failed = 0usize;
    let scrape_end = Instant::now() + Duration::from_secs_f64(SCRAPE_SECS_MAX);
    std::thread::scope(|s| {
        // At the top level, where the agent spends its time while scraped.
        let prof = (n >= *LEVELS.last().unwrap_or(&0))
            .then(|| s.spawn(|| super::profile::perf_pid(a.pid, dir, 3)));
        let hs: Vec<_> = (0..SCRAPERS)
            .map(|_| {
                s.spawn(move || {
                    let mut v = Vec::new();
                    for _ in 0..SCRAPES_EACH {
                        if Instant::now() > scrape_end {
                            break;
                        }
                        v.push(load::http_get_ms(addr, "/metrics"));
                    }
                    v
                })
            })
            .collect();
        if let Some(p) = prof
            && agent_profile.is_none()
        {
            agent_profile = Some(AgentProfile {
                during: format!("scraped by {SCRAPERS} /metrics clients"),
                perf: p
                    .join()
                    .unwrap_or_else(|_| Err("the perf thread panicked".into())),
            });
        }
        for h in hs {
            for r in h.join().unwrap_or_default() {
                match r {
                    Some(ms) => lat.push(ms),
                    None => scrape_failed += 1,
                }
            }
        }
    });
    let metrics_p50 = stats::quantile(&mut lat, 0.5);
    let metrics_p99 = stats::quantile(&mut lat, 0.99);

    let mut ctl: Vec<f64> = Vec::new();
    let mut ctl_failed = 0usize;
    match a.control_socket() {
        Some(sock) => {
            for _ in 0..CONTROL_CALLS {
                match agent::control_ms(&sock, r#"{"cmd":"locate","name":"mtp1"}"#) {
                    Some(ms) => ctl.push(ms),
                    None => ctl_failed += 1,
                }
            }
        }
        None => ctl_failed = CONTROL_CALLS,
    }
    let control_p50 = stats::quantile(&mut ctl, 0.5);
    let control_p99 = stats::quantile(&mut ctl, 0.99);

    let rss = stats::rss_bytes(a.pid);
    let maps = bpf::maps(&a.pin_dir);
    let memlock: u64 = maps.iter().map(|m| m.memlock).sum();
    let mut entries = BTreeMap::new();
    for m in maps.iter().filter(|m| bpf::countable(&m.kind)) {
        entries.insert(
            m.name.clone(),
            MapEntries {
                kind: m.kind.clone(),
                max_entries: m.max_entries,
                count: match bpf::entries(m.id, &m.kind) {
                    Ok(c) => Count::Entries(c),
                    Err(e) => Count::Error(e),
                },
            },
        );
    }
    // What mtlb itself counts as open.
    let active: Option<f64> = load::http_get(addr, "/metrics")
        .map(|m| {
            m.lines()
                .filter(|l| l.starts_with("mtlb_backend_active_connections{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        })
        .filter(|x: &f64| x.is_finite());
    let finite = |x: f64| x.is_finite().then_some(x);
    const MIB: f64 = 1024.0 * 1024.0;
    HeldLevel {
        level: level as u64,
        held: n as u64,
        opened,
        mtlb_active_connections: active,
        agent_idle_cpu_pct: idle_pct,
        metrics_ms_p50: finite(metrics_p50),
        metrics_ms_p99: finite(metrics_p99),
        control_ms_p50: finite(control_p50),
        control_ms_p99: finite(control_p99),
        agent_rss_mib: rss.map(|b| b as f64 / MIB),
        maps_memlock_mib: memlock as f64 / MIB,
        map_entries: entries,
        agent_profile,
        samples: Some(HeldSamples {
            metrics_samples: lat.len(),
            metrics_failed: scrape_failed,
            control_samples: ctl.len(),
            control_failed: ctl_failed,
        }),
    }
}

/// A `xtask bench-hold` process holding some of the connections (one
/// process may have only RLIMIT_NOFILE descriptors).
struct Holder {
    child: Child,
}

impl Holder {
    /// Starts one and waits until it has opened its connections: (holder,
    /// held, failed).
    fn open(target: SocketAddr, count: usize) -> anyhow::Result<(Holder, u64, u64)> {
        let secs = count as f64 / OPEN_PER_SEC * 2.0 + 30.0;
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "bench-hold",
                "--target",
                &target.to_string(),
                "--count",
                &count.to_string(),
                "--per-sec",
                &OPEN_PER_SEC.to_string(),
                "--secs",
                &secs.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        if w.first() != Some(&"held") {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("holder failed: {line:?}");
        }
        Ok((Holder { child }, num(1), num(3)))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Closing stdin tells it to close its connections and exit.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connections one holder process takes: under its descriptor limit.
fn per_process() -> usize {
    (super::nofile_limit() as usize)
        .saturating_sub(500)
        .clamp(1000, 200_000)
}

/// Levels 0, 1k, 10k, 100k, 1M (connections added on top of the previous
/// level's). Returns one JSON object per level.
pub fn run(a: &agent::Agent, dir: &Path) -> anyhow::Result<Vec<HeldLevel>> {
    let target: SocketAddr = "127.0.0.1:443".parse().expect("address");
    let mut holders: Vec<Holder> = Vec::new();
    let mut held = 0usize;
    let mut out = vec![measure_level(a, 0, 0, None, dir)];
    for &n in LEVELS {
        let more = n - held;
        eprintln!("bench: held: opening {more} connections (to {n})");
        let t0 = Instant::now();
        let (mut added, mut failed) = (0u64, 0u64);
        let mut left = more;
        while left > 0 {
            let chunk = left.min(per_process());
            let (h, ok, bad) = Holder::open(target, chunk)?;
            holders.push(h);
            added += ok;
            failed += bad;
            left -= chunk;
            if ok < chunk as u64 {
                break;
            }
        }
        held += added as usize;
        let secs = t0.elapsed().as_secs_f64();
        let opened = Opened {
            added,
            failed,
            secs,
        };
        if held < n {
            eprintln!("bench: held: only {held} of {n} connections open ({failed} failed)");
        }
        out.push(measure_level(a, n, held, Some(opened), dir));
        if held < n {
            break;
        }
    }
    eprintln!("bench: held: closing");
    drop(holders);
    Ok(out)
}
