//! Safe on a public host: what an unprivileged local user, a returning
//! replica with a wrong secret, bursts and restarts can and cannot do. Each
//! test runs in its own network namespace with its own agent. Run as root
//! through `cargo xtask test`.

use mtlb_tests::*;
use std::{net::TcpStream, time::Duration};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";
/// uid of `nobody`.
const NOBODY: u32 = 65534;

/// `n` connections to `addr`: the replica names that greeted them, and how
/// many failed.
/// `bpftool map dump` of each of `maps` pinned in `dir`, for a failure's
/// message.
fn bpftool_dump(dir: &std::path::Path, maps: &[&str]) -> String {
    maps.iter()
        .map(|m| {
            let out = std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(dir.join(m))
                .output();
            match out {
                Ok(o) => format!("{m}:\n{}", String::from_utf8_lossy(&o.stdout)),
                Err(e) => format!("{m}: {e}"),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn names(addr: &str, n: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut failed = 0;
    // Held until all are made: leastconn then spreads them by count, not
    // by how fast each closed one was counted out (a replica just back
    // must get some).
    let mut held = Vec::new();
    for _ in 0..n {
        match connect(addr) {
            Ok((s, name)) => {
                held.push(s);
                seen.push(name)
            }
            Err(_) => failed += 1,
        }
    }
    (seen, failed)
}

#[test]
fn unprivileged_listeners_get_no_slot_and_no_client() {
    let ns = Netns::new();
    // Listening before the agent starts, on a slot nobody holds yet: not
    // adopted.
    let _early = ReplicaProcess::start_as(&ns, "evil", "0.0.0.0:10002", Some(NOBODY), false);
    let a = Replica::start("mtp1", A);
    let mut b = Replica::start("mtp2", B);
    let agent = ns.agent(&["--replicas", "3"]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let line = agent.wait_for("refused a listener for mtp3 on 0.0.0.0:10002");
    assert!(
        line.contains(&format!("uid {NOBODY}"))
            && line.contains("pid ")
            && line.contains("replica_uids [0]"),
        "{line}"
    );
    let (seen, failed) = names(BALANCED, 9);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1" || n == "mtp2"), "{seen:?}");

    // IPv6-only listeners beside the real (IPv4) replicas: their binds
    // are refused.
    for port in [10000, 10001] {
        let addr = format!("[::]:{port}");
        let e = ReplicaProcess::try_start_as(&ns, "evil", &addr, Some(NOBODY), true)
            .err()
            .expect("bound a replica port as nobody");
        assert!(e.contains("Operation not permitted"), "{e}");
        let line = agent.wait_for(&format!("refused a bind to {addr}"));
        assert!(line.contains(&format!("by uid {NOBODY}")), "{line}");
    }
    // IPv6 clients: no replica can take them, refused at once.
    let (seen6, failed6) = names("[::1]:443", 10);
    assert!(seen6.is_empty(), "IPv6 clients reached {seen6:?}");
    assert_eq!(failed6, 10);
    // IPv4 clients: the real replicas.
    let (seen4, failed4) = names(BALANCED, 10);
    assert_eq!(failed4, 0);
    assert!(
        seen4.iter().all(|n| n == "mtp1" || n == "mtp2"),
        "{seen4:?}"
    );

    // mtp2 goes away; nobody cannot take the IPv4 wildcard of its port.
    b.stop_listening();
    agent.wait_state("mtp2", State::Down);
    let e = ReplicaProcess::try_start_as(&ns, "evil", "0.0.0.0:10001", Some(NOBODY), false)
        .err()
        .expect("squatted mtp2's port");
    assert!(e.contains("Operation not permitted"), "{e}");
    let (seen, failed) = names(BALANCED, 10);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1"), "{seen:?}");

    // The real mtp2 comes back: its slot and clients again.
    let _b2 = Replica::start("mtp2", B);
    agent.wait_state("mtp2", State::Up);
    let (seen, _) = names(BALANCED, 4);
    assert!(seen.iter().any(|n| n == "mtp2"), "{seen:?}");
    drop(a);
}

/// `any_replica_owner` restores the old behaviour, with a warning.
#[test]
fn any_replica_owner_lets_anyone_register() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let agent = ns.agent(&["--any-replica-owner"]);
    agent.wait_for("any_replica_owner is set");
    let _b = ReplicaProcess::start_as(&ns, "mtp2", B, Some(NOBODY), false);
    agent.wait_state("mtp2", State::Up);
}

#[test]
fn a_live_registration_is_never_replaced() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let maps = agent.maps();
    let before = (maps.listener(1).unwrap(), maps.socket_cookie(1).unwrap());
    // Even an allowed owner's second listener on the port (here IPv6-only
    // beside the registered IPv4 one) does not take the slot.
    let _twin = Replica::start_with("twin", "[::]:10001", 1024, true, Some(true));
    let line = agent.wait_for("refused a listener for mtp2 on [::]:10001");
    assert!(line.contains("the slot holds a live listener"), "{line}");
    assert!(line.contains("uid 0") && line.contains("pid "), "{line}");
    // The slot still holds the first listener, in the sockmap and in the
    // description sk_lookup selects on.
    assert_eq!(
        (maps.listener(1).unwrap(), maps.socket_cookie(1).unwrap()),
        before
    );
    let (seen, failed) = names(BALANCED, 10);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1" || n == "mtp2"), "{seen:?}");
    let (seen6, _) = names("[::1]:443", 4);
    assert!(seen6.is_empty(), "{seen6:?}");
}

/// A restarted replica that answers checks wrongly gets no client; one that
/// answers right gets clients as soon as its first check passes.
#[test]
fn a_returning_replica_proves_itself_before_clients() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const OTHER: &str = "fedcba9876543210fedcba9876543210";
    let ns = Netns::new();
    let _dc = fake_dc(&ns, 20443);
    let _mtp1 = mtproxy_replica(&ns, 10000, SECRET, 20443, false);
    let mtp2 = mtproxy_replica(&ns, 10001, SECRET, 20443, false);
    let cfg = Config::mtproxy(&format!("dd{SECRET}")).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);

    let timeout = (8 * time_scale()).to_string();
    // Restarted with a wrong secret: no client reaches it.
    drop(mtp2);
    agent.wait_state("mtp2", State::Down);
    let wrong = mtproxy_replica(&ns, 10001, OTHER, 20443, false);
    // Registered again; the next failed check is one of the new
    // listener's (those of the closed port failed for want of a listener).
    let reg = agent.wait_status("mtp2", "registered", |s| s.registered == 1);
    let failed = agent.wait_status("mtp2", "a failed check since", |s| {
        s.check_failures > reg.check_failures
    });
    assert_eq!(status_reason(&failed), "no answer through proxy");
    for _ in 0..10 {
        let (mut c, line) = py_first_line(
            &ns,
            "telethon_client.py",
            &[
                "443",
                &format!("dd{SECRET}"),
                "--hold",
                "0",
                "--timeout",
                &timeout,
            ],
        );
        let _ = c.wait();
        let r: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(r["verdict"], "UP", "a client failed: {r}");
    }
    let (_, text) = http_get("/metrics");
    assert_eq!(
        metric(&text, "mtlb_backend_connections_total{backend=\"mtp2\"}"),
        Some(0.0),
        "{text}"
    );

    // Restarted with the right secret: its first check runs the moment it
    // listens, and clients follow.
    drop(wrong);
    let from = agent.log_len();
    let _right = mtproxy_replica(&ns, 10001, SECRET, 20443, false);
    let (_, up) = agent.wait_for_after(from, "backend mtp2 is UP");
    assert!(
        up.contains("reason: MTProxy answered through upstream"),
        "{up}"
    );
    // Checked the moment it listens (not on the next scheduled check):
    // UP within its check's duration and 100 ms of registering.
    let (_, reg) = agent.wait_for_after(from, "replica mtp2 registered");
    let gap = log_time(&up) - log_time(&reg);
    let took: u64 = up
        .split("check duration: ")
        .nth(1)
        .and_then(|r| r.split("ms").next())
        .and_then(|n| n.parse().ok())
        .expect("check duration");
    assert!(
        gap <= Duration::from_millis(took) + scaled(Duration::from_millis(100)),
        "UP {gap:?} after registering, check took {took} ms"
    );
    // mtp1 holds nothing now either, so a held client may go to either;
    // two held clients cover both.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(py_first_line(
            &ns,
            "telethon_client.py",
            &[
                "443",
                &format!("dd{SECRET}"),
                "--hold",
                HOLD_UNTIL_KILLED,
                "--timeout",
                &timeout,
            ],
        ));
    }
    let (_, text) = http_get("/metrics");
    assert!(
        metric(&text, "mtlb_backend_connections_total{backend=\"mtp2\"}").unwrap() >= 1.0,
        "{text}"
    );
    for (mut c, _) in held {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The time stamp at the start of an agent log line.
fn log_time(line: &str) -> Duration {
    let ts = line.split_whitespace().next().unwrap();
    // 2026-11-29T16:41:53.937869Z: seconds of the day are enough here.
    let t = ts.split('T').nth(1).unwrap().trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next().unwrap().parse().unwrap();
    let m: f64 = it.next().unwrap().parse().unwrap();
    let s: f64 = it.next().unwrap().parse().unwrap();
    Duration::from_secs_f64(h * 3600.0 + m * 60.0 + s)
}

/// A client's SYN charged to a replica that then dies, retransmitted and
/// accepted by the other: each slot ends at what its replica holds, none
/// wraps below zero.
#[test]
fn a_retransmitted_syn_after_replica_death_is_charged_once() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let mut b = ReplicaProcess::start(&ns, "mtp2", B);
    // Expiry far away: only the kernel's bookkeeping is under test.
    let agent = ns.agent(&["--handshake-timeout-ms", "60000"]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let maps = agent.maps();
    // Three held on mtp1, so the next SYN goes to mtp2.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    let held: Vec<TcpStream> = (0..3).map(|_| connect(BALANCED).unwrap().0).collect();
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "ready"]);
    assert!(ok, "{out}");
    // SYN-ACKs do not get out: the handshake stays open on mtp2.
    ns.nft("add table inet mtlbtest");
    ns.nft("add chain inet mtlbtest out { type filter hook output priority 0; }");
    ns.nft("add rule inet mtlbtest out tcp sport 443 tcp flags & (syn | ack) == syn | ack drop");
    let client = start_connects(BALANCED, 1);
    wait_counts(&maps, 2, "the SYN charged to mtp2", |c| {
        c[1].handshakes == 1 && c[0].established == 3
    });
    // mtp2 dies with the handshake in its queue; the client's SYN
    // retransmit (1 s later) finds mtp1.
    b.kill();
    ns.nft("delete table inet mtlbtest");
    let s: TcpStream = {
        let s = client.into_iter().next().unwrap();
        s.set_nonblocking(false).unwrap();
        s.into()
    };
    assert_eq!(greeting(&s).unwrap(), "mtp1");
    wait_counts(&maps, 2, "each slot at what its replica holds", |c| {
        c[0].established == 4 && c[0].handshakes == 0 && c[1].handshakes == 0
    });
    let c = conns(&maps, 1);
    assert_eq!((c.established, c.handshakes), (0, 0));
    drop(held);
    drop(s);
    wait_counts(&maps, 2, "all closed", |c| {
        c.iter().all(|c| c.established == 0 && c.handshakes == 0)
    });
}

