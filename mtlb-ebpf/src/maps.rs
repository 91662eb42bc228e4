//! Maps shared by the programs and the agent. All are BTF-defined so that
//! `bpftool map dump pinned …` prints named fields.
//!
//! Who writes what (so no two writers race on one value):
//! * SETTINGS, BACKENDS, ADDRESSES, ALLOWED_UIDS, REPLICA_CGROUP: the agent.
//! * EVENTS: the programs (the agent consumes).
//! * RUNTIME: the agent and the programs (plain stores of a deadline).
//! * STATUS: the agent.
//! * LAST: per-CPU, sk_lookup writes, sock_ops reads.
//! * LISTENERS, SOCKETS: the listen hook, and the agent when it adopts a
//!   replica that was listening before it started.
//! * CONNS: atomic adds only, by the programs, and the agent's clamp of
//!   handshakes (compare-and-swap); each slot's `weight` by plain stores
//!   (the agent, the listen hook, a listener's close).
//! * STATS, SLOT_TOTALS: per-CPU, the programs only.
//! * OWNER_PIDS: the agent. STOPPING: the signal program sets a mark, the
//!   agent clears it (whole-value writes; a mark is only ever replaced by
//!   another or by zeros).

use aya_ebpf::{
    bindings::{
        BPF_F_CLONE, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type,
        bpf_sock_ops,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::generated::{bpf_map_lookup_elem, bpf_sk_storage_get, bpf_sock_map_update},
    macros::btf_map,
};
use core::{ffi::c_void, ptr};
use mtlb_common::*;

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_REPLICAS as usize }> = Array::new();

/// Mmapable: the agent clamps handshakes with atomic operations on the
/// shared page, as the programs add with atomic instructions. One value
/// holding every slot (see `ConnsTable`).
#[btf_map]
pub static CONNS: Array<ConnsTable, 1, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Slot `slot`'s line of CONNS.
#[inline(always)]
pub fn conns_of(slot: u32) -> Option<*mut Conns> {
    let t = CONNS.get_ptr_mut(0)?;
    if slot >= MAX_REPLICAS {
        return None;
    }
    // In bounds of the one value: the verifier checks slot * 64 + the
    // field's offset against the value size.
    Some(unsafe { (&raw mut (*t).slots).cast::<Conns>().add(slot as usize) })
}

#[btf_map]
pub static LISTENERS: Array<Listener, { MAX_REPLICAS as usize }> = Array::new();

/// Balanced addresses when not all local addresses are balanced; the value
/// is unused.
#[btf_map]
pub static ADDRESSES: HashMap<[u8; 16], u8, 64> = HashMap::new();

#[btf_map]
pub static RUNTIME: Array<Runtime, 1> = Array::new();

/// uids whose sockets may become replica listeners (with
/// SETTINGS.require_owner); the value is unused.
#[btf_map]
pub static ALLOWED_UIDS: HashMap<u32, u8, { MAX_ALLOWED_UIDS as usize }> = HashMap::new();

/// The cgroup (v2) id of `replica_cgroup`; 0: none configured. With one,
/// the bind hook refuses binds to replica ports by tasks outside it. A map
/// of its own rather than a SETTINGS field: a new map is created beside an
/// earlier agent's pins, while a SETTINGS of another size would make them
/// impossible to take over.
#[btf_map]
pub static REPLICA_CGROUP: Array<u64, 1> = Array::new();

/// When the bind hook last reported a refused bind, per slot (ns): at most
/// one event a second per slot.
#[btf_map]
pub static REFUSED_AT: Array<u64, { MAX_REPLICAS as usize }> = Array::new();

/// Listener events for the agent: registered, closed, refused. 64 KiB
/// holds ~1800 events; they only come with listen() and close() of
/// listeners on replica ports.
#[btf_map]
pub static EVENTS: RingBuf<ListenEvent, { 64 * 1024 }> = RingBuf::new();

#[btf_map]
pub static LAST: PerCpuArray<LastChoice, 1> = PerCpuArray::new();

