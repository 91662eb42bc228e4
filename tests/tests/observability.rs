//! Observability: /metrics, /stats, /healthz, `mtlb status`, bpftool.
//! Each test runs in its own network namespace with its own agent.

use mtlb_tests::*;
use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";

fn m(text: &str, sample: &str) -> f64 {
    metric(text, sample).unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

#[test]
fn metrics_stats_and_healthz_follow_the_replicas() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let mut b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    // 7 and 3 held: 3/3, then mtp2 drained, then 4 more on mtp1.
    let mut held: Vec<_> = (0..6).map(|_| connect(BALANCED).unwrap()).collect();
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    held.extend((0..4).map(|_| connect(BALANCED).unwrap()));
    let (code, text) = http_get("/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        m(&text, "mtlb_backend_active_connections{backend=\"mtp1\"}"),
        7.0
    );
    assert_eq!(
        m(&text, "mtlb_backend_active_connections{backend=\"mtp2\"}"),
        3.0
    );
    assert_eq!(
        m(
            &text,
            "mtlb_backend_state{backend=\"mtp2\",state=\"DRAIN\"}"
        ),
        1.0
    );
    // Totals rise by exactly the connections opened.
    let t1 = m(&text, "mtlb_backend_connections_total{backend=\"mtp1\"}");
    let t2 = m(&text, "mtlb_backend_connections_total{backend=\"mtp2\"}");
    held.extend((0..5).map(|_| connect(BALANCED).unwrap()));
    let (_, text) = http_get("/metrics");
    assert_eq!(
        m(&text, "mtlb_backend_connections_total{backend=\"mtp1\"}"),
        t1 + 5.0
    );
    assert_eq!(
        m(&text, "mtlb_backend_connections_total{backend=\"mtp2\"}"),
        t2
    );
    assert!(m(&text, "mtlb_lookups_total") >= 15.0);

    // The original deployment's check: one line per replica, with state.
    let (code, html) = http_get("/stats");
    assert_eq!(code, 200);
    let lines: Vec<&str> = html
        .lines()
        .filter(|l| l.contains("mtp1") || l.contains("mtp2"))
        .collect();
    assert_eq!(lines.len(), 2, "{html}");
    assert!(
        lines[0].contains("mtp1") && lines[0].contains(">UP<"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("mtp2") && lines[1].contains(">DRAIN<"),
        "{}",
        lines[1]
    );
    for path in ["/stats;csv", "/stats?format=csv"] {
        let (code, csv) = http_get(path);
        assert_eq!(code, 200);
        assert!(csv.starts_with("name,address,state,active,total"), "{csv}");
        assert!(
            csv.lines()
                .any(|l| l.starts_with("mtp1,127.0.0.1:10000,UP,12,")),
            "{csv}"
        );
    }
    assert_eq!(http_get("/healthz").0, 200);

    // mtp2 stops: up 0, state DOWN.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "ready"]);
    assert!(ok, "{out}");
    b.stop_listening();
    agent.wait_state("mtp2", State::Down);
    let (_, text) = http_get("/metrics");
    assert_eq!(m(&text, "mtlb_backend_up{backend=\"mtp2\"}"), 0.0);
    assert_eq!(
        m(&text, "mtlb_backend_state{backend=\"mtp2\",state=\"DOWN\"}"),
        1.0
    );
    assert_eq!(m(&text, "mtlb_backend_up{backend=\"mtp1\"}"), 1.0);
    assert!(
        m(
            &text,
            "mtlb_backend_transitions_total{backend=\"mtp2\",to=\"DOWN\"}"
        ) >= 1.0
    );
    let (_, html) = http_get("/stats");
    assert!(
        html.lines()
            .any(|l| l.contains("mtp2") && l.contains(">DOWN<")),
        "{html}"
    );
    drop(held);
}

#[test]
fn healthz_is_503_without_replicas() {
    let ns = Netns::new();
    let agent = ns.agent(&[]);
    // Published: DOWN, no replica listens.
    agent.wait_state("mtp1", State::Down);
    assert_eq!(http_get("/healthz").0, 503);
}

#[test]
fn bytes_are_attributed_to_the_replica_that_holds_the_connection() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let mut held: Vec<_> = (0..4).map(|_| connect(BALANCED).unwrap()).collect();
    let i = held
        .iter()
        .position(|(_, n)| n == "mtp1")
        .expect("a connection on mtp1");
    let (mut s, _) = held.remove(i);
    let (_, before) = http_get("/metrics");
    let rx1 = m(
        &before,
        "mtlb_backend_bytes_received_total{backend=\"mtp1\"}",
    );
    let rx2 = m(
        &before,
        "mtlb_backend_bytes_received_total{backend=\"mtp2\"}",
    );
    let tx1 = m(&before, "mtlb_backend_bytes_sent_total{backend=\"mtp1\"}");
    // 1 MiB to mtp1, which echoes it back; read it all.
    let mib = vec![0x5au8; 1 << 20];
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 1 << 20];
        r.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        r.read_exact(&mut got).unwrap();
    });
    s.write_all(&mib).unwrap();
    reader.join().unwrap();
    let mib = (1u64 << 20) as f64;
    // Sent bytes count once acknowledged, and the client may delay its last
    // ACK: wait for the counters (no event to wait on).
    let deadline = Instant::now() + wait_limit();
    let after = loop {
        let (_, t) = http_get("/metrics");
        let d_tx = m(&t, "mtlb_backend_bytes_sent_total{backend=\"mtp1\"}") - tx1;
        if (d_tx - mib).abs() <= mib * 0.01 || Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let d_rx1 = m(
        &after,
        "mtlb_backend_bytes_received_total{backend=\"mtp1\"}",
    ) - rx1;
    let d_tx1 = m(&after, "mtlb_backend_bytes_sent_total{backend=\"mtp1\"}") - tx1;
    let d_rx2 = m(
        &after,
        "mtlb_backend_bytes_received_total{backend=\"mtp2\"}",
    ) - rx2;
    assert!((d_rx1 - mib).abs() <= mib * 0.01, "mtp1 received {d_rx1}");
    assert!((d_tx1 - mib).abs() <= mib * 0.01, "mtp1 sent {d_tx1}");
    assert_eq!(d_rx2, 0.0, "mtp2's counter moved");
    // Still right once the connection has closed (final counts at close).
    let maps = agent.maps();
    let est = conns(&maps, 0).established;
    drop(s);
    wait_counts(&maps, 2, "closed", |c| c[0].established == est - 1);
    let (_, closed) = http_get("/metrics");
    let d = m(
        &closed,
        "mtlb_backend_bytes_received_total{backend=\"mtp1\"}",
    ) - rx1;
    assert!(
        (d - mib).abs() <= mib * 0.01,
        "after close mtp1 received {d}"
    );
    drop(held);
}