/// Established connections from the balanced port held by each process
/// in `pids`, from `ss -tnp` in the namespace.
fn held_by(ns: &Netns, pids: &[u32]) -> Vec<u64> {
    let text = ss_balanced(ns);
    pids.iter()
        .map(|p| {
            let tag = format!("pid={p},");
            text.lines().filter(|l| l.contains(&tag)).count() as u64
        })
        .collect()
}

/// xorshift64*: a reproducible sequence from a seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// Random sequences of opens, FIN and RST closes, abandoned handshakes,
/// replica deaths (with clients retrying) and agent restarts: whenever the
/// dust settles, every slot's count is what its replica holds.
#[test]
fn counts_match_what_replicas_hold_after_any_sequence() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_synack_retries", "1");
    let addrs = [A, B];
    let mut reps: Vec<ReplicaProcess> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| ReplicaProcess::start(&ns, &format!("mtp{}", i + 1), a))
        .collect();
    let args = ["--handshake-timeout-ms", "500"];
    let mut agent = ns.agent(&args);
    agent.wait_state("mtp2", State::Up);
    let mut held: Vec<TcpStream> = Vec::new();
    for seed in [0x9e37_79b9_7f4a_7c15u64, 0xdead_beef_cafe_f00d] {
        let mut rng = Rng(seed);
        let mut log = Vec::new();
        for step in 0..30 {
            let op = rng.below(10);
            log.push(op);
            match op {
                // Open (held).
                0..=3 => {
                    if let Ok((s, _)) = connect(BALANCED) {
                        held.push(s);
                    }
                }
                // FIN close.
                4 if !held.is_empty() => {
                    let i = rng.below(held.len());
                    drop(held.swap_remove(i));
                }
                // RST close.
                5 if !held.is_empty() => {
                    let i = rng.below(held.len());
                    let s = socket2::Socket::from(held.swap_remove(i));
                    s.set_linger(Some(Duration::ZERO)).unwrap();
                    drop(s);
                }
                // Abandoned handshakes: final ACKs dropped, clients gone.
                6 => {
                    ns.nft("add table inet mtlbtest");
                    ns.nft("add chain inet mtlbtest out { type filter hook output priority 0; }");
                    ns.nft("add rule inet mtlbtest out tcp dport 443 tcp flags == ack drop");
                    drop(start_connects(BALANCED, 3));
                    ns.nft("delete table inet mtlbtest");
                }
                // A replica dies with a client's handshake charged to it
                // (SYN-ACKs held back), and comes back; the client's SYN
                // retransmit is charged again, wherever it lands.
                7 => {
                    ns.nft("add table inet mtlbsyn");
                    ns.nft("add chain inet mtlbsyn out { type filter hook output priority 0; }");
                    ns.nft(
                        "add rule inet mtlbsyn out tcp sport 443 tcp flags & (syn | ack) == syn | ack drop",
                    );
                    let maps = agent.maps();
                    let pending = start_connects(BALANCED, 1);
                    let deadline = std::time::Instant::now() + wait_limit();
                    let r = loop {
                        if let Some(r) = (0..2).find(|s| conns(&maps, *s as u32).handshakes > 0) {
                            break r;
                        }
                        assert!(std::time::Instant::now() < deadline, "no handshake charged");
                        std::thread::sleep(Duration::from_millis(10));
                    };
                    reps[r].kill();
                    reps[r] = ReplicaProcess::start(&ns, &format!("mtp{}", r + 1), addrs[r]);
                    ns.nft("delete table inet mtlbsyn");
                    let s = pending.into_iter().next().unwrap();
                    s.set_nonblocking(false).unwrap();
                    let s: TcpStream = s.into();
                    // Held if it got through (it retransmits within ~1 s).
                    if greeting(&s).is_ok() {
                        held.push(s);
                    }
                    // The dead replica's connections are gone with it.
                    held.retain(|s| {
                        s.set_nonblocking(true).unwrap();
                        let mut b = [0u8; 1];
                        let gone = matches!(s.peek(&mut b), Ok(0))
                            || matches!(s.peek(&mut b), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock);
                        s.set_nonblocking(false).unwrap();
                        !gone
                    });
                }
                // The agent dies and a new one takes over.
                8 => {
                    agent.kill9();
                    agent = ns.agent(&args);
                }
                _ => {}
            }
            if step % 6 == 5 {
                settle(&ns, &agent, &reps, &format!("seed {seed:x} ops {log:?}"));
            }
        }
        settle(&ns, &agent, &reps, &format!("seed {seed:x} ops {log:?}"));
    }
    drop(held);
    settle(&ns, &agent, &reps, "all closed");
}

