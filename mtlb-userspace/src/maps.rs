//! Typed handles on the balancer's maps, from a freshly loaded object or
//! from the pins of a running (or dead) agent.

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, SkStorage};
use mtlb_common::{
    Backend, Conns, FlowKey, Listener, MAX_REPLICAS, Pending, Runtime, Settings, SlotTotals,
    SockTag, Status, stat,
};
use std::{
    os::fd::AsFd,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cannot open pinned map {path}: {source}")]
    Pin { path: PathBuf, source: MapError },
    #[error("cannot mmap CONNS: {0}")]
    Mmap(std::io::Error),
    #[error("map {name} has an unexpected type")]
    WrongType { name: &'static str },
    #[error("sockmap slot {slot}: {source}")]
    Sockmap { slot: u32, source: std::io::Error },
}

pub struct Maps {
    pub settings: Array<MapData, Settings>,
    pub backends: Array<MapData, Backend>,
    pub conns: Array<MapData, Conns>,
    pub listeners: Array<MapData, Listener>,
    pub addresses: HashMap<MapData, [u8; 16], u8>,
    pub stats: PerCpuArray<MapData, u64>,
    pub slot_totals: PerCpuArray<MapData, SlotTotals>,
    pub tags: SkStorage<MapData, SockTag>,
    /// The 8-byte-value sockmap; see `sys`.
    pub sockets: MapData,
    pub runtime: Array<MapData, Runtime>,
    pub live: HashMap<MapData, u64, u32>,
    pub status: Array<MapData, Status>,
    pub pending: HashMap<MapData, FlowKey, Pending>,
    /// CONNS mapped into this process, for atomic subtraction.
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
        let size = std::mem::size_of::<Conns>() * MAX_REPLICAS as usize;
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

fn conv<T>(name: &'static str, r: Result<T, MapError>) -> Result<T, MapsError> {
    r.map_err(|source| MapsError::Map { name, source })
}

/// The MapData of one of our maps (the types the object declares).
pub(crate) fn data(name: &'static str, m: Map) -> Result<MapData, MapsError> {
    Ok(match m {
        Map::SockMap(d) | Map::LruHashMap(d) | Map::HashMap(d) => d,
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
        let conns = get("CONNS")?;
        let conns_shared = SharedConns::map(&conns)?;
        Ok(Self {
            settings: conv("SETTINGS", Array::try_from(Map::Array(get("SETTINGS")?)))?,
            backends: conv("BACKENDS", Array::try_from(Map::Array(get("BACKENDS")?)))?,
            conns: conv("CONNS", Array::try_from(Map::Array(conns)))?,
            conns_shared,
            listeners: conv("LISTENERS", Array::try_from(Map::Array(get("LISTENERS")?)))?,
            addresses: conv(
                "ADDRESSES",
                HashMap::try_from(Map::HashMap(get("ADDRESSES")?)),
            )?,
            stats: conv(
                "STATS",
                PerCpuArray::try_from(Map::PerCpuArray(get("STATS")?)),
            )?,
            slot_totals: conv(
                "SLOT_TOTALS",
                PerCpuArray::try_from(Map::PerCpuArray(get("SLOT_TOTALS")?)),
            )?,
            tags: conv(
                "SK_TAGS",
                SkStorage::try_from(Map::SkStorage(get("SK_TAGS")?)),
            )?,
            sockets: get("SOCKETS")?,
            runtime: conv("RUNTIME", Array::try_from(Map::Array(get("RUNTIME")?)))?,
            live: conv("LIVE", HashMap::try_from(Map::HashMap(get("LIVE")?)))?,
            status: conv("STATUS", Array::try_from(Map::Array(get("STATUS")?)))?,
            pending: conv("PENDING", HashMap::try_from(Map::HashMap(get("PENDING")?)))?,
        })
    }

    pub fn conns(&self, slot: u32) -> Result<Conns, MapsError> {
        conv("CONNS", self.conns.get(&slot, 0))
    }

    pub fn listener(&self, slot: u32) -> Result<Listener, MapsError> {
        conv("LISTENERS", self.listeners.get(&slot, 0))
    }

    /// Cookie of the socket the sockmap holds in `slot`.
    pub fn socket_cookie(&self, slot: u32) -> Result<Option<u64>, MapsError> {
        crate::sys::sockmap_cookie(self.sockets.fd().as_fd(), slot)
            .map_err(|source| MapsError::Sockmap { slot, source })
    }

    /// Sum over CPUs of one global counter.
    pub fn stat(&self, index: u32) -> Result<u64, MapsError> {
        Ok(conv("STATS", self.stats.get(&index, 0))?.iter().sum())
    }

    /// Every global counter with its name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        (0..stat::COUNT)
            .map(|i| Ok((stat::NAMES[i as usize], self.stat(i)?)))
            .collect()
    }

    /// Per-slot totals summed over CPUs.
    pub fn slot_totals(&self, slot: u32) -> Result<SlotTotals, MapsError> {
        let v = conv("SLOT_TOTALS", self.slot_totals.get(&slot, 0))?;
        Ok(v.iter().fold(SlotTotals::default(), |a, b| SlotTotals {
            assigned: a.assigned + b.assigned,
            established: a.established + b.established,
            bytes_in: a.bytes_in + b.bytes_in,
            bytes_out: a.bytes_out + b.bytes_out,
        }))
    }

    pub fn set_listener(&mut self, slot: u32, l: Listener) -> Result<(), MapsError> {
        conv("LISTENERS", self.listeners.set(slot, l, 0))
    }

    pub fn set_backend(&mut self, slot: u32, b: Backend) -> Result<(), MapsError> {
        conv("BACKENDS", self.backends.set(slot, b, 0))
    }

    pub fn set_settings(&mut self, s: Settings) -> Result<(), MapsError> {
        conv("SETTINGS", self.settings.set(0, s, 0))
    }

    pub fn settings(&self) -> Result<Settings, MapsError> {
        conv("SETTINGS", self.settings.get(&0, 0))
    }

    pub fn status(&self, slot: u32) -> Result<Status, MapsError> {
        conv("STATUS", self.status.get(&slot, 0))
    }

    pub fn set_status(&mut self, slot: u32, s: Status) -> Result<(), MapsError> {
        conv("STATUS", self.status.set(slot, s, 0))
    }

    /// Slot of a live steered connection, by socket cookie.
    pub fn live_slot(&self, cookie: u64) -> Option<u32> {
        self.live.get(&cookie, 0).ok()
    }

    pub fn runtime(&self) -> Result<Runtime, MapsError> {
        conv("RUNTIME", self.runtime.get(&0, 0))
    }

    pub fn set_runtime(&mut self, r: Runtime) -> Result<(), MapsError> {
        conv("RUNTIME", self.runtime.set(0, r, 0))
    }

    pub fn add_address(&mut self, a: [u8; 16]) -> Result<(), MapsError> {
        conv("ADDRESSES", self.addresses.insert(a, 1, 0))
    }

    /// Removes handshakes in flight that started before `cutoff_ns`
    /// (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns) and subtracts each
    /// from its slot. Returns how many expired.
    pub fn expire_handshakes(&mut self, cutoff_ns: u64) -> Result<u32, MapsError> {
        let old: Vec<(FlowKey, Pending)> = self
            .pending
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, p)| p.since_ns < cutoff_ns)
            .collect();
        let mut n = 0;
        for (key, p) in old {
            // The delete is the claim: if establishment deleted it first,
            // it has subtracted already.
            if self.pending.remove(&key).is_ok() && p.slot < MAX_REPLICAS {
                self.conns_shared
                    .handshakes(p.slot)
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn addresses(&self) -> Result<Vec<[u8; 16]>, MapsError> {
        self.addresses
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Map {
                name: "ADDRESSES",
                source,
            })
    }

    pub fn remove_address(&mut self, a: &[u8; 16]) -> Result<(), MapsError> {
        conv("ADDRESSES", self.addresses.remove(a))
    }
}
