//! Steering core: sk_lookup least-connections steering, kernel connection
//! accounting, replica registration. Each test runs in its own network
//! namespace with its own agent. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";

/// Both replicas up, agent running, both registered.
fn setup() -> (Netns, Agent, Replica, Replica) {
    let ns = Netns::new();
    let a = Replica::start("mtp1", A);
    let b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    (ns, agent, a, b)
}

/// Like `setup`, but incomplete handshakes expire after 500 ms in the agent
/// and SYN-ACKs are retried once only, so the kernel gives up on them within
/// a few seconds too.
fn setup_short_handshakes() -> (Netns, Agent, Replica, Replica) {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_synack_retries", "1");
    let a = Replica::start("mtp1", A);
    let b = Replica::start("mtp2", B);
    let agent = ns.agent(&["--handshake-timeout-ms", "500"]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    (ns, agent, a, b)
}

fn hold(n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|i| connect(BALANCED).unwrap_or_else(|e| panic!("connect #{i}: {e}")))
        .collect()
}

#[test]
fn distribution_real_client_address_and_refill() {
    let (_ns, agent, a, b) = setup();
    let mut held = hold(40);
    let t = tally(held.iter().map(|(_, n)| n));
    let (na, nb) = (t["mtp1"], t["mtp2"]);
    assert!(na.abs_diff(20) <= 1 && nb.abs_diff(20) <= 1, "split {t:?}");

    // The replica sees the client's own address and port, and the balanced
    // address as local: the client's connection itself was handed over.
    let mut seen: Vec<Accepted> = a.accepted();
    seen.extend(b.accepted());
    for (s, _) in &held {
        let me = s.local_addr().unwrap();
        let got = seen
            .iter()
            .find(|x| x.peer == me)
            .unwrap_or_else(|| panic!("no replica saw peer {me}: {seen:?}"));
        assert_eq!(got.local, BALANCED.parse::<SocketAddr>().unwrap());
    }

    let maps = agent.maps();
    let c0 = conns(&maps, 0);
    let c1 = conns(&maps, 1);
    assert_eq!((c0.established, c1.established), (na as u64, nb as u64));
    assert_eq!((c0.handshakes, c1.handshakes), (0, 0));

    // Refill: close 10 on mtp1; the next 10 all go to mtp1.
    let mut closed = 0;
    held.retain(|(_, n)| {
        if n == "mtp1" && closed < 10 {
            closed += 1;
            false
        } else {
            true
        }
    });
    wait_counts(&maps, 2, "after closing 10 on mtp1", |c| {
        c[0].established == na as u64 - 10
    });
    let more = hold(10);
    let t = tally(more.iter().map(|(_, n)| n));
    assert_eq!(t.get("mtp1"), Some(&10), "refill went {t:?}");
    drop(more);
    drop(held);
}

#[test]
fn syn_burst_spreads_evenly() {
    let (ns, agent, a, b) = setup();
    // Slow lo down so that 64 handshakes are in flight at once: every SYN
    // is looked up before any SYN-ACK gets through the queue.
    ns.slow_lo("400kbit");
    let socks = start_connects(BALANCED, 64);
    // While the burst is in flight, handshakes count for their replica.
    let maps = agent.maps();
    let c = (conns(&maps, 0), conns(&maps, 1));
    assert!(
        c.0.handshakes + c.1.handshakes + c.0.established + c.1.established > 0,
        "nothing counted during the burst: {c:?}"
    );
    let names: Vec<String> = socks
        .into_iter()
        .map(|s| {
            s.set_nonblocking(false).unwrap();
            let s: TcpStream = s.into();
            greeting(&s).expect("greeting after burst")
        })
        .collect();
    let t = tally(&names);
    let (na, nb) = (
        t.get("mtp1").copied().unwrap_or(0),
        t.get("mtp2").copied().unwrap_or(0),
    );
    assert_eq!(na + nb, 64);
    // within ±10% of 32
    assert!(na.abs_diff(32) <= 3, "burst split {t:?}");
    assert_eq!(a.steered() + b.steered(), 64);
    ns.unslow_lo();
}

