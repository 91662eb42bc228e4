//! Health checking, failover and runtime control. Each test runs in its own
//! network namespace with its own agent and real replica processes or
//! threads. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use nix::sys::signal::Signal;
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    sync::atomic::Ordering,
    time::Duration,
};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";
const C: &str = "127.0.0.1:10002";

/// Fast checks so that tests take seconds (inter 100 ms, rise 2, fall 2),
/// and a stalled accept queue seen within a second.
fn fast() -> Config {
    Config::new().fast_checks().check("stall_ms", 1000)
}

fn agent_with(ns: &Netns, cfg: Config) -> Agent {
    ns.agent(&["--config", &cfg.write(ns)])
}

fn echo(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
}

#[test]
fn killed_replica_fails_over_with_a_down_line() {
    let ns = Netns::new();
    let _a = ReplicaProcess::start(&ns, "mtp1", A);
    let mut b = ReplicaProcess::start(&ns, "mtp2", B);
    let agent = agent_with(&ns, fast());
    agent.wait_state("mtp2", State::Up);
    let l = ConnectLoop::new().greet().start(&ns);
    // Let the loop run on both replicas first, long enough to mean
    // something however slow the machine.
    wait_counts(&agent.maps(), 2, "traffic on both", |_| {
        let m = agent.maps();
        let (a, b) = (m.slot_totals(0).unwrap(), m.slot_totals(1).unwrap());
        b.established > 5 && a.established + b.established > 20
    });
    b.kill();
    // The operator's line, in HAProxy's format (where this suite tests
    // it): the kernel is told first, so the state is DOWN by then too.
    let line = agent.wait_for("backend mtp2 is DOWN");
    assert!(
        line.contains("backend mtp2 is DOWN, reason: ")
            && line.contains(", info: \"")
            && line.contains(", check duration: ")
            && line.contains("ms. 1 active backends left. ")
            && line.ends_with(" connections active."),
        "{line}"
    );
    assert!(agent.is_state("mtp2", State::Down));
    let r = l.finish();
    assert!(r.ok > 20, "loop made only {} connections", r.ok);
    assert!(r.failed.is_empty(), "failed connects: {:?}", r.failed);
    assert!(r.cut <= 1, "{} connections lost", r.cut);
}

#[test]
fn stopped_replica_is_down_by_its_accept_queue_and_back_after_sigcont() {
    let ns = Netns::new();
    let _a = ReplicaProcess::start(&ns, "mtp1", A);
    let b = ReplicaProcess::start(&ns, "mtp2", B);
    let agent = agent_with(&ns, fast());
    agent.wait_state("mtp2", State::Up);
    b.signal(Signal::SIGSTOP);
    // New connections queue up at the stopped replica (the kernel still
    // completes their handshakes, so TCP checks pass).
    let queued: Vec<_> = (0..6)
        .map(|_| TcpStream::connect(BALANCED).unwrap())
        .collect();
    // DOWN for its stalled accept queue (its checks pass: the kernel
    // completes their handshakes).
    agent.wait_status("mtp2", "DOWN, accept queue stalled", |s| {
        s.state == mtlb_common::STATE_DOWN && s.flags & mtlb_common::STATUS_STALLED != 0
    });
    // From now on every connection is served by mtp1.
    for i in 0..20 {
        let (_s, name) = connect(BALANCED).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        assert_eq!(name, "mtp1", "connection #{i} after DOWN");
    }
    b.signal(Signal::SIGCONT);
    agent.wait_state("mtp2", State::Up);
    // The queued connections are served once it runs again.
    let names: Vec<String> = queued.iter().map(|s| greeting(s).unwrap()).collect();
    assert!(names.iter().any(|n| n == "mtp2"), "{names:?}");
}

#[test]
fn drain_and_wait_drained() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = agent_with(&ns, fast());
    agent.wait_state("mtp2", State::Up);
    let mut held: Vec<(TcpStream, String)> = (0..10).map(|_| connect(BALANCED).unwrap()).collect();
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    agent.wait_state("mtp2", State::Drain);
    // No new connection reaches it; existing ones keep working.
    for _ in 0..10 {
        assert_eq!(connect(BALANCED).unwrap().1, "mtp1");
    }
    for (s, name) in held.iter_mut().filter(|(_, n)| n == "mtp2") {
        assert!(echo(s), "held connection to {name} broken by drain");
    }
    // wait-drained returns when the last one closes, not before.
    let mut waiter = mtlb_cli_spawn(
        &ns,
        &["backend", "mtp2", "wait-drained", "--timeout", "20s"],
    );
    let (mut on_b, on_a): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, n)| n == "mtp2");
    assert!(!on_b.is_empty());
    while on_b.len() > 1 {
        on_b.pop();
    }
    // The kernel's count reaches the last one while it is still open.
    wait_counts(&agent.maps(), 2, "one left on mtp2", |c| {
        c[1].established == 1
    });
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "returned with one connection open"
    );
    on_b.clear();
    let status = waiter.wait().unwrap();
    assert!(status.success(), "wait-drained failed");
    // A timeout is an error; so is an unknown name.
    assert!(!on_a.is_empty());
    let (ok, out) = mtlb_cli(
        &ns,
        &["backend", "mtp1", "wait-drained", "--timeout", "200ms"],
    );
    assert!(!ok && out.contains("still has"), "{out}");
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp9", "drain"]);
    assert!(!ok && out.contains("no backend named"), "{out}");
}

