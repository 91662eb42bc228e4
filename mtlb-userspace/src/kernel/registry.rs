//! Replica listener registry.
//!
//! Replicas register themselves: the sock_ops listen hook puts a listener in
//! its slot the moment it calls listen(). This module covers the rest:
//! * adopting listeners that were there before the agent started (found in
//!   /proc/net/tcp{,6}, duplicated from their owner with pidfd_getfd, put in
//!   the sockmap, and the duplicate closed at once so the agent never keeps a
//!   replica's socket alive);
//! * noticing registrations and departures, for the logs.

use super::maps::{Maps, MapsError};
use crate::{
    config::Config,
    system::diag::{self, Listening},
};
use mtlb_common::{AF_INET, AF_INET6, Listener, REG_ADOPTED, REG_LISTEN_HOOK};
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("cannot list listening sockets (sock_diag)")]
    Diag(#[source] std::io::Error),
    #[error("cannot read the cgroups under replica_cgroup {path}")]
    Cgroups {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {what}")]
    Proc {
        what: &'static str,
        #[source]
        source: procfs::ProcError,
    },
    #[error("cannot take the listening socket of pid {pid} fd {fd} (needs CAP_SYS_PTRACE)")]
    GetFd {
        pid: i32,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read SO_COOKIE of the listener for slot {slot}")]
    Cookie {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
}

/// What the registry knows of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    pub cookie: u64,
    pub family: u16,
    pub how: u32,
}

/// The slot a listener on `addr` belongs to, if any: its port is a replica
/// port and its address is the replica address (or the wildcard, or the
/// IPv4-mapped form of it).
pub fn slot_for(cfg: &Config, addr: SocketAddr) -> Option<u32> {
    let port = addr.port();
    if port < cfg.base_port || port as u32 >= cfg.base_port as u32 + cfg.replicas as u32 {
        return None;
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if ip == cfg.replica_address || ip.is_unspecified() {
        Some((port - cfg.base_port) as u32)
    } else {
        None
    }
}

pub fn family_name(family: u16, v6only: Option<bool>) -> &'static str {
    match (family, v6only) {
        (AF_INET, _) => "IPv4",
        (AF_INET6, Some(false)) => "IPv6 dual-stack",
        (AF_INET6, Some(true)) => "IPv6 only",
        (AF_INET6, None) => "IPv6",
        _ => "unknown",
    }
}

/// Why a listener on a replica port got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseWhy {
    /// Its owner is not in `replica_uids`.
    Owner,
    /// Its slot holds a live listener.
    Taken,
    /// Created outside `replica_cgroup`: its connections would not be
    /// counted.
    Cgroup,
}

/// A listener on a replica port that was not registered, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub slot: u32,
    pub addr: SocketAddr,
    pub uid: Option<u32>,
    pub pid: Option<i32>,
    pub why: RefuseWhy,
}

impl Refusal {
    fn of(slot: u32, l: &Listening, why: RefuseWhy) -> Self {
        Self {
            slot,
            addr: l.addr,
            uid: Some(l.uid),
            pid: None,
            why,
        }
    }
}

/// Who may hold a replica's slot: an allowed owner's listener, created in
/// the replicas' cgroup when one is configured.
struct Judge {
    /// Cgroup ids of `replica_cgroup` and below; `None`: any cgroup.
    cgroups: Option<std::collections::HashSet<u64>>,
}

