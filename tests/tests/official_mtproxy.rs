//! End to end with the official C MTProxy server (TelegramMessenger/MTProxy,
//! built by `cargo xtask test` from ../shared/peers) as the replicas:
//! Telethon → mtlb → official mtproto-proxy → a loopback stand-in for
//! Telegram's middle proxies (fixture `middle_proxy.py`, which speaks the
//! server's RPC protocol and echoes each forwarded message). Skipped, with
//! the reason printed, where MTLB_OFFICIAL_MTPROXY is unset.

use mtlb_tests::*;
use std::net::TcpStream;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const OTHER: &str = "fedcba9876543210fedcba9876543210";
/// The stand-in's port (each test has its own namespace).
const UPSTREAM: u16 = 20443;
/// Replica `i`'s HTTP stats port is STATS_BASE + i.
const STATS_BASE: u16 = 18000;

/// A config for `replicas` replicas with check `kind` and fast timings;
/// with `stats`, the official servers' stats ports as well (then
/// `total_ready_targets` must be > 0 for any kind of check).
fn config(ns: &Netns, replicas: u16, kind: &str, stats: bool) -> String {
    let cfg = Config::new()
        .secret(&format!("dd{SECRET}"))
        .replicas(replicas)
        .check_kind(kind)
        .mtproxy_timings();
    if stats {
        cfg.stats_base_port(STATS_BASE)
    } else {
        cfg
    }
    .write(ns)
}

/// Official replica `i` (mtp{i+1}) on 10000+i with `secret`, forwarding to
/// `upstream`.
fn replica(bin: &str, ns: &Netns, i: u16, secret: &str, upstream: &MiddleProxy) -> OfficialReplica {
    official_replica(bin, ns, 10000 + i, STATS_BASE + i, secret, upstream)
}

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

/// Connections the connect loop holds at once, well under the servers'
/// `-c` (official_replica's).
const MAX_HELD: usize = 1000;

/// The stand-in's line for the request the official server forwarded from
/// `client` (it reports the client's address in RPC_PROXY_REQ).
fn forwarded_from(up: &MiddleProxy, client: &str) -> Option<String> {
    up.lines()
        .into_iter()
        .find(|l| l.contains("proxy_req") && l.contains(&format!("client={client} ")))
}

fn agent_with_checks_passing(ns: &Netns, cfg: &str, reason: &str) -> Agent {
    let agent = ns.agent_debug(&["--config", cfg]);
    agent.wait_check_passed("mtp1", reason);
    agent.wait_check_passed("mtp2", reason);
    // A passed check is not yet UP (rise): only UP replicas are steered to,
    // and a client sent before both are would all land on one (seen under
    // emulation, where a second check comes seconds later).
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    agent
}

/// Two official replicas on one stand-in, `mtproxy` checks with the
/// servers' stats, and an agent that has both UP. Fields drop in this
/// order: the agent first, the namespace last.
struct TwoReplicas {
    agent: Agent,
    mtp2: OfficialReplica,
    mtp1: OfficialReplica,
    up: MiddleProxy,
    ns: Netns,
}

fn two_replicas(bin: &str) -> TwoReplicas {
    let ns = Netns::new();
    let up = MiddleProxy::start(&ns, UPSTREAM);
    let mtp1 = replica(bin, &ns, 0, SECRET, &up);
    let mtp2 = replica(bin, &ns, 1, SECRET, &up);
    let cfg = config(&ns, 2, "mtproxy", true);
    let agent = agent_with_checks_passing(&ns, &cfg, "MTProxy answered through upstream");
    TwoReplicas {
        agent,
        mtp2,
        mtp1,
        up,
        ns,
    }
}

#[test]
fn official_mtproxy_frames_intact_through_telethon() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let TwoReplicas {
        mtp1, mtp2, up, ns, ..
    } = &two_replicas(&bin);
    // The servers count the stand-in as a ready middle proxy.
    mtp1.wait_ready_targets(1);
    mtp2.wait_ready_targets(1);
    for _ in 0..3 {
        let (c, r) = telethon(ns, false);
        drop(c);
        // Telethon's req_pq_multi came back byte for byte: the official
        // server parsed and forwarded it, the answer came back through it.
        assert_eq!(r["verdict"], "UP", "{r}");
        assert_eq!(r["reply_equals_sent"], true, "{r}");
        assert_eq!(r["reply_len"], 40, "{r}");
        let client = r["sockname"].as_str().unwrap();
        let line = forwarded_from(up, client).unwrap_or_else(|| {
            panic!(
                "the stand-in got no request from {client}:\n{}",
                up.lines().join("\n")
            )
        });
        assert!(line.contains("bytes=40"), "{line}");
    }
}