/// Waits until each slot's count (handshakes expired) equals what `ss`
/// says its replica holds.
fn settle(ns: &Netns, agent: &Agent, reps: &[ReplicaProcess], what: &str) {
    let pids: Vec<u32> = reps.iter().map(|r| r.child.id()).collect();
    let maps = agent.maps();
    let deadline = std::time::Instant::now() + wait_limit();
    loop {
        let want = held_by(ns, &pids);
        let got: Vec<Conns> = (0..2).map(|s| conns(&maps, s)).collect();
        if got
            .iter()
            .zip(&want)
            .all(|(c, w)| c.established == *w && c.handshakes == 0)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: counts {got:?}, replicas hold {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `systemctl restart mtlb` is SIGTERM then a new start with the same
/// config: no connection is refused in between, and every count goes on.
#[test]
fn a_restart_keeps_steering_and_counts() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let mut agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let held: Vec<(TcpStream, String)> = (0..20).map(|_| connect(BALANCED).unwrap()).collect();
    let on_b = held.iter().filter(|(_, n)| n == "mtp2").count() as u64;
    let looping = ConnectLoop::new().greet().strict().start(&ns);
    std::thread::sleep(Duration::from_millis(50));
    assert!(agent.stop().success());
    let agent = ns.agent(&[]);
    // STATUS still says UP from the earlier agent: only the new agent's
    // own lines show it took over and checked mtp2.
    agent.wait_for("taking over the pinned state of an earlier agent");
    agent.wait_for("backend mtp2 is UP");
    std::thread::sleep(Duration::from_millis(50));
    let LoopOutcome { ok, failed, .. } = looping.finish();
    assert!(failed.is_empty(), "refused across the restart: {failed:?}");
    assert!(ok > 10, "{ok}");
    // The held connections are still counted.
    let maps = agent.maps();
    wait_counts(&maps, 2, "20 held across the restart", |c| {
        c[0].established + c[1].established == 20 && c[1].established == on_b
    });
    // So a drain is not over while they last.
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "drain"]);
    assert!(ok, "{out}");
    let (ok, out) = mtlb_cli(
        &ns,
        &["backend", "mtp2", "wait-drained", "--timeout", "300ms"],
    );
    assert!(
        !ok && out.contains(&format!("still has {on_b}")),
        "{out} (mtp2 holds {on_b}; counts {:?} {:?}; totals {:?} {:?})",
        conns(&maps, 0),
        conns(&maps, 1),
        maps.slot_totals(0).unwrap(),
        maps.slot_totals(1).unwrap()
    );
    drop(held);
    let (ok, out) = mtlb_cli(
        &ns,
        &["backend", "mtp2", "wait-drained", "--timeout", "10s"],
    );
    assert!(ok, "{out}");
    // A replica that is not configured has nothing to drain (the playbook
    // waits on replicas a reload already removed).
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp5", "wait-drained"]);
    assert!(ok && out.contains("not configured"), "{out}");
    let (ok, out) = mtlb_cli(&ns, &["backend", "nope", "wait-drained"]);
    assert!(!ok && out.contains("no backend named"), "{out}");
}

