//! The seed's stack for real on one host: official MTProxy (C) replicas in
//! Docker containers started by the mtproxy role itself (ansible-playbook,
//! local connection), behind mtlb, with the seed's operator checks. The
//! engine runs in the test's network namespace (harness `Dockerd`); the image
//! is the one `cargo xtask test` builds from Debian's packages
//! (`MTLB_MTPROXY_ROOTFS`), imported by the role as an offline host would.

use mtlb_tests::{docker::Dockerd, *};
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const IMAGE: &str = "mtlb-test/mtproxy:local";

/// The replica image's tarball, or None (printed) where the official
/// server could not be built (no ../shared/peers): the test skips.
fn rootfs() -> Option<String> {
    let p = std::env::var("MTLB_MTPROXY_ROOTFS").ok();
    if p.is_none() {
        eprintln!(
            "skipped: MTLB_MTPROXY_ROOTFS is unset (cargo xtask test builds the replica image \
             when ../shared/peers holds the official MTProxy's source)"
        );
    }
    p
}

/// Runs the mtproxy role (only it: the common role would configure this
/// host) against this machine with the engine's socket as DOCKER_HOST.
fn run_mtproxy_role(d: &Dockerd, dir: &Path, rootfs: &str, extra: &[&str]) -> String {
    let play = dir.join("play.yml");
    std::fs::write(
        &play,
        "- hosts: all\n  gather_facts: false\n  roles: [mtproxy]\n",
    )
    .unwrap();
    let py = python();
    let mut cmd = Command::new(venv_bin("ansible-playbook"));
    cmd.env("DOCKER_HOST", &d.host)
        .env("ANSIBLE_ROLES_PATH", deploy_dir().join("roles"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .args(["-i", "localhost,", "-c", "local"])
        .arg(&play)
        .args(["-e", &format!("ansible_python_interpreter={py}")])
        .args(["-e", &format!("mtproxy_image={IMAGE}")])
        .args(["-e", &format!("mtproxy_image_archive={rootfs}")])
        .args(["-e", &format!("mtproxy_secret=dd{SECRET}")])
        .args([
            "-e",
            &format!("mtproxy_config_dir={}", dir.join("etc").display()),
        ])
        // The hard open-file limit here is below the server's default
        // 65536 + 16.
        .args(["-e", "mtproxy_max_connections=4096"]);
    for e in extra {
        cmd.args(["-e", e]);
    }
    let (status, out, err) = run_bounded(&mut cmd, scaled(Duration::from_secs(300)));
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(
        status.success(),
        "the mtproxy role failed: {status}\n{out}\n{err}"
    );
    out
}

fn names_up(d: &Dockerd) -> Vec<String> {
    d.docker(&["ps", "--format", "{{.Names}} {{.Status}}"])
        .lines()
        .filter(|l| l.contains(" Up "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// Seconds since the epoch, to set the stop and start against the
/// failed clients' times (client_loop.py prints `at` the same way).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn official_mtproxy_in_docker_the_seed_operator_checks() {
    let Some(rootfs) = rootfs() else { return };
    let ns = Netns::new();
    let dir = TempDir::new("docker-role");
    // The replicas' slice, as the role names it (removed after the engine).
    let slice = Cgroup::slice();
    let dockerd = Dockerd::start(&ns);
    let middle = MiddleProxy::start(&ns, free_port());
    let conf = dir.path.join("proxy-multi.conf");
    std::fs::write(&conf, middle.proxy_multi_conf()).unwrap();
    let secret_src = format!("mtproxy_proxy_secret_src={}", middle.secret_file.display());
    let config_src = format!("mtproxy_proxy_config_src={}", conf.display());
    // First as a host deployed before the replicas had a slice.
    let no_slice = [secret_src.as_str(), &config_src, "mtproxy_cgroup_slice="];
    let play = run_mtproxy_role(&dockerd, &dir.path, &rootfs, &no_slice);
    assert!(play.contains("Import the replica image"), "{play}");

    // 1) the replicas run: `docker ps` shows both.
    let up = names_up(&dockerd);
    assert!(
        up.contains(&"mtproxy1".into()) && up.contains(&"mtproxy2".into()),
        "docker ps: {up:?}"
    );
    // With the slice, each replica is started again in it.
    let id = || dockerd.docker(&["inspect", "--format", "{{.Id}}", "mtproxy2"]);
    let id2 = id();
    let slice_var = format!("mtproxy_cgroup_slice={}", slice.rel);
    let vars = [secret_src.as_str(), &config_src, &slice_var];
    run_mtproxy_role(&dockerd, &dir.path, &rootfs, &vars);
    assert_ne!(id2, id(), "mtproxy2 was not started again in the slice");
    // The role again changes nothing that runs (same containers).
    let id2 = id();
    run_mtproxy_role(&dockerd, &dir.path, &rootfs, &vars);
    assert_eq!(id2, id());
    // Each replica runs in the slice, below the cgroup2 root.
    for c in ["mtproxy1", "mtproxy2"] {
        let cgroup =
            std::fs::read_to_string(format!("/proc/{}/cgroup", dockerd.pid_of(c))).unwrap();
        assert!(
            cgroup.contains(&format!("0::/{}/", slice.rel)),
            "{c} is not in {}: {cgroup}",
            slice.rel
        );
    }

    // 2) mtlb sees them UP, proven by the mtproxy check through the
    // official server to the stand-in and by its stats.
    let cfg = Config::mtproxy(&format!("dd{SECRET}"))
        .replicas(2)
        .set("base_port", 10000)
        .set("replica_uids", vec![0, 65534])
        .set("replica_cgroup", slice.rel.as_str())
        .stats_base_port(11000)
        .write_to(&dir.path.join("mtlb.toml"));
    let agent = ns.agent(&["--config", cfg.to_str().unwrap()]);
    agent.wait_for(&format!(
        "replica ports belong to uids [0, 65534] in replica_cgroup {}",
        slice.rel
    ));
    agent.wait_state("mtp1", State::Up);
    agent.wait_state("mtp2", State::Up);
    // sock_ops runs for the replicas' sockets only: attached to their
    // cgroup (the agent's own report, from the pinned link), not the root.
    let (ok, status) = mtlb_cli(&ns, &["status", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{status}");
    assert!(
        status.contains(&format!("; sock_ops on cgroup /{} (id ", slice.rel)),
        "{status}"
    );
    let tree = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(&slice.path)
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&tree.stdout);
    assert!(
        tree.contains("sock_ops") && tree.contains("mtlb_sockops"),
        "{tree}"
    );
    let (_, html) = http_get("/stats");
    for b in ["mtp1", "mtp2"] {
        assert!(
            html.lines().any(|l| l.contains(b) && l.contains(">UP<")),
            "{b} not UP on the stats page:\n{html}"
        );
    }

    // Clients keep coming, each a complete exchange on a new connection.
    let mut cmd = Command::new(python());
    cmd.arg(fixture("client_loop.py"))
        .args(["127.0.0.1", "443", &format!("dd{SECRET}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    ns.run_inside(&mut cmd);
    let mut clients = cmd.spawn().unwrap();
    let mut out = BufReader::new(clients.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    let t1 = wait_backend_total_above("mtp1", 0.0);
    wait_backend_total_above("mtp2", 0.0);

    // The seed's failover: stop one container.
    let stop_at = unix_now();
    // Timed where it is seen (docker stop itself may return later): from
    // the listener closing on, every client must be served.
    let (down, down_at) = std::thread::scope(|s| {
        let seen = s.spawn(|| {
            // When the agent saw the listener close: the change's own
            // timestamp in STATUS.
            let s = agent.wait_state("mtp2", State::Down);
            (s, s.last_change_ms as f64 / 1000.0)
        });
        dockerd.docker(&["stop", "mtproxy2"]);
        seen.join().unwrap()
    });
    assert_ne!(down.reason[0], 0, "mtp2 DOWN with no reason in STATUS");
    assert!(!names_up(&dockerd).contains(&"mtproxy2".into()));
    // mtp1 alone serves the clients that keep coming.
    let t1 = wait_backend_total_above("mtp1", t1 + 20.0);
    // Back: UP, and it takes clients again.
    let t2 = backend_total("mtp2");
    dockerd.docker(&["start", "mtproxy2"]);
    agent.wait_state("mtp2", State::Up);
    wait_backend_total_above("mtp2", t2);
    wait_backend_total_above("mtp1", t1);

    drop(clients.stdin.take());
    let summary = out
        .lines()
        .map_while(Result::ok)
        .last()
        .expect("client_loop summary");
    let _ = clients.wait();
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert!(v["ok"].as_u64().unwrap() > 40, "{v}");
    // mtproto-proxy keeps its listener open for 30-100 ms after SIGTERM
    // while it shuts down, and a client it accepts then gets no answer:
    // nothing the balancer can see (README "Failover"). Those are counted
    // and shown; every other client must have been served.
    let failed = v["failed"].as_array().unwrap();
    let (in_shutdown, others): (Vec<_>, Vec<_>) = failed.iter().partition(|f| {
        let at = f["at"].as_f64().unwrap();
        at >= stop_at && at <= down_at
    });
    eprintln!(
        "{} clients served; {} failed while mtproxy2 shut down ({:.0} ms from docker stop to its listener closing)",
        v["ok"],
        in_shutdown.len(),
        (down_at - stop_at) * 1000.0
    );
    assert!(
        others.is_empty(),
        "failed clients: {others:?} (stop at {stop_at:.3}, DOWN at {down_at:.3})"
    );
    assert!(in_shutdown.len() <= 3, "{in_shutdown:?}");
}
