//! `mtlb_steer` (sk_lookup): hands each new connection to the balanced
//! port to the listening socket of the least-loaded enabled replica.

use crate::{
    maps::{
        ADDRESSES, BACKENDS, CONNS, FLOWS, LAST, LISTENERS, RUNTIME, SLOT_TOTALS, SOCKETS,
        STOPPING, conns_of,
    },
    shared::{IPPROTO_TCP, add, ctx_addr, replica_slot, settings, stat},
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_SK_LOOKUP_F_REPLACE},
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_release},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mtlb_common::{AF_INET, AF_INET6, Conns, FlowKey, MAX_ATTEMPTS, MAX_REPLICAS, Settings, stat};

/// sk_lookup verdicts (enum sk_action).
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

const EEXIST: i64 = 17;
const EAFNOSUPPORT: i64 = 97;
const EPROTOTYPE: i64 = 91;
const ESOCKTNOSUPPORT: i64 = 94;

#[sk_lookup]
pub fn mtlb_steer(ctx: SkLookupContext) -> u32 {
    try_steer(&ctx)
}

#[inline(always)]
fn try_steer(ctx: &SkLookupContext) -> u32 {
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some(s) = settings() else {
        return SK_PASS;
    };
    // local_port is host byte order (unlike remote_port).
    if l.local_port != s.port as u32 {
        // Other ports, including direct connections to replica ports
        // (health checks), take the normal lookup.
        return SK_PASS;
    }
    let family = l.family;
    let local = ctx_addr!(family, ctx.lookup, local_ip4, local_ip6);
    if s.all_addresses == 0 && unsafe { ADDRESSES.get(&local) }.is_none() {
        return SK_PASS;
    }
    // An mtlb program that runs before this one in the namespace (the
    // previous agent's, while a restart attaches ours before detaching
    // its) has chosen a replica already: its choice stands, and it has
    // counted it. (Another program's choice of some other socket does not
    // stop us: the last assignment wins.)
    let prior = unsafe {
        core::ptr::read_volatile(&raw const (*ctx.lookup).__bindgen_anon_1.__bindgen_anon_1.sk)
    };
    if !prior.is_null() {
        let p = unsafe { core::ptr::read_volatile(&raw const (*prior).src_port) };
        if replica_slot(s, p).is_some() {
            return SK_PASS;
        }
    }
    stat(stat::LOOKUPS);

    let key = FlowKey {
        remote_addr: ctx_addr!(family, ctx.lookup, remote_ip4, remote_ip6),
        local_addr: local,
        // remote_port is network byte order in a 16-bit field.
        remote_port: u16::from_be(l.remote_port),
        local_port: l.local_port as u16,
    };

    // While SYN cookies are in use, a flow that comes back (the ACK that
    // completes a cookie handshake) must reach the listener that sent the
    // cookie, or the cookie check fails there. Outside those periods the
    // flow table is skipped: it is most of the cost of a lookup.
    let track = tracking_flows();
    let mut tried: u64 = 0;
    if track {
        if let Some(slot) = unsafe { FLOWS.get(&key) }.copied() {
            // A drained or failed replica takes no flow, remembered or not
            // (a cookie handshake in flight then fails and is retried).
            if slot < MAX_REPLICAS && steerable(s, family, slot) {
                if assign(ctx, slot) {
                    stat(stat::FLOW_HITS);
                    // The usual hit is the ACK of a SYN-cookie handshake:
                    // no request socket was created for its SYN, so its
                    // handshake counts from here (its child takes the -1).
                    assigned(slot);
                    if let Some(c) = conns_of(slot) {
                        add(unsafe { &raw mut (*c).handshakes }, 1);
                    }
                    return SK_PASS;
                }
                tried |= 1u64 << slot;
            }
        }
    }

    let n = s.replicas as u32;
    if n > 0 && n <= MAX_REPLICAS {
        if let Some(table) = CONNS.get_ptr(0) {
            let lines = unsafe { (&raw const (*table).slots).cast::<Conns>() };
            // random(2): two random choices first; the scan only when
            // they find nothing that takes the connection.
            if n > 1
                && unsafe { core::ptr::read_volatile(&s.draws) } == 2
                && let Some(slot) = pick_two(lines, n, tried)
            {
                tried |= 1u64 << (slot & 63);
                if take(ctx, s, family, slot, &key, track) {
                    return SK_PASS;
                }
            }
            let mut attempt = 0;
            while attempt < MAX_ATTEMPTS {
                let Some(slot) = scan(lines, s, tried) else {
                    break;
                };
                tried |= 1u64 << (slot & 63);
                attempt += 1;
                if take(ctx, s, family, slot, &key, track) {
                    return SK_PASS;
                }
            }
        }
    }
    stat(stat::NO_BACKEND);
    // Refuse at once: the client gets a RST instead of waiting for a SYN
    // retransmit timeout.
    SK_DROP
}