impl Judge {
    /// `hooks`: the id of the cgroup the bind hooks judge by (0: none, or
    /// pins of a build without it). `None` when replica_cgroup's path is
    /// no longer that cgroup (removed, or removed and made again):
    /// listeners created in the one removed still serve, and judged by the
    /// ids under the path they would all lose their slots, so nothing is
    /// judged until an agent follows the new cgroup.
    fn new(cfg: &Config, hooks: u64) -> Result<Option<Self>, RegistryError> {
        use std::os::unix::fs::MetadataExt as _;
        if cfg.replica_cgroup.as_os_str().is_empty() {
            return Ok(Some(Self { cgroups: None }));
        }
        let mount = crate::system::mounts::cgroup2_mount().unwrap_or_default();
        let dir = cfg.replica_cgroup_in(&mount);
        let now = std::fs::metadata(&dir).map(|m| m.ino());
        if hooks != 0 && !matches!(now, Ok(id) if id == hooks) {
            return Ok(None);
        }
        let ids =
            crate::system::mounts::cgroup_ids(&dir).map_err(|source| RegistryError::Cgroups {
                path: dir.clone(),
                source,
            })?;
        // Made again between the two reads.
        if hooks != 0 && !ids.contains(&hooks) {
            return Ok(None);
        }
        Ok(Some(Self { cgroups: Some(ids) }))
    }

    fn refuses(&self, cfg: &Config, l: &Listening) -> Option<RefuseWhy> {
        if !cfg.owner_allowed(l.uid) {
            return Some(RefuseWhy::Owner);
        }
        // 0: a kernel that does not say; the listen hook (which runs only
        // in the cgroup) is then the only judge.
        match &self.cgroups {
            Some(ids) if l.cgroup != 0 && !ids.contains(&l.cgroup) => Some(RefuseWhy::Cgroup),
            _ => None,
        }
    }
}

/// A listener adopted by the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub slot: u32,
    pub addr: SocketAddr,
    pub pid: i32,
}

/// What one look for unregistered listeners found.
#[derive(Default)]
pub struct Adoption {
    pub adopted: Vec<Adopted>,
    /// Listeners refused for their owner (each reported once).
    pub refused: Vec<Refusal>,
    /// Adoptions that failed; the others were still tried.
    pub failed: Vec<RegistryError>,
}

#[derive(Default)]
pub struct Registrations {
    known: Vec<Option<SlotView>>,
    /// Listener address and IPV6_V6ONLY (when known) by cookie, for logs.
    addrs: HashMap<u64, (SocketAddr, Option<bool>)>,
    /// Socket inodes already reported as refused: each is logged once.
    reported: std::collections::HashSet<u64>,
}

impl Registrations {
    pub fn known(&self) -> &[Option<SlotView>] {
        &self.known
    }

    pub fn addr_of(&self, cookie: u64) -> Option<(SocketAddr, Option<bool>)> {
        self.addrs.get(&cookie).copied()
    }

    /// Reads LISTENERS and the sockmap for the first `slots` slots.
    fn read_raw(maps: &Maps, slots: usize) -> Result<Vec<(Listener, Option<u64>)>, RegistryError> {
        (0..slots as u32)
            .map(|slot| Ok((maps.listener(slot)?, maps.socket_cookie(slot)?)))
            .collect()
    }

    /// A slot counts as registered when the sockmap holds a socket and
    /// LISTENERS describes that same socket.
    fn view((l, cookie): &(Listener, Option<u64>)) -> Option<SlotView> {
        match cookie {
            Some(c) if *c == l.cookie && *c != 0 => Some(SlotView {
                cookie: *c,
                family: l.family,
                how: l.how,
            }),
            _ => None,
        }
    }

    /// Reads the first `slots` slots (the ones in use): each one's
    /// registered listener. Slots whose listener is gone from the sockmap
    /// but still described in LISTENERS (adopted listeners get no close
    /// callback) are cleared.
    pub fn poll(
        &mut self,
        maps: &mut Maps,
        slots: usize,
    ) -> Result<Vec<Option<SlotView>>, RegistryError> {
        let raw = Self::read_raw(maps, slots)?;
        for (slot, (l, cookie)) in raw.iter().enumerate() {
            if l.cookie != 0 && l.how == REG_ADOPTED && cookie.is_none() {
                maps.clear_listener(slot as u32)?;
            }
        }
        let now: Vec<Option<SlotView>> = raw.iter().map(Self::view).collect();
        self.known = now.clone();
        Ok(now)
    }

