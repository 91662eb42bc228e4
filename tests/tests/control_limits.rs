//! Limits on the control socket: clients that leak connections, leave
//! lines half-written or send one without end take neither the agent's
//! file descriptors nor its memory, so its checks, its clients and its
//! other control clients go on. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use std::{io::Write as _, path::Path, time::Duration};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";

/// Idle connections held, by two processes (one may not open as many).
const IDLE: usize = 22_000;
/// Connections that sent part of a line and then nothing.
const HALF_OPEN: usize = 1_000;
/// The agent's open-file limit, as a unit's `LimitNOFILE` would set it:
/// below the connections held, so an agent that kept them all would run
/// out of descriptors for its checks.
const AGENT_NOFILE: u64 = 16_384;
/// A request line without a newline, longer than the agent may grow (the
/// unit's `MemoryMax=256M`).
const ENDLESS_LINE: usize = 300 << 20;
/// The control socket's cap (`control::Limits`'s default).
const CAP: usize = 64;

/// Writes one line of `ENDLESS_LINE` bytes without its newline as fast as
/// the agent reads it; returns the bytes written before the agent closed,
/// and its answer.
fn endless_line(socket: &Path) -> (usize, Result<String, String>) {
    let mut s = match dial_control(socket) {
        Ok(s) => s,
        Err(e) => return (0, Err(format!("connect: {e}"))),
    };
    s.set_write_timeout(Some(scaled(Duration::from_secs(10))))
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    while sent < ENDLESS_LINE {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    (sent, read_line_within(&s, wait_limit()))
}

#[test]
fn control_clients_do_not_take_the_agent_down() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let _b = Replica::start("mtp2", B);
    let cfg = Config::new().fast_checks().write(&ns);
    let args = ["--config", cfg.as_str()];
    let agent = ns.agent(&args);
    agent.limit_open_files(AGENT_NOFILE);
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    let socket = ns.control_socket(&args);
    let fds_before = agent.open_fds();
    let clients = ConnectLoop::new().greet().start(&ns);

    // Both replicas UP whenever looked at; the agent's descriptors and
    // memory at their largest.
    let mut not_up = Vec::new();
    let mut max_fds = 0;
    let mut max_rss = 0;
    let mut look = |when: &str| {
        for name in ["mtp1", "mtp2"] {
            if !agent.is_state(name, State::Up) {
                not_up.push(format!("{name} not UP {when}"));
            }
        }
        max_fds = max_fds.max(agent.open_fds());
        max_rss = max_rss.max(agent.rss_kib());
    };

    let mut idle = Vec::new();
    let mut idle_held = Vec::new();
    for i in 0..2 {
        let mut h = ControlHolder::start(&socket, IDLE / 2, "");
        idle_held.push(h.wait_held(|n| look(&format!("with {n} idle connections of holder {i}"))));
        idle.push(h);
    }
    let mut half_open = ControlHolder::start(&socket, HALF_OPEN, "{\"cmd\":\"locate\",");
    let half_held = half_open.wait_held(|n| look(&format!("with {n} half-open connections")));
    let (endless_sent, endless_answer) = endless_line(&socket);
    look("after the endless line");
    // Another client's command, while all of these are held.
    let cli = mtlb_cli_within(&ns, &["backend", "mtp1", "weight", "2"], wait_limit());
    look("after the command");
    let loop_result = clients.finish();
    eprintln!(
        "held {idle_held:?} idle and {half_held:?} half-open connections, sent {endless_sent} bytes of one line; the agent's files at most {max_fds} ({fds_before} before), RSS at most {max_rss} KiB; {} clients served",
        loop_result.ok
    );

    assert!(
        not_up.is_empty(),
        "{} times not UP, first {:?}",
        not_up.len(),
        not_up.first()
    );
    assert!(
        loop_result.failed.is_empty(),
        "{} clients refused, e.g. {:?}",
        loop_result.failed.len(),
        loop_result.failed.first()
    );
    assert!(loop_result.ok > 20, "only {} clients", loop_result.ok);
    assert!(
        cli.as_ref().is_some_and(|(ok, _)| *ok),
        "mtlb backend (None: no answer within {:?}): {cli:?}",
        wait_limit()
    );
    assert!(max_rss < 64 * 1024, "agent RSS {max_rss} KiB");
    // The cap's worth of control connections, one being admitted, and
    // the agent's own passing files (checks' sockets, /proc reads).
    assert!(
        max_fds <= fds_before + CAP + 8,
        "the agent had {max_fds} files open ({fds_before} before)"
    );
    assert_eq!(idle_held, [Ok(IDLE / 2), Ok(IDLE / 2)]);
    assert_eq!(half_held, Ok(HALF_OPEN));

    // What the clients were told: the endless line was refused early, the
    // first connection made room for a later one, and the last half-open
    // one (after which only two came) is closed once its time is up.
    assert!(
        endless_answer
            .as_ref()
            .is_ok_and(|l| l.contains("request too long: over 4096 bytes")),
        "{endless_answer:?}"
    );
    assert!(
        endless_sent < 64 << 20,
        "the agent read {endless_sent} bytes of one line"
    );
    let (first, _) = idle.remove(0).release();
    assert!(first.contains("idle longest"), "{first}");
    let (_, last) = half_open.release();
    assert!(
        last.contains("closed: no request line within 10s"),
        "{last}"
    );
}