#[test]
fn official_mtproxy_replica_sees_the_client_address() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let TwoReplicas {
        mtp1, mtp2, up, ns, ..
    } = &two_replicas(&bin);
    let (c, r) = telethon(ns, true);
    assert_eq!(r["verdict"], "UP", "{r}");
    let client = r["sockname"].as_str().unwrap().to_string();
    // The socket the replica holds has the client's own address as its
    // peer (sk_lookup hands over the connection, nothing is proxied)...
    let holders = holders_of(ns, &client);
    assert!(
        holders.iter().any(|p| *p == mtp1.pid() || *p == mtp2.pid()),
        "no official replica holds the connection from {client}: {holders:?}\n{}",
        ss_balanced(ns)
    );
    // ...and the server reports that address upstream, as Telegram sees it.
    assert!(
        forwarded_from(up, &client).is_some(),
        "the stand-in got no request from {client}:\n{}",
        up.lines().join("\n")
    );
    drop(c);
}

#[test]
fn official_mtproxy_replicas_share_clients_by_least_connections() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let TwoReplicas {
        agent,
        mtp1,
        mtp2,
        ns,
        ..
    } = &two_replicas(&bin);
    // Two held clients: the second goes to the replica the first left idle.
    let mut pids = Vec::new();
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, r) = telethon(ns, true);
        assert_eq!(r["verdict"], "UP", "{r}");
        pids.extend(holders_of(ns, r["sockname"].as_str().unwrap()));
        held.push(c);
    }
    let m = agent.maps();
    assert!(
        pids.contains(&mtp1.pid()) && pids.contains(&mtp2.pid()),
        "both clients on one replica: {pids:?} (mtp1 {}, mtp2 {}); counts {:?} {:?}; sockets:\n{}\nagent:\n{}",
        mtp1.pid(),
        mtp2.pid(),
        conns(&m, 0),
        conns(&m, 1),
        ss_balanced(ns),
        agent.log()
    );
    // Six more held connections (the server waits silently for their
    // header): four each in all.
    let raw: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(BALANCED).unwrap())
        .collect();
    wait_counts(&m, 2, "4 each", |c| {
        c[0].established == 4 && c[1].established == 4
    });
    drop(raw);
    drop(held);
}

#[test]
fn official_mtproxy_killed_replica_fails_over_and_returns() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let TwoReplicas {
        agent,
        mtp2,
        up,
        ns,
        ..
    } = &mut two_replicas(&bin);

    // Clients keep connecting while mtp2 is killed and comes back.
    // Held, but not without bound: the server serves at most -c
    // connections and past that stops accepting, its checks time out and
    // it goes DOWN (a slow run under emulation got there).
    let loop_ = ConnectLoop::new()
        .hold(MAX_HELD)
        .pace(std::time::Duration::from_millis(5))
        .start(ns);
    mtp2.kill();
    agent.wait_state("mtp2", State::Down);
    // Real clients still get through, on mtp1.
    for _ in 0..2 {
        let (c, r) = telethon(ns, false);
        drop(c);
        assert_eq!(r["verdict"], "UP", "{r}");
    }
    let mtp2 = replica(&bin, ns, 1, SECRET, up);
    agent.wait_state("mtp2", State::Up);
    let looped = loop_.finish();
    looped.assert_one_replica_killed();
    // mtp1 holds the loop's connections: the next client goes to mtp2.
    let (c, r) = telethon(ns, true);
    assert_eq!(r["verdict"], "UP", "{r}");
    let holders = holders_of(ns, r["sockname"].as_str().unwrap());
    assert!(
        holders.contains(&mtp2.pid()),
        "the returned mtp2 ({}) took no client: {holders:?}",
        mtp2.pid()
    );
    drop(c);
    drop(looped.held);
}

#[test]
fn official_mtproxy_stats_drive_the_stats_check() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let ns = Netns::new();
    // mtp2 has a stand-in of its own, stopped below.
    let up1 = MiddleProxy::start(&ns, UPSTREAM);
    let mut up2 = MiddleProxy::start(&ns, UPSTREAM + 1);
    let _mtp1 = replica(&bin, &ns, 0, SECRET, &up1);
    let mtp2 = replica(&bin, &ns, 1, SECRET, &up2);
    let cfg = config(&ns, 2, "stats", true);
    let agent = agent_with_checks_passing(&ns, &cfg, "stats: upstream ready");

    up2.stop();
    mtp2.wait_ready_targets(0);
    let down = agent.wait_state("mtp2", State::Down);
    assert_eq!(status_reason(&down), "stats: no ready upstream targets");
    up2.restart(&ns);
    mtp2.wait_ready_targets(1);
    let up = agent.wait_state("mtp2", State::Up);
    assert_eq!(status_reason(&up), "stats: upstream ready");
    let log = agent.log();
    assert!(!log.contains("backend mtp1 is DOWN"), "{log}");
}