    /// Finds listeners on replica ports that are not registered (started
    /// before the agent, or registered while their slot was being cleared)
    /// and adopts those whose owner may run replicas. Returns the
    /// adoptions, the listeners refused for their owner (each once), and
    /// the adoptions that failed (the others are still tried).
    pub fn adopt_missing(
        &mut self,
        cfg: &Config,
        maps: &mut Maps,
    ) -> Result<Adoption, RegistryError> {
        let mut current: Vec<Option<SlotView>> = Self::read_raw(maps, cfg.replicas as usize)?
            .iter()
            .map(Self::view)
            .collect();
        let mut wanted: HashMap<u64, (u32, SocketAddr)> = HashMap::new();
        let mut refused: HashMap<u64, Refusal> = HashMap::new();
        let Some(judge) = Judge::new(cfg, maps.replica_cgroup()?)? else {
            return Ok(Adoption::default());
        };
        let all = listeners()?;
        // Who may run replicas can change (a reload, a restart with other
        // replica_uids): a registered listener whose owner is no longer
        // allowed loses its slot.
        for (slot, view) in current.iter_mut().enumerate() {
            let Some(v) = *view else { continue };
            let Some(l) = all.iter().find(|l| l.cookie == v.cookie) else {
                continue;
            };
            let Some(why) = judge.refuses(cfg, l) else {
                continue;
            };
            maps.evict_listener(slot as u32)?;
            *view = None;
            if self.reported.insert(l.inode) {
                refused.insert(l.inode, Refusal::of(slot as u32, l, why));
            }
        }
        for l in all {
            let Some(slot) = slot_for(cfg, l.addr) else {
                continue;
            };
            if !current.get(slot as usize).is_some_and(|v| v.is_none()) {
                continue;
            }
            match judge.refuses(cfg, &l) {
                None => {
                    wanted.insert(l.inode, (slot, l.addr));
                }
                Some(why) => {
                    if self.reported.insert(l.inode) {
                        refused.insert(l.inode, Refusal::of(slot, &l, why));
                    }
                }
            }
        }
        if wanted.is_empty() && refused.is_empty() {
            return Ok(Adoption::default());
        }
        let mut adopted = Vec::new();
        let mut failed = Vec::new();
        let inodes: std::collections::HashSet<u64> =
            wanted.keys().chain(refused.keys()).copied().collect();
        for (inode, (pid, fd)) in owners(&inodes)? {
            if let Some(r) = refused.get_mut(&inode) {
                r.pid = Some(pid);
                continue;
            }
            let Some((slot, addr)) = wanted.remove(&inode) else {
                continue;
            };
            match self.adopt(maps, pid, fd, slot, addr) {
                Ok(true) => adopted.push(Adopted { slot, addr, pid }),
                Ok(false) => {}
                Err(e) => failed.push(e),
            }
        }
        Ok(Adoption {
            adopted,
            refused: refused.into_values().collect(),
            failed,
        })
    }

    /// Describes listeners the listen hook refused (from its event): who
    /// owns them, found in /proc. Each socket is reported once; `None`
    /// when it is gone already or was reported.
    pub fn explain(
        &mut self,
        slot: u32,
        addr: SocketAddr,
        why: RefuseWhy,
    ) -> Result<Option<Refusal>, RegistryError> {
        // /proc shows no cookies: the listener is found by its address
        // (two listeners share one only through SO_REUSEPORT, which needs
        // the same owner).
        let Some(l) = listeners()?
            .into_iter()
            .find(|l| l.addr == addr && !self.reported.contains(&l.inode))
        else {
            return Ok(None);
        };
        self.reported.insert(l.inode);
        let pid = owners(&[l.inode].into())?
            .get(&l.inode)
            .map(|(pid, _)| *pid);
        Ok(Some(Refusal {
            slot,
            addr,
            uid: Some(l.uid),
            pid,
            why,
        }))
    }

