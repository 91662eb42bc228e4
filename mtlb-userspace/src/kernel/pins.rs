//! Per-network-namespace pin directory: `<bpffs>/mtlb/<netns inode>/`.
//!
//! Keying the directory by the namespace's inode lets one agent per
//! namespace run on a host without their pins meeting. A lock file under
//! /run/mtlb keeps a second agent out of a namespace that has one.

use nix::fcntl::{Flock, FlockArg};
use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot stat /proc/self/ns/net")]
    Netns(#[source] io::Error),
    #[error("cannot open lock file {path}")]
    LockOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another mtlb agent is running in this network namespace (lock {path} is held)")]
    Locked { path: PathBuf },
    #[error("cannot prepare pin directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Inode of this thread's network namespace.
pub fn netns_inode() -> Result<u64, PinError> {
    fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| fs::metadata("/proc/self/ns/net"))
        .map(|m| m.ino())
        .map_err(PinError::Netns)
}

/// The pin directory for namespace `ino` under bpffs `root`.
pub fn pin_dir(root: &Path, ino: u64) -> PathBuf {
    root.join("mtlb").join(ino.to_string())
}

/// Names of the pinned links, relative to the pin directory. (Maps are
/// pinned under their own names, `maps::names::ALL`.)
pub mod names {
    pub const LINK_SK_LOOKUP: &str = "link_sk_lookup";
    pub const LINK_SOCK_OPS: &str = "link_sock_ops";
    pub const LINK_BIND4: &str = "link_bind4";
    pub const LINK_BIND6: &str = "link_bind6";
    pub const LINK_SIGNAL: &str = "link_signal";
    pub const LINKS: &[&str] = &[
        LINK_SK_LOOKUP,
        LINK_SOCK_OPS,
        LINK_BIND4,
        LINK_BIND6,
        LINK_SIGNAL,
    ];
}

/// Where the per-namespace lock files live. Not configurable on purpose:
/// two agents with different `control_dir` or `bpffs` in one namespace
/// would still steer the same port, so they must meet on one lock.
pub const LOCK_DIR: &str = crate::config::RUN_DIR;

/// Exclusive right to run in one namespace, held for the agent's life.
pub struct NetnsLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

pub fn lock(ino: u64) -> Result<NetnsLock, PinError> {
    let dir = Path::new(LOCK_DIR);
    fs::create_dir_all(dir).map_err(|source| PinError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(format!("netns-{ino}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| PinError::LockOpen {
            path: path.clone(),
            source,
        })?;
    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(NetnsLock { _lock: lock, path }),
        Err(_) => Err(PinError::Locked { path }),
    }
}

/// Creates `dir` (and `<bpffs>/mtlb`) with mode 0700.
pub fn create_dir(dir: &Path) -> Result<(), PinError> {
    let err = |source| PinError::Dir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    for d in [dir.parent(), Some(dir)].into_iter().flatten() {
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Restricts every pinned object in `dir` to its owner.
pub fn restrict(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        fs::set_permissions(e?.path(), fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Whether `dir` holds pins (from an earlier agent).
pub fn has_pins(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

/// Removes every pin in `dir`, then `dir` itself. Unpinning a link whose
/// last holder was the pin detaches its program.
pub fn remove(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                fs::remove_file(e?.path())?;
            }
            fs::remove_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
