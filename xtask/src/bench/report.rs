//! BENCHMARKS.md and target/bench.json from one run's raw numbers.
//!
//! Every figure in the Markdown is derived here from the raw rows, which
//! the JSON keeps as measured (plus the derived summary and the targets).

use super::stats::{Summary, summary};
use serde_json::{Value, json};
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

/// Why a target was missed, for a human to fill in (key: the target's key
/// in the Targets table). An empty or missing reason is printed as "—".
const REASONS: &[(&str, &str)] = &[
    (
        "rate_ratio",
        "the rate is bound by each connection's latency (3 closed-loop clients): mtlb adds about 5 µs to a ~33 µs loopback connect and ~10 µs of machine CPU per connection, of which the perf profile attributes ≈4 µs to BPF machinery on the handshake and close path (8 sock_ops callbacks on the replica's sockets, the sk_lookup dispatch, the socket-storage clone of the replica tag into every accepted socket and its free at close, the SYN-ACK header-option callback that spots SYN cookies); per-connection map inserts and deletes (PENDING, LIVE) are gone already. Not reached on this loopback bench, where a whole connection costs ~75 µs of CPU; remote clients and real MTProxy work make the share smaller",
    ),
    (
        "bulk_ratio",
        "nothing of mtlb runs per segment (a few dozen program runs per pair of 1.5 s streams); the per-round ratios of two loopback streams on a shared 2-vCPU VM spread far wider than the gap (see the IQR), so this is noise, not a cost",
    ),
    (
        "rerun",
        "follows from the spread of the per-round ratios on this 2-vCPU VM (IQR wider than ±0.03); more rounds narrow it at a minute each",
    ),
    (
        "bpf_per_conn",
        "bpf_stats reads the paravirtual clock twice per run (8 sock_ops runs and 1 sk_lookup run per connection); perf samples put the programs' own code at about 1.1 µs per connection. The 8 sock_ops runs are callbacks the kernel makes for every socket of the replicas' cgroup (request, window and ECN init, SYN-ACK header option, established, three state changes); 5 of them do work, the others return at once but still pay the dispatch",
    ),
    ("bpf_vs_haproxy", ""),
    (
        "sk_lookup_2",
        "one run reads SETTINGS, RUNTIME, and per slot BACKENDS, LISTENERS and CONNS (whose cache line the other CPU's accounting writes), calls the sockmap lookup, bpf_sk_assign and release, and writes the per-CPU LAST choice; perf puts it at ~340 ns per run here, bpf_stats adds its clock reads. Levers not taken yet: an eligibility bitmask the agent writes, so only eligible slots are read, and the weight beside the counts in one line",
    ),
    (
        "sk_lookup_64",
        "the pick is a linear scan reading three arrays per slot; at 64 slots that dominates. Levers not taken yet: a bitmask of eligible slots, power-of-two choices past some N",
    ),
    ("idle_cpu_100k", ""),
    (
        "metrics_p99_100k",
        "p50 stays under 1 ms at 100k, but a byte-counter reading (one sock_diag message per connection, ~100k messages) runs on the agent's byte thread about once a second while scrapers keep asking, and the scrapes that ask for a new one wait up to 20 ms for it, on 2 vCPUs shared with the dump itself and the scrapers; at 10k p99 is 23 ms. Levers: run that thread at idle priority, make readings rarer at large counts (the counters would lag more)",
    ),
    ("control_p99_100k", ""),
    ("rss_100k", ""),
    ("held_100k", ""),
    ("failover_mtlb", ""),
];

/// Every target of issue #11, in table order: listed even when its phase
/// did not run.
const TARGETS: &[(&str, &str)] = &[
    (
        "rate_ratio",
        "mtlb connection rate ≥ 0.98 × direct (median of paired ratios)",
    ),
    ("bulk_ratio", "mtlb bulk throughput ≥ 0.99 × direct"),
    ("rerun", "a rerun agrees within ±0.03"),
    (
        "bpf_per_conn",
        "BPF time of all mtlb programs per connection ≤ 1.0 µs (2 replicas)",
    ),
    (
        "bpf_vs_haproxy",
        "mtlb BPF time ≤ 1/60 of HAProxy's process CPU per connection",
    ),
    (
        "sk_lookup_2",
        "sk_lookup ≤ 100 ns per run at 2 replicas (under the bench's clients)",
    ),
    (
        "sk_lookup_64",
        "sk_lookup ≤ 150 ns per run at 64 replicas (under the bench's clients)",
    ),
    ("held_100k", "100k connections held open through mtlb"),
    (
        "idle_cpu_100k",
        "agent idle CPU ≤ 1 % of a core at 100k held",
    ),
    (
        "metrics_p99_100k",
        "/metrics p99 ≤ 50 ms at 100k held (4 concurrent scrapers)",
    ),
    (
        "control_p99_100k",
        "control command p99 ≤ 20 ms at 100k held",
    ),
    ("rss_100k", "agent RSS ≤ 64 MiB at 100k held"),
    (
        "failover_mtlb",
        "no failed request on failover through mtlb",
    ),
];

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn fmt_s(s: &Summary, d: usize) -> String {
    if s.n == 0 {
        return "—".into();
    }
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = d)
}

fn fmt_r(s: &Summary) -> String {
    if s.n == 0 {
        return "—".into();
    }
    format!(
        "**{:.3}** [IQR {:.3}–{:.3}; {:.3}–{:.3}]",
        s.median, s.q1, s.q3, s.min, s.max
    )
}

fn bpf_ns(row: &Value) -> f64 {
    row["bpf"]
        .as_object()
        .map(|o| o.values().map(|p| f(&p["ns"])).sum())
        .unwrap_or(0.0)
}

/// The derived numbers of the rounds.
struct Rounds {
    modes: Vec<String>,
    /// mode -> metric -> per-round values (round order)
    by_mode: BTreeMap<String, BTreeMap<&'static str, Vec<f64>>>,
    /// mode -> metric -> per-round ratio to direct
    ratios: BTreeMap<String, BTreeMap<&'static str, Vec<f64>>>,
    /// per-round mtlb BPF ns per conn / HAProxy process ns per conn
    bpf_vs_haproxy: Vec<f64>,
    /// per-round machine CPU per conn of IPVS minus direct's (µs)
    ipvs_kernel_us: Vec<f64>,
    /// program -> (ns/run per round, runs/conn per round)
    progs: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
    failed: BTreeMap<String, u64>,
    repeated: BTreeMap<String, u64>,
}

