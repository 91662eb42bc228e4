//! Typed handles on the balancer's maps, from a freshly loaded object or
//! from the pins of a running (or dead) agent.
//!
//! [`names::ALL`] is the one list of the object's maps: the loader pins
//! each under its name, takeover compares their shapes, and [`Maps`] opens
//! its handles by the same names (a unit test checks the list against the
//! object the kernel programs build). The handles are private: callers use
//! domain methods (register a listener, write a backend, read counts).

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SkStorage};
use mtlb_common::{
    Backend, Conns, ConnsTable, Listener, MAX_REPLICAS, Runtime, Settings, SlotTotals, SockTag,
    Status, Stopping, stat,
};
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("cannot open pinned map {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("cannot mmap CONNS")]
    Mmap(#[source] std::io::Error),
    #[error("map {name} has an unexpected type")]
    WrongType { name: &'static str },
    #[error("sockmap slot {slot}")]
    Sockmap {
        slot: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tag the listener for slot {slot}")]
    Tag {
        slot: u32,
        #[source]
        source: MapError,
    },
}

/// The maps' names, as the kernel programs declare them and as they are
/// pinned (bpffs refuses names with a dot; these have none).
pub mod names {
    pub const SETTINGS: &str = "SETTINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNS: &str = "CONNS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const ADDRESSES: &str = "ADDRESSES";
    pub const FLOWS: &str = "FLOWS";
    pub const RUNTIME: &str = "RUNTIME";
    pub const LAST: &str = "LAST";
    pub const STATUS: &str = "STATUS";
    pub const STATS: &str = "STATS";
    pub const SLOT_TOTALS: &str = "SLOT_TOTALS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const SK_TAGS: &str = "SK_TAGS";
    pub const ALLOWED_UIDS: &str = "ALLOWED_UIDS";
    pub const EVENTS: &str = "EVENTS";
    pub const REFUSED_AT: &str = "REFUSED_AT";
    pub const STOPPING: &str = "STOPPING";
    pub const OWNER_PIDS: &str = "OWNER_PIDS";
    pub const REPLICA_CGROUP: &str = "REPLICA_CGROUP";
    /// Every map of the object. FLOWS and LAST are the kernel's alone (no
    /// userspace handle) but are pinned and taken over like the rest.
    pub const ALL: &[&str] = &[
        SETTINGS,
        BACKENDS,
        CONNS,
        LISTENERS,
        ADDRESSES,
        FLOWS,
        RUNTIME,
        LAST,
        STATUS,
        STATS,
        SLOT_TOTALS,
        SOCKETS,
        SK_TAGS,
        ALLOWED_UIDS,
        EVENTS,
        REFUSED_AT,
        STOPPING,
        OWNER_PIDS,
        REPLICA_CGROUP,
    ];
    /// Maps an earlier build did not have: their pins may be missing from
    /// a pin directory that is otherwise taken over (they are created
    /// then), and a read-only view of such pins goes without them.
    pub const ADDED: &[&str] = &[STOPPING, OWNER_PIDS, REPLICA_CGROUP];
}

pub struct Maps {
    settings: Array<MapData, Settings>,
    backends: Array<MapData, Backend>,
    /// Kept open for the mapping below.
    _conns: MapData,
    listeners: Array<MapData, Listener>,
    addresses: HashMap<MapData, [u8; 16], u8>,
    stats: PerCpuArray<MapData, u64>,
    slot_totals: PerCpuArray<MapData, SlotTotals>,
    tags: SkStorage<MapData, SockTag>,
    tags_fd: std::os::fd::OwnedFd,
    /// The 8-byte-value sockmap; see `sys`.
    sockets: MapData,
    runtime: Array<MapData, Runtime>,
    status: Array<MapData, Status>,
    allowed_uids: HashMap<MapData, u32, u8>,
    /// `None` in a read-only view of an older build's pins.
    replica_cgroup: Option<Array<MapData, u64>>,
    /// The EVENTS ring buffer, until the agent takes it to read.
    events: Option<MapData>,
    /// `None` in a read-only view of an older build's pins.
    stopping: Option<Array<MapData, Stopping>>,
    owner_pids: Option<HashMap<MapData, u32, u64>>,
    /// CONNS mapped into this process, for atomic reads and subtraction.
    conns_shared: SharedConns,
}

/// CONNS (a BPF_F_MMAPABLE array) mapped into the agent. The programs change
/// the counters with atomic instructions; subtracting here with atomic
/// operations on the same memory keeps every update, which a
/// lookup-then-update through bpf(2) would not.
struct SharedConns {
    ptr: std::ptr::NonNull<Conns>,
    len: usize,
}

impl SharedConns {
    fn map(m: &MapData) -> Result<Self, MapsError> {
        use std::os::fd::AsRawFd as _;
        let size = std::mem::size_of::<ConnsTable>();
        let page = 4096;
        let len = size.div_ceil(page) * page;
        // SAFETY: mapping a BPF array fd; the kernel checks size and flags.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                m.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MapsError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: std::ptr::NonNull::new(p.cast())
                .ok_or(MapsError::Mmap(std::io::Error::other("mmap returned null")))?,
            len,
        })
    }

    fn handshakes(&self, slot: u32) -> &std::sync::atomic::AtomicU64 {
        assert!(slot < MAX_REPLICAS);
        // SAFETY: in bounds; Conns is repr(C) with u64 fields, 8-aligned in
        // a page-aligned mapping; the kernel only touches it atomically.
        unsafe {
            std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of_mut!(
                (*self.ptr.as_ptr().add(slot as usize)).handshakes
            ))
        }
    }

    fn line(&self, slot: u32) -> *mut Conns {
        assert!(slot < MAX_REPLICAS);
        // SAFETY: in bounds of the mapping (one ConnsTable).
        unsafe { self.ptr.as_ptr().add(slot as usize) }
    }

    /// A slot's line, each word read atomically.
    fn read(&self, slot: u32) -> Conns {
        use std::sync::atomic::Ordering::Relaxed;
        Conns {
            handshakes: self.handshakes(slot).load(Relaxed),
            established: self.established(slot).load(Relaxed),
            weight: self.weight(slot).load(Relaxed),
            ..Conns::default()
        }
    }

    fn weight(&self, slot: u32) -> &std::sync::atomic::AtomicU32 {
        // SAFETY: as in `handshakes`; the programs store it whole.
        unsafe {
            std::sync::atomic::AtomicU32::from_ptr(std::ptr::addr_of_mut!(
                (*self.line(slot)).weight
            ))
        }
    }

    fn established(&self, slot: u32) -> &std::sync::atomic::AtomicU64 {
        assert!(slot < MAX_REPLICAS);
        // SAFETY: as in `handshakes`.
        unsafe {
            std::sync::atomic::AtomicU64::from_ptr(std::ptr::addr_of_mut!(
                (*self.ptr.as_ptr().add(slot as usize)).established
            ))
        }
    }
}

