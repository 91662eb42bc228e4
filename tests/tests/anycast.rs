//! Several hosts behind one router (issue 22): each host's BIRD, configured
//! by the deployment's role, announces the VIPs while their route is in the
//! host's announce table; the router's BIRD merges the hosts' routes into
//! one ECMP route. Root; namespaces of their own (tests/src/bgp.rs).

use mtlb_tests::*;
use std::time::{Duration, Instant};

/// Every host announced: the router's routes to both VIPs have a nexthop
/// per host, and new clients land on every host.
fn announce_all(lab: &Lab) {
    for i in 0..lab.hosts() {
        lab.announce_by_hand(i);
    }
    for vip in [VIP4, VIP6] {
        let all = lab.addrs(vip, 0..lab.hosts());
        lab.wait_nexthops(vip, &all, wait_limit());
    }
}

/// Does `event`, then waits until the router's routes to both VIPs have
/// the nexthops of hosts `hosts`; returns how long after the event each
/// (IPv4, IPv6) had them, both within `limit`.
fn after(
    lab: &Lab,
    event: impl FnOnce(),
    hosts: &[usize],
    limit: Duration,
) -> (Duration, Duration) {
    let t0 = Instant::now();
    event();
    let mut t = [Duration::ZERO; 2];
    for (k, vip) in [VIP4, VIP6].into_iter().enumerate() {
        lab.wait_nexthops(vip, &lab.addrs(vip, hosts.iter().copied()), limit);
        t[k] = t0.elapsed();
        assert!(
            t[k] < limit,
            "{vip}: after {:?}, not within {limit:?}",
            t[k]
        );
    }
    (t[0], t[1])
}

#[test]
fn withdrawal_by_route_link_and_bird() {
    let lab = Lab::new(2);
    let _l: Vec<_> = (0..2).map(|i| lab.listen(i)).collect();
    assert!(lab.nexthops(VIP4).is_empty(), "announced before any route");
    announce_all(&lab);
    for vip in [VIP4, VIP6] {
        let mut seen = [0; 2];
        for (_, h) in lab.hold(vip, 40) {
            seen[h] += 1;
        }
        assert!(
            seen.iter().all(|n| *n > 0),
            "{vip}: clients per host {seen:?}"
        );
    }

    // The announcing route goes: BIRD sees it at once (netlink), not at
    // its next scan of the table (10 s).
    let quick = Duration::from_secs(3);
    let (t4, t6) = after(&lab, || lab.withdraw_by_hand(0), &[1], quick);
    println!("route deleted on host 0: its nexthop gone after {t4:?} (IPv4), {t6:?} (IPv6)");
    let ok = lab.hold(VIP4, 20);
    assert!(
        ok.iter().all(|(_, h)| *h == 1),
        "a client on the withdrawn host"
    );
    let (t4, t6) = after(&lab, || lab.announce_by_hand(0), &[0, 1], quick);
    println!("route back on host 0: its nexthop back after {t4:?} (IPv4), {t6:?} (IPv6)");

    // Host 0's link goes down on its side; the router's port loses its
    // carrier but its bridge stays up: BFD notices.
    let second = scaled(Duration::from_secs(1));
    let (t4, t6) = after(&lab, || lab.link_down(0), &[1], second);
    println!("link of host 0 down: withdrawn by BFD after {t4:?} (IPv4), {t6:?} (IPv6)");
    let (t4, t6) = after(&lab, || lab.link_up(0), &[0, 1], wait_limit());
    println!("link of host 0 up: announced again after {t4:?} (IPv4), {t6:?} (IPv6)");
    lab.wait_sessions(4);

    // Host 0's BIRD dies: its sessions' sockets close with it.
    let (t4, t6) = after(&lab, || lab.kill_bird(0), &[1], second);
    println!("BIRD of host 0 killed: withdrawn after {t4:?} (IPv4), {t6:?} (IPv6)");
    let (t4, t6) = after(&lab, || lab.restart_bird(0), &[0, 1], wait_limit());
    println!("BIRD of host 0 restarted: announced again after {t4:?} (IPv4), {t6:?} (IPv6)");
    lab.wait_sessions(4);
}

