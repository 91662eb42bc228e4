//! mtlb kernel programs.
//!
//! * `mtlb_steer` (sk_lookup): hands each new connection to the balanced
//!   port to the listening socket of the least-loaded enabled replica.
//! * `mtlb_bind4`/`mtlb_bind6` (cgroup bind hooks): mark sockets bound to a
//!   replica port by an allowed owner (uid), the only ones that may
//!   register, and refuse everyone else's bind to those ports.
//! * `mtlb_sockops` (sock_ops on the cgroup2 root): registers replica
//!   listeners the moment they call listen() (never over a live one), tells
//!   the agent through EVENTS, counts handshakes in flight from the request
//!   socket's creation to establishment, and steered connections from
//!   establishment to TCP_CLOSE. Handshakes that never complete leave no
//!   event; the agent bounds them (see Conns).
//!   Attached to the replicas' cgroup (`replica_cgroup`, default the
//!   root): sockets outside it never run it.
//!
//! fentry/fexit would see request sockets die, but BPF_PROG_TYPE_TRACING is
//! not available on the kernels mtlb targets, so everything here runs from
//! sk_lookup and sock_ops.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod maps;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SK_LOOKUP_F_REPLACE, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_TIMEOUT_INIT, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        bpf_sock, bpf_sock_addr,
    },
    helpers::generated::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_sk_assign, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use maps::*;
use mtlb_common::*;

/// sk_lookup verdicts (enum sk_action).
const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

const IPPROTO_TCP: u32 = 6;
/// Kernel TCP states (include/net/tcp_states.h).
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// enum in bpf.h: args[0] of HDR_OPT_LEN_CB for a SYN-ACK with a cookie.
const BPF_WRITE_HDR_TCP_SYNACK_COOKIE: u32 = 2;

const EEXIST: i64 = 17;
const EAFNOSUPPORT: i64 = 97;
const EPROTOTYPE: i64 = 91;
const ESOCKTNOSUPPORT: i64 = 94;

#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // bpfel has no 64-bit atomics in core::sync; the intrinsic lowers to
    // BPF_ATOMIC_ADD. A decrement is the wrapping add of -1.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

/// An address from a context's ip4/ip6 field pair as IPv4-mapped bytes.
/// The fields hold network-order bytes inside u32s, so `to_ne_bytes` gives
/// the wire order.
///
/// The verifier only accepts context loads at a constant offset from the
/// context pointer itself: copying the `[u32; 4]` array would load through
/// a derived pointer ("dereference of modified ctx ptr"), so each word is
/// read with its own volatile load.
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
        let words: [u32; 4] = if $family == AF_INET as u32 {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4]
        } else {
            [w0, w1, w2, w3]
        };
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
    }};
}

// ---------------------------------------------------------------- sk_lookup

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
        if p >= s.base_port as u32 && p < s.base_port as u32 + s.replicas as u32 {
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
            if slot < MAX_REPLICAS && steerable(s, slot) {
                if assign(ctx, slot) {
                    stat(stat::FLOW_HITS);
                    // The usual hit is the ACK of a SYN-cookie handshake:
                    // no request socket was created for its SYN, so its
                    // handshake counts from here (its child takes the -1).
                    assigned(slot);
                    if let Some(c) = CONNS.get_ptr_mut(slot) {
                        add(unsafe { &raw mut (*c).handshakes }, 1);
                    }
                    return SK_PASS;
                }
                tried |= 1u64 << slot;
            }
        }
    }

    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        let Some(slot) = pick(s, family, tried) else {
            break;
        };
        tried |= 1u64 << slot;
        if assign(ctx, slot) {
            if track && FLOWS.insert(&key, &slot, BPF_ANY as u64).is_err() {
                stat(stat::FLOW_TABLE_FULL);
            }
            // Hand the choice to the sock_ops callbacks that run next on
            // this CPU for the same SYN.
            if let Some(last) = LAST.get_ptr_mut(0) {
                unsafe { *last = LastChoice { key, slot } };
            }
            assigned(slot);
            return SK_PASS;
        }
        attempt += 1;
    }
    stat(stat::NO_BACKEND);
    // Refuse at once: the client gets a RST instead of waiting for a SYN
    // retransmit timeout.
    SK_DROP
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

