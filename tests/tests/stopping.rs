//! Replicas told to stop: a stop signal to a process holding a replica's
//! listener takes that replica out of rotation at the signal, before it
//! closes anything, and it comes back with its next listener or, if it
//! ignored the signal, after the grace. Each test runs in its own network
//! namespace with its own agent. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

const MTP1: &str = "127.0.0.1:10000";
const MTP2: &str = "127.0.0.1:10001";

/// Lingers this long after SIGTERM (scaled), closing what it accepts
/// unanswered, as the official server does for 30–130 ms; longer here, so
/// a balancer that keeps steering to it fails clients for sure.
fn linger_ms() -> u128 {
    scaled(Duration::from_millis(600)).as_millis()
}

/// Waits until the stop-signal watch knows `pid` as the owner of slot
/// `slot`'s listener (the agent finds owners off its loop, just after a
/// replica registers or comes UP).
fn watched(agent: &Agent, pid: u32, slot: u32) {
    wait_until("the watch knows the replica's pid", || {
        agent
            .maps()
            .owner_pids()
            .expect("OWNER_PIDS")
            .get(&pid)
            .is_some_and(|m| m & (1 << slot) != 0)
    });
}

/// Whether a client connecting now is greeted by `name`.
fn reaches(name: &str) -> bool {
    connect(BALANCED).is_ok_and(|(_, g)| g == name)
}

/// SIGTERM to a replica that lingers as the official server does: no
/// client fails (strict: a connection closed unanswered is a failure),
/// the agent says why in HAProxy's words, /metrics shows it, and the
/// replica started again is checked and back in rotation.
#[test]
fn a_replica_sent_sigterm_gets_no_new_client() {
    let ns = Netns::new();
    let file = Config::new().fast_checks().replicas(2).write(&ns);
    let r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let mut r2 =
        ReplicaProcess::start_on_term(&ns, "mtp2", MTP2, &format!("linger:{}", linger_ms()));
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    watched(&agent, r2.pid(), 1);
    let running = ConnectLoop::new()
        .greet()
        .strict()
        .pace(Duration::from_millis(1))
        .start(&ns);
    wait_until("mtp2 takes clients before the signal", || reaches("mtp2"));
    let pid = r2.pid();
    let from = agent.log_len();
    r2.signal(Signal::SIGTERM);
    // It lingers, then exits; its listener goes.
    let _ = r2.child.wait();
    agent.wait_for_after(from, "replica mtp2 unregistered");
    let out = running.finish();
    println!(
        "clients: {} served, {} failed, {} cut",
        out.ok,
        out.failed.len(),
        out.cut
    );
    assert!(out.failed.is_empty(), "failed clients: {:?}", out.failed);
    // A few hundred on the host; tens under emulation.
    assert!(out.ok > 20, "only {} clients", out.ok);
    let (_, line) = agent.wait_for_after(
        from,
        &format!("backend mtp2 is DOWN, reason: stopping (SIGTERM to pid {pid})"),
    );
    println!("{line}");
    let (_, metrics) = http_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "mtlb_backend_stop_signals_total{backend=\"mtp2\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    // Back: a new process, a new listener, checked, in rotation.
    let _r2b = ReplicaProcess::start(&ns, "mtp2", MTP2);
    agent.wait_state("mtp2", State::Up);
    wait_until("mtp2 takes clients again", || reaches("mtp2"));
    let (_, metrics) = http_get("/metrics");
    assert_eq!(
        metric(&metrics, "mtlb_backend_stopping{backend=\"mtp2\"}"),
        Some(0.0),
        "{metrics}"
    );
    drop(r1);
}