#[test]
fn official_mtproxy_check_kind_reasons() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let ns = Netns::new();
    let up = MiddleProxy::start(&ns, UPSTREAM);
    // A stand-in that is stopped before anyone connects: mtp3's upstream
    // is unreachable, with its secret right.
    let mut gone = MiddleProxy::start(&ns, UPSTREAM + 1);
    gone.stop();
    let _right = replica(&bin, &ns, 0, SECRET, &up);
    let _wrong = replica(&bin, &ns, 1, OTHER, &up);
    let unreachable = official_replica(&bin, &ns, 10002, STATS_BASE + 2, SECRET, &gone);
    unreachable.wait_ready_targets(0);
    // Without the stats ports: the mtproxy probe alone decides.
    let cfg = config(&ns, 3, "mtproxy", false);
    let agent = ns.agent_debug(&["--config", &cfg]);
    agent.wait_check_passed("mtp1", "MTProxy answered through upstream");
    // The official server keeps silent on a header that does not decrypt
    // with its secret (it skips everything the client sends), and it drops
    // a well-formed request it has no ready middle proxy for, also
    // silently: a dd probe gets no answer in both cases (README "Health
    // checks").
    for b in ["mtp2", "mtp3"] {
        let down = agent.wait_down_by_check(b);
        assert_eq!(status_reason(&down), "no answer through proxy");
    }
    let log = agent.log();
    assert!(!log.contains("backend mtp1 is DOWN"), "{log}");
    drop(agent);

    // With the stats ports as well, the replicas' own stats tell the two
    // silences apart: no ready middle proxy names the upstream; a ready
    // one leaves the secret as the likely cause.
    let cfg = config(&ns, 3, "mtproxy", true);
    let agent = ns.agent_debug(&["--config", &cfg]);
    agent.wait_check_passed("mtp1", "MTProxy answered through upstream");
    let line = agent.wait_for("backend mtp3 is DOWN");
    assert!(
        line.contains("reason: stats: no ready upstream targets")
            && line.contains("the MTProxy probe got no answer"),
        "{line}"
    );
    let line = agent.wait_for("backend mtp2 is DOWN");
    assert!(
        line.contains("reason: no answer through proxy")
            && line.contains("its stats show ready upstream targets: wrong secret"),
        "{line}"
    );
    let log = agent.log();
    assert!(!log.contains("backend mtp1 is DOWN"), "{log}");
}

/// The accept queue of the listener on `port` in `ns` now (`ss`'s Recv-Q).
fn accept_queue(ns: &Netns, port: u16) -> usize {
    let mut cmd = std::process::Command::new("ss");
    cmd.args(["-ltnH", &format!("sport = :{port}")]);
    ns.run_inside(&mut cmd);
    let out = cmd.output().expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .sum()
}

/// `docker stop`'s SIGTERM to an official replica under a paced load of
/// complete clients (300 a second on the host; fewer under emulation):
/// the kernel takes it out of rotation at the signal, so no client that
/// starts after it fails. Those steered to it before (their handshake or
/// exchange under way, or waiting in its accept queue) go down with it, as
/// behind any balancer: they are counted and printed, and bound the
/// failures.
/// It comes back after it restarts and passes its check.
#[test]
fn official_mtproxy_sigterm_fails_no_client_it_had_not_queued() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let TwoReplicas {
        agent,
        mtp2,
        up,
        ns,
        ..
    } = &mut two_replicas(&bin);
    let rate = (300 / time_scale()).max(20);
    let load = PacedClients::start(ns, rate, &format!("dd{SECRET}"));
    let totals = |slot| agent.maps().slot_totals(slot).unwrap().established;
    wait_until("clients on both, and the watch knows mtp2's pid", || {
        totals(0) >= 20
            && totals(1) >= 20
            && agent.maps().owner_pids().unwrap().contains_key(&mtp2.pid())
    });
    let pid = mtp2.pid();
    let from = agent.log_len();
    let signal_at = load.elapsed();
    mtp2.signal(nix::sys::signal::Signal::SIGTERM);
    // The mark is made inside kill(): from here on nothing new enters.
    // What mtp2 holds then (the kernel's count, read from the shared
    // page at once: handshakes under way, connections in its accept
    // queue and those it accepted) goes down with it.
    let held = conns(&agent.maps(), 1).active() as usize;
    let queued = accept_queue(ns, 10001);
    mtp2.wait_exit();
    agent.wait_for_after(from, "replica mtp2 unregistered");
    let (_, down) = agent.wait_for_after(
        from,
        &format!("backend mtp2 is DOWN, reason: stopping (SIGTERM to pid {pid})"),
    );
    // Back after a restart, checked, taking clients.
    *mtp2 = replica(&bin, ns, 1, SECRET, up);
    agent.wait_state("mtp2", State::Up);
    let before = totals(1);
    wait_until("the restarted mtp2 takes clients", || {
        totals(1) >= before + 10
    });
    let out = load.finish();
    println!("{down}");
    println!(
        "{} complete clients at {:.0}/s: {} served, {} failed; at the signal mtp2 held {held} connections, {queued} of them in its accept queue",
        out.clients(),
        out.rate(),
        out.served,
        out.failed.len()
    );
    let after: Vec<_> = out
        .failed
        .iter()
        .filter(|(at, _)| *at >= signal_at)
        .collect();
    assert!(
        after.is_empty(),
        "clients started after the signal failed: {after:?}"
    );
    assert!(
        out.failed.len() <= held,
        "{} clients failed, mtp2 held {held} at the signal: {:?}",
        out.failed.len(),
        out.failed
    );
    if time_scale() == 1 {
        assert!(out.rate() >= 290.0, "only {:.0} clients/s", out.rate());
    }
}

