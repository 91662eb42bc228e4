//! `mtlb rollout`: replicas in processes of their own, restarted one at a
//! time by a shell command that `mtlb rollout` runs inside the test's
//! namespace. Run as root through `cargo xtask test rollout`.

use mtlb_tests::*;
use std::{
    io::Read as _,
    net::TcpStream,
    process::Stdio,
    time::{Duration, Instant},
};

const NAMES: [&str; 3] = ["mtp1", "mtp2", "mtp3"];

fn agent(ns: &Netns, replicas: u16) -> Agent {
    let cfg = Config::new().replicas(replicas).fast_checks().write(ns);
    ns.agent(&["--config", &cfg])
}

/// A namespace with replicas mtp1..=mtpN UP under its agent.
fn up(replicas: u16) -> (Netns, RestartableReplicas, Agent) {
    let ns = Netns::new();
    let set = RestartableReplicas::start_all(&ns, replicas);
    let agent = agent(&ns, replicas);
    for n in &NAMES[..replicas as usize] {
        agent.wait_state(n, State::Up);
    }
    (ns, set, agent)
}

/// `mtlb rollout --exec <the set's command> EXTRA` inside `ns`, to its
/// end; (success, stdout and stderr), printed for the test's log.
fn rollout(ns: &Netns, set: &RestartableReplicas, extra: &[&str]) -> (bool, String) {
    let exec = set.command();
    let mut args = vec!["rollout", "--exec", &exec, "--up-timeout", "20s"];
    args.extend(extra);
    let (ok, out) = mtlb_cli_within(ns, &args, scaled(Duration::from_secs(90)))
        .expect("mtlb rollout did not end within 90 s");
    eprintln!("mtlb rollout (ok: {ok}):\n{out}");
    (ok, out)
}

/// The operator-state lines of the agent's log, as "DRAIN mtp1",
/// "READY mtp1": the order in which replicas were taken out and put back.
fn admin_changes(agent: &Agent) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("(by operator)"))
        .filter_map(|l| {
            let rest = &l[l.find("backend mtp")? + "backend ".len()..];
            let name = rest.split_whitespace().next()?;
            let state = [
                ("DRAIN mode", "DRAIN"),
                ("READY", "READY"),
                ("maintenance", "MAINT"),
            ]
            .into_iter()
            .find(|(word, _)| rest.contains(word))?
            .1;
            Some(format!("{state} {name}"))
        })
        .collect()
}

/// Whether the peer of `s` has closed it (EOF or reset) within the wait
/// limit.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(wait_limit())).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn restarts_every_replica_in_turn_without_refusing_a_client() {
    let (ns, set, agent) = up(3);
    let before = set.pids();
    // Clients that hold their connections across the rollout, as
    // Telegram clients do: each replica's restart cuts its share.
    let mut held: Vec<(TcpStream, String)> = (0..6)
        .map(|i| connect(BALANCED).unwrap_or_else(|e| panic!("held connection #{i}: {e}")))
        .collect();
    let l = ConnectLoop::new().greet().strict().start(&ns);
    let maps = agent.maps();
    wait_counts(&maps, 3, "the loop running", |_| {
        maps.stat(mtlb_common::stat::LOOKUPS).unwrap() > 30
    });

    // Long enough for the loop's own connections to close.
    let grace = format!("{}s", scaled(Duration::from_secs(1)).as_secs());
    let (ok, out) = rollout(&ns, &set, &["--grace", &grace]);
    let r = l.finish();
    assert!(ok, "{out}");

    // No new client was refused or cut, and the loop ran throughout.
    assert!(r.failed.is_empty(), "failed connects: {:?}", r.failed);
    assert!(r.ok > 20, "only {} connects in the loop", r.ok);
    // Each replica restarted once, in order, each a new process.
    assert_eq!(set.restarts(), [1, 2, 3], "{out}");
    for (n, (old, new)) in before.iter().zip(set.pids()).enumerate() {
        assert_ne!(*old, new, "mtp{} has the same pid", n + 1);
    }
    // One replica out at a time: each was drained while the two others
    // took clients, and readied before the next was drained.
    assert_eq!(
        admin_changes(&agent),
        [
            "DRAIN mtp1",
            "READY mtp1",
            "DRAIN mtp2",
            "READY mtp2",
            "DRAIN mtp3",
            "READY mtp3"
        ],
        "{}",
        agent.log()
    );
    let drains = agent
        .log()
        .lines()
        .filter(|l| l.contains("DRAIN mode (by operator). 2 active backends."))
        .count();
    assert_eq!(drains, 3, "{}", agent.log());
    // All back, UP and READY, when it returns.
    for n in NAMES {
        assert!(agent.is_state(n, State::Up), "{n}: {:?}", agent.status(n));
    }
    // The held connections were cut by the restarts (they outlived the
    // grace), and counted apart.
    for (s, name) in &mut held {
        assert!(closed_by_peer(s), "a held connection to {name} survived");
    }
    assert!(
        out.contains("6 connections cut by the restarts (left after the grace)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("connections left after the {grace} grace")),
        "{out}"
    );
    for n in NAMES {
        assert!(
            out.contains(&format!("{n}: new listener … UP in ")),
            "{out}"
        );
    }
}