    fn adopt(
        &mut self,
        maps: &mut Maps,
        pid: i32,
        fd: i32,
        slot: u32,
        addr: SocketAddr,
    ) -> Result<bool, RegistryError> {
        let dup = take_fd(pid, fd).map_err(|source| RegistryError::GetFd { pid, fd, source })?;
        let cookie =
            rustix::net::sockopt::socket_cookie(&dup).map_err(|e| RegistryError::Cookie {
                slot,
                source: e.into(),
            })?;
        // The listen hook may have registered it since the scan looked
        // (/proc shows a listener a moment before the hook runs).
        if maps.socket_cookie(slot)? == Some(cookie) {
            return Ok(false);
        }
        let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
        // Not over a live registration (another listener may have taken
        // the slot since the scan looked).
        let registered = maps.register_listener(
            slot,
            &dup,
            Listener {
                cookie,
                family,
                port: addr.port(),
                how: REG_ADOPTED,
            },
        )?;
        if !registered {
            return Ok(false);
        }
        let v6only = addr
            .is_ipv6()
            .then(|| rustix::net::sockopt::ipv6_v6only(&dup).ok())
            .flatten();
        self.addrs.insert(cookie, (addr, v6only));
        // `dup` closes here: only the replica keeps its socket alive.
        drop(dup);
        Ok(true)
    }
}

/// How a slot's listener got registered, for logs.
pub fn how_name(how: u32) -> &'static str {
    match how {
        REG_LISTEN_HOOK => "listen hook",
        REG_ADOPTED => "adopted",
        _ => "unknown",
    }
}

/// Every other process's sockets, from /proc/<pid>/fd: `visit(pid, fd,
/// inode)` for each, until it returns false. Processes can exit while we
/// look: what cannot be read is skipped.
fn scan_sockets(mut visit: impl FnMut(i32, i32, u64) -> bool) -> Result<(), RegistryError> {
    let me = std::process::id() as i32;
    let procs = procfs::process::all_processes().map_err(|source| RegistryError::Proc {
        what: "/proc",
        source,
    })?;
    for p in procs.flatten() {
        if p.pid == me {
            continue;
        }
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(inode) = fd.target
                && !visit(p.pid, fd.fd, inode)
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The process (and its fd) holding each socket inode in `inodes`.
fn owners(
    inodes: &std::collections::HashSet<u64>,
) -> Result<HashMap<u64, (i32, i32)>, RegistryError> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return Ok(found);
    }
    scan_sockets(|pid, fd, inode| {
        if inodes.contains(&inode) {
            found.entry(inode).or_insert((pid, fd));
        }
        found.len() < inodes.len()
    })?;
    Ok(found)
}

/// The socket inodes of the registered listeners, each with the bitmask
/// of the slots it holds (from sock_diag, in this thread's network
/// namespace): what [`owner_pids`] looks for.
pub fn listener_inodes(known: &[Option<SlotView>]) -> Result<HashMap<u64, u64>, RegistryError> {
    let by_cookie: HashMap<u64, usize> = known
        .iter()
        .enumerate()
        .filter_map(|(slot, v)| v.map(|v| (v.cookie, slot)))
        .collect();
    let mut slots_of: HashMap<u64, u64> = HashMap::new();
    if !by_cookie.is_empty() {
        for l in listeners()? {
            if let Some(slot) = by_cookie.get(&l.cookie) {
                *slots_of.entry(l.inode).or_default() |= 1u64 << slot;
            }
        }
    }
    Ok(slots_of)
}

/// Where each owner of a listener holds it: pid -> (fd, inode) pairs.
pub type OwnerFds = HashMap<u32, Vec<(i32, u64)>>;

/// The owners found: pid -> bitmask of slots, and where they hold them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Owners {
    pub pids: HashMap<u32, u64>,
    pub fds: OwnerFds,
}

impl Owners {
    fn add(&mut self, pid: u32, fd: i32, inode: u64, slots: u64) {
        *self.pids.entry(pid).or_default() |= slots;
        self.fds.entry(pid).or_default().push((fd, inode));
    }
}

