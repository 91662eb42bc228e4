//! A Docker engine of a test's own, inside the test's network namespace:
//! `--network host` containers then share that namespace (where mtlb
//! steers), and the host's network stays untouched (no bridge, no
//! iptables rules, no forwarding). Its data, state and socket live in a temp
//! dir, so two tests (or a test and the host's own engine) do not meet.

use crate::{Netns, TempDir, wait_limit};
use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub struct Dockerd {
    child: Child,
    /// `unix://…` of this engine's API socket, for `docker -H` / DOCKER_HOST.
    pub host: String,
    pub log: PathBuf,
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd (and the containerd it manages) in `ns` and waits
    /// until its API answers.
    pub fn start(ns: &Netns) -> Self {
        let dir = TempDir::new("docker");
        let host = format!("unix://{}", dir.path.join("docker.sock").display());
        let log = dir.path.join("dockerd.log");
        let mut cmd = Command::new("dockerd");
        cmd.args([
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ])
        .arg("--data-root")
        .arg(dir.path.join("data"))
        .arg("--exec-root")
        .arg(dir.path.join("exec"))
        .arg("--pidfile")
        .arg(dir.path.join("dockerd.pid"))
        .args(["-H", &host])
        .stdin(Stdio::null());
        let file = std::fs::File::create(&log).unwrap();
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        // setns only: `ip netns exec` would also remount /sys, hiding the
        // cgroup hierarchies dockerd needs ("Devices cgroup isn't mounted").
        ns.run_inside(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn dockerd: {e}"));
        let mut d = Self {
            child,
            host,
            log,
            dir,
        };
        // Readiness has no event to wait on from outside: ask the API,
        // bounded in time, and fail with dockerd's log.
        let deadline = Instant::now() + wait_limit();
        loop {
            if d.docker_out(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
            {
                break;
            }
            if let Some(s) = d.child.try_wait().unwrap() {
                panic!("dockerd exited with {s}:\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within {:?}:\n{}",
                wait_limit(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `docker` command against this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.host).args(args);
        c
    }

    fn docker_out(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
    }

    /// Runs `docker args…`, requires success, returns its stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = self.docker_out(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pid (as the host sees it) of a running container's first process.
    pub fn pid_of(&self, container: &str) -> u32 {
        self.docker(&["inspect", "--format", "{{.State.Pid}}", container])
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers first (their processes and mounts), then the engine,
        // which stops the containerd it started.
        let ids = self.docker_out(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker_out(&["rm", "-f", id]);
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever the engine left mounted under its root (overlay layers,
        // its exec root's tmpfs) must go before the dir can be removed.
        let root = self.dir.path.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        // Deepest first.
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