/// Unmounts a bpffs the agent mounted for a test (lazily: the agent may
/// still be going away).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `control_dir` and `bpffs` set only in the agent's config file: every
/// command finds the agent through the same file; without it, they look in
/// the default places and say so.
#[test]
fn commands_find_an_agent_placed_by_its_config_file_alone() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let own = ns.state_dir().join("own");
    let bpffs = own.join("bpf");
    let control = own.join("ctl");
    let _unmount = Unmount(bpffs.clone());
    let p = fast()
        .set("bpffs", bpffs.to_str().unwrap())
        .set("control_dir", control.to_str().unwrap())
        .write(&ns);
    let c = p.as_str();
    let mut agent = ns.agent(&["--config", c]);
    agent.wait_state("mtp2", State::Up);
    assert!(
        agent
            .log()
            .contains(&format!("mounted bpffs at {}", bpffs.display())),
        "{}",
        agent.log()
    );
    let pin_dir = bpffs.join("mtlb").join(ns.ino.to_string());
    assert!(
        pin_dir.join("BACKENDS").exists(),
        "pins under the config's bpffs"
    );
    assert!(control.join(format!("{}.sock", ns.ino)).exists());

    // Without the file: the default places, named in the error.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(
        !ok && out.contains(&format!("/run/mtlb/{}.sock", ns.ino)),
        "{out}"
    );
    let (ok, out) = mtlb_cli(&ns, &["status"]);
    assert!(!ok && out.contains("/sys/fs/bpf/mtlb/"), "{out}");

    // With it, each command reaches the agent.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain", "--config", c]);
    assert!(ok, "{out}");
    agent.wait_state("mtp2", State::Drain);
    let (ok, out) = mtlb_cli(&ns, &["status", "--config", c]);
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("mtp2 ") && l.contains("DRAIN")),
        "{out}"
    );
    let (ok, out) = mtlb_cli(
        &ns,
        &[
            "backend",
            "-c",
            c,
            "mtp2",
            "wait-drained",
            "--timeout",
            "5s",
        ],
    );
    assert!(ok && out.contains("mtp2 drained"), "{out}");
    let (ok, out) = mtlb_cli(&ns, &["reload", "--config", c]);
    assert!(ok && out.contains("reloaded: 2 replicas"), "{out}");
    // Flags still win over the file.
    let (ok, out) = mtlb_cli(
        &ns,
        &[
            "backend",
            "mtp1",
            "ready",
            "--config",
            c,
            "--control-dir",
            "/nonexistent",
        ],
    );
    assert!(!ok && out.contains("/nonexistent/"), "{out}");

    // Taken off for good through the same file.
    let (ok, out) = mtlb_cli(&ns, &["remove", "--config", c]);
    assert!(ok, "{out}");
    assert!(agent.wait_exit().success());
    assert!(!pin_dir.exists(), "pins left after mtlb remove");
}

#[test]
fn weights_split_three_to_one_and_survive_a_restart() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let mut agent = agent_with(&ns, fast());
    agent.wait_state("mtp2", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp1", "weight", "3"]);
    assert!(ok, "{out}");
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "maint"]);
    assert!(ok, "{out}");
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp1", "weight", "0"]);
    assert!(!ok && out.contains("1..=256"), "{out}");
    // Operator state survives an agent restart.
    assert!(agent.stop().success());
    let agent = agent_with(&ns, fast());
    agent.wait_status("mtp2", "MAINT, UP by its checks", |s| {
        s.state == mtlb_common::STATE_MAINT && s.oper == mtlb_common::STATE_UP
    });
    assert_eq!(
        connect(BALANCED).unwrap().1,
        "mtp1",
        "mtp2 should still be in MAINT"
    );
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "ready"]);
    assert!(ok, "{out}");
    let held: Vec<_> = (0..39).map(|_| connect(BALANCED).unwrap()).collect();
    let t = tally(held.iter().map(|(_, n)| n));
    // 40 connections in all with the one above: 30/10 ± 5%.
    let (na, nb) = (t["mtp1"] + 1, t["mtp2"]);
    assert!(
        na.abs_diff(30) <= 2 && nb.abs_diff(10) <= 2,
        "split {na}/{nb}"
    );
}