/// Gives the connection to `slot` if it may take it: the pick read only
/// the slots' weights, so the one picked is checked against its maps
/// first. Records the flow while SYN cookies are about, and the choice for
/// the sock_ops callbacks of the same SYN.
#[inline(always)]
fn take(
    ctx: &SkLookupContext,
    s: &Settings,
    family: u32,
    slot: u32,
    key: &FlowKey,
    track: bool,
) -> bool {
    if !steerable(s, family, slot) || !assign(ctx, slot) {
        return false;
    }
    if track && FLOWS.insert(key, &slot, BPF_ANY as u64).is_err() {
        stat(stat::FLOW_TABLE_FULL);
    }
    remember(key, slot);
    assigned(slot);
    true
}

/// Counts a connection handed to `slot` (SLOT_TOTALS.assigned). Its
/// handshake is not counted here: sk_lookup also runs for stray segments
/// that match no socket (an ACK or RST after a close), and only a SYN makes
/// a request socket (see on_request). Every handshake counted follows an
/// assignment counted, which bounds what can be in flight (agent::heal).
#[inline(always)]
fn assigned(slot: u32) {
    if let Some(t) = SLOT_TOTALS.get_ptr_mut(slot) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { (*t).assigned += 1 };
    }
}

/// Whether `slot` may take this connection as its maps say now: enabled,
/// holding a listener for the family, the listener the agent verified (with
/// checks on) and not told to stop.
#[inline(always)]
fn steerable(s: &Settings, family: u32, slot: u32) -> bool {
    let Some(b) = BACKENDS.get(slot) else {
        return false;
    };
    if b.enabled == 0 {
        return false;
    }
    let Some(l) = LISTENERS.get(slot) else {
        return false;
    };
    if l.cookie == 0 || (s.require_verified != 0 && l.cookie != b.listener_cookie) {
        return false;
    }
    // An AF_INET listener cannot take an IPv6 connection.
    if family == AF_INET6 as u32 && l.family == AF_INET {
        return false;
    }
    !stopping(slot, l.cookie)
}

/// Hands the choice to the sock_ops callbacks that run next on this CPU
/// for the same SYN (LAST). Word by word: a struct assignment here becomes
/// a byte-by-byte memmove loop on the BPF target.
#[inline(always)]
fn remember(key: &FlowKey, slot: u32) {
    let Some(last) = LAST.get_ptr_mut(0) else {
        return;
    };
    const WORDS: usize = core::mem::size_of::<FlowKey>() / 4;
    let src = core::ptr::from_ref(key).cast::<u32>();
    let dst = last.cast::<u32>();
    let mut w = 0;
    while w < WORDS {
        unsafe { core::ptr::write_volatile(dst.add(w), *src.add(w)) };
        w += 1;
    }
    unsafe { core::ptr::write_volatile(&raw mut (*last).slot, slot) };
}

/// Whether a stop signal marked the slot's listener `cookie` (see
/// `signal.rs`): a replica shutting down takes no new connection, even
/// before the agent has heard of it.
#[inline(always)]
fn stopping(slot: u32, cookie: u64) -> bool {
    STOPPING
        .get(slot)
        .is_some_and(|m| unsafe { core::ptr::read_volatile(&m.cookie) } == cookie)
}

#[inline(always)]
fn tracking_flows() -> bool {
    match RUNTIME.get(0) {
        Some(r) => {
            let until = unsafe { core::ptr::read_volatile(&r.track_flows_until_ns) };
            until != 0 && (until == u64::MAX || unsafe { bpf_ktime_get_ns() } < until)
        }
        None => false,
    }
}