#[test]
fn status_json_agrees_with_metrics_and_works_after_the_agent_died() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let mut agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let held: Vec<_> = (0..5).map(|_| connect(BALANCED).unwrap()).collect();
    let (_, text) = http_get("/metrics");
    let (ok, out) = mtlb_cli(&ns, &["status", "--json"]);
    assert!(ok, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = j["backends"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let name = r["name"].as_str().unwrap();
        for (field, metric_name) in [
            ("active", "mtlb_backend_active_connections"),
            ("total", "mtlb_backend_connections_total"),
            ("weight", "mtlb_backend_weight"),
        ] {
            assert_eq!(
                r[field].as_f64().unwrap(),
                m(&text, &format!("{metric_name}{{backend=\"{name}\"}}")),
                "{name} {field}"
            );
        }
        assert_eq!(r["state"], "UP");
    }
    let (ok, table) = mtlb_cli(&ns, &["status"]);
    assert!(
        ok && table
            .lines()
            .any(|l| l.starts_with("mtp1 ") && l.contains("UP")),
        "{table}"
    );
    // From the pins after the agent died.
    agent.kill9();
    let (ok, out) = mtlb_cli(&ns, &["status", "--json"]);
    assert!(ok, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let active: u64 = j["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["active"].as_u64().unwrap())
        .sum();
    assert_eq!(active, 5);
    drop(held);
}

#[test]
fn bpftool_dumps_readable_maps() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let _held: Vec<_> = (0..3).map(|_| connect(BALANCED).unwrap()).collect();
    let dump = |map: &str| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(ns.pin_dir().join(map))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // With -j, bpftool gives raw bytes plus the BTF-typed view under
        // "formatted".
        let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        raw.as_array()
            .unwrap()
            .iter()
            .map(|e| e["formatted"].clone())
            .collect()
    };
    // One value: every slot's line, with the weight the pick sees.
    let conns = dump("CONNS");
    let slots = conns[0]["value"]["slots"].as_array().unwrap();
    let est: u64 = slots
        .iter()
        .map(|c| c["established"].as_u64().unwrap() + c["handshakes"].as_u64().unwrap())
        .sum();
    assert_eq!(est, 3);
    assert_eq!(slots[0]["weight"], 1, "mtp1 UP: picked with its weight");
    assert_eq!(slots[2]["weight"], 0, "no third replica");
    let listeners = dump("LISTENERS");
    let l0 = &listeners[0]["value"];
    assert_eq!(l0["port"], 10000);
    assert_eq!(l0["family"], 2);
    assert!(l0["cookie"].as_u64().unwrap() > 0);
    let status = dump("STATUS");
    let s1 = &status[1]["value"];
    assert_eq!(s1["state"], 1, "STATE_UP");
    assert_eq!(s1["registered"], 1);
    assert!(s1["weight"].as_u64().unwrap() >= 1);
    let settings = dump("SETTINGS");
    assert_eq!(settings[0]["value"]["port"], 443);
    assert_eq!(
        settings[0]["value"]["replica_addr"],
        serde_json::json!([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 127, 0, 0, 1])
    );
}