#[test]
fn no_leaks_after_fin_rst_and_failed_handshakes() {
    let (ns, agent, _a, _b) = setup_short_handshakes();
    let maps = agent.maps();
    let zero = |c: &[Conns]| c.iter().all(Conns::is_empty);

    // FIN: the client closes, the replica closes on EOF.
    let held = hold(10);
    wait_counts(&maps, 2, "10 held", |c| {
        c[0].established + c[1].established == 10
    });
    drop(held);
    wait_counts(&maps, 2, "after FIN close", zero);

    // RST: SO_LINGER 0.
    let held = hold(10);
    for (s, _) in held {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    }
    wait_counts(&maps, 2, "after RST close", zero);

    // Handshakes that never complete: a client that gives up before the
    // SYN-ACK (the kernel answers it with RST), seen as in flight.
    ns.slow_lo("100kbit");
    drop(start_connects(BALANCED, 8));
    // The SYNs still reach the replicas (their request sockets count), the
    // SYN-ACKs meet no socket and get RST: the kernel drops the requests
    // without any event reaching the programs.
    wait_counts(&maps, 2, "abandoned handshakes in flight", |c| {
        c.iter().map(|c| c.handshakes).sum::<u64>() > 0
    });
    wait_counts(&maps, 2, "after abandoned handshakes", zero);
    ns.unslow_lo();
}

#[test]
fn handshakes_that_never_complete_do_not_leak() {
    let (ns, agent, _a, _b) = setup_short_handshakes();
    let maps = agent.maps();
    // Drop the clients' final ACKs: the replicas' request sockets stay in
    // SYN-RECV until the kernel gives up on them, as in a SYN flood. The
    // kernel drops them without an event the programs could see.
    ns.nft("add table inet mtlbtest");
    ns.nft("add chain inet mtlbtest out { type filter hook output priority 0; }");
    ns.nft("add rule inet mtlbtest out tcp dport 443 tcp flags == ack drop");
    let socks = start_connects(BALANCED, 8);
    wait_counts(&maps, 2, "stuck handshakes counted", |c| {
        c.iter().map(|c| c.handshakes).sum::<u64>() == 8
    });
    let c = (conns(&maps, 0), conns(&maps, 1));
    assert_eq!((c.0.handshakes, c.1.handshakes), (4, 4), "in-flight split");
    wait_counts(&maps, 2, "stuck handshakes expired", |c| {
        c.iter().all(Conns::is_empty)
    });
    ns.nft("delete table inet mtlbtest");
    drop(socks);
    // Steering still works afterwards.
    let held = hold(2);
    assert_eq!(held.len(), 2);
}

#[test]
fn full_accept_queue_does_not_leak() {
    let ns = Netns::new();
    // Replicas that never accept, with a one-slot backlog.
    let mut a = Replica::start_with("mtp1", A, 1, false, None);
    let mut b = Replica::start_with("mtp2", B, 1, false, None);
    let agent = ns.agent(&["--handshake-timeout-ms", "500"]);
    agent.wait_state("mtp2", State::Up);
    let maps = agent.maps();
    let socks = start_connects(BALANCED, 8);
    // Queued (established, never accepted) connections count.
    wait_counts(&maps, 2, "queued connections counted", |c| {
        c[0].established > 0 && c[1].established > 0
    });
    drop(socks);
    // Closing the listeners aborts what is queued: back to zero.
    a.stop_listening();
    b.stop_listening();
    wait_counts(&maps, 2, "listeners closed", |c| {
        c.iter().all(Conns::is_empty)
    });
}

#[test]
fn syn_cookies_keep_replica_and_counts() {
    let ns = Netns::new();
    // Always answer with a SYN cookie: no request socket exists, and the
    // final ACK comes back through sk_lookup.
    ns.sysctl("net.ipv4.tcp_syncookies", "2");
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let held = hold(20);
    let t = tally(held.iter().map(|(_, n)| n));
    assert!(t["mtp1"].abs_diff(10) <= 1, "split {t:?}");
    let maps = agent.maps();
    let (c0, c1) = (conns(&maps, 0), conns(&maps, 1));
    assert_eq!(c0.established + c1.established, 20);
    assert_eq!(c0.handshakes + c1.handshakes, 0);
    drop(held);
    wait_counts(&maps, 2, "closed", |c| c.iter().all(Conns::is_empty));
}