/// `mtlb remove` with an agent running: it detaches, removes the pins and
/// exits; nothing steers afterwards.
#[test]
fn remove_takes_mtlb_off_for_good() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let mut agent = ns.agent(&[]);
    agent.wait_state("mtp1", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["remove"]);
    assert!(ok, "{out}");
    assert!(agent.wait_exit().success());
    assert!(
        agent
            .log()
            .contains("removing mtlb from this namespace (by operator)")
    );
    assert!(!ns.pin_dir().exists());
    assert!(connect_fails(BALANCED), "still steering");
}

/// Unmounts what a test mounted, lazily.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Starts `mtlb run ARGS` in `ns` with `state_dir` of the test's choosing.
fn agent_with_state_dir(ns: &Netns, state_dir: &std::path::Path, args: &[&str]) -> Agent {
    let mut cmd = std::process::Command::new(std::env::var("MTLB_BIN").unwrap());
    cmd.arg("run").args(args).arg("--state-dir").arg(state_dir);
    ns.run_inside(&mut cmd);
    Agent::command(cmd, ns.pin_dir())
}

#[test]
fn operator_state_is_durable_and_errors_are_loud() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    // A state_dir nobody can write to, root included: a read-only mount.
    let ro = ns.state_dir().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=64k", "tmpfs"])
        .arg(&ro)
        .status()
        .unwrap();
    assert!(status.success());
    let _unmount = Unmount(ro.clone());
    let mut agent = agent_with_state_dir(&ns, &ro, &["--keep-pins", "false"]);
    agent.wait_state("mtp2", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "maint"]);
    assert!(!ok, "maint reported saved: {out}");
    assert!(out.contains("could not be saved"), "{out}");
    // The reply can come before the log line is read from the agent.
    agent.wait_for("saving operator state");
    assert!(agent.stop().success());

    // A saved MAINT, then a truncated file: the agent refuses to start
    // (MAINT must not come back READY), attaching nothing.
    let dir = ns.state_dir().join("state");
    let mut agent = agent_with_state_dir(&ns, &dir, &["--keep-pins", "false"]);
    agent.wait_state("mtp2", State::Up);
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp2", "maint"]);
    assert!(ok, "{out}");
    assert!(agent.stop().success());
    let path = dir.join(format!("state-{}.json", ns.ino));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("MAINT"), "{text}");
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let mut agent = agent_with_state_dir(&ns, &dir, &[]);
    assert!(!agent.wait_exit().success());
    let log = agent.log();
    assert!(
        log.contains("invalid state file") && log.contains("fix or remove it"),
        "{log}"
    );
    assert!(!ns.pin_dir().exists(), "attached with a broken state file");
    assert!(connect_fails(BALANCED));
}

/// Namespace inode numbers are reused: pins left by a dead namespace under
/// the inode a new one gets are not taken over.
#[test]
fn pins_of_a_dead_namespace_are_not_taken_over() {
    let old = Netns::create();
    let new = Netns::new();
    // An agent in `old` keeps its pins (counts included) when it stops.
    let mut cmd = std::process::Command::new(std::env::var("MTLB_BIN").unwrap());
    cmd.arg("run").arg("--state-dir").arg(old.state_dir());
    old.run_inside(&mut cmd);
    let mut agent = Agent::command(cmd, old.pin_dir());
    // Published (DOWN: no replica listens) once it has started.
    agent.wait_state("mtp1", State::Down);
    assert!(agent.stop().success());
    assert!(old.pin_dir().exists());
    // As if `new` had got the dead namespace's inode number.
    std::fs::rename(old.pin_dir(), new.pin_dir()).unwrap();
    let _a = Replica::start("mtp1", A);
    let agent = new.agent(&[]);
    let line = agent.wait_for("cannot take over");
    assert!(line.contains("another network namespace"), "{line}");
    agent.wait_state("mtp1", State::Up);
    assert_eq!(connect(BALANCED).unwrap().1, "mtp1");
}

