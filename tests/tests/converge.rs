//! Convergence: whatever reloads and operator commands the agent goes
//! through, however fast, once things are quiet it shows what a fresh
//! agent started with the final config and the saved state shows, and it
//! steers to every healthy replica. Each test runs in its own network
//! namespace with its own agent. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use nix::sys::signal::{Signal, kill};
use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

const PORTS: [&str; 3] = ["127.0.0.1:10000", "127.0.0.1:10001", "127.0.0.1:10002"];

fn cfg(replicas: u16) -> Config {
    Config::new().fast_checks().replicas(replicas)
}

fn reload_to(ns: &Netns, replicas: u16) {
    cfg(replicas).write(ns);
    let (ok, out) = mtlb_cli(ns, &["reload"]);
    assert!(ok, "{out}");
}

/// What the kernel is told and what STATUS shows of each configured
/// replica: the SETTINGS slot count, and per replica its state word,
/// admin-relevant flags, registration, weight and whether it is enabled.
fn shown(agent: &Agent, replicas: u32) -> Vec<String> {
    let maps = agent.maps();
    let settings = maps.settings().expect("SETTINGS");
    let mut out = vec![format!("slots={}", settings.replicas)];
    for slot in 0..replicas {
        let s = maps.status(slot).expect("STATUS");
        let b = maps.backend(slot).expect("BACKENDS");
        out.push(format!(
            "mtp{} state={} oper={} registered={} weight={} enabled={}",
            slot + 1,
            s.state,
            s.oper,
            s.registered,
            s.weight,
            b.enabled
        ));
    }
    out
}

/// Waits until what the agent shows holds still for a few check
/// intervals (fast checks: 100 ms), and returns it.
fn quiet(agent: &Agent, replicas: u32) -> Vec<String> {
    let deadline = Instant::now() + wait_limit();
    let mut last = shown(agent, replicas);
    let mut still = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = shown(agent, replicas);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > scaled(Duration::from_millis(800)) {
            return last;
        }
        assert!(Instant::now() < deadline, "never quiet: {last:?}");
    }
}

