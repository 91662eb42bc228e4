//! Cgroups (v2) of a test's own.

use crate::*;
use std::{path::PathBuf, process::Command, time::Duration};

/// A cgroup (v2) of a test's own, under the cgroup2 mount; removed when
/// dropped (after the processes in it: drop those first).
pub struct Cgroup {
    pub path: PathBuf,
    /// Relative to the cgroup2 mount, as `replica_cgroup` takes it.
    pub rel: String,
}

/// Mount points of the cgroup hierarchies of type `fstype` ("cgroup2",
/// "cgroup").
fn mounts(fstype: &str) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    // "... mount_point ... - fstype ...": field 5 is the mount point.
    info.lines()
        .filter(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.starts_with(&format!("{fstype} ")))
        })
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .collect()
}

/// The cgroup2 mount, mounted where mtlb itself mounts one when there is
/// none (a bare VM).
fn cgroup2_mount() -> PathBuf {
    mounts("cgroup2").into_iter().next().unwrap_or_else(|| {
        std::fs::create_dir_all("/run/mtlb/cgroup2").unwrap();
        sh(Command::new("mount").args(["-t", "cgroup2", "cgroup2", "/run/mtlb/cgroup2"]));
        mounts("cgroup2")
            .into_iter()
            .next()
            .expect("cgroup2 mounted")
    })
}

impl Cgroup {
    pub fn new() -> Self {
        let cg = Self::named(format!("mtlb-t{}-{}", std::process::id(), unique()));
        std::fs::create_dir(&cg.path)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.path.display()));
        cg
    }

    /// A top-level systemd slice name of a test's own (`mtlbt…x….slice`,
    /// no "-": systemd would nest it), for a cgroup someone else creates
    /// (Docker's `--cgroup-parent`). Not created here; removed when
    /// dropped, from every hierarchy (Docker's cgroupfs driver on a
    /// hybrid host makes it in each cgroup v1 hierarchy too).
    pub fn slice() -> Self {
        Self::named(format!("mtlbt{}x{}.slice", std::process::id(), unique()))
    }

    fn named(rel: String) -> Self {
        Self {
            path: cgroup2_mount().join(&rel),
            rel,
        }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for m in mounts("cgroup") {
            let _ = std::fs::remove_dir(m.join(&self.rel));
        }
        // A killed process leaves its cgroup a moment after wait()
        // returns: bounded retries.
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}