/// With SYN cookies always on, every flow is remembered; a remembered flow
/// must not lead to a drained replica.
#[test]
fn remembered_flows_respect_drain() {
    let ns = Netns::new();
    ns.sysctl("net.ipv4.tcp_syncookies", "2");
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    // The same 4-tuple again and again: close with RST so neither side
    // keeps it in TIME_WAIT.
    let from = |port: u16| -> String {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(
            &"127.0.0.1:40000"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        s.connect_timeout(&dst.into(), Duration::from_secs(5))
            .unwrap();
        let t: TcpStream = s.into();
        let name = greeting(&t).unwrap();
        let s = socket2::Socket::from(t);
        s.set_linger(Some(Duration::ZERO)).unwrap();
        name
    };
    let first = from(443);
    // With idle replicas each new flow could go either way; the same one
    // keeps going back to the same replica.
    for _ in 0..5 {
        assert_eq!(from(443), first, "the remembered flow");
    }
    let (ok, out) = mtlb_cli(&ns, &["backend", &first, "drain"]);
    assert!(ok, "{out}");
    for _ in 0..5 {
        assert_ne!(
            from(443),
            first,
            "a remembered flow reached the drained replica"
        );
    }
}

/// A changed `scan_interval_ms` takes effect on reload.
#[test]
fn scan_interval_changes_on_reload() {
    let ns = Netns::new();
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = Config::new()
        .set("scan_interval_ms", 60000)
        .write_to(&dir.join("mtlb.toml"));
    let agent = ns.agent_debug(&["--config", cfg.to_str().unwrap()]);
    agent.wait_for("scanning for replica listeners");
    let scans = || {
        agent
            .log()
            .matches("scanning for replica listeners")
            .count()
    };
    let before = scans();
    Config::new().set("scan_interval_ms", 20).write_to(&cfg);
    let (ok, out) = mtlb_cli(&ns, &["reload", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    agent.wait_count("scanning for replica listeners", before + 10);
}

/// Two replicas that each accept ~100 connections a second take a 4 s
/// burst at 1.5 times that: queues grow, but they accept, so neither is
/// taken for hung and no client is refused.
#[test]
fn a_burst_does_not_down_busy_replicas() {
    let ns = Netns::new();
    let _a = ReplicaProcess::start_busy(&ns, "mtp1", A, 100);
    let _b = ReplicaProcess::start_busy(&ns, "mtp2", B, 100);
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    // Stalls show within a second; checks are frequent.
    let cfg = Config::new()
        .fast_checks()
        .check("stall_ms", 1000)
        .write_to(&dir.join("mtlb.toml"));
    let agent = ns.agent(&["--config", cfg.to_str().unwrap()]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let from = agent.log_len();
    let (mut ok, mut failed) = (0usize, Vec::new());
    let t0 = std::time::Instant::now();
    let mut queued_max = 0u32;
    for i in 0..1200u32 {
        // 300 a second, paced against the clock.
        let due = t0 + Duration::from_micros(3333 * i as u64);
        if let Some(d) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(d);
        }
        match TcpStream::connect_timeout(&BALANCED.parse().unwrap(), scaled(Duration::from_secs(5)))
        {
            Ok(_) => ok += 1,
            Err(e) => failed.push(e.to_string()),
        }
        if i % 100 == 0 {
            let (_, text) = http_get("/metrics");
            for b in ["mtp1", "mtp2"] {
                let q = metric(
                    &text,
                    &format!("mtlb_backend_accept_queue{{backend=\"{b}\"}}"),
                )
                .unwrap_or(0.0);
                queued_max = queued_max.max(q as u32);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} refused: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(ok, 1200);
    // The burst did build queues (or the test proves nothing).
    assert!(queued_max >= 50, "queues peaked at {queued_max}");
    let log = agent.log();
    let after: Vec<&str> = log.lines().skip(from).collect();
    assert!(
        !after
            .iter()
            .any(|l| l.contains(" is DOWN") || l.contains("no backend available")),
        "{}",
        after.join("\n")
    );
}

/// 2000 idle and 300 slow-header connections to the stats port from an
/// unprivileged user, against an agent allowed 1024 open files: checks
/// keep passing, no replica changes state, clients are served, control
/// commands answer about as fast as under the same flood of a port that is
/// not the agent's, memory stays small.
#[test]
fn nothing_on_the_stats_port_starves_the_agent() {
    use std::os::unix::process::CommandExt as _;
    let nofile = |n: u64| {
        move || {
            let r = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit on a local value, in the child.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    };
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = Config::new().fast_checks().write_to(&dir.join("mtlb.toml"));
    let mut cmd = std::process::Command::new(std::env::var("MTLB_BIN").unwrap());
    cmd.arg("run")
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&dir);
    ns.run_inside(&mut cmd);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe { cmd.pre_exec(nofile(1024)) };
    let agent = Agent::command(cmd, ns.pin_dir());
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let from = agent.log_len();

    let exe = std::env::current_exe().unwrap();
    let flood_bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("mtlb-test-flood");
    // The same flood, as `nobody`, against `target`, while clients and
    // control commands go on: the slowest command and the agent's largest
    // RSS meanwhile, and the flood's summary line.
    let flooded = |target: &str| {
        let mut flood = std::process::Command::new("setpriv");
        flood
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&flood_bin)
            .args([target, "2000", "300", "6"])
            .stdout(std::process::Stdio::piped());
        ns.run_inside(&mut flood);
        // SAFETY: as above.
        unsafe { flood.pre_exec(nofile(8192)) };
        let mut flood = flood.spawn().unwrap();
        let mut out = std::io::BufReader::new(flood.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        let mut slowest = Duration::ZERO;
        let mut max_rss = 0;
        for _ in 0..20 {
            let (seen, failed) = names(BALANCED, 2);
            assert_eq!(
                failed, 0,
                "a client was refused during the flood of {target}"
            );
            assert_eq!(seen.len(), 2);
            let t0 = std::time::Instant::now();
            let (ok, out) = mtlb_cli(&ns, &["backend", "mtp1", "weight", "1"]);
            slowest = slowest.max(t0.elapsed());
            assert!(ok, "{out}");
            max_rss = max_rss.max(agent.rss_kib());
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = flood.wait();
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        eprintln!("flood of {target}: {line}");
        let opened: usize = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(opened >= 2300, "the flood opened only {opened}: {line}");
        (slowest, max_rss)
    };
    // Baseline, same run, same load on the machine: the same flood against
    // a canary server the agent has nothing to do with, which treats it as
    // the stats server does (holds 64, closes the rest at once, so the
    // flood churns as much). A control command's time is mostly the CLI's
    // own start, slow under emulation and the flood's CPU use however well
    // the agent does; starving shows as the ratio.
    let canary = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        // Bound as the stats server binds its own (non-blocking, the same
        // accept queue).
        let l = mtlb::stats::server::bind("127.0.0.1:9404".parse().unwrap()).unwrap();
        let t = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) if held.len() < 64 => held.push(c),
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        (stop, t)
    };
    let (base, _) = flooded("127.0.0.1:9404");
    canary.0.store(true, std::sync::atomic::Ordering::Relaxed);
    canary.1.join().unwrap();
    let (slowest, max_rss) = flooded("127.0.0.1:8404");
    eprintln!("slowest control command: {slowest:?} (canary flood: {base:?})");
    assert!(
        slowest < base * 3 + scaled(Duration::from_millis(100)),
        "a control command took {slowest:?} under the stats-port flood, {base:?} under the same flood of a canary"
    );
    assert!(max_rss < 64 * 1024, "agent RSS {max_rss} KiB");
    let log = agent.log();
    let during: Vec<&str> = log.lines().skip(from).collect();
    assert!(
        !during.iter().any(|l| l.contains("Health check for backend")
            || l.contains(" is DOWN")
            || l.contains("no backend available")),
        "{}",
        during.join("\n")
    );
    // Served again once it is over.
    let (code, _) = http_get("/metrics");
    assert_eq!(code, 200);
}

/// Per-replica byte counters never go backwards while connections with
/// traffic open and close between scrapes.
#[test]
fn byte_counters_never_go_back_under_churn() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let file = ns.file.try_clone().unwrap();
    let s2 = stop.clone();
    let churn = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
            if let Ok((mut s, _)) = connect(BALANCED) {
                use std::io::{Read as _, Write as _};
                let _ = s.write_all(&[7u8; 2048]);
                let mut b = [0u8; 2048];
                let _ = s.read_exact(&mut b);
            }
            n += 1;
        }
        n
    });
    let mut last: std::collections::HashMap<String, f64> = Default::default();
    let mut decreases = Vec::new();
    for i in 0..400 {
        let (_, text) = http_get("/metrics");
        for b in ["mtp1", "mtp2"] {
            for dir in ["received", "sent"] {
                let key = format!("mtlb_backend_bytes_{dir}_total{{backend=\"{b}\"}}");
                let v = metric(&text, &key).unwrap();
                if let Some(prev) = last.insert(key.clone(), v)
                    && v < prev
                {
                    decreases.push(format!("scrape {i}: {key} {prev} -> {v}"));
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = churn.join().unwrap();
    assert!(n > 50, "only {n} connections churned");
    assert!(decreases.is_empty(), "{decreases:?}");
}

/// Configuration mistakes that would fight mtlb's own ports, and a named
/// config file that is missing, are errors before anything is attached.
#[test]
fn conflicting_ports_and_a_missing_named_config_are_refused() {
    let ns = Netns::new();
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (port, why) in [
        (443, "is the balanced port"),
        (10001, "inside the replica ports"),
    ] {
        let cfg = Config::new()
            .set("stats_port", port)
            .write_to(&dir.join("bad.toml"));
        let mut agent = ns.spawn_agent(&["--config", cfg.to_str().unwrap()]);
        assert!(!agent.wait_exit().success());
        let log = agent.log();
        assert!(log.contains("`stats_port`") && log.contains(why), "{log}");
        assert!(!ns.pin_dir().exists());
    }
    // Naming the default path makes it required like any other.
    if !std::path::Path::new("/etc/mtlb/mtlb.toml").exists() {
        let mut agent = ns.spawn_agent(&["--config", "/etc/mtlb/mtlb.toml"]);
        assert!(!agent.wait_exit().success());
        assert!(
            agent
                .log()
                .contains("cannot read config file /etc/mtlb/mtlb.toml")
        );
    }
}

/// Who may run replicas changes on reload: a listener registered under the
/// old rule whose owner the new one does not allow loses its slot. UDP on a
/// replica port is none of mtlb's business.
#[test]
fn a_reload_that_narrows_the_owners_evicts_listeners() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let cfg = Config::new().set("any_replica_owner", true).write(&ns);
    let agent = ns.agent(&["--config", &cfg]);
    let _b = ReplicaProcess::start_as(&ns, "mtp2", B, Some(NOBODY), false);
    agent.wait_state("mtp2", State::Up);
    let from = agent.log_len();
    Config::new().write(&ns);
    let (ok, out) = mtlb_cli(&ns, &["reload", "--config", &cfg]);
    assert!(ok, "{out}");
    let (_, line) = agent.wait_for_after(from, "refused a listener for mtp2 on 127.0.0.1:10001");
    assert!(line.contains(&format!("uid {NOBODY}")), "{line}");
    agent.wait_state("mtp2", State::Down);
    let (seen, failed) = names(BALANCED, 6);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1"), "{seen:?}");
    // A UDP socket of nobody's on a replica port binds as before.
    let udp = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv", "--reuid=65534", "--regid=65534"])
        .args(["--clear-groups", "/usr/bin/python3", "-c"])
        .arg("import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', 10000))")
        .status()
        .unwrap();
    assert!(udp.success(), "a UDP bind to a replica port was refused");
}

/// A restart does not bring back a replica the agent had DOWN by its
/// checks: the new agent trusts only what was taking clients.
#[test]
fn a_restart_does_not_revive_a_replica_down_by_checks() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    // mtp2's stats say no upstream is ready: DOWN by checks.
    let _ok = stats_endpoint(
        std::net::TcpListener::bind("127.0.0.1:20000").unwrap(),
        |_| 1,
    );
    let _bad = stats_endpoint(
        std::net::TcpListener::bind("127.0.0.1:20001").unwrap(),
        |_| 0,
    );
    let cfg = Config::new()
        .check_kind("stats")
        .stats_base_port(20000)
        .fast_checks()
        .write(&ns);
    let mut agent = ns.agent(&["--config", &cfg]);
    agent.wait_state("mtp1", State::Up);
    agent.wait_down_by_check("mtp2");
    assert!(agent.stop().success());
    let agent = ns.agent(&["--config", &cfg]);
    agent.wait_for("taking over the pinned state of an earlier agent");
    let (seen, failed) = names(BALANCED, 20);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1"), "{seen:?}");
    // STATUS still holds the earlier agent's UP: wait for the new agent's
    // own check of mtp1, after which mtp2 has been checked too.
    agent.wait_for("backend mtp1 is UP");
    assert!(
        !agent.log().contains("backend mtp2 is UP"),
        "{}",
        agent.log()
    );
}

/// Restarting with checks turned on (they were off) refuses nothing: the
/// listeners that were taking clients keep them while they are checked.
#[test]
fn turning_checks_on_with_a_restart_refuses_nothing() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let cfg = Config::new().check_kind("none").write(&ns);
    let mut agent = ns.agent(&["--config", &cfg]);
    agent.wait_state("mtp2", State::Up);
    let looping = ConnectLoop::new().greet().strict().start(&ns);
    std::thread::sleep(Duration::from_millis(50));
    assert!(agent.stop().success());
    Config::new().check_kind("tcp").write(&ns);
    let _agent = ns.agent(&["--config", &cfg]);
    std::thread::sleep(Duration::from_millis(200));
    let LoopOutcome { ok, failed, .. } = looping.finish();
    assert!(failed.is_empty(), "refused: {failed:?}");
    assert!(ok > 10);
}

/// mtp2 is down and mtp1 up: a process of `uid` (None: root) outside
/// `cg` cannot bind mtp2's port (EPERM), the agent names the cgroup as the
/// reason, and clients keep going to mtp1.
fn mtp2_refused_outside(ns: &Netns, agent: &Agent, cg: &Cgroup, uid: Option<u32>) {
    let from = agent.log_len();
    let e = ReplicaProcess::try_start_as(ns, "outsider", B, uid, false)
        .err()
        .unwrap_or_else(|| panic!("uid {uid:?} outside the replica cgroup took mtp2's port"));
    assert!(e.contains("Operation not permitted"), "{e}");
    let (_, line) = agent.wait_for_after(
        from,
        &format!(
            "refused a bind to 127.0.0.1:10001 (mtp2's port) by uid {} in cgroup /",
            uid.unwrap_or(0)
        ),
    );
    assert!(
        line.contains(&format!("it is not in replica_cgroup {}", cg.rel)),
        "{line}"
    );
    let (seen, failed) = names(BALANCED, 6);
    assert_eq!(failed, 0);
    assert!(seen.iter().all(|n| n == "mtp1"), "{seen:?}");
}

/// mtp2 started in `cg` as `uid`: the listen hook registers it and it gets
/// clients once checked.
fn mtp2_registers_inside(
    ns: &Netns,
    agent: &Agent,
    cg: &Cgroup,
    uid: Option<u32>,
) -> ReplicaProcess {
    let from = agent.log_len();
    let b = ReplicaProcess::start_as_in(ns, "mtp2", B, uid, cg);
    let (_, line) = agent.wait_for_after(from, "replica mtp2 registered");
    assert!(line.contains("listen hook"), "{line}");
    agent.wait_state("mtp2", State::Up);
    let (seen, _) = names(BALANCED, 8);
    assert!(seen.iter().any(|n| n == "mtp2"), "{seen:?}");
    b
}

/// With `replica_cgroup`, only listeners created in that cgroup become
/// replicas (registered by the listen hook, or adopted), their connections
/// are counted, and a listener of an allowed owner outside it gets no slot
/// and no client.
#[test]
fn only_listeners_of_the_replica_cgroup_become_replicas() {
    let ns = Netns::new();
    let cg = Cgroup::new();
    // mtp1 in the cgroup before the agent (adopted); an outsider on mtp2's
    // port, root like the replicas, also before the agent.
    let mut a = ReplicaProcess::start_in(&ns, "mtp1", A, &cg);
    let mut outsider = ReplicaProcess::start(&ns, "outsider", B);
    let agent = ns.agent(&["--replica-cgroup", &cg.rel]);
    agent.wait_state("mtp1", State::Up);
    let line = agent.wait_for("refused a listener for mtp2 on 127.0.0.1:10001");
    assert!(line.contains("replica_cgroup"), "{line}");
    let held: Vec<TcpStream> = (0..6)
        .map(|_| {
            let (s, name) = connect(BALANCED).unwrap();
            assert_eq!(name, "mtp1");
            s
        })
        .collect();
    let maps = agent.maps();
    wait_counts(&maps, 2, "mtp1's connections counted", |c| {
        c[0].established == 6 && c[1].established == 0
    });
    // An outsider that starts after the agent, root like the replicas:
    // outside the cgroup, its bind is refused, and the agent says why.
    outsider.kill();
    mtp2_refused_outside(&ns, &agent, &cg, None);
    // The real mtp2, in the cgroup: the listen hook registers it.
    let mut b = mtp2_registers_inside(&ns, &agent, &cg, None);
    drop(held);
    wait_counts(&maps, 2, "all closed", |c| {
        c.iter().all(|c| c.established == 0 && c.handshakes == 0)
    });
    drop(agent);
    a.kill();
    b.kill();
}

/// With `replica_cgroup`, a replica port belongs to that cgroup as well as
/// to `replica_uids`: the official server binds as nobody, so the deployed
/// config allows 65534, yet an unprivileged nobody process outside the
/// cgroup cannot take the port of a replica that is down; the same uid in
/// the cgroup can, and becomes the replica.
#[test]
fn a_replica_port_belongs_to_the_replica_cgroup() {
    let ns = Netns::new();
    let cg = Cgroup::new();
    let mut a = ReplicaProcess::start_as_in(&ns, "mtp1", A, Some(NOBODY), &cg);
    let mut b = ReplicaProcess::start_as_in(&ns, "mtp2", B, Some(NOBODY), &cg);
    let agent = ns.agent(&[
        "--replica-cgroup",
        &cg.rel,
        "--replica-uid",
        "0",
        "--replica-uid",
        &NOBODY.to_string(),
    ]);
    agent.wait_for(&format!(
        "replica ports belong to uids [0, {NOBODY}] in replica_cgroup {}",
        cg.rel
    ));
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    // What is enforced, as the kernel holds it: the bind hooks judge by the
    // cgroup, and sock_ops is attached to it, not to the root.
    let (ok, out) = mtlb_cli(&ns, &["status"]);
    assert!(ok, "{out}");
    let owners = out
        .lines()
        .find(|l| l.starts_with("replica ports:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        owners.contains(&format!("uids [0, {NOBODY}] in cgroup /{} (id ", cg.rel))
            && owners.contains(&format!("; sock_ops on cgroup /{} (id ", cg.rel)),
        "{owners}"
    );

    b.kill();
    agent.wait_state("mtp2", State::Down);
    mtp2_refused_outside(&ns, &agent, &cg, Some(NOBODY));
    // The same uid in the cgroup: its bind passes, the listen hook
    // registers it, and it gets clients once checked.
    let mut b2 = mtp2_registers_inside(&ns, &agent, &cg, Some(NOBODY));
    drop(agent);
    a.kill();
    b2.kill();
}

/// `replica_cgroup` removed and made again (a slice stopped and started)
/// is another cgroup: the bind hooks, set up with the old one's id, refuse
/// the replicas' binds. The agent says so and stops; the next agent (the
/// service manager's restart) takes the pins over, steering all along, and
/// follows the new cgroup: the replica binds, registers and takes clients.
#[test]
fn a_replica_cgroup_made_again_is_followed_by_a_restart() {
    let ns = Netns::new();
    let cg = Cgroup::new();
    let mut a = ReplicaProcess::start_in(&ns, "mtp1", A, &cg);
    let b = ReplicaProcess::start_in(&ns, "mtp2", B, &cg);
    let args = ["--replica-cgroup", cg.rel.as_str()];
    let mut agent = ns.agent(&args);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    // Emptied and made again: another cgroup at the same path. mtp2 is
    // moved out first (a cgroup with processes cannot be removed), so it
    // keeps serving throughout.
    a.kill();
    agent.wait_state("mtp1", State::Down);
    let root = cg.path.parent().unwrap().join("cgroup.procs");
    std::fs::write(&root, b.child.id().to_string()).unwrap();
    std::fs::remove_dir(&cg.path).unwrap();
    std::fs::create_dir(&cg.path).unwrap();

    let from = agent.log_len();
    let e = ReplicaProcess::try_start_as_in(&ns, "mtp1", A, None, &cg)
        .err()
        .expect("a bind in the new cgroup before mtlb follows it is refused");
    assert!(e.contains("Operation not permitted"), "{e}");
    agent.wait_for_after(
        from,
        &format!("replica_cgroup {} was made again (id ", cg.path.display()),
    );
    assert!(agent.wait_exit().success());
    // Steering goes on from the pins meanwhile.
    let (seen, failed) = names(BALANCED, 4);
    assert_eq!(
        failed,
        0,
        "{seen:?}; maps: {}; agent:\n{}",
        bpftool_dump(
            &ns.pin_dir(),
            &["CONNS", "BACKENDS", "LISTENERS", "STOPPING", "STATS"]
        ),
        agent.log()
    );
    assert!(seen.iter().all(|n| n == "mtp2"), "{seen:?}");

    let agent = ns.agent(&args);
    let mut a2 = ReplicaProcess::start_in(&ns, "mtp1", A, &cg);
    agent.wait_state("mtp1", State::Up);
    let (seen, _) = names(BALANCED, 8);
    assert!(seen.iter().any(|n| n == "mtp1"), "{seen:?}");
    drop(agent);
    a2.kill();
    drop(b);
}

/// Pins of a build that had no REPLICA_CGROUP map (every build before the
/// bind hooks judged the cgroup) are taken over, not replaced: the held
/// connections stay counted, and the new map is created and enforced.
#[test]
fn pins_without_the_replica_cgroup_map_are_taken_over() {
    let ns = Netns::new();
    let cg = Cgroup::new();
    let mut a = ReplicaProcess::start_in(&ns, "mtp1", A, &cg);
    let mut agent = ns.agent(&["--replica-cgroup", &cg.rel]);
    agent.wait_state("mtp1", State::Up);
    let held: Vec<_> = (0..3).map(|_| connect(BALANCED).unwrap()).collect();
    assert!(agent.stop().success());
    let map = ns.pin_dir().join("REPLICA_CGROUP");
    std::fs::remove_file(&map).unwrap();
    let agent = ns.agent(&["--replica-cgroup", &cg.rel]);
    agent.wait_for("taking over the pinned state of an earlier agent");
    assert!(map.exists(), "REPLICA_CGROUP not pinned again");
    let maps = agent.maps();
    wait_counts(&maps, 1, "3 held across the takeover", |c| {
        c[0].established == 3
    });
    // Root is in replica_uids: only the cgroup refuses it.
    let e = ReplicaProcess::try_start_as(&ns, "outsider", B, None, false)
        .err()
        .expect("root outside the cgroup bound a replica port");
    assert!(e.contains("Operation not permitted"), "{e}");
    drop(held);
    drop(agent);
    a.kill();
}

/// A replica_cgroup that does not exist stops the agent before anything is
/// attached.
#[test]
fn a_missing_replica_cgroup_is_a_clear_error() {
    let ns = Netns::new();
    let mut agent = ns.spawn_agent(&["--replica-cgroup", "no-such-mtlb-cgroup"]);
    let status = agent.wait_exit();
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("replica_cgroup") && log.contains("no-such-mtlb-cgroup"),
        "{log}"
    );
    assert!(!ns.pin_dir().exists(), "pins left behind");
}