#[test]
fn syn_queue_overflow_cookies_reach_the_right_replica() {
    let ns = Netns::new();
    // Default tcp_syncookies = 1: cookies only when a SYN queue overflows.
    let agent = ns.agent(&[]);
    // Registered by the listen hook, with one-slot SYN queues: every SYN
    // that arrives while another handshake is open gets a cookie.
    let _a = Replica::start_with("mtp1", A, 1, true, None);
    let _b = Replica::start_with("mtp2", B, 1, true, None);
    agent.wait_for("replica mtp2 registered: 127.0.0.1:10001 (IPv4, via listen hook)");
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let maps = agent.maps();
    // A queue overflows when a SYN arrives while another handshake to the
    // same listener is open. Whether the 24 SYNs come faster than the
    // shaped loopback completes handshakes depends on the machine (under
    // software emulation a connect() can take longer than a handshake):
    // a slower link each round, until cookies were sent.
    let mut held: Vec<TcpStream> = Vec::new();
    for rate in ["400kbit", "100kbit", "25kbit"] {
        ns.slow_lo(rate);
        let socks = start_connects(BALANCED, 24);
        // Every connection completes with its replica: a cookie ACK sent
        // to the other listener would be answered with RST.
        held.extend(socks.into_iter().map(|s| {
            s.set_nonblocking(false).unwrap();
            let mut s: TcpStream = s.into();
            // A cookie handshake has no SYN-ACK retransmits: if its ACK
            // meets a full accept queue, data sent afterwards retries it.
            std::io::Write::write_all(&mut s, b"x").unwrap();
            greeting(&s).expect("greeting");
            s
        }));
        ns.unslow_lo();
        if maps.stat(mtlb_common::stat::COOKIE_SYNACKS).unwrap() > 0 {
            break;
        }
    }
    let cookies = maps.stat(mtlb_common::stat::COOKIE_SYNACKS).unwrap();
    let hits = maps.stat(mtlb_common::stat::FLOW_HITS).unwrap();
    assert!(
        cookies > 0,
        "no SYN cookie was sent in {} connections; the test did not overflow a queue",
        held.len()
    );
    assert!(hits > 0, "no cookie ACK came back through the flow table");
    let n = held.len() as u64;
    wait_counts(&maps, 2, "all established", |c| {
        c[0].established + c[1].established == n && c[0].handshakes + c[1].handshakes == 0
    });
}

#[test]
fn failover_and_restart() {
    let (_ns, agent, a, mut b) = setup();
    let maps = agent.maps();
    let mut held = Vec::new();
    let mut connect_errors = Vec::new();
    let mut lost = 0;
    let mut after_stop = Vec::new();
    let deadline = Instant::now() + wait_limit();
    for i in 0..400 {
        assert!(Instant::now() < deadline, "connect loop too slow");
        if i == 100 {
            b.stop_listening();
        }
        match TcpStream::connect(BALANCED) {
            // Reset in that queue before connect() returned: the same loss.
            Err(e) if cut_in_flight(&e) => lost += 1,
            Err(e) => connect_errors.push((i, e.to_string())),
            Ok(s) => match greeting(&s) {
                Ok(name) => {
                    if i >= 100 {
                        after_stop.push(name);
                    }
                    held.push(s);
                }
                // A connection sitting in the closing listener's accept queue
                // is reset with it; the loop has at most one in flight.
                Err(_) => lost += 1,
            },
        }
    }
    assert!(
        connect_errors.is_empty(),
        "failed connects: {connect_errors:?}"
    );
    assert!(lost <= 1, "{lost} connections lost at failover");
    assert!(
        after_stop.iter().all(|n| n == "mtp1"),
        "after mtp2 stopped: {:?}",
        tally(&after_stop)
    );
    agent.wait_status("mtp2", "unregistered", |s| s.registered == 0);

    // Restart on the same port: once its first check passes (run the
    // moment it listens), mtp1 holds ~350 connections, so the very first
    // new connection must go to mtp2, which has none.
    let b2 = Replica::start("mtp2", B);
    agent.wait_state("mtp2", State::Up);
    let (_s, name) = connect(BALANCED).unwrap();
    assert_eq!(name, "mtp2", "first connection after restart");
    assert_eq!(b2.steered(), 1);
    assert!(conns(&maps, 0).established >= 300);
    drop(a);
}

#[test]
fn start_order_and_direct_connections() {
    let ns = Netns::new();
    let a = Replica::start("mtp1", A);
    let agent = ns.agent(&[]);
    agent.wait_for("replica mtp1 registered: 127.0.0.1:10000 (IPv4, via adopted)");
    agent.wait_state("mtp1", State::Up);
    let b = Replica::start("mtp2", B);
    agent.wait_for("replica mtp2 registered: 127.0.0.1:10001 (IPv4, via listen hook)");
    agent.wait_state("mtp2", State::Up);
    let held = hold(4);
    let t = tally(held.iter().map(|(_, n)| n));
    assert_eq!((t["mtp1"], t["mtp2"]), (2, 2), "{t:?}");

    // Direct connections to a replica port reach that replica, uncounted.
    let maps = agent.maps();
    let before = (conns(&maps, 0), conns(&maps, 1));
    let (_d, name) = connect(A).unwrap();
    assert_eq!(name, "mtp1");
    let (_d2, name) = connect(B).unwrap();
    assert_eq!(name, "mtp2");
    assert_eq!((conns(&maps, 0), conns(&maps, 1)), before);
    assert!(a.accepted().iter().any(|x| x.local.port() == 10000));
    assert!(b.accepted().iter().any(|x| x.local.port() == 10001));
}