// SAFETY: the mapping is process-wide shared memory only touched through
// atomics; moving the handle to another thread is fine.
unsafe impl Send for SharedConns {}

impl Drop for SharedConns {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

const ADDRESSES_NAME: &str = names::ADDRESSES;

fn conv<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Map { name, source })
}

/// The MapData of one of our maps (the types the object declares).
pub(crate) fn data(name: &'static str, m: Map) -> Result<MapData, MapsError> {
    Ok(match m {
        Map::SockMap(d) | Map::LruHashMap(d) | Map::HashMap(d) | Map::RingBuf(d) => d,
        Map::SkStorage(d) | Map::Array(d) | Map::PerCpuArray(d) => d,
        _ => return Err(MapsError::WrongType { name }),
    })
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut get = |name: &'static str| -> Result<MapData, MapsError> {
            let m = ebpf.take_map(name).ok_or(MapsError::Missing { name })?;
            data(name, m)
        };
        Self::build(&mut get)
    }

    /// Opens the maps pinned in `dir`.
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        let mut get = |name: &'static str| -> Result<MapData, MapsError> {
            let path = dir.join(name);
            MapData::from_pin(&path).map_err(|source| MapsError::Pin { path, source })
        };
        Self::build(&mut get)
    }

    fn build(
        get: &mut dyn FnMut(&'static str) -> Result<MapData, MapsError>,
    ) -> Result<Self, MapsError> {
        use names::*;
        // Each handle typed from its map, by name.
        macro_rules! open {
            ($name:expr, $variant:ident, $ty:ident) => {
                conv($name, $ty::try_from(Map::$variant(get($name)?)))?
            };
        }
        let conns = get(CONNS)?;
        let conns_shared = SharedConns::map(&conns)?;
        // SkStorage keeps its MapData to itself: a second fd of the map for
        // sock_diag's storage requests.
        let tags = get(SK_TAGS)?;
        let tags_fd = tags
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| MapsError::Map {
                name: SK_TAGS,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }),
            })?;
        Ok(Self {
            settings: open!(SETTINGS, Array, Array),
            backends: open!(BACKENDS, Array, Array),
            _conns: conns,
            conns_shared,
            listeners: open!(LISTENERS, Array, Array),
            addresses: open!(ADDRESSES, HashMap, HashMap),
            stats: open!(STATS, PerCpuArray, PerCpuArray),
            slot_totals: open!(SLOT_TOTALS, PerCpuArray, PerCpuArray),
            tags: conv(SK_TAGS, SkStorage::try_from(Map::SkStorage(tags)))?,
            tags_fd,
            sockets: get(SOCKETS)?,
            runtime: open!(RUNTIME, Array, Array),
            status: open!(STATUS, Array, Array),
            allowed_uids: open!(ALLOWED_UIDS, HashMap, HashMap),
            replica_cgroup: get(REPLICA_CGROUP)
                .ok()
                .map(|m| conv(REPLICA_CGROUP, Array::try_from(Map::Array(m))))
                .transpose()?,
            events: Some(get(EVENTS)?),
            stopping: get(STOPPING)
                .ok()
                .map(|m| conv(STOPPING, Array::try_from(Map::Array(m))))
                .transpose()?,
            owner_pids: get(OWNER_PIDS)
                .ok()
                .map(|m| conv(OWNER_PIDS, HashMap::try_from(Map::HashMap(m))))
                .transpose()?,
        })
    }

    /// Connections of each of the first `slots` slots now (established plus
    /// handshakes in flight), read from the shared mapping without a
    /// syscall.
    pub fn counts(&self, slots: usize) -> Vec<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        (0..slots.min(MAX_REPLICAS as usize) as u32)
            .map(|s| {
                let c = &self.conns_shared;
                let h = (c.handshakes(s).load(Relaxed) as i64).max(0) as u64;
                c.established(s).load(Relaxed).wrapping_add(h)
            })
            .collect()
    }

    /// Registers `socket`, a replica's listening socket, in `slot` unless
    /// the slot holds a live listener (then `Ok(false)`): the sockmap
    /// first (NOEXIST, so a live registration is never replaced), then the
    /// tag (children accepted from now on carry the slot), then the
    /// description sk_lookup selects on: no steered connection can reach
    /// the socket before it is tagged.
    pub fn register_listener(
        &mut self,
        slot: u32,
        socket: &(impl std::os::fd::AsFd + std::os::fd::AsRawFd),
        l: Listener,
    ) -> Result<bool, MapsError> {
        match super::sys::sockmap_insert(self.sockets.fd().as_fd(), slot, socket) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(false),
            Err(source) => return Err(MapsError::Sockmap { slot, source }),
        }
        self.tags
            .insert(
                socket,
                SockTag {
                    slot,
                    state: mtlb_common::TAG_LISTENER,
                },
                0,
            )
            .map_err(|source| MapsError::Tag { slot, source })?;
        self.set_listener(slot, l)?;
        Ok(true)
    }

    /// Makes ALLOWED_UIDS hold exactly `uids`, adding before removing.
    pub fn set_allowed_uids(&mut self, uids: &[u32]) -> Result<(), MapsError> {
        for u in uids {
            conv(names::ALLOWED_UIDS, self.allowed_uids.insert(*u, 1, 0))?;
        }
        for u in self.allowed_uids()? {
            if !uids.contains(&u) {
                conv(names::ALLOWED_UIDS, self.allowed_uids.remove(&u))?;
            }
        }
        Ok(())
    }

    /// The uids ALLOWED_UIDS holds.
    pub fn allowed_uids(&self) -> Result<Vec<u32>, MapsError> {
        let mut uids: Vec<u32> =
            self.allowed_uids
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| MapsError::Map {
                    name: names::ALLOWED_UIDS,
                    source,
                })?;
        uids.sort_unstable();
        Ok(uids)
    }

    /// Sets the id of the replicas' cgroup (0: none) that the bind hooks
    /// judge binds to replica ports by.
    pub fn set_replica_cgroup(&mut self, id: u64) -> Result<(), MapsError> {
        let m = self.replica_cgroup.as_mut().ok_or(MapsError::Missing {
            name: names::REPLICA_CGROUP,
        })?;
        conv(names::REPLICA_CGROUP, m.set(0, id, 0))
    }

    /// The id of the replicas' cgroup the bind hooks judge by; 0: none
    /// (or pins of a build without the map).
    pub fn replica_cgroup(&self) -> Result<u64, MapsError> {
        match &self.replica_cgroup {
            Some(m) => conv(names::REPLICA_CGROUP, m.get(&0, 0)),
            None => Ok(0),
        }
    }

    /// The stop mark of `slot` (see [`Stopping`]); `None`: no mark, or
    /// pins of a build without marks.
    pub fn stopping(&self, slot: u32) -> Result<Option<Stopping>, MapsError> {
        let Some(m) = &self.stopping else {
            return Ok(None);
        };
        let v = conv(names::STOPPING, m.get(&slot, 0))?;
        Ok((v.cookie != 0).then_some(v))
    }

    /// The stop record of `slot` as it is, counters included.
    pub fn stop_record(&self, slot: u32) -> Result<Stopping, MapsError> {
        match &self.stopping {
            Some(m) => conv(names::STOPPING, m.get(&slot, 0)),
            None => Ok(Stopping::default()),
        }
    }

    /// Removes the stop mark of `slot` if it still marks `cookie`, and
    /// adds `queued` to its count of stranded connections. (A read, then a
    /// write of the whole value: the program writes only at a new mark,
    /// and a new mark of the same listener within this window is the one
    /// lost, counted as told already.)
    pub fn settle_stopping(
        &mut self,
        slot: u32,
        clear: Option<u64>,
        queued: u64,
    ) -> Result<(), MapsError> {
        let Some(m) = &mut self.stopping else {
            return Ok(());
        };
        let mut v = conv(names::STOPPING, m.get(&slot, 0))?;
        if let Some(c) = clear
            && v.cookie == c
        {
            v.cookie = 0;
        }
        v.queued += queued;
        conv(names::STOPPING, m.set(slot, v, 0))?;
        // A cleared mark gives the slot its weight back.
        self.refresh_weight(slot)
    }

    /// What OWNER_PIDS holds: pid -> bitmask of slots.
    pub fn owner_pids(&self) -> Result<std::collections::HashMap<u32, u64>, MapsError> {
        let Some(m) = &self.owner_pids else {
            return Ok(Default::default());
        };
        m.iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Map {
                name: names::OWNER_PIDS,
                source,
            })
    }

    /// Makes OWNER_PIDS hold exactly `owners` (pid -> slot bitmask),
    /// adding and updating before removing. At most
    /// `MAX_OWNER_PIDS` fit: the rest fail with E2BIG, reported.
    pub fn set_owner_pids(
        &mut self,
        owners: &std::collections::HashMap<u32, u64>,
    ) -> Result<(), MapsError> {
        let Some(m) = &mut self.owner_pids else {
            return Ok(());
        };
        let old: Vec<(u32, u64)> =
            m.iter()
                .collect::<Result<_, _>>()
                .map_err(|source| MapsError::Map {
                    name: names::OWNER_PIDS,
                    source,
                })?;
        for (pid, mask) in owners {
            if !old.contains(&(*pid, *mask)) {
                conv(names::OWNER_PIDS, m.insert(*pid, *mask, 0))?;
            }
        }
        for (pid, _) in old {
            if !owners.contains_key(&pid) {
                conv(names::OWNER_PIDS, m.remove(&pid))?;
            }
        }
        Ok(())
    }

    /// The EVENTS ring buffer, to read; once.
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<MapData>> {
        let m = self.events.take()?;
        aya::maps::RingBuf::try_from(Map::RingBuf(m)).ok()
    }

    /// What BACKENDS holds for `slot` (an earlier agent's, at takeover).
    pub fn backend(&self, slot: u32) -> Result<Backend, MapsError> {
        conv(names::BACKENDS, self.backends.get(&slot, 0))
    }

    /// Takes the listener out of `slot` (its owner may no longer run
    /// replicas): the sockmap first, so nothing is steered to it, then its
    /// description.
    pub fn evict_listener(&mut self, slot: u32) -> Result<(), MapsError> {
        super::sys::sockmap_delete(self.sockets.fd().as_fd(), slot)
            .map_err(|source| MapsError::Sockmap { slot, source })?;
        self.clear_listener(slot)
    }

    /// Forgets the description of `slot` (its socket has left the sockmap).
    pub fn clear_listener(&mut self, slot: u32) -> Result<(), MapsError> {
        self.set_listener(slot, Listener::default())
    }

    /// Makes ADDRESSES hold exactly `want`, adding before removing so a
    /// balanced address is never missing in between.
    pub fn set_addresses(&mut self, want: &[[u8; 16]]) -> Result<(), MapsError> {
        for a in want {
            conv(ADDRESSES_NAME, self.addresses.insert(*a, 1, 0))?;
        }
        for old in self.addresses()? {
            if !want.contains(&old) {
                conv(ADDRESSES_NAME, self.addresses.remove(&old))?;
            }
        }
        Ok(())
    }

    /// A slot's counts, handshakes never below zero (see [`Conns`]), and
    /// the weight the pick sees.
    pub fn conns(&self, slot: u32) -> Result<Conns, MapsError> {
        let mut c = self.conns_shared.read(slot);
        c.handshakes = c.handshakes_now();
        Ok(c)
    }

    /// The SK_TAGS socket storage, for sock_diag to report each socket's
    /// tag (slot and state).
    pub fn tags_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.tags_fd.as_fd()
    }

    pub fn listener(&self, slot: u32) -> Result<Listener, MapsError> {
        conv(names::LISTENERS, self.listeners.get(&slot, 0))
    }

    /// Cookie of the socket the sockmap holds in `slot`.
    pub fn socket_cookie(&self, slot: u32) -> Result<Option<u64>, MapsError> {
        super::sys::sockmap_cookie(self.sockets.fd().as_fd(), slot)
            .map_err(|source| MapsError::Sockmap { slot, source })
    }

    /// Sum over CPUs of one global counter.
    pub fn stat(&self, index: u32) -> Result<u64, MapsError> {
        Ok(conv(names::STATS, self.stats.get(&index, 0))?.iter().sum())
    }

    /// Every global counter with its name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        (0..stat::COUNT)
            .map(|i| Ok((stat::NAMES[i as usize], self.stat(i)?)))
            .collect()
    }

    /// Per-slot totals summed over CPUs.
    pub fn slot_totals(&self, slot: u32) -> Result<SlotTotals, MapsError> {
        let v = conv(names::SLOT_TOTALS, self.slot_totals.get(&slot, 0))?;
        Ok(v.iter().fold(SlotTotals::default(), |a, b| SlotTotals {
            assigned: a.assigned + b.assigned,
            established: a.established + b.established,
            bytes_in: a.bytes_in + b.bytes_in,
            bytes_out: a.bytes_out + b.bytes_out,
        }))
    }

    fn set_listener(&mut self, slot: u32, l: Listener) -> Result<(), MapsError> {
        conv(names::LISTENERS, self.listeners.set(slot, l, 0))?;
        self.refresh_weight(slot)
    }

    pub fn set_backend(&mut self, slot: u32, b: Backend) -> Result<(), MapsError> {
        conv(names::BACKENDS, self.backends.set(slot, b, 0))?;
        let rv = self.settings()?.require_verified;
        self.write_weight(slot, &b, rv)
    }

    /// Writes the weight the pick sees for `slot` (see [`Conns`]) from what
    /// the maps hold now: the backend's weight if it is enabled and its
    /// listener is there, verified (with checks on) and not told to stop;
    /// else 0. The kernel writes the same field when a listener registers,
    /// closes or is told to stop; sk_lookup checks its pick against the
    /// maps themselves, so a stale weight costs a pick, never a wrong
    /// assignment.
    pub fn refresh_weight(&mut self, slot: u32) -> Result<(), MapsError> {
        let b = self.backend(slot)?;
        let rv = self.settings()?.require_verified;
        self.write_weight(slot, &b, rv)
    }

    /// `refresh_weight` with the backend entry and the settings' flag the
    /// caller has just written (not read back).
    fn write_weight(
        &mut self,
        slot: u32,
        b: &Backend,
        require_verified: u8,
    ) -> Result<(), MapsError> {
        use std::sync::atomic::Ordering::Relaxed;
        let l = self.listener(slot)?;
        let verified = require_verified == 0 || l.cookie == b.listener_cookie;
        let stopping = self.stopping(slot)?.is_some_and(|m| m.cookie == l.cookie);
        let w = if b.enabled != 0 && l.cookie != 0 && verified && !stopping {
            b.weight
        } else {
            0
        };
        self.conns_shared.weight(slot).store(w, Relaxed);
        Ok(())
    }

    pub fn set_settings(&mut self, s: Settings) -> Result<(), MapsError> {
        conv(names::SETTINGS, self.settings.set(0, s, 0))?;
        // Whether a listener must be verified is part of every weight.
        (0..MAX_REPLICAS).try_for_each(|slot| {
            let b = self.backend(slot)?;
            self.write_weight(slot, &b, s.require_verified)
        })
    }

    pub fn settings(&self) -> Result<Settings, MapsError> {
        conv(names::SETTINGS, self.settings.get(&0, 0))
    }

    pub fn status(&self, slot: u32) -> Result<Status, MapsError> {
        conv(names::STATUS, self.status.get(&slot, 0))
    }

    pub fn set_status(&mut self, slot: u32, s: Status) -> Result<(), MapsError> {
        conv(names::STATUS, self.status.set(slot, s, 0))
    }

    pub fn runtime(&self) -> Result<Runtime, MapsError> {
        conv(names::RUNTIME, self.runtime.get(&0, 0))
    }

    pub fn set_runtime(&mut self, r: Runtime) -> Result<(), MapsError> {
        conv(names::RUNTIME, self.runtime.set(0, r, 0))
    }

    /// Replaces a slot's handshake count (the raw word, as i64) with what
    /// `fix` says (`None`: leave it), with compare-and-swap on the shared
    /// page, so an add or subtract by the programs meanwhile is never
    /// lost. Returns the raw value and the value stored when it changed.
    pub fn fix_handshakes(
        &self,
        slot: u32,
        fix: impl Fn(i64) -> Option<u64>,
    ) -> Option<(i64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let a = self.conns_shared.handshakes(slot);
        let mut cur = a.load(Relaxed);
        // Bounded: each failure means the programs changed the word just
        // now; the next tick tries again.
        for _ in 0..8 {
            let want = fix(cur as i64)?;
            match a.compare_exchange(cur, want, Relaxed, Relaxed) {
                Ok(_) => return Some((cur as i64, want)),
                Err(now) => cur = now,
            }
        }
        None
    }

    pub fn addresses(&self) -> Result<Vec<[u8; 16]>, MapsError> {
        self.addresses
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Map {
                name: ADDRESSES_NAME,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is the object's list: every map the kernel programs
    /// declare is pinned and taken over, and nothing else is expected.
    #[test]
    fn table_matches_the_object() {
        let obj = aya_obj::Object::parse(crate::kernel::loader::OBJECT).expect("parse the object");
        let mut theirs: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
        let mut ours = names::ALL.to_vec();
        theirs.sort_unstable();
        ours.sort_unstable();
        assert_eq!(ours, theirs);
    }
}
