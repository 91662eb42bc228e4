//! The `mtproxy` health check against a real MTProxy server (mtprotoproxy
//! from PyPI) whose Telegram upstream is a loopback fake DC, and against a
//! plain TCP server. Needs the Python environment `cargo xtask test` makes.

use mtlb_tests::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const OTHER: &str = "fedcba9876543210fedcba9876543210";
const DOMAIN_HEX: &str = "6578616d706c652e636f6d"; // example.com

/// mtp1 runs with the configured secret, mtp2 with another: mtp1 passes
/// its checks, mtp2 goes DOWN with `reason`.
fn right_up_wrong_down(tls: bool, configured: &str, reason: &str) {
    let ns = Netns::new();
    let _dc = fake_dc(&ns, 20443);
    let _right = mtproxy_replica(&ns, 10000, SECRET, 20443, tls);
    let _wrong = mtproxy_replica(&ns, 10001, OTHER, 20443, tls);
    let cfg = Config::mtproxy(configured).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    let down = agent.wait_down_by_check("mtp2");
    assert_eq!(status_reason(&down), reason);
    agent.wait_check_passed("mtp1", "MTProxy answered through upstream");
    let log = agent.log();
    assert!(!log.contains("backend mtp1 is DOWN"), "{log}");
}

#[test]
fn dd_right_secret_up_wrong_secret_down() {
    // A dd probe cannot tell a wrong secret from an unreachable upstream:
    // the server stays silent (see mtlb-userspace/src/checks/mtproxy.rs).
    right_up_wrong_down(false, &format!("dd{SECRET}"), "no answer through proxy");
}

#[test]
fn ee_right_secret_up_wrong_secret_down() {
    right_up_wrong_down(
        true,
        &format!("ee{SECRET}{DOMAIN_HEX}"),
        "wrong secret or not MTProxy",
    );
}

#[test]
fn unreachable_upstream_is_down_with_no_answer() {
    let ns = Netns::new();
    // No fake DC on 20443: the proxies cannot reach their upstream.
    let _dd = mtproxy_replica(&ns, 10000, SECRET, 20443, false);
    let _ee = mtproxy_replica(&ns, 10001, SECRET, 20443, true);
    let cfg = Config::mtproxy(&format!("dd{SECRET}")).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    let down = agent.wait_down_by_check("mtp1");
    assert_eq!(status_reason(&down), "no answer through proxy");
    drop(agent);
    // With the ee secret the TLS answer proves the secret first.
    let cfg = Config::mtproxy(&format!("ee{SECRET}{DOMAIN_HEX}")).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    let line = agent.wait_for("backend mtp2 is DOWN");
    assert!(
        line.contains("reason: no answer through proxy") && line.contains("secret verified"),
        "{line}"
    );
}

#[test]
fn plain_tcp_server_is_down() {
    let ns = Netns::new();
    let _dc = fake_dc(&ns, 20443);
    let _right = mtproxy_replica(&ns, 10000, SECRET, 20443, false);
    let _plain = Replica::start("mtp2", "127.0.0.1:10001");
    let cfg = Config::mtproxy(&format!("dd{SECRET}")).write(&ns);
    let agent = ns.agent_debug(&["--config", &cfg]);
    let down = agent.wait_down_by_check("mtp2");
    assert_eq!(status_reason(&down), "wrong secret or not MTProxy");
    // Clients go to the real proxy only.
    agent.wait_state("mtp1", State::Up);
    let held: Vec<_> = (0..5)
        .map(|_| std::net::TcpStream::connect(BALANCED).unwrap())
        .collect();
    let m = agent.maps();
    wait_counts(&m, 2, "all on mtp1", |c| {
        c[0].established == 5 && c[1].established == 0
    });
    drop(held);
}
