//! Several hosts behind one router, each running mtlb (issue 22): a host's
//! agent announces the VIPs through its BIRD, configured by the
//! deployment's role, exactly while the host can serve; the router's BIRD
//! merges the hosts' routes into one ECMP route. Root; namespaces of their
//! own (tests/src/bgp.rs). What the router's ECMP does to held connections
//! is measured in tests/tests/ecmp.rs.

use mtlb_tests::*;
use std::time::{Duration, Instant};

/// Which hosts `n` new clients of `vip` land on.
fn spread(lab: &Lab, vip: std::net::IpAddr, n: usize) -> Vec<usize> {
    let mut seen = vec![0; lab.hosts()];
    for (_, h) in lab.hold(vip, n) {
        seen[h] += 1;
    }
    seen
}

/// A loop of new clients of `vip` from the client namespace, one at a
/// time, each greeted.
fn client_loop(vip: std::net::IpAddr) -> ConnectLoop {
    ConnectLoop::new()
        .to(std::net::SocketAddr::new(vip, 443))
        .greet()
        .pace(Duration::from_millis(5))
}

/// Loops of both families; each client must be greeted (strict).
fn clients(lab: &Lab) -> [RunningLoop; 2] {
    [VIP4, VIP6].map(|vip| client_loop(vip).strict().start(lab.client()))
}

/// Like [`clients`], but a connection reset in flight counts as cut, not
/// failed: for loops that run across a move of the router.
fn clients_across_a_move(lab: &Lab) -> [RunningLoop; 2] {
    [VIP4, VIP6].map(|vip| client_loop(vip).start(lab.client()))
}