/// Connects until `replica` has accepted a client (bounded).
fn takes_clients(replica: &Replica) {
    let before = replica.steered();
    let deadline = Instant::now() + wait_limit();
    let mut held = Vec::new();
    while replica.steered() == before {
        assert!(
            Instant::now() < deadline,
            "{} got no client in {} connections",
            replica.name,
            held.len()
        );
        held.push(TcpStream::connect(BALANCED).expect("a client served"));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `agent`, starts a fresh one with the same config file and saved
/// state, and returns what it shows once quiet.
fn fresh_shows(ns: &Netns, agent: &mut Agent, file: &str, replicas: u32) -> Vec<String> {
    agent.stop();
    let fresh = ns.agent(&["--config", file]);
    let shown = quiet(&fresh, replicas);
    *agent = fresh;
    shown
}

fn state_file_says(ns: &Netns, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(ns.state_file()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).expect("state file is JSON");
    v["backends"][name]["admin"].as_str().map(str::to_string)
}

/// Three stand-in replicas and an agent steering to them, all UP; the
/// config file's path.
fn three_up(ns: &Netns) -> (Vec<Replica>, String, Agent) {
    let replicas = PORTS
        .iter()
        .enumerate()
        .map(|(i, a)| Replica::start(&format!("mtp{}", i + 1), a))
        .collect();
    let file = cfg(3).write(ns);
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp3", State::Up);
    (replicas, file, agent)
}

/// 3 → 2 → 3 with gaps around the agent's 100 ms tick (the removal of a
/// drained slot happens on it): mtp3 comes back UP and takes clients,
/// and the agent then shows what a fresh one does.
fn scale_down_and_up(drain: bool) {
    let ns = Netns::new();
    let (replicas, file, mut agent) = three_up(&ns);
    if drain {
        let (ok, out) = mtlb_cli(&ns, &["backend", "mtp3", "drain"]);
        assert!(ok, "{out}");
    }
    let want = if drain { State::Drain } else { State::Up };
    for gap in [30, 80, 150, 250] {
        reload_to(&ns, 2);
        std::thread::sleep(Duration::from_millis(gap));
        reload_to(&ns, 3);
        agent.wait_state("mtp3", want);
    }
    let live = quiet(&agent, 3);
    if drain {
        assert_eq!(state_file_says(&ns, "mtp3").as_deref(), Some("DRAIN"));
    } else {
        takes_clients(&replicas[2]);
    }
    let fresh = fresh_shows(&ns, &mut agent, &file, 3);
    assert_eq!(live, fresh, "the running agent and a fresh one differ");
}

#[test]
fn quick_scale_down_and_up_keeps_the_replica() {
    scale_down_and_up(false);
}

#[test]
fn quick_scale_down_and_up_keeps_an_operators_drain() {
    scale_down_and_up(true);
}

/// A script flipping `replicas` 3 ↔ 2 by SIGHUP many times a second while
/// clients connect: nothing fails, and once it stops the agent steers to
/// all three and shows what a fresh agent shows; mtp2's DRAIN holds.
#[test]
fn rapid_flips_converge() {
    let ns = Netns::new();
    let (replicas, file, mut agent) = three_up(&ns);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    let l = ConnectLoop::new().start(&ns);
    // 20 to 100 flips a second, about 3 s in all.
    let mut flips = 0;
    for (i, gap_ms) in [50u64, 30, 20, 10].iter().cycle().take(160).enumerate() {
        cfg(if i % 2 == 0 { 2 } else { 3 }).write(&ns);
        kill(pid, Signal::SIGHUP).expect("SIGHUP to the agent");
        flips += 1;
        std::thread::sleep(Duration::from_millis(*gap_ms));
    }
    // The last flip wrote 3.
    assert_eq!(flips % 2, 0);
    let r = l.finish();
    assert!(r.failed.is_empty(), "failed clients: {:?}", r.failed);
    agent.wait_state("mtp3", State::Up);
    agent.wait_state("mtp2", State::Drain);
    let live = quiet(&agent, 3);
    takes_clients(&replicas[2]);
    takes_clients(&replicas[0]);
    assert_eq!(state_file_says(&ns, "mtp2").as_deref(), Some("DRAIN"));
    let fresh = fresh_shows(&ns, &mut agent, &file, 3);
    assert_eq!(live, fresh, "the running agent and a fresh one differ");
}

/// Bytes received, by replica name.
type ByName = Vec<(String, f64)>;

/// Bytes received per replica as /metrics and `mtlb status` show them.
fn bytes_in(ns: &Netns) -> (ByName, ByName) {
    let (_, text) = http_get("/metrics");
    let (ok, out) = mtlb_cli(ns, &["status", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    let status: ByName = v["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["bytes_in"].as_f64().unwrap(),
            )
        })
        .collect();
    let metrics = status
        .iter()
        .map(|(name, _)| {
            let sample = format!("mtlb_backend_bytes_received_total{{backend=\"{name}\"}}");
            (name.clone(), metric(&text, &sample).unwrap_or(0.0))
        })
        .collect();
    (metrics, status)
}

/// Per-replica byte counters across a `port` reload, a restart on another
/// port and a restart with fewer replicas: never lower than before (a
/// Prometheus counter), `mtlb status` and /metrics agree, and a replica a
/// restart scales away while it holds clients drains as after a reload.
#[test]
fn counters_hold_across_port_changes_and_restarts() {
    use std::io::{Read as _, Write as _};
    let ns = Netns::new();
    let _a = Replica::start("mtp1", PORTS[0]);
    let _b = Replica::start("mtp2", PORTS[1]);
    let file = cfg(2).write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp2", State::Up);
    // Four clients, 50,000 bytes each through the echoing replicas.
    let mut held: Vec<(TcpStream, String)> = (0..4)
        .map(|_| connect(BALANCED).expect("a client served"))
        .collect();
    assert!(held.iter().any(|(_, n)| n == "mtp2"), "none on mtp2");
    let chunk = vec![0x5au8; 50_000];
    for (s, _) in &mut held {
        s.write_all(&chunk).unwrap();
        let mut back = vec![0u8; chunk.len()];
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let (m0, s0) = bytes_in(&ns);
    assert_eq!(m0, s0, "/metrics and status differ");
    for (name, b) in &m0 {
        let on = held.iter().filter(|(_, n)| n == name).count() as f64;
        assert!(*b >= on * 50_000.0, "{name}: {b} bytes in");
    }
    let not_lower = |before: &ByName, after: &ByName, what: &str| {
        for (name, b) in before {
            let a = after.iter().find(|(n, _)| n == name).map(|(_, a)| *a);
            assert!(
                a.is_some_and(|a| a >= *b),
                "{what}: {name} went from {b} to {a:?}"
            );
        }
    };
    // A reload onto another balanced port.
    cfg(2).port(8443).write(&ns);
    let (ok, out) = mtlb_cli(&ns, &["reload"]);
    assert!(ok, "{out}");
    let (m1, s1) = bytes_in(&ns);
    not_lower(&m0, &m1, "/metrics after a port reload");
    not_lower(&s0, &s1, "status after a port reload");
    assert_eq!(m1, s1, "/metrics and status differ after a port reload");
    // A restart on yet another port, with mtp2 scaled away while its
    // clients are still connected.
    let file = cfg(1).port(9443).write(&ns);
    agent.stop();
    agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp1", State::Up);
    let (m2, s2) = bytes_in(&ns);
    not_lower(&m1, &m2, "/metrics after a restart");
    not_lower(&s1, &s2, "status after a restart");
    assert_eq!(m2, s2, "/metrics and status differ after a restart");
    let maps = agent.maps();
    assert_eq!(maps.settings().unwrap().replicas, 2, "mtp2 drains first");
    assert_eq!(maps.backend(1).unwrap().enabled, 0, "mtp2 gets no client");
    // Once its clients leave, mtp2 goes.
    held.retain(|(_, n)| n != "mtp2");
    let deadline = Instant::now() + wait_limit();
    while maps.settings().unwrap().replicas != 1 {
        assert!(Instant::now() < deadline, "mtp2 never removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
}

/// Sets the soft open-file limit of process `pid` (prlimit(2) through
/// util-linux's prlimit); the hard limit stays, so it can be raised again.
fn set_nofile(pid: u32, n: u64) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
        .output()
        .expect("running prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
}

/// The lowest descriptor number `pid` leaves free, the least over a second
/// (scaled) of looks: below it are the descriptors it keeps, so with it as
/// the limit no new one can be opened. A check's socket or a scan's
/// netlink socket (every 500 ms) holds one for a while, longer under
/// emulation; a limit taken while one is open leaves its number free for
/// the checks once it closes.
fn lowest_free_fd(pid: u32) -> u64 {
    let until = Instant::now() + scaled(Duration::from_secs(1));
    let mut lowest = lowest_free_now(pid);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        lowest = lowest.min(lowest_free_now(pid));
    }
    lowest
}

fn lowest_free_now(pid: u32) -> u64 {
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's fds")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).expect("a free number")
}

/// The agent runs out of file descriptors: its checks cannot run, which
/// says nothing about the replicas. They stay UP and keep taking clients,
/// the journal tells the agent's problem, and once it has descriptors
/// again /metrics and /healthz show it.
#[test]
fn the_agents_own_fd_shortage_downs_no_replica() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", PORTS[0]);
    let _b = Replica::start("mtp2", PORTS[1]);
    let file = cfg(2).write(&ns);
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp2", State::Up);
    let pid = agent.pid();
    let from = agent.log_len();
    // No descriptor number left below the limit: every check's socket()
    // fails with EMFILE.
    set_nofile(pid, lowest_free_fd(pid));
    agent.wait_for_after(from, "agent problem:");
    // An operator's command waits in the control socket's backlog: the
    // agent's accept() fails with EMFILE every 100 ms meanwhile.
    let _waiting = dial_control(&ns.control_socket(&["--config", &file])).unwrap();
    // Fast checks fall after 2 failures 100 ms apart: 2 s is twenty
    // intervals in which a replica would have gone DOWN.
    let until = Instant::now() + scaled(Duration::from_secs(2));
    let mut clients = 0;
    while Instant::now() < until {
        for name in ["mtp1", "mtp2"] {
            assert!(
                agent.is_state(name, State::Up),
                "{name} left UP on the agent's own shortage: {}",
                agent.log()
            );
        }
        TcpStream::connect(BALANCED).expect("a client served");
        clients += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(clients > 10);
    // Told once, not every 100 ms; nor the scans' and polls' failed reads
    // (every 500 ms), each kind once a minute.
    let log = agent.log();
    assert_eq!(log.matches("control socket: accepting").count(), 1, "{log}");
    for what in [
        "looking for running replicas",
        "reading replica registrations",
    ] {
        assert!(log.matches(what).count() <= 1, "{what} told again:\n{log}");
    }
    set_nofile(pid, 4096);
    let deadline = Instant::now() + wait_limit();
    let text = loop {
        let (_, text) = http_get("/metrics");
        let n = metric(&text, "mtlb_agent_check_errors_total{reason=\"files\"}");
        if n.is_some_and(|n| n >= 2.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no check errors counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(&text, "mtlb_agent_check_errors_total{reason=\"memory\"}"),
        Some(0.0)
    );
    let (code, body) = http_get("/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("agent problem"), "{body}");
    assert!(!agent.log().contains("is DOWN"), "{}", agent.log());
}