/// Least connections / weight among the replicas' slots with a weight in
/// CONNS (see `Conns`), skipping `tried`: one cache line per slot. The scan
/// starts at a random slot and only a strictly smaller load replaces the
/// best, so ties are broken at random instead of always favouring the
/// lowest slot.
#[inline(always)]
fn scan(lines: *const Conns, s: &Settings, tried: u64) -> Option<u32> {
    // Read again and bounded here rather than passed in: the scan is
    // reached with n known to different ranges (after pick_two or not), and
    // the verifier walks a loop once for each such state; from the map,
    // n is the same unknown every time and the walks are pruned.
    let n = unsafe { core::ptr::read_volatile(&s.replicas) } as u32;
    if n == 0 || n > MAX_REPLICAS {
        return None;
    }
    // A modulo, not `below`: the verifier cannot bound its result, and a
    // start it knows nothing of keeps the states of the scan's iterations
    // alike enough to be pruned (a bounded start made every iteration a
    // state of its own and the attempts loop past the verifier's limit).
    let start = unsafe { bpf_get_prandom_u32() } % n;
    let mut best: Option<u32> = None;
    let mut best_load: u64 = 0;
    let mut best_weight: u64 = 1;
    let mut k = 0;
    while k < MAX_REPLICAS {
        if k >= n {
            break;
        }
        let mut i = start + k;
        if i >= n {
            i -= n;
        }
        k += 1;
        if tried & (1u64 << (i & 63)) != 0 {
            continue;
        }
        // Bounds the index for the verifier (n <= MAX_REPLICAS already).
        if i >= MAX_REPLICAS {
            break;
        }
        let (load, w) = line(lines, i);
        if w == 0 {
            continue;
        }
        // load/w < best_load/best_weight without division.
        if best.is_none() || load * best_weight < best_load * w {
            best = Some(i);
            best_load = load;
            best_weight = w;
        }
    }
    best
}

/// A random number in [0, n): the high half of a 32-bit random times `n`
/// (no division; the verifier follows the bounds of a multiply and a shift,
/// not of a modulo, and LLVM would drop a mask it knows changes nothing).
#[inline(always)]
fn below(n: u32) -> u32 {
    ((unsafe { bpf_get_prandom_u32() } as u64 * n as u64) >> 32) as u32
}

/// (load, weight) of slot `i`'s line (`i` < MAX_REPLICAS).
#[inline(always)]
fn line(lines: *const Conns, i: u32) -> (u64, u64) {
    let c = unsafe { lines.add(i as usize) };
    // Plain reads of counters other CPUs add to atomically: a stale value
    // only makes this choice slightly less exact. handshakes may dip below
    // zero for a moment (see Conns): as i64, clamped.
    unsafe {
        let w = core::ptr::read_volatile(&raw const (*c).weight) as u64;
        let h = core::ptr::read_volatile(&raw const (*c).handshakes) as i64;
        let e = core::ptr::read_volatile(&raw const (*c).established);
        ((if h > 0 { h as u64 } else { 0 }) + e, w)
    }
}

/// random(2), the power of two choices: the less loaded (per weight) of
/// two different random slots, of those of the two that have a weight and
/// are not in `tried`; None when neither (the scan then looks at every
/// slot). Two cache lines whatever the number of replicas, where the scan
/// reads one per slot, and the loads stay within a small constant of each
/// other.
#[inline(always)]
fn pick_two(lines: *const Conns, n: u32, tried: u64) -> Option<u32> {
    let a = below(n);
    // b uniform over the other n - 1 slots.
    let mut b = below(n - 1);
    if b >= a {
        b += 1;
    }
    // Read back through memory: LLVM knows both are below n and would
    // drop the test, which the verifier needs to bound the indexes.
    let (a, b) = unsafe { (core::ptr::read_volatile(&a), core::ptr::read_volatile(&b)) };
    if a >= MAX_REPLICAS || b >= MAX_REPLICAS {
        return None;
    }
    let (la, wa) = line(lines, a);
    let (lb, wb) = line(lines, b);
    let ok_a = wa != 0 && tried & (1u64 << a) == 0;
    let ok_b = wb != 0 && tried & (1u64 << b) == 0;
    match (ok_a, ok_b) {
        (true, true) => Some(if lb * wa < la * wb { b } else { a }),
        (true, false) => Some(a),
        (false, true) => Some(b),
        (false, false) => None,
    }
}

/// Assigns the slot's listener to this lookup. false when the socket is
/// gone or the kernel refused it (e.g. an IPv6 flow and a V6ONLY listener
/// for IPv4, or the reverse); the caller then tries the next best slot.
#[inline(always)]
fn assign(ctx: &SkLookupContext, slot: u32) -> bool {
    let Some(sk) = SOCKETS.lookup(slot) else {
        stat(stat::ERR_NO_SOCKET);
        return false;
    };
    let ret =
        unsafe { bpf_sk_assign(ctx.lookup.cast(), sk.cast(), BPF_SK_LOOKUP_F_REPLACE as u64) };
    // The sockmap lookup took a reference the verifier wants released.
    unsafe { bpf_sk_release(sk.cast()) };
    if ret == 0 {
        return true;
    }
    stat(match -ret {
        EAFNOSUPPORT => stat::ERR_EAFNOSUPPORT,
        EPROTOTYPE => stat::ERR_EPROTOTYPE,
        ESOCKTNOSUPPORT => stat::ERR_ESOCKTNOSUPPORT,
        EEXIST => stat::ERR_EEXIST,
        _ => stat::ERR_OTHER,
    });
    false
}
