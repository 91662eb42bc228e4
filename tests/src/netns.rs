//! Network namespaces of a test's own.

use crate::*;
use std::{
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::PathBuf,
    process::Command,
};

/// A named network namespace with lo up. The creating thread is moved into
/// it. Dropping it deletes the namespace and any pins left for it.
pub struct Netns {
    pub name: String,
    pub file: File,
    pub ino: u64,
}

impl Netns {
    /// Creates the namespace and moves the calling thread into it.
    #[expect(
        clippy::new_without_default,
        reason = "creating a namespace is not a default value"
    )]
    pub fn new() -> Self {
        let n = Self::create();
        n.enter();
        n
    }

    /// Creates the namespace without entering it.
    pub fn create() -> Self {
        let name = format!("mtlb-t{}-{}", std::process::id(), unique());
        sh(Command::new("ip").args(["netns", "add", &name]));
        sh(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let ino = file.metadata().unwrap().ino();
        Self { name, file, ino }
    }

    /// Makes `cmd` start inside the namespace (keeping this mount
    /// namespace, so pins stay visible).
    pub fn run_inside(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; fd stays open in the parent
        // for as long as the Netns lives.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", self.name));
    }

    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("mtlb-state-{}", self.name))
    }

    /// The agent's saved operator choices (`mtlb run --state-dir` is
    /// [`state_dir`](Self::state_dir)).
    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join(format!("state-{}.json", self.ino))
    }

    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/mtlb/{}", self.ino))
    }

    /// `sysctl -w key=value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        sh(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]));
    }

    /// Runs `nft RULE` inside the namespace.
    pub fn nft(&self, rule: &str) {
        sh(Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .arg(rule));
    }

    /// Slows lo down with a token bucket, so that handshakes stay in flight
    /// (SYN-ACKs queue behind the SYNs sent before them).
    pub fn slow_lo(&self, rate: &str) {
        self.tc(&[
            "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "1600", "limit",
            "1000000",
        ]);
    }

    pub fn unslow_lo(&self) {
        self.tc(&["qdisc", "del", "dev", "lo", "root"]);
    }

    /// Runs `tc ARGS` inside the namespace.
    pub fn tc(&self, args: &[&str]) {
        sh(Command::new("tc").arg("-n").arg(&self.name).args(args));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = mtlb::kernel::pins::remove(&self.pin_dir());
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}