fn rounds(raw: &Value) -> Option<Rounds> {
    let rows = raw["rounds"].as_array()?;
    let mut r = Rounds {
        modes: Vec::new(),
        by_mode: BTreeMap::new(),
        ratios: BTreeMap::new(),
        bpf_vs_haproxy: Vec::new(),
        ipvs_kernel_us: Vec::new(),
        progs: BTreeMap::new(),
        failed: BTreeMap::new(),
        repeated: BTreeMap::new(),
    };
    let n_rounds = rows.iter().filter_map(|x| x["round"].as_u64()).max()? + 1;
    for m in super::MODES {
        if rows.iter().any(|x| x["mode"] == *m) {
            r.modes.push(m.to_string());
        }
    }
    for round in 0..n_rounds {
        let get = |mode: &str| {
            rows.iter()
                .find(|x| x["round"].as_u64() == Some(round) && x["mode"] == mode)
        };
        for m in &r.modes {
            let Some(x) = get(m) else { continue };
            let conns = f(&x["conns"]).max(1.0);
            let e = r.by_mode.entry(m.clone()).or_default();
            e.entry("rate").or_default().push(f(&x["rate"]));
            e.entry("bulk").or_default().push(f(&x["bulk_mbs"]));
            e.entry("p50").or_default().push(f(&x["connect_p50_us"]));
            e.entry("p99").or_default().push(f(&x["connect_p99_us"]));
            // Busy CPU of the machine less what processes outside the
            // bench used.
            e.entry("machine_us").or_default().push(
                (f(&x["machine_cpu_s"]) - x["foreign_cpu_s"].as_f64().unwrap_or(0.0)) / conns * 1e6,
            );
            if !x["foreign_cpu_s"].is_null() {
                // % of the whole machine (all cores) during the rate run.
                e.entry("foreign_pct").or_default().push(
                    f(&x["foreign_cpu_s"]) / f(&x["secs"]) / f(&raw["meta"]["cpus"]).max(1.0)
                        * 100.0,
                );
            }
            if !x["balancer_cpu_s"].is_null() {
                e.entry("proc_us")
                    .or_default()
                    .push(f(&x["balancer_cpu_s"]) / conns * 1e6);
            }
            if !x["agent_cpu_s"].is_null() {
                e.entry("agent_us")
                    .or_default()
                    .push(f(&x["agent_cpu_s"]) / conns * 1e6);
            }
            if m == "mtlb" {
                e.entry("bpf_us").or_default().push(bpf_ns(x) / conns / 1e3);
                if let Some(o) = x["bpf"].as_object() {
                    for (p, d) in o {
                        let runs = f(&d["runs"]);
                        let pe = r.progs.entry(p.clone()).or_default();
                        pe.0.push(if runs > 0.0 {
                            f(&d["ns"]) / runs
                        } else {
                            f64::NAN
                        });
                        pe.1.push(runs / conns);
                    }
                }
            }
            *r.failed.entry(m.clone()).or_default() += x["failed"].as_u64().unwrap_or(0);
            *r.repeated.entry(m.clone()).or_default() +=
                x["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
        }
        if let Some(d) = get("direct") {
            for m in &r.modes {
                let Some(x) = get(m) else { continue };
                let e = r.ratios.entry(m.clone()).or_default();
                e.entry("rate")
                    .or_default()
                    .push(f(&x["rate"]) / f(&d["rate"]));
                e.entry("bulk")
                    .or_default()
                    .push(f(&x["bulk_mbs"]) / f(&d["bulk_mbs"]));
            }
            if let Some(i) = get("ipvs") {
                let per = |x: &Value| {
                    (f(&x["machine_cpu_s"]) - x["foreign_cpu_s"].as_f64().unwrap_or(0.0))
                        / f(&x["conns"]).max(1.0)
                        * 1e6
                };
                r.ipvs_kernel_us.push(per(i) - per(d));
            }
        }
        if let (Some(m), Some(h)) = (get("mtlb"), get("haproxy")) {
            let mb = bpf_ns(m) / f(&m["conns"]).max(1.0);
            let hp = f(&h["balancer_cpu_s"]) * 1e9 / f(&h["conns"]).max(1.0);
            r.bpf_vs_haproxy.push(mb / hp);
        }
    }
    Some(r)
}

/// Steering cost per replica count: program -> (ns/run, runs/conn)
/// medians over the repetitions, and BPF ns per connection.
/// Per program: (ns per run, runs per connection).
type ProgSummaries = BTreeMap<String, (Summary, Summary)>;

fn steering(raw: &Value) -> Vec<(u64, ProgSummaries, Summary)> {
    let mut out = Vec::new();
    for s in raw["steering"].as_array().into_iter().flatten() {
        let n = s["replicas"].as_u64().unwrap_or(0);
        let mut per: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        let mut total = Vec::new();
        for rep in s["reps"].as_array().into_iter().flatten() {
            let conns = f(&rep["conns"]).max(1.0);
            total.push(bpf_ns(rep) / conns);
            for (p, d) in rep["bpf"].as_object().into_iter().flatten() {
                let runs = f(&d["runs"]);
                let e = per.entry(p.clone()).or_default();
                e.0.push(if runs > 0.0 {
                    f(&d["ns"]) / runs
                } else {
                    f64::NAN
                });
                e.1.push(runs / conns);
            }
        }
        out.push((
            n,
            per.into_iter()
                .map(|(k, (a, b))| (k, (summary(&a), summary(&b))))
                .collect(),
            summary(&total),
        ));
    }
    out
}

struct Target {
    key: &'static str,
    what: String,
    value: String,
    /// None: not run / not judged.
    met: Option<bool>,
}

fn verdict(t: &Target) -> &'static str {
    match t.met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "not judged",
    }
}