#[test]
fn two_namespaces_stay_independent() {
    let (ns1, agent1, _a1, _b1) = setup();
    let ns2 = Netns::create();
    let (agent2, _a2, _b2) = std::thread::scope(|s| {
        s.spawn(|| {
            ns2.enter();
            let a = Replica::start("mtp1", A);
            let b = Replica::start("mtp2", B);
            let agent = ns2.agent(&[]);
            agent.wait_state("mtp2", State::Up);
            (agent, a, b)
        })
        .join()
        .unwrap()
    });
    assert_ne!(ns1.pin_dir(), ns2.pin_dir());
    let h1 = hold(6);
    let h2 = std::thread::scope(|s| {
        s.spawn(|| {
            ns2.enter();
            hold(2)
        })
        .join()
        .unwrap()
    });
    let (m1, m2) = (agent1.maps(), agent2.maps());
    let sum = |m: &mtlb::kernel::maps::Maps| conns(m, 0).established + conns(m, 1).established;
    assert_eq!(sum(&m1), 6);
    assert_eq!(sum(&m2), 2);
    drop(h1);
    drop(h2);
}

#[test]
fn bad_config_is_rejected_and_attaches_nothing() {
    let ns = Netns::new();
    let dir = std::env::temp_dir().join(format!("mtlb-bad-{}", ns.ino));
    std::fs::create_dir_all(&dir).unwrap();
    for (cfg, needle) in [
        (Config::new().set("replicas", 0), "`replicas`: 0"),
        (Config::new().port(10001), "`port`: 10001"),
        (
            Config::new().set("replica_adress", "127.0.0.1"),
            "replica_adress",
        ),
        (Config::new().set("port", "https"), "port"),
        // Cross-checks: a replica's stats port on the balanced port, IPv6
        // clients with IPv4 replicas.
        (
            Config::new().stats_base_port(442),
            "`check.stats_base_port`: 442: mtp2's stats port 443 is the balanced port",
        ),
        (
            Config::new().set("addresses", vec!["::1"]),
            "`addresses`: ::1: IPv6 clients",
        ),
    ] {
        let path = cfg.write_to(&dir.join("mtlb.toml"));
        let text = cfg.text();
        let mut agent = ns.spawn_agent(&["--config", path.to_str().unwrap()]);
        let status = agent.wait_exit();
        assert!(!status.success(), "accepted {text:?}");
        let log = agent.log();
        assert!(
            log.contains(needle),
            "error for {text:?} lacks {needle:?}: {log}"
        );
        assert!(!ns.pin_dir().exists(), "pins left for {text:?}");
    }
    // A bad flag, too.
    let mut agent = ns.spawn_agent(&["--replicas", "100"]);
    assert!(!agent.wait_exit().success());
    assert!(agent.log().contains("`replicas`: 100"), "{}", agent.log());
    // Nothing attached to this namespace.
    let links = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let links: serde_json::Value = serde_json::from_slice(&links.stdout).unwrap();
    let ours = links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["netns_ino"].as_u64() == Some(ns.ino))
        .count();
    assert_eq!(ours, 0, "links attached to the namespace: {links}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn ipv6_clients_reach_dual_stack_replicas() {
    let ns = Netns::new();
    // Dual-stack listeners, as the official MTProxy opens with IPv6 on.
    let a = Replica::start_with("mtp1", "[::]:10000", 1024, true, Some(false));
    let _b = Replica::start_with("mtp2", "[::]:10001", 1024, true, Some(false));
    let agent = ns.agent(&[]);
    agent.wait_for("replica mtp2 registered: [::]:10001 (IPv6 dual-stack");
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let held6 = hold_at("[::1]:443", 4);
    let t = tally(held6.iter().map(|(_, n)| n));
    assert_eq!((t["mtp1"], t["mtp2"]), (2, 2), "{t:?}");
    let held4 = hold(2);
    assert_eq!(held4.len(), 2);
    let seen = a.accepted();
    assert!(
        seen.iter().any(|x| x.peer.ip().to_string() == "::1"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|x| x.peer.ip().to_string() == "::ffff:127.0.0.1"),
        "{seen:?}"
    );
}