#[test]
fn scraping_in_a_loop_does_not_disturb_a_connect_loop() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let file = ns.file.try_clone().unwrap();
    let scraper = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let (code, _) = http_get("/metrics");
            assert_eq!(code, 200);
            lat.push(t.elapsed());
        }
        lat
    });
    let mut failures = 0;
    for _ in 0..500 {
        if connect(BALANCED).is_err() {
            failures += 1;
        }
    }
    let mut lat = scraper.join().unwrap();
    assert_eq!(failures, 0);
    lat.sort();
    eprintln!(
        "scrape latency over {} scrapes: min {:?}, median {:?}, p99 {:?}, max {:?}",
        lat.len(),
        lat[0],
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
}

/// With run statistics on (here: a BPF_ENABLE_STATS descriptor held by the
/// test, as `sysctl kernel.bpf_stats_enabled=1` would), /metrics reports
/// each of this agent's programs' runs: found through its own pinned
/// links, not among every program on the host.
#[test]
fn program_run_statistics_are_reported_when_the_kernel_counts_them() {
    let _stats = bpf_run_stats();
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    for _ in 0..10 {
        connect(BALANCED).unwrap();
    }
    let (_, text) = http_get("/metrics");
    let runs = |p: &str| {
        m(
            &text,
            &format!("mtlb_program_runs_total{{program=\"{p}\"}}"),
        )
    };
    assert!(runs("mtlb_steer") >= 10.0, "{text}");
    assert!(runs("mtlb_sockops") >= 10.0, "{text}");
    assert!(
        m(
            &text,
            "mtlb_program_run_time_seconds_total{program=\"mtlb_steer\"}"
        ) > 0.0,
        "{text}"
    );
}

/// What a steered connection costs in program runs, as the kernel counts
/// them (run statistics on; replicas in a cgroup of the test's own and no
/// checks, so no other socket runs this agent's sock_ops): one sk_lookup
/// run and at most six sock_ops runs. Four of those the kernel makes for
/// any accepted connection whatever the program asks for (RWND_INIT and
/// TIMEOUT_INIT for the request socket, NEEDS_ECN for its SYN-ACK,
/// PASSIVE_ESTABLISHED), one is the SYN-ACK's header-option callback (it
/// tells SYN-cookie SYN-ACKs apart), one the state callback as the
/// connection leaves ESTABLISHED: its callbacks end there, not at
/// TCP_CLOSE two or three state changes later.
#[test]
fn a_steered_connection_costs_one_lookup_and_six_sock_ops_runs() {
    let _stats = bpf_run_stats();
    let ns = Netns::new();
    let cg = Cgroup::new();
    let _a = ReplicaProcess::start_in(&ns, "mtp1", A, &cg);
    let _b = ReplicaProcess::start_in(&ns, "mtp2", B, &cg);
    let cfg = Config::new().check_kind("none").write(&ns);
    let agent = ns.agent(&["--config", &cfg, "--replica-cgroup", &cg.rel]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let maps = agent.maps();
    let runs = || {
        let (_, text) = http_get("/metrics");
        let r = |p: &str| {
            m(
                &text,
                &format!("mtlb_program_runs_total{{program=\"{p}\"}}"),
            )
        };
        (r("mtlb_steer"), r("mtlb_sockops"))
    };
    let (steer0, ops0) = runs();
    const N: u32 = 60;
    let mut on = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..N {
        // Each one greeted by its replica, then closed by the client.
        let (s, name) = connect(BALANCED).unwrap();
        *on.entry(name).or_default() += 1;
        drop(s);
    }
    assert_eq!(on.len(), 2, "both replicas take connections: {on:?}");
    wait_counts(&maps, 2, "all closed", |c| c.iter().all(Conns::is_empty));
    let (steer1, ops1) = runs();
    let n = f64::from(N);
    let (steer, ops) = ((steer1 - steer0) / n, (ops1 - ops0) / n);
    eprintln!("per connection: {steer:.2} sk_lookup runs, {ops:.2} sock_ops runs");
    // sk_lookup runs for every listener lookup of the namespace: the
    // second /metrics GET's own connection is the one more.
    assert_eq!(
        steer1 - steer0,
        n + 1.0,
        "sk_lookup runs for {N} connections"
    );
    assert!(
        (4.0..=6.0).contains(&ops),
        "{ops:.2} sock_ops runs per connection"
    );
}
