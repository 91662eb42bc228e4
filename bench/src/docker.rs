//! A Docker engine of a run's own, in the run's network namespace:
//! `--network host` containers then share that namespace (where mtlb
//! steers), as the seed runs its replicas on its host, and the host's own
//! engine and network stay untouched (no bridge, no iptables rules, no
//! forwarding). Its data, state and socket live in a directory of the
//! run's, so two runs (or a run and the host's own engine) do not meet.
//! The bench's stop phase and the integration tests (tests/src/docker.rs)
//! use it.

use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Dockerd {
    child: Option<Child>,
    /// `unix://…` of this engine's API socket, for `docker -H` / DOCKER_HOST.
    pub host: String,
    root: PathBuf,
    pub log: PathBuf,
}

impl Dockerd {
    /// Starts dockerd (and the containerd it manages) with everything
    /// under `root`, and waits up to `limit` until its API answers.
    /// `prepare` readies the command: the network namespace it must start
    /// in (setns only: `ip netns exec` would also remount /sys, hiding the
    /// cgroup hierarchies dockerd needs), a parent-death signal.
    pub fn start(
        root: &Path,
        limit: Duration,
        prepare: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Dockerd> {
        let root = root.to_path_buf();
        std::fs::create_dir_all(&root)?;
        let host = format!("unix://{}", root.join("docker.sock").display());
        let log = root.join("dockerd.log");
        let file = std::fs::File::create(&log)?;
        let mut c = Command::new("dockerd");
        c.args([
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ])
        .arg("--data-root")
        .arg(root.join("data"))
        .arg("--exec-root")
        .arg(root.join("exec"))
        .arg("--pidfile")
        .arg(root.join("dockerd.pid"))
        .args(["-H", &host])
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
        prepare(&mut c);
        let child = c.spawn().context("starting dockerd")?;
        let mut d = Dockerd {
            child: Some(child),
            host,
            root,
            log,
        };
        // Readiness has no event to wait on from outside: ask the API.
        let deadline = Instant::now() + limit;
        while d
            .docker(&["version", "--format", "{{.Server.Version}}"])
            .is_err()
        {
            if let Some(Ok(Some(s))) = d.child.as_mut().map(|c| c.try_wait()) {
                bail!("dockerd exited with {s}:\n{}", d.log_text());
            }
            if Instant::now() > deadline {
                bail!("dockerd did not answer within {limit:?}:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
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

    /// Runs `docker args…` against this engine; its stdout, or an error
    /// with its output.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("docker {args:?}"))?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers first (their processes and mounts), then the engine,
        // which stops the containerd it started.
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            for id in ids.split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        if let Some(mut c) = self.child.take() {
            super::anchors::terminate(&mut c, Some(Duration::from_secs(20)));
        }
        // What the engine left mounted under its root (overlay layers, the
        // exec root's tmpfs) must go before the directory can be removed;
        // deepest first.
        let root = self.root.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
