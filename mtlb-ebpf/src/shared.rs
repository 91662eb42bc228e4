//! What more than one program needs: counters, settings, the two tests
//! every hook makes first (is this a replica port, is this our namespace),
//! context addresses and listener events.

use crate::maps::{EVENTS, SETTINGS, STATS};
use aya_ebpf::helpers::generated::bpf_get_netns_cookie;
use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
};
use mtlb_common::{ListenEvent, Settings, stat};

pub const IPPROTO_TCP: u32 = 6;

/// Adds `v` to a counter other CPUs add to as well.
#[inline(always)]
pub fn add(p: *mut u64, v: u64) {
    // bpfel has no 64-bit atomics in core::sync; the intrinsic lowers to
    // BPF_ATOMIC_ADD. A decrement is the wrapping add of -1.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Counts one `stat::*` event.
#[inline(always)]
pub fn stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *p += 1 };
    }
}

/// The agent's settings; None before the agent has written them.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

/// The replica slot whose port `port` (host byte order) is, if it is one:
/// replica `i` listens on `base_port + i`.
#[inline(always)]
pub fn replica_slot(s: &Settings, port: u32) -> Option<u32> {
    let base = s.base_port as u32;
    if port >= base && port < base + s.replicas as u32 {
        Some(port - base)
    } else {
        None
    }
}

/// Whether the socket behind the program context `ctx` lives in the
/// balancer's network namespace. Hooks on a cgroup see sockets of every
/// namespace (a second balancer in another one included).
///
/// `ctx` must be the context pointer the program was given: the verifier
/// accepts nothing else for this helper.
#[inline(always)]
pub fn in_our_netns(s: &Settings, ctx: *mut c_void) -> bool {
    (unsafe { bpf_get_netns_cookie(ctx) }) == s.netns_cookie
}

/// An address from a context's ip4/ip6 field pair as IPv4-mapped bytes.
/// The fields hold network-order bytes inside u32s, so `to_ne_bytes` gives
/// the wire order.
///
/// A macro, not a function: the verifier only accepts context loads at a
/// constant offset from the context pointer itself. Copying the `[u32; 4]`
/// array would load through a derived pointer ("dereference of modified
/// ctx ptr"), so each word is read with its own volatile load, named by
/// field.
macro_rules! ctx_addr {
    ($family:expr, $ctx:expr, $ip4:ident, $ip6:ident) => {{
        let c = $ctx;
        // All five loads happen on both paths: were they inside the branch,
        // LLVM would merge them into one load through a selected offset.
        let v4 = unsafe { core::ptr::read_volatile(&raw const (*c).$ip4) };
        let w0 = unsafe { core::ptr::read_volatile(&raw const (*c).$ip6[0]) };
        let w1 = unsafe { core::ptr::read_volatile(&raw const (*c).$ip6[1]) };
        let w2 = unsafe { core::ptr::read_volatile(&raw const (*c).$ip6[2]) };
        let w3 = unsafe { core::ptr::read_volatile(&raw const (*c).$ip6[3]) };
        // Whole words, not bytes: each word already holds its four bytes in
        // wire order, and four word stores are far cheaper than sixteen
        // byte shifts and stores.
        let words: [u32; 4] = if $family == mtlb_common::AF_INET as u32 {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
        } else {
            [w0, w1, w2, w3]
        };
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
    }};
}
pub(crate) use ctx_addr;

/// Tells the agent about a listener or a refused bind (best effort: a full
/// ring is counted, and the agent's poll finds the change anyway).
#[inline(always)]
pub fn send(ev: ListenEvent) {
    if EVENTS.output(ev, 0).is_err() {
        stat(stat::EVENTS_LOST);
    }
}