/// The processes holding the listener sockets `inodes` (a replica's
/// master and the workers it forked, which inherit the socket), as pid ->
/// bitmask of the slots whose listener they hold: what the stop-signal
/// watch looks a signalled pid up in. Pids are those of this /proc, which
/// are the kernel's (the tracepoint's) when the agent runs in the initial
/// pid namespace, as its service does.
///
/// Reads every process's fd table: seconds of CPU on a host with 100k
/// connections, so it runs off the agent's loop, when registrations
/// change; [`owners_again`] is the cheap look in between.
pub fn owner_pids(inodes: &HashMap<u64, u64>) -> Result<Owners, RegistryError> {
    let mut owners = Owners::default();
    if inodes.is_empty() {
        return Ok(owners);
    }
    scan_sockets(|pid, fd, inode| {
        if let Some(m) = inodes.get(&inode) {
            owners.add(pid as u32, fd, inode, *m);
        }
        true
    })?;
    Ok(owners)
}

/// The owners `known` found before that still hold their listeners at the
/// same descriptors, and their children that hold them there too: a
/// worker a replica forks or respawns inherits the listener at its
/// parent's descriptor number. One readlink per known descriptor and one
/// stat read per process, whatever the connections: the periodic look
/// between full scans. (A child that got the listener some other way is
/// found by the next full scan.)
pub fn owners_again(inodes: &HashMap<u64, u64>, known: &OwnerFds) -> Owners {
    let holds = |pid: u32, fd: i32, inode: u64| {
        std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .is_ok_and(|l| l.as_os_str() == format!("socket:[{inode}]").as_str())
    };
    let mut owners = Owners::default();
    for (&pid, fds) in known {
        for &(fd, inode) in fds {
            if let Some(m) = inodes.get(&inode)
                && holds(pid, fd, inode)
            {
                owners.add(pid, fd, inode, *m);
            }
        }
    }
    let Ok(procs) = procfs::process::all_processes() else {
        return owners;
    };
    for p in procs.flatten() {
        let pid = p.pid as u32;
        let Ok(stat) = p.stat() else { continue };
        let Some(fds) = known.get(&(stat.ppid as u32)) else {
            continue;
        };
        if known.contains_key(&pid) {
            continue;
        }
        for &(fd, inode) in fds {
            if let Some(m) = inodes.get(&inode)
                && holds(pid, fd, inode)
            {
                owners.add(pid, fd, inode, *m);
            }
        }
    }
    owners
}

/// Duplicates `fd` of process `pid` into this process.
fn take_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    Ok(rustix::process::pidfd_getfd(
        &pidfd,
        fd,
        rustix::process::PidfdGetfdFlags::empty(),
    )?)
}

/// Listening TCP sockets of this network namespace, from sock_diag (the
/// kernel walks only its listeners, never the connections).
pub fn listeners() -> Result<Vec<Listening>, RegistryError> {
    diag::listeners().map_err(RegistryError::Diag)
}

/// Address of a listener in `slot`, from /proc/net (the listen hook does
/// not tell userspace the address it saw).
pub fn find_addr(cfg: &Config, slot: u32) -> Option<SocketAddr> {
    listeners()
        .ok()?
        .into_iter()
        .map(|l| l.addr)
        .find(|a| slot_for(cfg, *a) == Some(slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_by_address_and_port() {
        let cfg = Config::default();
        let s = |a: &str| slot_for(&cfg, a.parse().unwrap());
        assert_eq!(s("127.0.0.1:10000"), Some(0));
        assert_eq!(s("127.0.0.1:10001"), Some(1));
        assert_eq!(s("127.0.0.1:10002"), None);
        assert_eq!(s("127.0.0.1:9999"), None);
        assert_eq!(s("0.0.0.0:10001"), Some(1));
        assert_eq!(s("[::]:10000"), Some(0));
        assert_eq!(s("[::ffff:127.0.0.1]:10000"), Some(0));
        assert_eq!(s("127.0.0.2:10000"), None);
        assert_eq!(s("[::1]:10000"), None);
    }
}