/// A process that ignores SIGTERM keeps its listener: after the grace the
/// mark is lifted, the agent says so, and its checks bring it back.
#[test]
fn a_replica_that_ignores_sigterm_is_back_after_the_grace() {
    // Long enough for the checks below to run while it holds.
    let grace = scaled(Duration::from_millis(1500));
    let ns = Netns::new();
    let file = Config::new()
        .fast_checks()
        .replicas(2)
        .set("stop_grace_ms", grace.as_millis() as i64)
        .write(&ns);
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let r2 = ReplicaProcess::start_on_term(&ns, "mtp2", MTP2, "ignore");
    let agent = ns.agent(&["--config", &file]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    watched(&agent, r2.pid(), 1);
    let from = agent.log_len();
    let t0 = Instant::now();
    r2.signal(Signal::SIGTERM);
    agent.wait_for_after(
        from,
        &format!(
            "backend mtp2 is DOWN, reason: stopping (SIGTERM to pid {})",
            r2.pid()
        ),
    );
    // While marked, the operator's views say why and no client goes to it.
    // (By now the agent has it DOWN too; that the kernel skips it from the
    // signal on, before the agent knows, is the lingering-replica test's.)
    let s = agent.status("mtp2");
    assert_ne!(s.flags & mtlb_common::STATUS_STOPPING, 0, "{s:?}");
    let why = format!("stopping (SIGTERM to pid {})", r2.pid());
    let (_, page) = http_get("/stats");
    assert!(page.contains(&why), "{page}");
    let (ok, status) = mtlb_cli(&ns, &["status"]);
    assert!(ok && status.contains(&why), "{status}");
    for _ in 0..50 {
        let (_, greeting) = connect(BALANCED).expect("a client served");
        assert_eq!(greeting, "mtp1", "a client went to the stopping replica");
    }
    agent.wait_for_after(
        from,
        &format!(
            "backend mtp2 still listens {:.1}s after SIGTERM",
            grace.as_secs_f64()
        ),
    );
    assert!(t0.elapsed() >= grace, "lifted before the grace");
    agent.wait_state("mtp2", State::Up);
    let s = agent.status("mtp2");
    assert_eq!(s.flags & mtlb_common::STATUS_STOPPING, 0, "{s:?}");
    wait_until("mtp2 takes clients after the grace", || reaches("mtp2"));
}

/// A stop signal to a process holding no replica listener, and SIGTERM to
/// a replica of another agent's namespace, mark nothing here. (The
/// tracepoint runs inside kill(): once it returns, every agent's program
/// has seen the signal.)
#[test]
fn other_processes_and_namespaces_mark_nothing() {
    let ns = Netns::new();
    let other = Netns::create();
    let file = Config::new().fast_checks().replicas(2).write(&ns);
    let other_file = Config::new().fast_checks().replicas(2).write(&other);
    let _r1 = ReplicaProcess::start(&ns, "mtp1", MTP1);
    let r2 = ReplicaProcess::start_on_term(&ns, "mtp2", MTP2, "ignore");
    let _o1 = ReplicaProcess::start(&other, "mtp1", MTP1);
    let o2 = ReplicaProcess::start_on_term(&other, "mtp2", MTP2, "ignore");
    let agent = ns.agent(&["--config", &file]);
    let other_agent = other.agent(&["--config", &other_file]);
    for a in [&agent, &other_agent] {
        a.wait_state("mtp1", State::Up);
        a.wait_state("mtp2", State::Up);
    }
    watched(&agent, r2.pid(), 1);
    watched(&other_agent, o2.pid(), 1);
    let marks = |a: &Agent| -> Vec<u64> {
        let maps = a.maps();
        (0..2)
            .map(|s| maps.stop_record(s).expect("STOPPING").marks)
            .collect()
    };
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bystander.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let _ = bystander.wait();
    assert_eq!(marks(&agent), [0, 0], "a bystander's SIGTERM marked a slot");
    let from = agent.log_len();
    o2.signal(Signal::SIGTERM);
    assert_eq!(marks(&other_agent), [0, 1]);
    assert_eq!(
        marks(&agent),
        [0, 0],
        "another namespace's SIGTERM marked ours"
    );
    other_agent.wait_for("backend mtp2 is DOWN, reason: stopping");
    assert!(agent.is_state("mtp2", State::Up));
    assert!(
        !agent.log()[from..].contains("stopping"),
        "marked by another namespace's signal"
    );
}

/// Between full scans (at registrations and UP changes) the agent looks
/// again only at the owners it knows and their children, at the
/// descriptor numbers the owners hold the listener at: a worker forked
/// later inherits it there. Real processes and a real listener; a child
/// without it, or with another socket at that number, is no owner.
#[test]
fn workers_forked_later_are_found_by_the_cheap_look() {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let _ns = Netns::new();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = l.as_raw_fd();
    let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .unwrap()
        .ino();
    // Children that keep the listener at its number (cleared
    // close-on-exec, as fork() keeps it) and one that does not get it.
    let spawn = |keep: bool| {
        let mut c = std::process::Command::new("sleep");
        c.arg("30");
        if keep {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: fcntl is async-signal-safe.
            unsafe {
                c.pre_exec(move || {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                    Ok(())
                });
            }
        }
        c.spawn().unwrap()
    };
    let mut worker = spawn(true);
    let mut other = spawn(false);
    let me = std::process::id();
    let inodes = [(inode, 0b100u64)].into_iter().collect();
    let known = [(me, vec![(fd, inode)])].into_iter().collect();
    let found = mtlb::kernel::registry::owners_again(&inodes, &known);
    assert_eq!(found.pids.get(&me), Some(&0b100), "the known owner");
    assert_eq!(
        found.pids.get(&worker.id()),
        Some(&0b100),
        "its child holding the listener: {found:?}"
    );
    assert!(!found.pids.contains_key(&other.id()), "{found:?}");
    assert_eq!(found.fds.get(&worker.id()), Some(&vec![(fd, inode)]));
    // Once the listener is closed nobody holds it any more.
    worker.kill().unwrap();
    worker.wait().unwrap();
    drop(l);
    let again = mtlb::kernel::registry::owners_again(&inodes, &found.fds);
    assert!(again.pids.is_empty(), "{again:?}");
    other.kill().unwrap();
    other.wait().unwrap();
}