fn mode_label(m: &str) -> &str {
    match m {
        "direct" => "direct (2 backends, round-robin)",
        "mtlb" => "mtlb",
        "haproxy" => "HAProxy",
        "nginx" => "nginx stream",
        "ipvs" => "IPVS",
        _ => m,
    }
}

/// The fields that make two runs comparable.
const SAME_METHOD: &[&str] = &[
    "rounds",
    "rate_secs",
    "bulk_secs",
    "client_threads",
    "bulk_streams",
    "replica_cgroup",
    "mtlb_sha256",
];

/// Whether two runs' `key` settings are the same method: the replicas'
/// cgroup is named after the bench's pid, so only whether one was given
/// counts.
fn same_setting(key: &str, a: &Value, b: &Value) -> bool {
    if key == "replica_cgroup" {
        let given = |v: &Value| !(v.is_null() || v == &Value::Bool(false) || v == "");
        return given(a) == given(b);
    }
    a == b
}

pub fn write(root: &Path, raw: &Value, full: bool) -> anyhow::Result<()> {
    let mut all = raw.clone();
    // The previous full run's mtlb/direct ratios, if it was made the same
    // way: kept in the JSON, so that `--report-only` renders the same.
    if all["previous"].is_null() {
        let previous: Option<Value> = std::fs::read_to_string(root.join("target/bench.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        if let Some(p) = previous
            && SAME_METHOD
                .iter()
                .all(|k| same_setting(k, &p["meta"][k], &raw["meta"][k]))
            && let (Some(r), Some(b)) = (
                p["summary"]["ratios"]["mtlb"]["rate"]["median"].as_f64(),
                p["summary"]["ratios"]["mtlb"]["bulk"]["median"].as_f64(),
            )
        {
            all["previous"] = json!({"rate": r, "bulk": b, "date": p["meta"]["date"]});
        }
    }
    let (md, summary_json, targets_json) = render(&all);
    all["summary"] = summary_json;
    all["targets"] = targets_json;
    let name = if full {
        "bench.json"
    } else {
        "bench-partial.json"
    };
    let json_path = root.join("target").join(name);
    std::fs::create_dir_all(root.join("target"))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&all)?)?;
    println!("{md}");
    if full {
        std::fs::write(root.join("BENCHMARKS.md"), &md)?;
        eprintln!("bench: wrote BENCHMARKS.md and {}", json_path.display());
    } else {
        std::fs::write(root.join("target/BENCHMARKS-partial.md"), &md)?;
        eprintln!(
            "bench: partial run (not every phase): wrote target/BENCHMARKS-partial.md and {}",
            json_path.display()
        );
    }
    Ok(())
}