/// Stops the loops; asserts no client failed, at most `max_cut` of each
/// loop were cut in flight, and some got through; the hosts that took
/// them.
fn no_client_failed(loops: [RunningLoop; 2], what: &str, max_cut: usize) -> Vec<usize> {
    let mut hosts = Vec::new();
    for l in loops {
        let out = l.finish();
        println!(
            "{what}: {} clients, {} cut, {} failed, by host {:?}",
            out.ok,
            out.cut,
            out.failed.len(),
            out.greeted
        );
        assert!(out.failed.is_empty(), "{what}: {:?}", out.failed);
        assert!(out.cut <= max_cut, "{what}: {} cut", out.cut);
        assert!(out.ok >= 5, "{what}: only {} clients", out.ok);
        for g in out.greeted.keys() {
            hosts.push(Lab::host_of(g).unwrap());
        }
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Issue 22's acceptance with mtlb on two hosts: each host is announced
/// while its replicas serve, withdrawn when they all stop (within fall +
/// 1 s) and by `mtlb host drain` (before any replica is touched; the host
/// closes none of its held connections, though the router's move resets
/// them), kept across kill -9 of its agent, and withdrawn by BFD when its
/// link goes down; no new client fails once the router has converged, nor
/// during a drain.
#[test]
fn hosts_are_announced_while_they_can_serve() {
    let lab = Lab::new(2);
    let mut a = start_mtlb(&lab, 0);
    let b = start_mtlb(&lab, 1);
    let t = lab.routed_to(&[0, 1], wait_limit());
    println!("both hosts announced {t:?} after the last agent answered");
    for vip in [VIP4, VIP6] {
        let seen = spread(&lab, vip, 40);
        assert!(
            seen.iter().all(|n| *n > 0),
            "{vip}: clients per host {seen:?}"
        );
    }
    let (ok, status) = mtlb_cli(&lab.host(0).ns, &["status", "--config", &a.file]);
    assert!(
        ok && status.contains("announced (2 replicas UP)"),
        "{status}"
    );

    // Every replica of host 0 stops: withdrawn within fall + 1 s.
    let t0 = Instant::now();
    for r in &mut a.replicas {
        r.kill();
    }
    lab.routed_to(&[1], wait_limit());
    let t = t0.elapsed();
    println!("host 0's replicas killed: its nexthop gone after {t:?} (fall {FALL_MS} ms)");
    assert!(
        t < scaled(Duration::from_millis(FALL_MS + 1000)),
        "withdrawn after {t:?}"
    );
    a.agent
        .wait_for("withdrawing 192.0.2.200, 2001:db8:ff::80: no replica UP");
    let loops = clients(&lab);
    loops.iter().for_each(|l| l.wait_ok(50));
    assert_eq!(no_client_failed(loops, "host 0 withdrawn", 0), [1]);
    a.replicas = lab_replicas(&lab, 0);
    let t = lab.routed_to(&[0, 1], wait_limit());
    println!("host 0's replicas back: announced again after {t:?} (rise {RISE_MS} ms)");
    wait_until("host 0 takes clients again", || {
        spread(&lab, VIP4, 10)[0] > 0
    });

    // Drain: withdrawn when the command answers, replicas untouched, no
    // client fails meanwhile but the one a loop may have in flight to host
    // 0 when the router moves (host 1 resets it, as it resets the held
    // ones below; one at a time, so at most one a loop); the host closes
    // none of its held connections.
    let held: Vec<_> = lab
        .hold(VIP6, 40)
        .into_iter()
        .filter(|(_, h)| *h == 0)
        .collect();
    assert!(!held.is_empty());
    let loops = clients_across_a_move(&lab);
    let out = a.cli(&lab, "drain");
    assert!(out.contains("host drained"), "{out}");
    let table = announce_routes(&lab.host(0).ns.name);
    assert!(table.is_empty(), "withdrawn before the answer: {table:?}");
    for name in ["mtp1", "mtp2"] {
        let s = a.agent.status(name);
        assert_eq!(
            s.state,
            mtlb_common::STATE_UP,
            "host 0's {name} touched by the drain"
        );
    }
    let t = lab.routed_to(&[1], wait_limit());
    println!("host 0 drained: its nexthop gone {t:?} after the command answered");
    // The router has moved: what follows lands on host 1 only.
    let after = clients(&lab);
    after.iter().for_each(|l| l.wait_ok(50));
    no_client_failed(loops, "during the drain", 1);
    assert_eq!(no_client_failed(after, "host 0 drained", 0), [1]);
    // Host 0 closed none of its held connections: its replicas still hold
    // every one. But the router now sends their packets to host 1, which
    // has no socket for them and resets them (issue 22, point 5: keeping
    // them takes forwarding between hosts, docs/deployment.md).
    let ss = ss_balanced(&lab.host(0).ns);
    let established = held
        .iter()
        .filter(|(c, _)| ss.contains(&c.local_addr().unwrap().to_string()))
        .count();
    assert_eq!(established, held.len(), "{ss}");
    let reset = held
        .iter()
        .filter(|(s, _)| echo(s, b"held").contains("reset"))
        .count();
    println!(
        "host 0 drained: {established} held connections still open on host 0; \
         after the router moved, {reset} of {} reset by host 1",
        held.len()
    );
    // With two hosts every flow of host 0 now goes to host 1.
    assert_eq!(reset, held.len());
    drop(held);
    a.cli(&lab, "ready");
    lab.routed_to(&[0, 1], wait_limit());

    // kill -9 of host 0's agent: the route stays, host 0 still serves,
    // the next agent takes over without a withdrawal.
    let both = lab.addrs(VIP4, [0, 1]);
    let ((), _, off) = sampling(
        || lab.nexthops(VIP4) == both,
        || {
            a.agent.kill9();
            wait_until("host 0 serves without its agent", || {
                spread(&lab, VIP4, 10)[0] > 0
            });
            a.agent = lab.host(0).ns.agent(&["--config", &a.file]);
            a.agent
                .wait_for("announced as the last agent left it; taking the decision over");
            a.agent.wait_state("mtp1", State::Up);
            a.agent.wait_state("mtp2", State::Up);
            // That nothing is withdrawn can only be seen over time: a
            // withdrawal would come fall_ms after the first checks at the
            // latest.
            std::thread::sleep(scaled(Duration::from_millis(2 * FALL_MS)));
        },
    );
    assert_eq!(off, 0, "readings of the router without host 0");
    assert!(!a.agent.log().contains("withdrawing"), "{}", a.agent.log());

    // Host 0's link down: BFD withdraws it within a second.
    let t0 = Instant::now();
    lab.link_down(0);
    lab.routed_to(&[1], wait_limit());
    let t = t0.elapsed();
    println!("host 0's link down: withdrawn by BFD after {t:?}");
    assert!(t < scaled(Duration::from_secs(1)), "withdrawn after {t:?}");
    let loops = clients(&lab);
    loops.iter().for_each(|l| l.wait_ok(50));
    assert_eq!(no_client_failed(loops, "host 0's link down", 0), [1]);
    lab.link_up(0);
    lab.routed_to(&[0, 1], wait_limit());
    drop(b);
}
