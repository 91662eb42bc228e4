//! Finding (or making) the bpffs and cgroup2 mounts the agent needs.
//!
//! `ip netns exec` remounts /sys for the namespace it enters, so neither
//! /sys/fs/bpf nor the cgroup2 hierarchy may be there: mount what is missing
//! and say where.

use nix::mount::{MsFlags, mount};
use std::{
    io,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[from] procfs::ProcError),
    #[error("cannot create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} at {path} (needs CAP_SYS_ADMIN)")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{path} is a {found} mount, not bpffs")]
    NotBpffs { path: PathBuf, found: String },
}

/// Mount points of `fstype` in this mount namespace, in mount order.
fn mounts_of(fstype: &str) -> Result<Vec<PathBuf>, MountError> {
    let infos = procfs::process::Process::myself()?.mountinfo()?;
    Ok(infos
        .into_iter()
        .filter(|m| m.fs_type == fstype)
        .map(|m| m.mount_point)
        .collect())
}

fn fstype_at(path: &Path) -> Result<Option<String>, MountError> {
    let infos = procfs::process::Process::myself()?.mountinfo()?;
    // The last mount on a path is the visible one.
    Ok(infos
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
        .map(|m| m.fs_type))
}

/// What [`ensure_bpffs`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bpffs {
    /// `path` was a bpffs mount already.
    Present,
    /// This mount namespace (e.g. `ip netns exec`'s, which remounts /sys)
    /// lacks it, but the parent's (or PID 1's) has it: use that one through
    /// `/proc/<pid>/root/<path>`, so the pins are the host's.
    Host(PathBuf),
    /// No bpffs anywhere: a new one was mounted.
    Mounted,
}

/// Makes sure `path` is a bpffs mount.
///
/// Every `mount -t bpf` makes a separate instance, so mounting a fresh one
/// inside a private mount namespace would hide the pins from the host (and
/// they would vanish with the namespace). When the parent's or PID 1's mount
/// namespace has
/// bpffs at the same path, that instance is used through /proc/<pid>/root
/// (a bind mount across mount namespaces is refused).
pub fn ensure_bpffs(path: &Path) -> Result<Bpffs, MountError> {
    match fstype_at(path)? {
        Some(t) if t == "bpf" => return Ok(Bpffs::Present),
        Some(t) if path != Path::new(crate::config::DEFAULT_BPFFS) => {
            return Err(MountError::NotBpffs {
                path: path.to_owned(),
                found: t,
            });
        }
        _ => {}
    }
    std::fs::create_dir_all(path).map_err(|source| MountError::Mkdir {
        path: path.to_owned(),
        source,
    })?;
    if let Some(there) = other_ns_bpffs(path) {
        return Ok(Bpffs::Host(there));
    }
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|source| MountError::Mount {
        fstype: "bpf",
        path: path.to_owned(),
        source,
    })?;
    Ok(Bpffs::Mounted)
}

/// The bpffs mounted at `path` in the mount namespace of the parent (the
/// shell that ran `ip netns exec`) or of PID 1, when it differs from ours,
/// as a path through `/proc/<pid>/root`. Either may be unreadable.
fn other_ns_bpffs(path: &Path) -> Option<PathBuf> {
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let ppid = nix::unistd::getppid().as_raw();
    for pid in [ppid, 1] {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let other_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        if other_ns.is_none() || other_ns == ours {
            continue;
        }
        let has_it = procfs::process::Process::new(pid)
            .and_then(|p| p.mountinfo())
            .is_ok_and(|m| {
                m.into_iter()
                    .any(|m| m.mount_point == path && m.fs_type == "bpf")
            });
        let there = root.join(path.strip_prefix("/").unwrap_or(path));
        if has_it && std::fs::read_dir(&there).is_ok() {
            return Some(there);
        }
    }
    None
}

/// Where to read pins that an agent made under the bpffs `path`: `path`
/// itself when it is a bpffs here, else the parent's (or PID 1's) instance
/// through /proc, as [`ensure_bpffs`] would have used; `path` when neither.
pub fn visible_bpffs(path: &Path) -> PathBuf {
    match fstype_at(path) {
        Ok(Some(t)) if t == "bpf" => path.to_owned(),
        _ => other_ns_bpffs(path).unwrap_or_else(|| path.to_owned()),
    }
}

/// Where the tracefs is (the tracepoint's id is read there): an existing
/// tracefs mount, else one made at /sys/kernel/tracing. Tracepoint
/// programs are attached by id; the mount only serves that lookup.
pub fn ensure_tracefs() -> Result<PathBuf, MountError> {
    // aya looks at these two places, in this order, and takes the first
    // that is not empty.
    const PLACES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    for p in PLACES {
        if std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some()) {
            return Ok(PathBuf::from(p));
        }
    }
    let path = PathBuf::from(PLACES[0]);
    mount(
        Some("tracefs"),
        &path,
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        fstype: "tracefs",
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Where the cgroup2 hierarchy's root is mounted; mounts it under
/// /run/mtlb/cgroup2 when it is nowhere. Returns (path, mounted_now).
pub fn ensure_cgroup2() -> Result<(PathBuf, bool), MountError> {
    if let Some(p) = mounts_of("cgroup2")?.into_iter().next() {
        return Ok((p, false));
    }
    let path = Path::new(crate::config::RUN_DIR).join("cgroup2");
    std::fs::create_dir_all(&path).map_err(|source| MountError::Mkdir {
        path: path.clone(),
        source,
    })?;
    mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|source| MountError::Mount {
        fstype: "cgroup2",
        path: path.clone(),
        source,
    })?;
    Ok((path, true))
}

/// The cgroup ids (v2: inode numbers of the directories) of `dir` and
/// every cgroup below it: the sockets created there are the replicas'.
pub fn cgroup_ids(dir: &Path) -> std::io::Result<std::collections::HashSet<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = std::collections::HashSet::new();
    let mut todo = vec![dir.to_owned()];
    // Bounded: a cgroup tree has no cycles, but stop at a sane size.
    while let Some(d) = todo.pop() {
        if ids.len() >= 65_536 {
            break;
        }
        ids.insert(std::fs::metadata(&d)?.ino());
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok(ids)
}

/// The path of the cgroup whose id is `id`, relative to the cgroup2 mount
/// `mount`: what a log line names a task's cgroup by. `None` when it is not
/// found (gone already, or outside this mount's view).
pub fn cgroup_path(mount: &Path, id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let mut todo = vec![mount.to_owned()];
    // Bounded like `cgroup_ids`.
    for _ in 0..65_536 {
        let d = todo.pop()?;
        if std::fs::metadata(&d).ok()?.ino() == id {
            return Some(Path::new("/").join(d.strip_prefix(mount).ok()?));
        }
        for e in std::fs::read_dir(&d).ok()?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            }
        }
    }
    None
}

/// Where cgroup2 is mounted in this mount namespace, if anywhere.
pub fn cgroup2_mount() -> Option<PathBuf> {
    mounts_of("cgroup2").ok()?.into_iter().next()
}

/// Whether this process is in another mount namespace than its parent's
/// (as under `ip netns exec`). Unknown counts as no.
pub fn in_private_mount_ns() -> bool {
    let ppid = nix::unistd::getppid().as_raw();
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link(format!("/proc/{ppid}/ns/mnt")),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}
