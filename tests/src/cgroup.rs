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

impl Cgroup {
    pub fn new() -> Self {
        let find = || {
            let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            // "... mount_point ... - cgroup2 ...": field 5 is the mount point.
            info.lines()
                .find(|l| {
                    l.split(" - ")
                        .nth(1)
                        .is_some_and(|t| t.starts_with("cgroup2 "))
                })
                .and_then(|l| l.split_whitespace().nth(4))
                .map(PathBuf::from)
        };
        let mount = find().unwrap_or_else(|| {
            // Where mtlb itself mounts one when there is none (a bare VM).
            std::fs::create_dir_all("/run/mtlb/cgroup2").unwrap();
            sh(Command::new("mount").args(["-t", "cgroup2", "cgroup2", "/run/mtlb/cgroup2"]));
            find().expect("cgroup2 mounted")
        });
        let rel = format!("mtlb-t{}-{}", std::process::id(), unique());
        let path = mount.join(&rel);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path, rel }
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A killed process leaves its cgroup a moment after wait()
        // returns: bounded retries.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}
