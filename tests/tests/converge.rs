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

/// 3 → 2 → 3 with gaps around the agent's 100 ms tick (the removal of a
/// drained slot happens on it): mtp3 comes back UP and takes clients,
/// and the agent then shows what a fresh one does.
fn scale_down_and_up(drain: bool) {
    let ns = Netns::new();
    let replicas: Vec<Replica> = PORTS
        .iter()
        .enumerate()
        .map(|(i, a)| Replica::start(&format!("mtp{}", i + 1), a))
        .collect();
    let file = cfg(3).write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp3", State::Up);
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
    let replicas: Vec<Replica> = PORTS
        .iter()
        .enumerate()
        .map(|(i, a)| Replica::start(&format!("mtp{}", i + 1), a))
        .collect();
    let file = cfg(3).write(&ns);
    let mut agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp3", State::Up);
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