#[test]
fn refuses_to_start_with_one_replica_taking_clients() {
    let ns = Netns::new();
    let set = RestartableReplicas::new(3);
    set.start(&ns, 1);
    set.start(&ns, 2);
    let agent = agent(&ns, 3);
    agent.wait_state("mtp2", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "maint"]);
    assert!(ok, "{out}");
    agent.wait_state("mtp3", State::Down);
    let before = [set.pid(1), set.pid(2)];

    let (ok, out) = rollout(&ns, &set, &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "refusing to start: 1 of 3 replicas take clients (UP and READY): \
             mtp1 UP, mtp2 MAINT, mtp3 DOWN"
        ),
        "{out}"
    );
    // Nothing changed.
    assert!(set.restarts().is_empty());
    assert_eq!([set.pid(1), set.pid(2)], before);
    assert!(agent.is_state("mtp1", State::Up));
    assert!(agent.is_state("mtp2", State::Maint));
    assert_eq!(admin_changes(&agent), ["MAINT mtp2"]);
}

#[test]
fn a_failing_command_stops_the_rollout_at_its_replica() {
    let (ns, set, agent) = up(3);
    let before = set.pids();
    set.fail_for(2);

    let (ok, out) = rollout(&ns, &set, &["--grace", "0s"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("mtp2: not restarting (the test says so)"),
        "{out}"
    );
    assert!(
        out.contains(
            "rollout stopped at mtp2: `sh '"
        ) && out.contains(
            "' 2` failed (exit status: 3). mtp2 is left in DRAIN: `mtlb backend mtp2 ready` undoes it"
        ) && out.contains("Restarted: mtp1. Not reached: mtp3."),
        "{out}"
    );
    // The replicas' table, as `mtlb status` prints it.
    assert!(out.contains("NAME   ADDRESS"), "{out}");
    assert_eq!(set.restarts(), [1]);
    let after = set.pids();
    assert_ne!(after[0], before[0], "mtp1 not restarted");
    assert_eq!(after[1..], before[1..], "mtp2 or mtp3 restarted");
    assert!(agent.is_state("mtp1", State::Up));
    assert!(agent.is_state("mtp2", State::Drain));
    assert!(agent.is_state("mtp3", State::Up));
    assert_eq!(
        admin_changes(&agent),
        ["DRAIN mtp1", "READY mtp1", "DRAIN mtp2"]
    );
    // What the message says undoes it.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "ready"]);
    assert!(ok, "{out}");
    assert!(agent.is_state("mtp2", State::Up));
}

#[test]
fn a_replica_not_back_in_time_stops_the_rollout() {
    let (ns, set, agent) = up(2);
    let before = set.pids();
    // A command that succeeds without restarting anything.
    let (ok, out) = mtlb_cli_within(
        &ns,
        &["rollout", "--exec", "true {n}", "--up-timeout", "1s"],
        scaled(Duration::from_secs(60)),
    )
    .expect("mtlb rollout did not end within 60 s");
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "rollout stopped at mtp1: no new listener UP within 1s: \
             still its old listener: the command did not restart it. \
             mtp1 is left in DRAIN"
        ),
        "{out}"
    );
    assert_eq!(set.pids(), before);
    assert!(agent.is_state("mtp1", State::Drain));
    assert!(agent.is_state("mtp2", State::Up));
}

#[test]
fn skips_replicas_the_operator_drained_and_restarts_only_those_named() {
    let (ns, set, agent) = up(3);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    let before = set.pids();

    let (ok, out) = rollout(&ns, &set, &["--replicas", "mtp2,3"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("mtp2: skipped: in DRAIN (the operator's), left as it is"),
        "{out}"
    );
    assert!(
        out.contains("restarted mtp3;") && out.contains("skipped mtp2"),
        "{out}"
    );
    assert_eq!(set.restarts(), [3]);
    let after = set.pids();
    assert_eq!(after[..2], before[..2], "mtp1 or mtp2 restarted");
    assert_ne!(after[2], before[2], "mtp3 not restarted");
    assert!(agent.is_state("mtp1", State::Up));
    assert!(agent.is_state("mtp2", State::Drain));
    assert!(agent.is_state("mtp3", State::Up));
}

#[test]
fn an_interrupt_stops_the_command_and_leaves_its_replica_draining() {
    let (ns, set, agent) = up(2);
    let started = set.dir().join("started");
    let cmd_pid = set.dir().join("command.pid");
    let exec = format!(
        "echo $$ >'{}'; touch '{}'; exec sleep 60",
        cmd_pid.display(),
        started.display()
    );
    let mut child = mtlb_cli_command(&ns, &["rollout", "--exec", &exec])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + wait_limit();
    while !started.exists() {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "the command did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("mtlb rollout:\n{text}");
    assert!(!out.status.success(), "{text}");
    // Stopped the command rather than waiting for it.
    assert!(t.elapsed() < scaled(Duration::from_secs(10)), "{text}");
    assert!(
        text.contains("rollout stopped at mtp1: interrupted by SIGINT while `echo")
            && text.contains("mtp1 is left in DRAIN: `mtlb backend mtp1 ready` undoes it"),
        "{text}"
    );
    let pid: i32 = std::fs::read_to_string(&cmd_pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "the command still runs: {stat}"
    );
    assert!(agent.is_state("mtp1", State::Drain));
    assert!(agent.is_state("mtp2", State::Up));
    assert!(set.restarts().is_empty());
}