#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, u32, { MAX_FLOWS as usize }> = LruHashMap::new();

#[btf_map]
pub static STATS: PerCpuArray<u64, { stat::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static SLOT_TOTALS: PerCpuArray<SlotTotals, { MAX_REPLICAS as usize }> = PerCpuArray::new();

/// Replica states as the agent last saw them; the programs do not read it.
#[btf_map]
pub static STATUS: Array<Status, { MAX_REPLICAS as usize }> = Array::new();

/// Per slot, the listener a stop signal marked (see `Stopping`).
#[btf_map]
pub static STOPPING: Array<Stopping, { MAX_REPLICAS as usize }> = Array::new();

/// Processes that hold a replica listener (masters and their workers), as
/// the agent found them in /proc: pid (tgid) -> bitmask of slots.
#[btf_map]
pub static OWNER_PIDS: HashMap<u32, u64, { MAX_OWNER_PIDS as usize }> = HashMap::new();

#[btf_map]
pub static SOCKETS: SockMap64<{ MAX_REPLICAS as usize }> = SockMap64::new();

#[btf_map]
pub static SK_TAGS: CloneSkStorage<SockTag> = CloneSkStorage::new();

/// A sockmap whose values are 8 bytes wide. aya-ebpf's SockMap declares
/// 4-byte values, with which the kernel refuses userspace lookups (ENOSPC);
/// with 8 bytes a lookup returns the socket cookie, so the agent and bpftool
/// can see which socket holds each slot. Layout follows the BTF map
/// convention (pointers to arrays whose length encodes each attribute).
#[repr(C)]
pub struct SockMap64<const N: usize> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SOCKMAP as usize],
    key: *const u32,
    value: *const u64,
    max_entries: *const [i32; N],
    map_flags: *const [i32; 0],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl<const N: usize> Sync for SockMap64<N> {}

impl<const N: usize> SockMap64<N> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    fn as_ptr(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// The socket in `slot`, with a reference the caller must release with
    /// `bpf_sk_release`.
    #[inline(always)]
    pub fn lookup(&self, slot: u32) -> Option<*mut c_void> {
        let p = unsafe { bpf_map_lookup_elem(self.as_ptr(), ptr::from_ref(&slot).cast()) };
        if p.is_null() { None } else { Some(p) }
    }

    #[inline(always)]
    pub fn update(&self, mut slot: u32, ops: *mut bpf_sock_ops, flags: u64) -> Result<(), i64> {
        let ret = unsafe {
            bpf_sock_map_update(ops, self.as_ptr(), ptr::from_mut(&mut slot).cast(), flags)
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

/// Socket-local storage with `BPF_F_CLONE`: the kernel copies a listener's
/// value into each child socket at accept time (aya-ebpf's SkStorage fixes
/// the flags to BPF_F_NO_PREALLOC only).
#[repr(C)]
pub struct CloneSkStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers patched by the loader, never dereferenced.
unsafe impl<T> Sync for CloneSkStorage<T> {}

impl<T> CloneSkStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    fn as_ptr(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// The socket's value, if it has one.
    #[inline(always)]
    pub fn get(&self, sk: *mut c_void) -> Option<*mut T> {
        let p = unsafe { bpf_sk_storage_get(self.as_ptr(), sk, ptr::null_mut(), 0) };
        if p.is_null() { None } else { Some(p.cast()) }
    }

    /// Creates or overwrites the socket's value.
    #[inline(always)]
    pub fn set(&self, sk: *mut c_void, value: &T) -> Option<*mut T>
    where
        T: Copy,
    {
        let p = unsafe {
            bpf_sk_storage_get(
                self.as_ptr(),
                sk,
                ptr::from_ref(value).cast_mut().cast(),
                BPF_SK_STORAGE_GET_F_CREATE as u64,
            )
        };
        if p.is_null() {
            return None;
        }
        let p: *mut T = p.cast();
        // F_CREATE initialises only a new value; an existing one (a
        // listener registered again) is overwritten here.
        unsafe { *p = *value };
        Some(p)
    }
}
