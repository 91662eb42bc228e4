//! A Docker engine of a test's own, inside the test's network namespace
//! (mtlb-bench's `docker::Dockerd`, which the bench's stop phase runs
//! too): `--network host` containers then share that namespace, where
//! mtlb steers. Its data, state and socket live in a temp dir.

use crate::{Netns, TempDir, wait_limit};
use std::{path::PathBuf, process::Command};

pub struct Dockerd {
    inner: mtlb_bench::docker::Dockerd,
    /// `unix://…` of this engine's API socket, for `docker -H` / DOCKER_HOST.
    pub host: String,
    pub log: PathBuf,
    // After `inner`: the engine is stopped and unmounted before its
    // directory goes.
    _dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd (and the containerd it manages) in `ns` and waits
    /// until its API answers.
    pub fn start(ns: &Netns) -> Self {
        let dir = TempDir::new("docker");
        let inner =
            mtlb_bench::docker::Dockerd::start(&dir.path, wait_limit(), |c| ns.run_inside(c))
                .unwrap_or_else(|e| panic!("{e:#}"));
        Self {
            host: inner.host.clone(),
            log: inner.log.clone(),
            inner,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        self.inner.log_text()
    }

    /// A `docker` command against this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        self.inner.command(args)
    }

    /// Runs `docker args…`, requires success, returns its stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        self.inner.docker(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The pid (as the host sees it) of a running container's first process.
    pub fn pid_of(&self, container: &str) -> u32 {
        self.docker(&["inspect", "--format", "{{.State.Pid}}", container])
            .trim()
            .parse()
            .unwrap()
    }
}