#[test]
fn ipv6_client_refused_cleanly_by_ipv4_only_replicas() {
    let (_ns, agent, _a, _b) = setup();
    let t0 = Instant::now();
    let err = TcpStream::connect("[::1]:443").expect_err("IPv4-only replicas took IPv6");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "refusal was not immediate"
    );
    assert!(agent.maps().stat(mtlb_common::stat::NO_BACKEND).unwrap() >= 1);
    // IPv4 still works.
    assert!(can_dial(BALANCED));
}

#[test]
fn no_replica_refuses_at_once_and_remove_takes_the_pins() {
    let ns = Netns::new();
    let mut agent = ns.agent(&[]);
    // Published: DOWN, no replica listens.
    agent.wait_state("mtp1", State::Down);
    let err = TcpStream::connect(BALANCED).expect_err("connected with no replica");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // Pins: directory 0700, files 0600.
    use std::os::unix::fs::PermissionsExt as _;
    let dir = ns.pin_dir();
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            e.metadata().unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            e.path().display()
        );
    }
    // SIGTERM keeps the pins (a restart must not stop steering); `mtlb
    // remove` takes them away.
    assert!(agent.stop().success());
    assert!(dir.exists(), "pins removed by SIGTERM");
    let (ok, out) = mtlb_cli(&ns, &["remove"]);
    assert!(ok, "{out}");
    assert!(!dir.exists(), "pins left after mtlb remove");
    let (ok, out) = mtlb_cli(&ns, &["remove"]);
    assert!(ok && out.contains("nothing to remove"), "{out}");
    assert!(connect_fails(BALANCED));
}

fn hold_at(addr: &str, n: usize) -> Vec<(TcpStream, String)> {
    (0..n)
        .map(|i| connect(addr).unwrap_or_else(|e| panic!("connect {addr} #{i}: {e}")))
        .collect()
}

#[test]
fn kept_pins_keep_steering_and_the_next_agent_replaces_them() {
    let (ns, mut agent, _a, _b) = setup();
    drop(agent);
    // The dropped agent was killed (SIGKILL): its pins stay, and so does
    // steering from the pinned program and maps.
    let (_held, name) = connect(BALANCED).expect("steering after the agent died");
    assert!(name.starts_with("mtp"));
    assert!(ns.pin_dir().exists());

    // SIGTERM (keep_pins, the default): same. The new agent takes the
    // pinned state over: the connection held across the restart is still
    // counted.
    agent = ns.agent(&[]);
    agent.wait_for("taking over the pinned state of an earlier agent");
    let m = agent.maps();
    assert_eq!(conns(&m, 0).established + conns(&m, 1).established, 1);
    agent.wait_state("mtp2", State::Up);
    assert!(agent.stop().success());
    assert!(agent.log().contains("keeping programs attached"));
    assert!(can_dial(BALANCED), "steering after a kept-pins exit");

    // With keep_pins false, SIGTERM takes everything down.
    let mut agent = ns.agent(&["--keep-pins", "false"]);
    agent.wait_state("mtp2", State::Up);
    assert!(agent.stop().success());
    assert!(!ns.pin_dir().exists());
    assert!(connect_fails(BALANCED));
}

#[test]
fn works_under_ip_netns_exec() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let bin = std::env::var("MTLB_BIN").unwrap();
    // `ip netns exec` remounts /sys: no bpffs, no cgroup2 there.
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, &bin, "run"]);
    let agent = Agent::command(cmd, ns.pin_dir());
    agent.wait_state("mtp2", State::Up);
    let log = agent.log();
    assert!(log.contains("mounted cgroup2 at"), "{log}");
    assert!(log.contains("using the host's bpffs"), "{log}");
    // The pins are the host's: readable from here.
    let held = hold(2);
    let maps = agent.maps();
    assert_eq!(conns(&maps, 0).established + conns(&maps, 1).established, 2);
    drop(held);
}

/// The feature probe runs before anything is loaded: a kernel too old (here
/// one the agent is told it runs on, through the UNAME26 personality) is
/// named, and nothing is attached or pinned.
#[test]
fn an_old_kernel_is_named_before_anything_is_loaded() {
    let ns = Netns::new();
    let mut cmd = std::process::Command::new("setarch");
    cmd.args(["x86_64", "--uname-2.6"])
        .arg(std::env::var("MTLB_BIN").unwrap())
        .arg("run")
        .arg("--state-dir")
        .arg(ns.state_dir());
    ns.run_inside(&mut cmd);
    let mut agent = Agent::command(cmd, ns.pin_dir());
    assert!(!agent.wait_exit().success());
    let log = agent.log();
    assert!(
        log.contains("this kernel (2.6.") && log.contains("is older than Linux 5.15"),
        "{log}"
    );
    assert!(!ns.pin_dir().exists(), "pinned on a refused kernel");
}