/// How many established connections a change of the announcing hosts
/// cuts, with the router's ECMP as BIRD writes it and with a resilient
/// nexthop group (issue 22, point 5): one host withdrawn, and the same host
/// back. Printed; asserted where the outcome is the kernel's documented
/// behaviour.
#[test]
fn cut_flows_on_withdrawal() {
    let lab = Lab::new(3);
    let _l: Vec<_> = (0..3).map(|i| lab.listen(i)).collect();
    announce_all(&lab);
    let all = [0, 1, 2];
    let mut figures = Vec::new();
    for ecmp in [Ecmp::Bird, Ecmp::Resilient { buckets: 128 }] {
        // Which flows hash-threshold moves depends on where the nexthop
        // sits in the route: each host once, for IPv4.
        for (vip, gone) in [(VIP4, 0), (VIP4, 1), (VIP4, 2), (VIP6, 0)] {
            let rest: Vec<usize> = all.into_iter().filter(|i| *i != gone).collect();
            let out = lab.cut_flows(vip, ecmp, 600, (&all, &rest), || lab.withdraw_by_hand(gone));
            assert_eq!(out.silent, 0, "{out}");
            assert!(out.per_host.iter().all(|n| *n > 0), "{out}");
            // Every flow of the withdrawn host now goes to a host that
            // has no socket for it.
            assert_eq!(out.gone_cut, out.gone_held, "{out}");
            let back = lab.cut_flows(vip, ecmp, 600, (&rest, &all), || lab.announce_by_hand(gone));
            assert_eq!(back.silent, 0, "{back}");
            assert_eq!(out.new_per_host[gone], 0, "{out}");
            match ecmp {
                // The host back takes new clients at once (and moves old
                // ones).
                Ecmp::Bird => assert!(back.new_per_host.iter().all(|n| *n > 0), "{back}"),
                // Only the withdrawn nexthop's buckets move; the one
                // coming back gets only buckets idle for the group's idle
                // timer (120 s by default), so few new clients for now.
                Ecmp::Resilient { .. } => {
                    assert_eq!(out.kept_cut, 0, "{out}");
                    assert_eq!(back.kept_cut, 0, "{back}");
                }
            }
            figures.push(out.to_string());
            figures.push(back.to_string());
            let other = if vip == VIP4 { VIP6 } else { VIP4 };
            lab.wait_nexthops(other, &lab.addrs(other, all), wait_limit());
        }
    }
    println!(
        "cut flows, 3 hosts, fib_multipath_hash_policy 1:\n  {}",
        figures.join("\n  ")
    );
}

/// A host of the lab running mtlb: two fake replicas on [::] (dual-stack,
/// named `h<i>-mtp<k>` so a client knows the host) and an agent announcing
/// both VIPs with short rise and fall.
struct MtlbHost {
    file: String,
    agent: Agent,
    replicas: Vec<ReplicaProcess>,
}

/// rise_ms and fall_ms of the lab's agents.
const RISE_MS: u64 = 500;
const FALL_MS: u64 = 500;

fn replicas(lab: &Lab, i: usize) -> Vec<ReplicaProcess> {
    (0..2)
        .map(|k| {
            ReplicaProcess::start(
                &lab.host(i).ns,
                &format!("h{i}-mtp{}", k + 1),
                &format!("[::]:{}", 10000 + k),
            )
        })
        .collect()
}

fn start_mtlb(lab: &Lab, i: usize) -> MtlbHost {
    let ns = &lab.host(i).ns;
    let file = Config::new()
        .fast_checks()
        .replicas(2)
        .set("replica_address", "::1")
        .vips(&[&VIP4.to_string(), &VIP6.to_string()])
        .announce("rise_ms", RISE_MS as i64)
        .announce("fall_ms", FALL_MS as i64)
        .write(ns);
    let replicas = replicas(lab, i);
    let agent = ns.agent(&["--config", &file]);
    MtlbHost {
        file,
        agent,
        replicas,
    }
}

fn host_cli(lab: &Lab, i: usize, h: &MtlbHost, verb: &str) -> String {
    let (ok, out) = mtlb_cli(&lab.host(i).ns, &["host", verb, "--config", &h.file]);
    assert!(ok, "mtlb host {verb} on host {i}: {out}");
    out
}

/// Which hosts `n` new clients of `vip` land on.
fn spread(lab: &Lab, vip: std::net::IpAddr, n: usize) -> Vec<usize> {
    let mut seen = vec![0; lab.hosts()];
    for (_, h) in lab.hold(vip, n) {
        seen[h] += 1;
    }
    seen
}

/// New clients of the VIPs from the client namespace, one at a time, both
/// families in turn; each must be greeted (strict).
fn clients(lab: &Lab) -> [RunningLoop; 2] {
    [VIP4, VIP6].map(|vip| {
        ConnectLoop::new()
            .to(std::net::SocketAddr::new(vip, 443))
            .greet()
            .strict()
            .pace(Duration::from_millis(5))
            .start(lab.client())
    })
}