/// `cargo xtask bench --report-only`: BENCHMARKS.md again from
/// target/bench.json (e.g. after filling in REASONS).
pub fn rewrite(root: &Path) -> anyhow::Result<()> {
    let path = root.join("target/bench.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut raw: Value = serde_json::from_str(&text)?;
    if let Some(o) = raw.as_object_mut() {
        o.remove("summary");
        o.remove("targets");
        // Not compared with itself.
        o.entry("previous").or_insert(Value::Bool(false));
    }
    write(root, &raw, true)
}

fn render(raw: &Value) -> (String, Value, Value) {
    let meta = &raw["meta"];
    let mut md = String::new();
    let mut sj = json!({});
    let mut targets: Vec<Target> = Vec::new();
    let not_run = |m: &str| raw["not_run"][m].as_str().map(str::to_string);

    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Command: `cargo xtask bench` (as root; {:.0} min on this machine). Machine: {} vCPU ({}), {:.0} GiB RAM, kernel {}. mtlb at commit {}{}. {}, {}, {}, {}. Raw numbers: `target/bench.json`.\n",
        f(&meta["secs"]) / 60.0,
        meta["cpus"],
        meta["cpu_model"].as_str().unwrap_or("?"),
        f(&meta["mem_gib"]),
        meta["kernel"].as_str().unwrap_or("?"),
        meta["commit"].as_str().unwrap_or("?"),
        if meta["dirty"].as_bool() == Some(true) {
            " (with uncommitted changes)"
        } else {
            ""
        },
        meta["haproxy"].as_str().unwrap_or(""),
        meta["nginx"].as_str().unwrap_or(""),
        meta["bpftool"].as_str().unwrap_or(""),
        meta["perf"].as_str().unwrap_or(""),
    );
    let cg = match meta["replica_cgroup"].as_str() {
        Some(c) => format!(
            "the backends run in the cgroup `{c}` (relative to the cgroup2 mount), given to mtlb as `replica_cgroup`, so mtlb's sock_ops runs only on their sockets"
        ),
        None => "the backends run in a cgroup of their own, but mtlb was not given `replica_cgroup` (MTLB_BENCH_REPLICA_CGROUP=0): its sock_ops is on the cgroup root and also runs on the clients' sockets".into(),
    };
    let _ = writeln!(
        md,
        "## Method\n\n\
         Everything runs in a network namespace the bench creates, on loopback only, and shares the machine's 2 cores: clients (threads of the xtask), backends, balancers. \
         The backends are 2 separate processes (`xtask bench-backend`, one epoll thread each, on 127.0.0.1:10000 and :10001); {cg}. Every balancer uses these same two backends. \
         \"direct\" sends each client's successive connections to backend 1 and 2 in turn (round-robin), so it uses the same two backend processes as the balancers.\n\n\
         **Rounds**: {} interleaved rounds; each round runs every mode once, the order rotated by one each round. Per mode: {} client threads of connect + 1 byte request + 1 byte reply + close for {} s (connection rate), {} sequential connects (latency), {} streams at once for {} s (bulk; direct sends one to each backend, the balancers spread them). \
         The mtlb agent is started (2 replicas, `keep_pins = false`) before the mtlb mode and stopped after it, so direct and the other balancers run without any mtlb program attached. \
         Ratios are **paired**: each round's figure divided by the same round's direct figure; the table gives the median of these per-round ratios, [IQR; min–max]. \
         CPU per connection: HAProxy and nginx from their processes' utime+stime (/proc/PID/stat, nginx master + workers); mtlb from BPF run time (kernel.bpf_stats_enabled=1: run_time_ns and run_cnt of mtlb's programs, found through the links the agent pinned) plus, separately, the agent process; IPVS has no process: its kernel time is estimated as whole-machine busy CPU per connection (/proc/stat) minus direct's in the same round. \
         bpf_stats itself adds two clock reads per program run, included in the BPF figures; the bench holds a BPF_ENABLE_STATS descriptor for the whole run, so another process switching the sysctl off does not stop the counting. \
         Without `replica_cgroup`, mtlb's sock_ops runs for every TCP socket of the host (it is attached to the cgroup root), so whatever else runs on the host adds to its runs per connection. \
         The machine is shared: the CPU that userspace processes outside the bench's namespace used during each rate run is recorded; a rate run during which they used more than {:.0} % of the machine is run again (3 runs at most, the quietest kept), and the table's last rows say how much they still used and how many runs were repeated. A rerun can only agree when that stays near zero.\n",
        meta["rounds"],
        meta["client_threads"],
        meta["rate_secs"],
        super::LATENCY_N,
        meta["bulk_streams"],
        meta["bulk_secs"],
        super::FOREIGN_MAX * 100.0,
    );

    if let Some(o) = meta["other_mtlb_programs_at_start"]
        .as_array()
        .filter(|o| !o.is_empty())
    {
        let _ = writeln!(
            md,
            "**Warning**: mtlb programs of another agent were attached on this host when the bench started ({}); they run on every socket of the bench, in every mode.\n",
            o.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    // --- Rounds.
    if let Some(r) = rounds(raw) {
        let _ = writeln!(
            md,
            "## Connection rate, bulk, latency, CPU ({} rounds; median (min–max) of the rounds)\n",
            meta["rounds"]
        );
        let _ = write!(md, "| metric |");
        for m in &r.modes {
            let _ = write!(md, " {} |", mode_label(m));
        }
        let _ = write!(md, "\n|---|");
        for _ in &r.modes {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        let rows: &[(&str, &str, usize)] = &[
            ("rate", "new connections/s (request + reply each)", 0),
            ("bulk", "bulk throughput, all streams (MB/s)", 0),
            ("p50", "connect latency p50 (µs)", 1),
            ("p99", "connect latency p99 (µs)", 1),
            (
                "machine_us",
                "whole machine CPU per connection, less processes outside the bench (µs)",
                1,
            ),
            ("proc_us", "balancer process CPU per connection (µs)", 2),
            ("bpf_us", "mtlb BPF time per connection (µs)", 3),
            ("agent_us", "mtlb agent process CPU per connection (µs)", 3),
            (
                "foreign_pct",
                "CPU of processes outside the bench (% of the machine)",
                1,
            ),
        ];
        let mut sm = json!({});
        for (key, label, d) in rows {
            if !r.by_mode.values().any(|m| m.contains_key(key)) {
                continue;
            }
            let _ = write!(md, "| {label} |");
            for m in &r.modes {
                let s = summary(r.by_mode[m].get(key).map_or(&[][..], |v| v));
                sm[m.as_str()][*key] = json!(s);
                let _ = write!(md, " {} |", fmt_s(&s, *d));
            }
            md.push('\n');
        }
        let _ = write!(md, "| rate runs repeated for outside load (all rounds) |");
        for m in &r.modes {
            let _ = write!(md, " {} |", r.repeated.get(m).copied().unwrap_or(0));
        }
        md.push('\n');
        let _ = write!(md, "| failed requests (all rounds) |");
        for m in &r.modes {
            let _ = write!(md, " {} |", r.failed.get(m).copied().unwrap_or(0));
        }
        md.push('\n');
        if let Some(e) = not_run("ipvs") {
            let _ = writeln!(md, "\nIPVS: not run: {e}.");
        }
        for m in ["haproxy", "nginx"] {
            if let Some(e) = not_run(m) {
                let _ = writeln!(md, "\n{}: not run: {e}.", mode_label(m));
            }
        }

        let _ = writeln!(
            md,
            "\n### Paired ratios to direct (median of per-round ratios [IQR; min–max])\n\n| mode | connection rate | bulk throughput |\n|---|---|---|"
        );
        let mut rj = json!({});
        for m in r.modes.iter().filter(|m| *m != "direct") {
            let rate = summary(&r.ratios[m]["rate"]);
            let bulk = summary(&r.ratios[m]["bulk"]);
            rj[m.as_str()] = json!({"rate": rate, "bulk": bulk, "rate_rounds": r.ratios[m]["rate"], "bulk_rounds": r.ratios[m]["bulk"]});
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                mode_label(m),
                fmt_r(&rate),
                fmt_r(&bulk)
            );
        }
        if let Some(e) = not_run("ipvs") {
            let _ = writeln!(md, "| IPVS | not run | not run |\n\n(IPVS: {e}.)");
        }

        // CPU per connection of each anchor.
        let _ = writeln!(
            md,
            "\n### CPU per connection of each balancer\n\n| balancer | CPU per connection | how |\n|---|---|---|"
        );
        let med = |m: &str, k: &str| r.by_mode.get(m).and_then(|x| x.get(k)).map(|v| summary(v));
        if let Some(b) = med("mtlb", "bpf_us") {
            let a = med("mtlb", "agent_us");
            let _ = writeln!(
                md,
                "| mtlb | {} µs BPF; agent process {} µs | bpf_stats run time of all mtlb programs / connections; agent utime+stime / connections |",
                fmt_s(&b, 3),
                a.map_or("—".into(), |a| fmt_s(&a, 3))
            );
        }
        for (m, how) in [
            ("haproxy", "process utime+stime / connections"),
            ("nginx", "master + workers utime+stime / connections"),
        ] {
            match med(m, "proc_us") {
                Some(s) => {
                    let _ = writeln!(md, "| {} | {} µs | {how} |", mode_label(m), fmt_s(&s, 2));
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {} | not run: {} | |",
                        mode_label(m),
                        not_run(m).unwrap_or_default()
                    );
                }
            }
        }
        if r.ipvs_kernel_us.is_empty() {
            let _ = writeln!(
                md,
                "| IPVS | not run: {} | (would be: whole-machine CPU per connection minus direct's, same round) |",
                not_run("ipvs").unwrap_or_default()
            );
        } else {
            let _ = writeln!(
                md,
                "| IPVS | {} µs | whole-machine busy CPU per connection minus direct's, same round |",
                fmt_s(&summary(&r.ipvs_kernel_us), 2)
            );
        }
        let bvh = summary(&r.bpf_vs_haproxy);
        if bvh.n > 0 {
            let _ = writeln!(
                md,
                "\nmtlb BPF time / HAProxy process CPU, per connection (paired by round): {} (target ≤ 1/60 = 0.0167).",
                fmt_r(&bvh)
            );
        }

        // Per-program breakdown at 2 replicas.
        let _ = writeln!(
            md,
            "\n### mtlb's programs at 2 replicas, during the mtlb rounds (median (min–max) of the rounds)\n\n| program | ns per run | runs per connection | ns per connection |\n|---|---|---|---|"
        );
        let mut pj = json!({});
        for (p, (ns, runs)) in &r.progs {
            let (a, b) = (summary(ns), summary(runs));
            let per: Vec<f64> = ns
                .iter()
                .zip(runs)
                .map(|(x, y)| if x.is_finite() { x * y } else { 0.0 })
                .collect();
            let c = summary(&per);
            pj[p.as_str()] = json!({"ns_per_run": a, "runs_per_conn": b, "ns_per_conn": c});
            let _ = writeln!(
                md,
                "| {p} | {} | {} | {} |",
                fmt_s(&a, 0),
                fmt_s(&b, 2),
                fmt_s(&c, 0)
            );
        }
        // BPF runs during the bulk streams.
        let bulk_runs: Vec<f64> = raw["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["mode"] == "mtlb")
            .map(|x| {
                x["bulk_bpf"]
                    .as_object()
                    .map(|o| o.values().map(|p| f(&p["runs"])).sum())
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let br = summary(&bulk_runs);
        if br.n > 0 {
            let _ = writeln!(
                md,
                "\nRuns of mtlb's programs during the {} bulk streams of an mtlb round (all programs): {} (so nothing runs per segment when this is a few dozen).",
                meta["bulk_streams"],
                fmt_s(&br, 0)
            );
        }
        sj["bulk_bpf_runs"] = json!(br);
        sj["rounds"] = sm;
        sj["ratios"] = rj.clone();
        sj["programs_2_replicas"] = pj;
        sj["bpf_vs_haproxy"] = json!(bvh);
        sj["ipvs_kernel_us"] = json!(summary(&r.ipvs_kernel_us));

        // Targets from the rounds.
        let rate = summary(r.ratios.get("mtlb").map_or(&[][..], |x| &x["rate"]));
        let bulk = summary(r.ratios.get("mtlb").map_or(&[][..], |x| &x["bulk"]));
        // A target inside the interquartile range makes the verdict a coin
        // toss; a spread wider than the ±0.03 a rerun should agree within
        // is worth saying too.
        let wide = |s: &Summary, target: f64| {
            if s.q1 <= target && target <= s.q3 {
                "; the target lies inside the IQR: verdict unreliable"
            } else if (s.q3 - s.q1) / 2.0 > 0.03 {
                "; spread wider than ±0.03"
            } else {
                ""
            }
        };
        targets.push(Target {
            key: "rate_ratio",
            what: "mtlb connection rate ≥ 0.98 × direct (median of paired ratios)".into(),
            value: format!(
                "{:.3} (IQR {:.3}–{:.3}{})",
                rate.median,
                rate.q1,
                rate.q3,
                wide(&rate, 0.98)
            ),
            met: (rate.n > 0).then_some(rate.median >= 0.98),
        });
        targets.push(Target {
            key: "bulk_ratio",
            what: "mtlb bulk throughput ≥ 0.99 × direct".into(),
            value: format!(
                "{:.3} (IQR {:.3}–{:.3}{})",
                bulk.median,
                bulk.q1,
                bulk.q3,
                wide(&bulk, 0.99)
            ),
            met: (bulk.n > 0).then_some(bulk.median >= 0.99),
        });
        // Rerun agreement: against the previous run's bench.json, if it
        // was made the same way (see `write`).
        let prev = raw["previous"]["rate"]
            .as_f64()
            .zip(raw["previous"]["bulk"].as_f64());
        targets.push(match prev {
            Some((pr, pb)) => {
                let (dr, db) = (rate.median - pr, bulk.median - pb);
                Target {
                    key: "rerun",
                    what: "a rerun agrees within ±0.03 (mtlb/direct ratios vs the previous target/bench.json)".into(),
                    value: format!("rate {dr:+.3}, bulk {db:+.3} (previous {pr:.3}, {pb:.3})"),
                    met: Some(dr.abs() <= 0.03 && db.abs() <= 0.03),
                }
            }
            None => Target {
                key: "rerun",
                what: "a rerun agrees within ±0.03".into(),
                value: "no previous target/bench.json made the same way (same settings and mtlb binary) to compare with".into(),
                met: None,
            },
        });
        let b = med("mtlb", "bpf_us").unwrap_or(summary(&[]));
        // Zero means the run counters did not move: not a measurement.
        let b_ok = b.n > 0 && b.median > 0.0;
        targets.push(Target {
            key: "bpf_per_conn",
            what: "BPF time of all mtlb programs per connection ≤ 1.0 µs (2 replicas)".into(),
            value: if b_ok {
                format!("{:.3} µs", b.median)
            } else {
                "not measured: run_time_ns did not advance".into()
            },
            met: b_ok.then_some(b.median <= 1.0),
        });
        targets.push(Target {
            key: "bpf_vs_haproxy",
            what: "mtlb BPF time ≤ 1/60 of HAProxy's process CPU per connection".into(),
            value: if bvh.n > 0 {
                format!("{:.4} (= 1/{:.0})", bvh.median, 1.0 / bvh.median)
            } else {
                "not run".into()
            },
            met: (bvh.n > 0).then_some(bvh.median <= 1.0 / 60.0),
        });
    }

    // --- Failover.
    if let Some(fo) = raw["failover"].as_array() {
        let _ = writeln!(
            md,
            "\n## Failover under load\n\nOne client thread paced at ~2000 requests/s for 3 s; the second backend process is SIGKILLed after 1 s (its listener and its connections go at once), and restarted before the next balancer's run (which waits for that balancer to see it again).\n\n| balancer | requests | failed |\n|---|---|---|"
        );
        for x in fo {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                mode_label(x["mode"].as_str().unwrap_or("?")),
                x["requests"],
                x["failed"]
            );
        }
        for m in ["haproxy", "nginx", "ipvs"] {
            if let Some(e) = not_run(m) {
                let _ = writeln!(md, "| {} | not run: {e} | |", mode_label(m));
            }
        }
        let mt = fo.iter().find(|x| x["mode"] == "mtlb");
        targets.push(Target {
            key: "failover_mtlb",
            what: "no failed request on failover through mtlb".into(),
            value: mt.map_or("not run".into(), |x| {
                format!("{} of {}", x["failed"], x["requests"])
            }),
            met: mt.map(|x| x["failed"].as_u64() == Some(0)),
        });
    }

    // --- Steering cost.
    let st = steering(raw);
    if !st.is_empty() {
        let _ = writeln!(
            md,
            "\n## Steering cost by number of replicas\n\nmtlb alone (agent with N replicas, N backend processes), the rate load ({} client threads) for {} s, {} times; median (min–max).\n\n| replicas | sk_lookup ns/run | sk_lookup runs/conn | sock_ops ns/run | sock_ops runs/conn | all BPF ns/conn |\n|---|---|---|---|---|---|",
            meta["client_threads"],
            meta["rate_secs"],
            super::STEERING_REPS
        );
        let mut stj = Vec::new();
        for (n, per, total) in &st {
            let g = |p: &str| per.get(p).copied();
            let sl = g("mtlb_steer");
            let so = g("mtlb_sockops");
            let c = |x: Option<(Summary, Summary)>, i: usize, d: usize| {
                x.map_or("—".into(), |x| fmt_s(if i == 0 { &x.0 } else { &x.1 }, d))
            };
            let _ = writeln!(
                md,
                "| {n} | {} | {} | {} | {} | {} |",
                c(sl, 0, 0),
                c(sl, 1, 2),
                c(so, 0, 0),
                c(so, 1, 2),
                fmt_s(total, 0)
            );
            stj.push(json!({"replicas": n, "programs": per.iter().map(|(k, (a, b))| (k.clone(), json!({"ns_per_run": a, "runs_per_conn": b}))).collect::<serde_json::Map<_,_>>(), "bpf_ns_per_conn": total}));
        }
        sj["steering"] = json!(stj);
        let sl = |n: u64| {
            st.iter()
                .find(|x| x.0 == n)
                .and_then(|x| x.1.get("mtlb_steer"))
                .map(|x| x.0.median)
        };
        for (n, lim, key) in [(2u64, 100.0, "sk_lookup_2"), (64, 150.0, "sk_lookup_64")] {
            let v = sl(n);
            targets.push(Target {
                key,
                what: format!(
                    "sk_lookup ≤ {lim:.0} ns per run at {n} replicas (under the bench's clients)"
                ),
                value: v.map_or("not run".into(), |v| format!("{v:.0} ns")),
                met: v.map(|v| v <= lim),
            });
        }
    }

    // --- Held connections.
    if let Some(h) = raw["held"].as_array() {
        let _ = writeln!(
            md,
            "\n## Held connections (mtlb, 2 replicas)\n\nConnections opened through mtlb from 127.0.0.2–127.0.0.9 (so the ephemeral ports suffice) at ≤ 5000/s, each confirmed by its backend, then held idle. At each level: the agent's CPU over 10 s of nothing happening (utime+stime of the mtlb process), `/metrics` latency with 4 concurrent scrapers × up to 50 GETs (no new GET after 20 s), 200 sequential `locate` requests on the control socket, the agent's VmRSS, the memlock of mtlb's maps (`bpftool map show`, the maps pinned in the agent's pin directory).\n\n| held | opened (failed, s) | mtlb counts | agent idle CPU (% of a core) | /metrics p50 / p99 (ms) | control p50 / p99 (ms) | agent RSS (MiB) | maps memlock (MiB) |\n|---|---|---|---|---|---|---|---|"
        );
        for l in h {
            let op = &l["opened"];
            let opened = if op.is_null() {
                "—".to_string()
            } else {
                format!(
                    "{} ({}, {:.0} s)",
                    op["added"],
                    op["failed"],
                    f(&op["secs"])
                )
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.2} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} | {:.2} |",
                l["held"],
                opened,
                f(&l["mtlb_active_connections"]),
                f(&l["agent_idle_cpu_pct"]),
                f(&l["metrics_ms_p50"]),
                f(&l["metrics_ms_p99"]),
                f(&l["control_ms_p50"]),
                f(&l["control_ms_p99"]),
                f(&l["agent_rss_bytes"]) / 1048576.0,
                f(&l["maps_memlock_bytes"]) / 1048576.0,
            );
        }
        // Map entries per held connection.
        let base = h.iter().find(|l| l["held"].as_u64() == Some(0));
        let names: Vec<String> = base
            .and_then(|b| b["map_entries"].as_object())
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(base) = base {
            let _ = write!(
                md,
                "\nMap entries per held connection ((entries at N − entries at 0) / N; `bpftool map dump` counts):\n\n| map (type, max entries) |"
            );
            let levels: Vec<&Value> = h.iter().filter(|l| l["held"].as_u64() != Some(0)).collect();
            for l in &levels {
                let _ = write!(md, " at {} |", l["held"]);
            }
            let _ = write!(md, "\n|---|");
            for _ in &levels {
                let _ = write!(md, "---|");
            }
            md.push('\n');
            for n in &names {
                let b = &base["map_entries"][n];
                let _ = write!(
                    md,
                    "| {n} ({}, {}) |",
                    b["kind"].as_str().unwrap_or("?"),
                    b["max_entries"]
                );
                for l in &levels {
                    let e = &l["map_entries"][n];
                    let held = f(&l["held"]);
                    if let (Some(a), Some(z)) = (e["entries"].as_u64(), b["entries"].as_u64()) {
                        let _ =
                            write!(md, " {:.3} ({} entries) |", (a as f64 - z as f64) / held, a);
                    } else {
                        let _ = write!(
                            md,
                            " cannot count: {} |",
                            e["error"].as_str().or(b["error"].as_str()).unwrap_or("?")
                        );
                    }
                }
                md.push('\n');
            }
            let _ = writeln!(
                md,
                "\nArray, per-CPU array and ring buffer maps are preallocated (their memlock does not grow with connections) and are not counted. A socket-storage map (sk_storage) cannot be walked from userspace (the kernel has no MAP_GET_NEXT_KEY for it, and `bpftool map dump` lists nothing), so its entries are not counted; it holds at most one value per socket and is freed with the socket. The sockmap's entries are its replica listeners. \"mtlb counts\" above is the sum of `mtlb_backend_active_connections` in /metrics."
            );
        }
        for l in h {
            let p = &l["agent_profile"]["perf"];
            if p.is_null() {
                continue;
            }
            if let Some(e) = p["error"].as_str() {
                let _ = writeln!(md, "\nAgent profile at {} held: {e}", l["held"]);
                continue;
            }
            let _ = writeln!(
                md,
                "\nThe agent at {} held, {} (`perf record -e cpu-clock -g -p <mtlb>` for {} s; agent idle CPU {:.1} %). Top symbols, including callees / self:\n\n| % incl. callees | symbol | | % self | symbol |\n|---|---|---|---|---|",
                l["held"],
                l["agent_profile"]["while"].as_str().unwrap_or(""),
                p["secs"],
                f(&l["agent_idle_cpu_pct"]),
            );
            let ch = p["children"].as_array().cloned().unwrap_or_default();
            let se = p["self"].as_array().cloned().unwrap_or_default();
            for i in 0..ch.len().max(se.len()).min(15) {
                let cell = |v: &[Value]| {
                    v.get(i).map_or((String::new(), String::new()), |r| {
                        (
                            format!("{:.1}", f(&r["pct"])),
                            format!(
                                "`{}`",
                                r["symbol"].as_str().unwrap_or("").replace('|', "\\|")
                            ),
                        )
                    })
                };
                let (a, b) = cell(&ch);
                let (c, d) = cell(&se);
                let _ = writeln!(md, "| {a} | {b} | | {c} | {d} |");
            }
        }
        let at = |n: u64| h.iter().find(|l| l["level"].as_u64() == Some(n));
        let top = at(100_000);
        let reached = top.map(|l| l["held"].as_u64() == Some(100_000));
        targets.push(Target {
            key: "held_100k",
            what: "100k connections held open through mtlb".into(),
            value: top.map_or("not reached".into(), |l| format!("{} held", l["held"])),
            met: Some(reached == Some(true)),
        });
        let judge =
            |key: &'static str, what: &str, field: &str, lim: f64, unit: &str, scale: f64| Target {
                key,
                what: what.to_string(),
                value: top.map_or("not reached".into(), |l| {
                    format!("{:.2} {unit}", f(&l[field]) / scale)
                }),
                met: top.map(|l| f(&l[field]) / scale <= lim),
            };
        targets.push(judge(
            "idle_cpu_100k",
            "agent idle CPU ≤ 1 % of a core at 100k held",
            "agent_idle_cpu_pct",
            1.0,
            "%",
            1.0,
        ));
        targets.push(judge(
            "metrics_p99_100k",
            "/metrics p99 ≤ 50 ms at 100k held (4 concurrent scrapers)",
            "metrics_ms_p99",
            50.0,
            "ms",
            1.0,
        ));
        targets.push(judge(
            "control_p99_100k",
            "control command p99 ≤ 20 ms at 100k held",
            "control_ms_p99",
            20.0,
            "ms",
            1.0,
        ));
        targets.push(judge(
            "rss_100k",
            "agent RSS ≤ 64 MiB at 100k held",
            "agent_rss_bytes",
            64.0,
            "MiB",
            1048576.0,
        ));
        sj["held"] = json!(h.iter().map(|l| json!({"held": l["held"], "idle_cpu_pct": l["agent_idle_cpu_pct"], "metrics_ms_p99": l["metrics_ms_p99"], "control_ms_p99": l["control_ms_p99"], "rss_bytes": l["agent_rss_bytes"], "maps_memlock_bytes": l["maps_memlock_bytes"]})).collect::<Vec<_>>());
    }

    // --- Profile.
    if let Some(p) = raw.get("profile").filter(|p| !p.is_null()) {
        let _ = writeln!(
            md,
            "\n## Where the time goes\n\nUnder the mtlb rate load (2 replicas):\n"
        );
        for (prog, r) in p["bpftool_prog_profile"].as_object().into_iter().flatten() {
            match r["ok"].as_str() {
                Some(t) => {
                    let _ = writeln!(md, "`bpftool prog profile` {prog}:\n\n```\n{t}\n```\n");
                }
                None => {
                    let _ = writeln!(
                        md,
                        "- `bpftool prog profile id <{prog}> duration 3 cycles instructions` did not work: {}.",
                        r["error"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        let perf = &p["perf"];
        if let Some(e) = perf["error"].as_str() {
            let _ = writeln!(md, "- perf: {e}");
        } else {
            let _ = writeln!(
                md,
                "\n`perf record -e cpu-clock -a -g` for {} s (software clock; whole machine: clients, backends, kernel), `perf report --no-children --sort sym`, top symbols:\n\n| % of samples | symbol |\n|---|---|",
                perf["secs"]
            );
            for row in perf["top"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    md,
                    "| {:.2} | `{}` |",
                    f(&row["pct"]),
                    row["symbol"].as_str().unwrap_or("").replace('|', "\\|")
                );
            }
            let _ = writeln!(
                md,
                "\nmtlb's JIT-ed programs (`bpf_prog_*` symbols): {:.2} % of all samples{}.",
                f(&perf["bpf_prog_pct_total"]),
                perf["bpf_prog_rows"]
                    .as_array()
                    .map(|a| {
                        let v: Vec<String> = a
                            .iter()
                            .map(|r| {
                                format!(
                                    "`{}` {:.2} %",
                                    r["symbol"].as_str().unwrap_or(""),
                                    f(&r["pct"])
                                )
                            })
                            .collect();
                        if v.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", v.join(", "))
                        }
                    })
                    .unwrap_or_default()
            );
        }
    }

    if let Some(perf) = raw["profile"]["perf"].as_object() {
        let cps = perf
            .get("conns_per_sec")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let cpus = f(&meta["cpus"]);
        let us = |pct: f64| pct / 100.0 * cpus / cps * 1e6;
        if cps > 0.0 {
            let m = perf
                .get("bpf_machinery_pct_total")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0);
            let p = perf
                .get("bpf_prog_pct_total")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0);
            let _ = writeln!(
                md,
                "\nPer connection ({cps:.0} connections/s during the recording, {cpus} CPUs): the programs' own code (`bpf_prog_*`) ≈ {:.2} µs; all BPF machinery (every symbol with bpf, htab, sock_map or sk_storage in its name, machine-wide: programs, cgroup and sk_lookup dispatch, helpers, map and socket-storage code; a rough upper figure) ≈ {:.2} µs. bpf_stats' run_time_ns covers the programs and the helpers they call, not the dispatch around them. Machinery rows: {}.",
                us(p),
                us(m),
                perf.get("bpf_machinery_rows")
                    .and_then(|v| v.as_array())
                    .map(|a| a
                        .iter()
                        .take(12)
                        .map(|r| format!(
                            "`{}` {:.2} %",
                            r["symbol"]
                                .as_str()
                                .unwrap_or("")
                                .trim_start_matches("[k] "),
                            f(&r["pct"])
                        ))
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        }
    }

    // The programs' own time from the samples, against bpf_stats'.
    if let Some(perf) = raw["profile"]["perf"].as_object() {
        let cps = perf
            .get("conns_per_sec")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let cpus = f(&meta["cpus"]);
        let rows = perf.get("bpf_prog_rows").and_then(|v| v.as_array());
        if cps > 0.0
            && let Some(rows) = rows
        {
            let _ = writeln!(
                md,
                "\n| program | from perf samples: ns per connection | ns per run | bpf_stats: ns per run (mtlb rounds) |\n|---|---|---|---|"
            );
            let mut pj = json!({});
            for name in ["mtlb_steer", "mtlb_sockops"] {
                let pct: f64 = rows
                    .iter()
                    .filter(|r| {
                        r["symbol"]
                            .as_str()
                            .is_some_and(|s| s.ends_with(&format!("_{name}")))
                    })
                    .map(|r| f(&r["pct"]))
                    .sum();
                let per_conn = pct / 100.0 * cpus / cps * 1e9;
                let runs = f(&sj["programs_2_replicas"][name]["runs_per_conn"]["median"]);
                let stats_ns = f(&sj["programs_2_replicas"][name]["ns_per_run"]["median"]);
                let per_run = per_conn / runs;
                pj[name] = json!({"perf_ns_per_conn": per_conn, "perf_ns_per_run": per_run, "bpf_stats_ns_per_run": stats_ns});
                let _ = writeln!(
                    md,
                    "| {name} | {per_conn:.0} | {per_run:.0} | {stats_ns:.0} |"
                );
            }
            let _ = writeln!(
                md,
                "\nThe difference is mostly bpf_stats' own cost: it reads the clock before and after every run, and on this VM the clock is the paravirtual one (`pvclock_clocksource_read_nowd` in the profile). The sample-based figure is statistical (cpu-clock at 4999 Hz for {} s) but has no such overhead.",
                perf.get("secs").cloned().unwrap_or_default()
            );
            sj["programs_from_perf"] = pj;
        }
    }

    // --- Phases that failed.
    if let Some(e) = raw["errors"].as_object().filter(|e| !e.is_empty()) {
        let _ = writeln!(md, "\n## Phases that failed\n");
        for (phase, err) in e {
            let _ = writeln!(
                md,
                "- {phase}: not run: {}",
                err.as_str().unwrap_or("?").replace('\n', " ")
            );
        }
    }

    // --- Targets.
    let reasons: BTreeMap<&str, &str> = REASONS.iter().copied().collect();
    let _ = writeln!(
        md,
        "\n## Targets (issue #11)\n\n| target | this run | verdict | reason (if missed) |\n|---|---|---|---|"
    );
    let mut ordered: Vec<Target> = Vec::new();
    for (key, what) in TARGETS {
        match targets.iter().position(|t| t.key == *key) {
            Some(i) => ordered.push(targets.remove(i)),
            None => ordered.push(Target {
                key,
                what: what.to_string(),
                value: "not run".into(),
                met: None,
            }),
        }
    }
    ordered.append(&mut targets);
    let targets = ordered;
    for t in &targets {
        let reason = reasons.get(t.key).copied().filter(|r| !r.is_empty());
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.what,
            t.value,
            verdict(t),
            if t.met == Some(false) {
                reason.unwrap_or("—")
            } else {
                ""
            }
        );
    }
    let tj = json!(
        targets
            .iter()
            .map(|t| json!({"key": t.key, "target": t.what, "value": t.value, "verdict": verdict(t), "reason": reasons.get(t.key).copied().unwrap_or("")}))
            .collect::<Vec<_>>()
    );
    (md, sj, tj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_a_replica_cgroup_of_other_names_are_the_same_method() {
        let a = json!("mtlb-bench-1/replicas");
        let b = json!("mtlb-bench-2/replicas");
        assert!(same_setting("replica_cgroup", &a, &b));
        assert!(!same_setting("replica_cgroup", &a, &Value::Null));
        assert!(same_setting("rounds", &json!(11), &json!(11)));
        assert!(!same_setting("mtlb_sha256", &json!("x"), &json!("y")));
    }
}
