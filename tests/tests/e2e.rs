//! End to end with real peers, offline: a real Telegram client library
//! (Telethon's MTProxy connection) → mtlb → real MTProxy replicas
//! (mtprotoproxy from PyPI) → a loopback fake DC that echoes frames → back.

use mtlb_tests::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const DOMAIN_HEX: &str = "6578616d706c652e636f6d"; // example.com

/// One Telethon exchange through the balanced port, holding the connection
/// after it until the returned guard is dropped when `hold`; returns the
/// client and its JSON result.
fn telethon(ns: &Netns, hold: bool) -> (Killed, serde_json::Value) {
    let secret = format!("dd{SECRET}");
    let timeout = (8 * time_scale()).to_string();
    let hold = if hold { HOLD_UNTIL_KILLED } else { "0" };
    let (child, line) = py_first_line(
        ns,
        "telethon_client.py",
        &["443", &secret, "--hold", hold, "--timeout", &timeout],
    );
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("telethon said {line:?}: {e}"));
    (child, v)
}

#[test]
fn telegram_client_through_mtlb_with_failover() {
    let ns = Netns::new();
    let _dc = fake_dc(&ns, 20443);
    let mtp1 = mtproxy_replica(&ns, 10000, SECRET, 20443, false);
    let mtp2 = mtproxy_replica(&ns, 10001, SECRET, 20443, false);
    let cfg = Config::mtproxy(&format!("dd{SECRET}")).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    agent.wait_check_passed("mtp1", "MTProxy answered through upstream");
    agent.wait_check_passed("mtp2", "MTProxy answered through upstream");
    // Steered to only once UP (rise), which may come a check later.
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);

    // Frames come back intact, and the replica that serves a client holds a
    // socket whose peer is the client's own address.
    let mut clients = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let (child, r) = telethon(&ns, true);
        assert_eq!(r["verdict"], "UP", "{r}");
        assert_eq!(r["reply_equals_sent"], true, "{r}");
        let client = r["sockname"].as_str().unwrap().to_string();
        let holders = holders_of(&ns, &client);
        assert!(
            holders.iter().any(|p| *p == mtp1.pid() || *p == mtp2.pid()),
            "no replica holds the connection from {client}: {holders:?}"
        );
        pids.extend(holders);
        clients.push(child);
    }
    // Least connections: one client each.
    assert!(
        pids.contains(&mtp1.pid()) && pids.contains(&mtp2.pid()),
        "{pids:?}; counts {:?}; sockets:\n{}",
        (0..2).map(|s| conns(&agent.maps(), s)).collect::<Vec<_>>(),
        ss_balanced(&ns)
    );
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }

    // The seed's failover case: stop a replica while clients keep
    // connecting.
    let loop_ = ConnectLoop::new()
        .hold(usize::MAX)
        .pace(std::time::Duration::from_millis(5))
        .start(&ns);
    drop(mtp2);
    agent.wait_state("mtp2", State::Down);
    let (_, html) = http_get("/stats");
    assert!(
        html.lines()
            .any(|l| l.contains("mtp2") && l.contains(">DOWN<")),
        "{html}"
    );
    // Every client connection succeeds, through mtp1.
    for _ in 0..2 {
        let (mut c, r) = telethon(&ns, false);
        assert_eq!(r["verdict"], "UP", "{r}");
        let _ = c.wait();
    }
    // mtp2 comes back: UP, and it takes traffic: the loop's next
    // connections go to it (mtp1 holds the loop's others). Awaited while
    // the loop runs rather than judged by one client: mtprotoproxy closes
    // connections that send no handshake within its timeout, so on a slow
    // run mtp1 may hold fewer than mtp2 by the time one client is sent.
    let _mtp2 = mtproxy_replica(&ns, 10001, SECRET, 20443, false);
    agent.wait_state("mtp2", State::Up);
    let t2 = backend_total("mtp2");
    wait_backend_total_above("mtp2", t2);
    let looped = loop_.finish();
    looped.assert_one_replica_killed();
    let (mut c, r) = telethon(&ns, false);
    assert_eq!(r["verdict"], "UP", "{r}");
    let _ = c.wait();
    drop(looped.held);
}

#[test]
fn fake_tls_replicas_end_to_end() {
    let ns = Netns::new();
    let _dc = fake_dc(&ns, 20443);
    let _mtp1 = mtproxy_replica(&ns, 10000, SECRET, 20443, true);
    let _mtp2 = mtproxy_replica(&ns, 10001, SECRET, 20443, true);
    let secret = format!("ee{SECRET}{DOMAIN_HEX}");
    let cfg = Config::mtproxy(&secret).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    agent.wait_check_passed("mtp1", "MTProxy answered through upstream");
    agent.wait_check_passed("mtp2", "MTProxy answered through upstream");
    // Telethon has no fake-TLS support; the fixtures' own client (a separate
    // implementation from mtlb's check) speaks it.
    for _ in 0..4 {
        let (mut c, line) = py_first_line(&ns, "probe.py", &["127.0.0.1", "443", &secret]);
        let _ = c.wait();
        let r: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["verdict"], "UP", "{r}");
        assert_eq!(r["reply"], "echo", "{r}");
    }
    // Each probe closes before the next, so ties are broken at random: the
    // four may land on either replica (both are proven by their checks).
    let (_, text) = http_get("/metrics");
    let total: f64 = ["mtp1", "mtp2"]
        .iter()
        .map(|b| {
            metric(
                &text,
                &format!("mtlb_backend_connections_total{{backend=\"{b}\"}}"),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(total, 4.0, "{text}");
}