/// Whether a remembered flow may still go to `slot`: enabled, and its
/// listener the one the agent verified (as `pick` requires).
#[inline(always)]
fn steerable(s: &Settings, slot: u32) -> bool {
    let Some(b) = BACKENDS.get(slot) else {
        return false;
    };
    if b.enabled == 0 {
        return false;
    }
    s.require_verified == 0
        || LISTENERS
            .get(slot)
            .is_some_and(|l| l.cookie == b.listener_cookie)
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

/// The replica sk_lookup chose for `key` on this CPU, if it was the last
/// decision made here.
#[inline(always)]
fn last_choice(key: &FlowKey) -> Option<u32> {
    let last = LAST.get(0)?;
    if last.key == *key && last.slot < MAX_REPLICAS {
        Some(last.slot)
    } else {
        None
    }
}

/// Least connections / weight among enabled slots with a live listener that
/// can take this family, skipping `tried`. The scan starts at a random slot
/// and only a strictly smaller load replaces the best, so ties are broken at
/// random instead of always favouring the lowest slot.
#[inline(always)]
fn pick(s: &Settings, family: u32, tried: u64) -> Option<u32> {
    let n = s.replicas as u32;
    if n == 0 || n > MAX_REPLICAS {
        return None;
    }
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
        let Some(b) = BACKENDS.get(i) else { continue };
        if b.enabled == 0 || b.weight == 0 {
            continue;
        }
        let Some(lst) = LISTENERS.get(i) else {
            continue;
        };
        if lst.cookie == 0 {
            continue;
        }
        // A listener the agent has not verified yet (a replica that just
        // came back) proves itself with a check before it gets clients.
        if s.require_verified != 0 && b.listener_cookie != lst.cookie {
            continue;
        }
        // An AF_INET listener cannot take an IPv6 connection.
        if family == AF_INET6 as u32 && lst.family == AF_INET {
            continue;
        }
        let Some(c) = CONNS.get_ptr(i) else { continue };
        // Plain reads of counters other CPUs add to atomically: a stale
        // value only makes this choice slightly less exact.
        // handshakes may dip below zero for a moment (see Conns): as i64,
        // clamped.
        let load = unsafe {
            let h = core::ptr::read_volatile(&(*c).handshakes) as i64;
            (if h > 0 { h as u64 } else { 0 }) + core::ptr::read_volatile(&(*c).established)
        };
        let w = b.weight as u64;
        // load/w < best_load/best_weight without division.
        if best.is_none() || load * best_weight < best_load * w {
            best = Some(i);
            best_load = load;
            best_weight = w;
        }
    }
    best
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

// ---------------------------------------------------------------- sock_ops

#[sock_ops]
pub fn mtlb_sockops(ctx: SockOpsContext) -> u32 {
    // Runs for every TCP socket in the cgroup, for every callback: leave
    // as early as possible for everything we do not handle.
    match ctx.op() {
        BPF_SOCK_OPS_TIMEOUT_INIT => on_request(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => on_synack(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state(&ctx),
        _ => {}
    }
    1
}

/// Flow key of a sock_ops socket, as sk_lookup built it for the SYN.
#[inline(always)]
fn ops_flow_key(ctx: &SockOpsContext) -> FlowKey {
    let family = ctx.family();
    FlowKey {
        remote_addr: ctx_addr!(family, ctx.ops, remote_ip4, remote_ip6),
        local_addr: ctx_addr!(family, ctx.ops, local_ip4, local_ip6),
        // sock_ops keeps the network-order remote port in the upper 16 bits
        // on little-endian hosts (it is loaded, then shifted left by 16).
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        local_port: ctx.local_port() as u16,
    }
}

/// TIMEOUT_INIT runs for the request socket tcp_conn_request creates for a
/// SYN, right before it enters the listener's queue (not for SYN-cookie
/// SYNs, which get no request socket; not for stray segments). That is
/// where a handshake starts to count for its replica, so the next SYN's
/// lookup already sees it: one atomic add, no per-flow state. The child
/// that establishes takes the -1 from its listener's slot, which is the
/// slot charged here (the request socket belongs to the listener sk_lookup
/// assigned). A request socket that dies without a child (SYN flood,
/// client gone, full accept queue) leaves its +1: the agent bounds it
/// (agent::heal).
#[inline(always)]
fn on_request(ctx: &SockOpsContext) {
    let Some(s) = settings() else { return };
    if ctx.local_port() != s.port as u32 {
        return;
    }
    if unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != s.netns_cookie {
        return;
    }
    let key = ops_flow_key(ctx);
    // The slot sk_lookup chose for this SYN moments ago on this CPU.
    let Some(slot) = last_choice(&key) else {
        return;
    };
    // Taken: a second sock_ops program of ours (the previous agent's,
    // attached beside this one for a moment during a restart) runs for
    // the same request socket next and must not count it again.
    if let Some(last) = LAST.get_ptr_mut(0) {
        unsafe { (*last).slot = u32::MAX };
    }
    if let Some(c) = CONNS.get_ptr_mut(slot) {
        add(unsafe { &raw mut (*c).handshakes }, 1);
    }
}

/// HDR_OPT_LEN_CB runs for each SYN-ACK a replica listener sends (the
/// listen hook asks for it). args[0] says whether it carries a SYN cookie:
/// then no request socket exists, and the flow must be remembered so its
/// final ACK reaches this listener; flow tracking is switched on for a while.
#[inline(always)]
fn on_synack(ctx: &SockOpsContext) {
    if ctx.arg(0) != BPF_WRITE_HDR_TCP_SYNACK_COOKIE {
        return;
    }
    let Some(s) = settings() else { return };
    if ctx.local_port() != s.port as u32 {
        return;
    }
    let key = ops_flow_key(ctx);
    let Some(slot) = last_choice(&key) else {
        return;
    };
    stat(stat::COOKIE_SYNACKS);
    if FLOWS.insert(&key, &slot, BPF_ANY as u64).is_err() {
        stat(stat::FLOW_TABLE_FULL);
    }
    if let Some(r) = RUNTIME.get_ptr_mut(0) {
        let until = unsafe { bpf_ktime_get_ns() } + COOKIE_TRACK_NS;
        // u64::MAX (always) stays; otherwise move the deadline forward.
        unsafe {
            if (*r).track_flows_until_ns != u64::MAX && (*r).track_flows_until_ns < until {
                (*r).track_flows_until_ns = until;
            }
        }
    }
}

#[inline(always)]
fn sk_of(ctx: &SockOpsContext) -> *mut bpf_sock {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk }
}

/// A listen() in our namespace on a replica port: put the socket in its
/// slot right away, so a restarted replica takes connections as soon as it
/// listens, with no agent round trip.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(s) = settings() else { return };
    let port = ctx.local_port();
    if port < s.base_port as u32 || port >= s.base_port as u32 + s.replicas as u32 {
        return;
    }
    if unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != s.netns_cookie {
        return;
    }
    let family = ctx.family();
    let local = ctx_addr!(family, ctx.ops, local_ip4, local_ip6);
    if local != s.replica_addr && !(s.accept_wildcard != 0 && is_wildcard(&local)) {
        return;
    }
    let slot = port - s.base_port as u32;
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // Only a socket an allowed owner bound (marked by the bind hook).
    let owner_ok = SK_TAGS
        .get(sk.cast())
        .is_some_and(|t| unsafe { (*t).state } == TAG_OWNER_OK);
    if s.require_owner != 0 && !owner_ok {
        refuse(EV_REFUSED_OWNER, slot, cookie, family, port, &local);
        return;
    }
    let tag = SockTag {
        slot,
        state: TAG_LISTENER,
    };
    if SK_TAGS.set(sk.cast(), &tag).is_none() {
        return;
    }
    // NOEXIST: a live registration is never replaced (the kernel empties
    // the slot when its socket closes).
    if SOCKETS.update(slot, ctx.ops, BPF_NOEXIST as u64).is_err() {
        // Registered already by the other agent's program running beside
        // ours during a restart: nothing to refuse.
        if LISTENERS.get(slot).is_some_and(|l| l.cookie == cookie) {
            return;
        }
        let _ = SK_TAGS.set(
            sk.cast(),
            &SockTag {
                slot,
                state: TAG_IGNORED,
            },
        );
        refuse(EV_REFUSED_TAKEN, slot, cookie, family, port, &local);
        return;
    }
    let lst = Listener {
        cookie,
        family: family as u16,
        port: port as u16,
        how: REG_LISTEN_HOOK,
    };
    let _ = LISTENERS.set(slot, lst, BPF_ANY as u64);
    event(EV_REGISTERED, slot, cookie, family, port, &local);
    // Ask for the state callback so the slot is cleared the moment this
    // listener closes (the kernel already drops it from the sockmap), and
    // for the header-option callback on its SYN-ACKs, which tells SYN-cookie
    // SYN-ACKs apart (see on_synack).
    let _ =
        ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// Tells the agent about a listener (best effort: a full ring is counted,
/// and the agent's poll finds the change anyway).
#[inline(always)]
fn event(kind: u32, slot: u32, cookie: u64, family: u32, port: u32, addr: &[u8; 16]) {
    let ev = ListenEvent {
        kind,
        slot,
        cookie,
        family: family as u16,
        port: port as u16,
        _pad: 0,
        addr: *addr,
    };
    if EVENTS.output(ev, 0).is_err() {
        stat(stat::EVENTS_LOST);
    }
}

#[inline(always)]
fn refuse(kind: u32, slot: u32, cookie: u64, family: u32, port: u32, addr: &[u8; 16]) {
    stat(stat::REFUSED_LISTENERS);
    event(kind, slot, cookie, family, port, addr);
}

#[inline(always)]
fn is_wildcard(a: &[u8; 16]) -> bool {
    let v4any = v4_mapped([0, 0, 0, 0]);
    *a == [0u8; 16] || *a == v4any
}

/// A connection accepted by one of our listeners (its tag was cloned from
/// the listener's) reached ESTABLISHED. Count it if it came through the
/// balanced port; direct connections to a replica port are not steered and
/// not counted.
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    let Some(tag) = SK_TAGS.get(sk.cast()) else {
        return;
    };
    let Some(s) = settings() else { return };
    let tag = unsafe { &mut *tag };
    if tag.state != TAG_LISTENER {
        return;
    }
    if ctx.local_port() != s.port as u32 || tag.slot >= MAX_REPLICAS {
        tag.state = TAG_IGNORED;
        // Children inherit the listener's header-option flag; a direct
        // connection needs no callbacks at all.
        let _ = ctx.set_cb_flags(0);
        return;
    }
    tag.state = TAG_COUNTED;
    // The handshake is over: move it from handshakes to established, on
    // the slot whose listener made this child (and whose request socket
    // was charged). The tag, cloned from the listener, is also how the
    // agent attributes this connection's bytes at scrape time (sock_diag
    // reads socket storage): nothing else is kept per connection.
    if let Some(c) = CONNS.get_ptr_mut(tag.slot) {
        add(unsafe { &raw mut (*c).handshakes }, (-1i64) as u64);
        add(unsafe { &raw mut (*c).established }, 1);
    }
    if let Some(t) = SLOT_TOTALS.get_ptr_mut(tag.slot) {
        unsafe { (*t).established += 1 };
    }
    // Only steered sockets pay for state callbacks; this also drops the
    // header-option flag inherited from the listener, which would otherwise
    // run us for every segment sent.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn on_state(ctx: &SockOpsContext) {
    // args[0] old state, args[1] new state.
    if ctx.arg(1) != TCP_CLOSE {
        return;
    }
    let sk = sk_of(ctx);
    if sk.is_null() {
        return;
    }
    let Some(tag) = SK_TAGS.get(sk.cast()) else {
        return;
    };
    let tag = unsafe { &mut *tag };
    if ctx.arg(0) == TCP_LISTEN && tag.state == TAG_LISTENER {
        // Our listener closed: empty the slot unless a newer listener has
        // taken it already.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if let Some(l) = LISTENERS.get_ptr_mut(tag.slot) {
            if unsafe { (*l).cookie } == cookie {
                let _ = LISTENERS.set(tag.slot, Listener::default(), BPF_ANY as u64);
                // Its request sockets die with it (the kernel drops them
                // at their next segment): none of them will establish.
                // A plain store: a SYN charged on another CPU meanwhile
                // is lost with it, which the agent's clamp tolerates.
                if let Some(c) = CONNS.get_ptr_mut(tag.slot) {
                    unsafe { core::ptr::write_volatile(&raw mut (*c).handshakes, 0) };
                }
            }
        }
        tag.state = TAG_CLOSED;
        let family = ctx.family();
        let local = ctx_addr!(family, ctx.ops, local_ip4, local_ip6);
        event(
            EV_CLOSED,
            tag.slot,
            cookie,
            family,
            ctx.local_port(),
            &local,
        );
        return;
    }
    if tag.state == TAG_COUNTED {
        // TCP_CLOSE is entered once per socket, and the socket lock
        // serialises callbacks: this runs once per counted connection.
        tag.state = TAG_CLOSED;
        if let Some(c) = CONNS.get_ptr_mut(tag.slot) {
            add(unsafe { &raw mut (*c).established }, (-1i64) as u64);
        }
        // The connection's final byte counts move into its replica's
        // totals (per-CPU: no other CPU writes this slot's copy).
        let (rx, acked) = unsafe {
            (
                core::ptr::read_volatile(&raw const (*ctx.ops).bytes_received),
                core::ptr::read_volatile(&raw const (*ctx.ops).bytes_acked),
            )
        };
        if let Some(t) = SLOT_TOTALS.get_ptr_mut(tag.slot) {
            unsafe {
                (*t).bytes_in += rx;
                (*t).bytes_out += acked;
            }
        }
    }
}