#[test]
fn reload_scales_two_three_two_without_dropping_anything() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let c = Replica::start("mtp3", C);
    let cfg = fast().replicas(2).write(&ns);
    let agent = ns.agent(&["--config", &cfg]);
    agent.wait_state("mtp2", State::Up);
    let l = ConnectLoop::new().greet().hold(usize::MAX).start(&ns);
    // 2 → 3: mtp3 joins.
    fast().replicas(3).write(&ns);
    let (ok, out) = mtlb_cli(&ns, &["reload"]);
    assert!(ok, "{out}");
    agent.wait_state("mtp3", State::Up);
    wait_counts(&agent.maps(), 3, "traffic on mtp3", |c| {
        c[2].established > 5
    });
    // 3 → 2 by SIGHUP: mtp3 drains; its connections stay up.
    fast().replicas(2).write(&ns);
    let from = agent.log_len();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid(&agent)),
        Signal::SIGHUP,
    )
    .unwrap();
    agent.wait_for_after(from, "backend mtp3 is draining before removal");
    // That line comes before BACKENDS is written, and a connection steered
    // to mtp3 just before the write is accepted a moment later: count
    // mtp3's clients once the kernel no longer steers to it and it has
    // accepted every connection it was given.
    let maps = agent.maps();
    let deadline = std::time::Instant::now() + wait_limit();
    while !(maps.backend(2).is_ok_and(|b| b.enabled == 0) && {
        let k = conns(&maps, 2);
        k.handshakes_now() == 0 && k.established as usize == c.steered()
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "mtp3 still steered to or not settled: {:?}, {} accepted",
            conns(&maps, 2),
            c.steered()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_c = c.steered();
    // An invalid config is rejected and the running one stays.
    Config::new().set("replicas", 0).write(&ns);
    let (ok, out) = mtlb_cli(&ns, &["reload"]);
    assert!(!ok && out.contains("`replicas`: 0"), "{out}");
    agent.wait_for("reload failed, keeping the running configuration");
    let mut r = l.finish();
    assert!(r.failed.is_empty(), "failed connects: {:?}", r.failed);
    assert_eq!(r.cut, 0, "connections lost during reloads");
    assert!(r.ok > 10, "only {} connections", r.ok);
    for s in r.held.iter_mut().step_by(7) {
        assert!(
            echo(s),
            "an established connection broke during the reloads"
        );
    }
    assert_eq!(
        c.steered(),
        on_c,
        "mtp3 took connections after it was scaled away"
    );
    // Every connection mtp3 holds is still established.
    assert_eq!(conns(&maps, 2).established as usize, on_c);
}

fn agent_pid(agent: &Agent) -> i32 {
    agent.pid() as i32
}

#[test]
fn agent_kill_9_keeps_steering_and_the_next_one_adopts_counts() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let mut agent = agent_with(&ns, fast());
    agent.wait_state("mtp2", State::Up);
    let l = ConnectLoop::new().greet().hold(usize::MAX).start(&ns);
    wait_counts(&agent.maps(), 2, "some traffic", |c| {
        c[0].established + c[1].established > 20
    });
    agent.kill9();
    // Steering goes on from the pinned program while no agent runs.
    let dead = agent.maps();
    let before = conns(&dead, 0).established + conns(&dead, 1).established;
    wait_counts(&dead, 2, "connections while the agent is dead", |c| {
        c[0].established + c[1].established > before + 20
    });
    let agent = agent_with(&ns, fast());
    let r = l.finish();
    assert!(r.failed.is_empty(), "failed connects: {:?}", r.failed);
    assert_eq!(r.cut, 0, "connections lost across the agent restart");
    let held = r.held;
    // The counts are those of the connections actually held.
    let maps = agent.maps();
    wait_counts(&maps, 2, "counts match held connections", |c| {
        (c[0].established + c[1].established) as usize == held.len()
            && c[0].handshakes + c[1].handshakes == 0
    });
}

#[test]
fn flapping_replica_does_not_flip_on_every_check() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    // A stats endpoint for mtp2 that alternates ready / not ready: ready
    // for the check that proves its listener, then alternating.
    let served = stats_endpoint(
        std::net::TcpListener::bind("127.0.0.1:20001").unwrap(),
        |i| {
            if i == 0 { 1 } else { ((i + 1) % 2) as u32 }
        },
    );
    let _ok = stats_endpoint(
        std::net::TcpListener::bind("127.0.0.1:20000").unwrap(),
        |_| 1,
    );
    let agent = agent_with(&ns, fast().check_kind("stats").stats_base_port(20000));
    agent.wait_state("mtp2", State::Up);
    // Ten failed checks of mtp2, each between successes: with rise 2 and
    // fall 2 it must never change state.
    let st = agent.wait_status("mtp2", "10 failed checks", |s| s.check_failures >= 10);
    assert!(served.load(Ordering::Relaxed) >= 10);
    assert_eq!(st.transitions_down, 0, "flipped: {st:?}");
    let log = agent.log();
    assert!(
        log.contains("Health check for backend mtp2 failed"),
        "{log}"
    );
    assert!(!log.contains("backend mtp2 is DOWN"), "flipped: {log}");
}