/// `mtlb rollout` over three official replicas, each restarted (SIGTERM,
/// then a new server on its port) by a shell command, under a paced load
/// of complete clients (300 a second on the host): no client is refused,
/// none fails but those whose connection the restarts cut (still under way
/// after the grace: on the host none, under emulation where one exchange
/// takes seconds, some), which the rollout counts apart; each replica is a
/// new process after it.
#[test]
fn official_mtproxy_rollout_under_load_fails_no_client() {
    let Some(bin) = official_mtproxy() else {
        return;
    };
    let ns = Netns::new();
    let up = MiddleProxy::start(&ns, UPSTREAM);
    let dir = TempDir::new("official-rollout");
    let conf = dir.path.join("proxy-multi.conf");
    std::fs::write(&conf, up.proxy_multi_conf()).unwrap();
    // As official_replica starts them, one per port; `exec` keeps the
    // pid the script records.
    let start = format!(
        "( cd '{d}' && exec '{bin}' -u nobody -p $(({STATS_BASE} + n - 1)) --http-stats -H $port -S {SECRET} --aes-pwd '{s}' '{c}' -M 0 -c 4000 )",
        d = dir.path.display(),
        s = up.secret_file.display(),
        c = conf.display(),
    );
    let set = RestartableReplicas::with_start(3, &start);
    for n in 1..=3 {
        set.start(&ns, n);
    }
    let cfg = config(&ns, 3, "mtproxy", true);
    let agent = ns.agent(&["--config", &cfg]);
    for n in ["mtp1", "mtp2", "mtp3"] {
        agent.wait_state(n, State::Up);
    }
    let before = set.pids();
    let rate = (300 / time_scale()).max(20);
    let load = PacedClients::start(&ns, rate, &format!("dd{SECRET}"));
    let exec = set.command();
    let (ok, out) = mtlb_cli_within(
        &ns,
        &[
            "rollout",
            "--exec",
            &exec,
            "--grace",
            "1s",
            "--up-timeout",
            "30s",
        ],
        scaled(std::time::Duration::from_secs(120)),
    )
    .expect("mtlb rollout did not end within 120 s");
    let clients = load.finish();
    eprintln!("mtlb rollout (ok: {ok}):\n{out}");
    assert!(ok, "{out}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("rollout done"))
        .unwrap_or("(no summary)")
        .to_string();
    // "…; N connections cut by the restarts (left after the grace)"
    let cut: usize = summary
        .split("; ")
        .find_map(|p| p.strip_suffix(" connections cut by the restarts (left after the grace)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    println!(
        "{} complete clients at {:.0}/s during the rollout: {} served, {} failed; {summary}",
        clients.clients(),
        clients.rate(),
        clients.served,
        clients.failed.len()
    );
    // A refused connect would be a new client the rollout lost; one
    // accepted and then reset or left without an answer was under way at
    // a restart: cut.
    let refused: Vec<_> = clients
        .failed
        .iter()
        .filter(|(_, why)| why == mtlb_bench::mtclient::Outcome::Refused.label())
        .collect();
    assert!(refused.is_empty(), "refused clients: {refused:?}");
    assert!(
        clients.failed.len() <= cut,
        "{} clients failed, the restarts cut {cut}: {:?}",
        clients.failed.len(),
        clients.failed
    );
    assert_eq!(set.restarts(), [1, 2, 3], "{out}");
    for (n, (old, new)) in before.iter().zip(set.pids()).enumerate() {
        assert_ne!(*old, new, "mtp{} has the same pid", n + 1);
    }
    if time_scale() == 1 {
        assert!(
            clients.rate() >= 290.0,
            "only {:.0} clients/s",
            clients.rate()
        );
    }
}