// ---------------------------------------------------------------- bind

// Each hook reads only its own family's address field: the verifier
// refuses user_ip6 in bind4 and user_ip4 in bind6.
#[cgroup_sock_addr(bind4)]
pub fn mtlb_bind4(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, |c| {
        v4_mapped(unsafe { core::ptr::read_volatile(&raw const (*c).user_ip4) }.to_ne_bytes())
    })
}

#[cgroup_sock_addr(bind6)]
pub fn mtlb_bind6(ctx: SockAddrContext) -> i32 {
    on_bind(&ctx, |c| {
        let w = |i: usize| unsafe { core::ptr::read_volatile(&raw const (*c).user_ip6[i]) };
        let words = [w(0), w(1), w(2), w(3)];
        unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
    })
}

/// bind() to a replica port in our namespace: an allowed owner's socket is
/// marked, so the listen hook may register it; anyone else's bind is
/// refused (EPERM), so nobody else can squat a replica's port while it is
/// down. sock_ops cannot tell who owns a socket (no uid helper there); bind
/// runs in the owner's context. Returns 1 to allow, 0 to refuse.
#[inline(always)]
fn on_bind(ctx: &SockAddrContext, addr: impl Fn(*mut bpf_sock_addr) -> [u8; 16]) -> i32 {
    let Some(s) = settings() else { return 1 };
    if s.require_owner == 0 {
        return 1;
    }
    let a = unsafe { &*ctx.sock_addr };
    // TCP only: UDP and other sockets on these ports are none of ours.
    if a.protocol != IPPROTO_TCP {
        return 1;
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(a.user_port as u16) as u32;
    if port < s.base_port as u32 || port >= s.base_port as u32 + s.replicas as u32 {
        return 1;
    }
    if unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } != s.netns_cookie {
        return 1;
    }
    let slot = port - s.base_port as u32;
    // The low 32 bits are the uid.
    let uid = unsafe { bpf_get_current_uid_gid() } as u32;
    if unsafe { ALLOWED_UIDS.get(&uid) }.is_none() {
        stat(stat::REFUSED_LISTENERS);
        // One event a second per slot at most: a loop of refused binds
        // must not flood the agent (or its log, or the ring).
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(last) = REFUSED_AT.get_ptr_mut(slot) {
            if now.saturating_sub(unsafe { *last }) < 1_000_000_000 {
                return 0;
            }
            unsafe { *last = now };
        }
        let family = a.user_family;
        let addr = addr(ctx.sock_addr);
        // The uid travels in the cookie field: a socket that was never
        // bound has no cookie worth reporting.
        event(EV_REFUSED_BIND, slot, uid as u64, family, port, &addr);
        return 0;
    }
    let sk = unsafe { a.__bindgen_anon_1.sk };
    // Only a socket with no tag yet: bind() runs this hook before the
    // kernel refuses a second bind, and a listener's or a counted
    // connection's tag must not be overwritten.
    if !sk.is_null() && SK_TAGS.get(sk.cast()).is_none() {
        let _ = SK_TAGS.set(
            sk.cast(),
            &SockTag {
                slot,
                state: TAG_OWNER_OK,
            },
        );
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
