//! One host's announcement of its service addresses, seen where the agent
//! writes it: the VIPs on `lo` and their host routes in the announce table
//! (which BIRD learns; the several-hosts tests run BIRD and a router).
//! Each test in its own network namespace with its own agent. Run as root
//! through `cargo xtask test`.

use mtlb_tests::*;
use std::{process::Command, time::Duration};

const VIP4: &str = "192.0.2.80";
const VIP6: &str = "2001:db8:ff::80";
/// Dual-stack replicas on [::], as the official server listens with IPv6
/// on: IPv4 clients of the VIP reach them IPv4-mapped.
const MTP1: &str = "[::]:10000";
const MTP2: &str = "[::]:10001";

fn config() -> Config {
    Config::new()
        .fast_checks()
        .replicas(2)
        .set("replica_address", "::1")
        .vips(&[VIP4, VIP6])
        .announce("rise_ms", 300)
        .announce("fall_ms", 300)
}

fn routes(ns: &Netns) -> Vec<String> {
    announce_routes(&ns.name)
}

fn announced(ns: &Netns) -> bool {
    routes(ns) == [VIP4, VIP6]
}

/// The addresses on the namespace's `lo`.
fn lo_addresses(ns: &Netns) -> String {
    let o = Command::new("ip")
        .args(["-n", &ns.name, "-br", "addr", "show", "lo"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Who greets a client of `addr` (the VIP on the balanced port).
fn served_by(addr: &str) -> Option<String> {
    connect(addr).ok().map(|(_, g)| g)
}

/// The route follows what the host can serve: announced once a replica is
/// UP for rise_ms, withdrawn once none is for fall_ms, back with the
/// replicas; `mtlb host drain` withdraws before it answers and touches no
/// replica (clients that still arrive are served); `mtlb host ready`
/// announces again; status, /stats and /metrics say it.
#[test]
fn the_route_follows_the_replicas_and_the_operator() {
    let ns = Netns::new();
    let file = config().write(&ns);
    let mut r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let mut r2 = ReplicaProcess::start(&ns, "mtp2", MTP2);
    let agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("added {VIP4}, {VIP6} to lo"));
    agent.wait_for(&format!("announcing {VIP4}, {VIP6}: 2 replicas UP"));
    assert!(announced(&ns), "{:?}", routes(&ns));
    let lo = lo_addresses(&ns);
    assert!(
        lo.contains(&format!("{VIP4}/32")) && lo.contains(&format!("{VIP6}/128")),
        "{lo}"
    );
    // The VIP is steered like any local address, IPv4 and IPv6.
    assert!(served_by(&format!("{VIP4}:443")).is_some());
    assert!(served_by(&format!("[{VIP6}]:443")).is_some());
    let (ok, out) = mtlb_cli(&ns, &["status", "--config", &file]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "announce: {VIP4}, {VIP6}: announced (2 replicas UP)"
        )),
        "{out}"
    );
    let (_, metrics) = http_get("/metrics");
    assert!(
        metrics.contains(&format!("mtlb_vip_announced{{vip=\"{VIP6}\"}} 1")),
        "{metrics}"
    );
    let (_, page) = http_get("/stats");
    assert!(page.contains("<b>announced</b> (2 replicas UP)"), "{page}");

    // Both replicas go: withdrawn after fall_ms.
    let from = agent.log_len();
    r1.kill();
    r2.kill();
    agent.wait_for_after(from, &format!("withdrawing {VIP4}, {VIP6}: no replica UP"));
    assert!(routes(&ns).is_empty(), "{:?}", routes(&ns));
    let (_, metrics) = http_get("/metrics");
    assert!(
        metrics.contains(&format!("mtlb_vip_announced{{vip=\"{VIP4}\"}} 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "mtlb_vip_announcement_changes_total{{vip=\"{VIP4}\"}} 2"
        )),
        "{metrics}"
    );
    let (_, host) = mtlb_cli(&ns, &["host", "--config", &file]);
    assert!(host.contains("withdrawn: no replica UP"), "{host}");
    // The addresses stay: what the host holds keeps working.
    assert!(lo_addresses(&ns).contains(VIP4));

    // One comes back: announced again.
    let from = agent.log_len();
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    agent.wait_for_after(from, &format!("announcing {VIP4}, {VIP6}: 1 replica UP"));
    assert!(announced(&ns));

    // Drain: withdrawn when the command answers, no replica touched.
    let held = connect(&format!("[{VIP6}]:443")).expect("a client before the drain");
    let (ok, out) = mtlb_cli(&ns, &["host", "drain", "--config", &file]);
    assert!(ok && out.contains("host drained"), "{out}");
    assert!(
        routes(&ns).is_empty(),
        "withdrawn before the answer: {:?}",
        routes(&ns)
    );
    assert_eq!(served_by(&format!("{VIP4}:443")).as_deref(), Some("mtp1"));
    assert_eq!(
        echo(&held.0, b"still here"),
        "still here",
        "held connection"
    );
    let (_, host) = mtlb_cli(&ns, &["host", "--config", &file]);
    assert!(host.contains("withdrawn: drained by operator"), "{host}");
    let (ok, out) = mtlb_cli(&ns, &["host", "ready", "--config", &file]);
    assert!(ok, "{out}");
    assert!(
        announced(&ns),
        "ready announces a host that served all along"
    );
}

/// kill -9 of the agent leaves the route; the next agent takes it over
/// without withdrawing, even for a moment; so does a SIGTERM (a service
/// restart); a drain saved before holds
/// across a restart; `mtlb remove` withdraws and takes the VIPs off lo.
#[test]
fn restarts_keep_the_route_and_remove_takes_it() {
    let ns = Netns::new();
    let file = config().write(&ns);
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let _r2 = ReplicaProcess::start(&ns, "mtp2", MTP2);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("announcing {VIP4}, {VIP6}"));
    agent.kill9();
    assert!(announced(&ns), "the route outlives the agent");
    let (ok, out) = mtlb_cli(&ns, &["status", "--config", &file]);
    assert!(
        ok && out.contains("announced (the agent does not answer"),
        "{out}"
    );
    // The route is read every 10 ms all through the next agent's start,
    // until it has taken over and its replicas are UP.
    let (agent, readings, gaps) = sampling(
        || announced(&ns),
        || {
            let agent = ns.agent(&["--config", &file]);
            agent.wait_for("announced as the last agent left it; taking the decision over");
            agent.wait_state("mtp1", State::Up);
            agent.wait_state("mtp2", State::Up);
            // That nothing is withdrawn can only be seen over time: past
            // twice fall_ms, a withdrawal would have happened.
            std::thread::sleep(scaled(Duration::from_millis(600)));
            agent
        },
    );
    assert_eq!(gaps, 0, "{gaps} of {readings} readings without the route");
    assert!(!agent.log().contains("withdrawing"), "{}", agent.log());

    // A service restart (SIGTERM, pins kept) leaves the route too.
    let mut agent = agent;
    assert!(agent.stop().success());
    assert!(announced(&ns), "the route outlives a stopped agent");
    let agent = ns.agent(&["--config", &file]);
    agent.wait_for("announced as the last agent left it; taking the decision over");
    agent.wait_state("mtp1", State::Up);
    assert!(announced(&ns));

    // A drain is kept across a restart.
    let (ok, out) = mtlb_cli(&ns, &["host", "drain", "--config", &file]);
    assert!(ok, "{out}");
    drop(agent);
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp1", State::Up);
    let (_, host) = mtlb_cli(&ns, &["host", "--config", &file]);
    assert!(host.contains("withdrawn: drained by operator"), "{host}");
    assert!(routes(&ns).is_empty());
    let from = agent.log_len();
    let (ok, out) = mtlb_cli(&ns, &["host", "ready", "--config", &file]);
    assert!(ok, "{out}");
    // Announced once the replicas have served for rise_ms (they came UP
    // with this agent just now).
    agent.wait_for_after(from, &format!("announcing {VIP4}, {VIP6}"));
    assert!(announced(&ns));

    let (ok, out) = mtlb_cli(&ns, &["remove", "--config", &file]);
    assert!(ok, "{out}");
    drop(agent);
    assert!(routes(&ns).is_empty(), "{:?}", routes(&ns));
    let lo = lo_addresses(&ns);
    assert!(!lo.contains(VIP4) && !lo.contains(VIP6), "{lo}");
}

/// A VIP the replicas could not take is refused before anything changes:
/// nothing added to lo, nothing announced; a host command without VIPs is
/// an error that says what is missing.
#[test]
fn bad_announce_configs_change_nothing() {
    let ns = Netns::new();
    let file = Config::new().vips(&[VIP6]).write(&ns);
    let (ok, out) = mtlb_cli(&ns, &["check-config", "--config", &file]);
    assert!(
        !ok && out.contains("`announce.vips`") && out.contains("replica_address"),
        "{out}"
    );
    let run = mtlb_cli_within(&ns, &["run", "--config", &file], wait_limit()).expect("exits");
    assert!(!run.0 && run.1.contains("`announce.vips`"), "{}", run.1);
    assert!(!lo_addresses(&ns).contains(VIP6));
    assert!(routes(&ns).is_empty());

    let file = Config::new().fast_checks().write(&ns);
    let _r1 = ReplicaProcess::start(&ns, "mtp1", "127.0.0.1:10000");
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp1", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["host", "drain", "--config", &file]);
    assert!(!ok && out.contains("[announce] vips"), "{out}");
}

/// The table is mtlb's: a route in it that is no VIP (any protocol) is
/// withdrawn at start, and a start that finds some VIPs only writes them
/// all; `mtlb remove` with no agent running withdraws whatever the table
/// holds and takes the VIPs off lo.
#[test]
fn strays_go_at_start_and_remove_without_an_agent_clears_all() {
    let ns = Netns::new();
    let ip = |args: &[&str]| {
        let o = Command::new("ip")
            .arg("-n")
            .arg(&ns.name)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // As an operator's `ip route add` writes them: proto boot.
    ip(&["route", "add", "192.0.2.99", "dev", "lo", "table", "4242"]);
    ip(&["route", "add", VIP4, "dev", "lo", "table", "4242"]);
    let file = config().write(&ns);
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for("withdrawing 192.0.2.99: not in announce.vips");
    assert!(
        !routes(&ns).contains(&"192.0.2.99".to_string()),
        "{:?}",
        routes(&ns)
    );
    agent.wait_for(&format!("announcing {VIP4}, {VIP6}"));
    assert!(announced(&ns), "{:?}", routes(&ns));

    agent.kill9();
    ip(&["route", "add", "192.0.2.98", "dev", "lo", "table", "4242"]);
    let (ok, out) = mtlb_cli(&ns, &["remove", "--config", &file]);
    assert!(ok && out.contains("withdrew"), "{out}");
    assert!(routes(&ns).is_empty(), "{:?}", routes(&ns));
    let lo = lo_addresses(&ns);
    assert!(!lo.contains(VIP4) && !lo.contains(VIP6), "{lo}");
}

/// `announce.vips` and `announce.table` are changed across restarts: the
/// start withdraws what is left in the earlier table, a dropped VIP whose
/// route it withdraws stays on lo while the router converges and the next
/// start takes it off; an address mtlb never held stays on lo throughout.
#[test]
fn a_restart_with_another_announce_takes_the_old_one_back() {
    let ns = Netns::new();
    let foreign = "192.0.2.99";
    let o = Command::new("ip")
        .args([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{foreign}/32"),
            "dev",
            "lo",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let file = config().write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("announcing {VIP4}, {VIP6}"));
    assert!(announced(&ns), "{:?}", routes(&ns));
    agent.kill9();

    // VIP6 dropped, another table: the routes in 4242 were announced when
    // this start found them.
    let file = config().vips(&[VIP4]).announce("table", 4343).write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!(
        "withdrawing {VIP4}, {VIP6} from table {ANNOUNCE_TABLE}: announce.table is 4343 now"
    ));
    agent.wait_for(&format!(
        "{VIP6}: not in announce.vips any more; withdrawn, left on lo"
    ));
    agent.wait_for(&format!("announcing {VIP4}"));
    assert!(routes(&ns).is_empty(), "{:?}", routes(&ns));
    assert_eq!(announce_routes_in(&ns.name, 4343), [VIP4]);
    let lo = lo_addresses(&ns);
    assert!(
        lo.contains(VIP4) && lo.contains(VIP6) && lo.contains(foreign),
        "{lo}"
    );
    agent.kill9();

    // The next start finds VIP6 withdrawn: off lo now.
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!(
        "took {VIP6} off lo: not in announce.vips any more"
    ));
    let lo = lo_addresses(&ns);
    assert!(
        lo.contains(VIP4) && !lo.contains(VIP6) && lo.contains(foreign),
        "{lo}"
    );
    agent.kill9();

    // A start with nothing to announce takes VIP4 off too and withdraws
    // its route (announced a moment ago: it stays on lo until the next).
    let file = Config::new()
        .fast_checks()
        .replicas(2)
        .set("replica_address", "::1")
        .write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("{VIP4}: not in announce.vips any more"));
    assert!(announce_routes_in(&ns.name, 4343).is_empty());
    agent.kill9();
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("took {VIP4} off lo"));
    let lo = lo_addresses(&ns);
    assert!(!lo.contains(VIP4) && lo.contains(foreign), "{lo}");
    agent.kill9();
}

/// `mtlb remove` with no agent running takes off lo the addresses the
/// last start kept there for the router, not only `announce.vips`.
#[test]
fn remove_takes_a_kept_vip_off_too() {
    let ns = Netns::new();
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let file = config().write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("announcing {VIP4}, {VIP6}"));
    agent.kill9();
    let file = config().vips(&[VIP4]).write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_for(&format!("{VIP6}: not in announce.vips any more"));
    agent.kill9();
    let state = ns.state_dir();
    let state = state.to_str().unwrap();
    let (ok, out) = mtlb_cli(&ns, &["remove", "--config", &file, "--state-dir", state]);
    assert!(ok, "{out}");
    let lo = lo_addresses(&ns);
    assert!(!lo.contains(VIP4) && !lo.contains(VIP6), "{lo}");
}