/// Stops the loops; asserts no client failed and some got through; the
/// hosts that took them.
fn no_client_failed(loops: [RunningLoop; 2], what: &str) -> Vec<usize> {
    let mut hosts = Vec::new();
    for l in loops {
        let out = l.finish();
        println!(
            "{what}: {} clients, {} failed, by host {:?}",
            out.ok,
            out.failed.len(),
            out.greeted
        );
        assert!(out.failed.is_empty(), "{what}: {:?}", out.failed);
        assert!(out.ok >= 5, "{what}: only {} clients", out.ok);
        for g in out.greeted.keys() {
            hosts.push(Lab::host_of(g).unwrap());
        }
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Both VIPs' nexthops at the router are those of `hosts`, within `limit`.
fn routed_to(lab: &Lab, hosts: &[usize], limit: Duration) -> Duration {
    [VIP4, VIP6]
        .map(|vip| lab.wait_nexthops(vip, &lab.addrs(vip, hosts.iter().copied()), limit))
        .into_iter()
        .max()
        .unwrap()
}

/// Runs `f` while the router's route to `vip` is read every 10 ms;
/// returns what `f` returned and the readings whose nexthops were not
/// `want`.
fn watching<T>(
    lab: &Lab,
    vip: std::net::IpAddr,
    want: Vec<std::net::IpAddr>,
    f: impl FnOnce() -> T,
) -> (T, usize) {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let mut off = 0;
            for _ in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if lab.nexthops(vip) != want {
                    off += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            off
        });
        let r = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (r, w.join().unwrap())
    })
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
    let t = routed_to(&lab, &[0, 1], wait_limit());
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
    routed_to(&lab, &[1], wait_limit());
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
    assert_eq!(no_client_failed(loops, "host 0 withdrawn"), [1]);
    a.replicas = replicas(&lab, 0);
    let t = routed_to(&lab, &[0, 1], wait_limit());
    println!("host 0's replicas back: announced again after {t:?} (rise {RISE_MS} ms)");
    wait_until("host 0 takes clients again", || {
        spread(&lab, VIP4, 10)[0] > 0
    });

    // Drain: withdrawn when the command answers, replicas untouched, no
    // client fails meanwhile; the host closes none of its held connections.
    let held: Vec<_> = lab
        .hold(VIP6, 40)
        .into_iter()
        .filter(|(_, h)| *h == 0)
        .collect();
    assert!(!held.is_empty());
    let loops = clients(&lab);
    let out = host_cli(&lab, 0, &a, "drain");
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
    let t = routed_to(&lab, &[1], wait_limit());
    println!("host 0 drained: its nexthop gone {t:?} after the command answered");
    // The router has moved: what follows lands on host 1 only.
    let after = clients(&lab);
    after.iter().for_each(|l| l.wait_ok(50));
    no_client_failed(loops, "during the drain");
    assert_eq!(no_client_failed(after, "host 0 drained"), [1]);
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
    host_cli(&lab, 0, &a, "ready");
    routed_to(&lab, &[0, 1], wait_limit());

    // kill -9 of host 0's agent: the route stays, host 0 still serves,
    // the next agent takes over without a withdrawal.
    let both = lab.addrs(VIP4, [0, 1]);
    let ((), off) = watching(&lab, VIP4, both, || {
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
    });
    assert_eq!(off, 0, "readings of the router without host 0");
    assert!(!a.agent.log().contains("withdrawing"), "{}", a.agent.log());

    // Host 0's link down: BFD withdraws it within a second.
    let t0 = Instant::now();
    lab.link_down(0);
    routed_to(&lab, &[1], wait_limit());
    let t = t0.elapsed();
    println!("host 0's link down: withdrawn by BFD after {t:?}");
    assert!(t < scaled(Duration::from_secs(1)), "withdrawn after {t:?}");
    let loops = clients(&lab);
    loops.iter().for_each(|l| l.wait_ok(50));
    assert_eq!(no_client_failed(loops, "host 0's link down"), [1]);
    lab.link_up(0);
    routed_to(&lab, &[0, 1], wait_limit());
    drop(b);
}

/// The cut-established-flows figure with mtlb doing the withdrawing:
/// `mtlb host drain` on one of three hosts, with the router's ECMP as BIRD
/// writes it.
#[test]
fn a_drained_host_cuts_what_ecmp_moves() {
    let lab = Lab::new(3);
    let hosts: Vec<_> = (0..3).map(|i| start_mtlb(&lab, i)).collect();
    routed_to(&lab, &[0, 1, 2], wait_limit());
    let out = lab.cut_flows(VIP4, Ecmp::Bird, 300, (&[0, 1, 2], &[1, 2]), || {
        host_cli(&lab, 0, &hosts[0], "drain");
    });
    println!("mtlb host drain of host 0 of 3: {out}");
    assert_eq!(out.silent, 0, "{out}");
    assert!(out.per_host.iter().all(|n| *n > 0), "{out}");
    // The drained host's held connections now go to hosts without a socket
    // for them (a later step forwards them, see docs/deployment.md).
    assert_eq!(out.gone_cut, out.gone_held, "{out}");
    assert_eq!(out.new_per_host[0], 0, "{out}");
}
