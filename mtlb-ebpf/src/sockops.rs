//! `mtlb_sockops` (sock_ops on the replicas' cgroup, by default the
//! cgroup2 root): registers replica listeners the moment they call
//! listen() (never over a live one) and tells the agent through EVENTS;
//! counts handshakes in flight from the request socket's creation to
//! establishment, and steered connections from establishment until they
//! leave ESTABLISHED. Handshakes that never complete leave no event; the
//! agent bounds them (see Conns). Sockets outside the cgroup never run it.

use crate::{
    maps::{BACKENDS, FLOWS, LAST, LISTENERS, RUNTIME, SK_TAGS, SLOT_TOTALS, SOCKETS, conns_of},
    shared::{add, ctx_addr, in_our_netns, replica_slot, send, settings, stat},
};
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_SOCK_OPS_TIMEOUT_INIT, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_sock,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mtlb_common::{
    COOKIE_TRACK_NS, EV_CLOSED, EV_REFUSED_OWNER, EV_REFUSED_TAKEN, EV_REGISTERED, FlowKey,
    ListenEvent, Listener, MAX_REPLICAS, REG_LISTEN_HOOK, SockTag, TAG_CLOSED, TAG_COUNTED,
    TAG_IGNORED, TAG_LISTENER, TAG_OWNER_OK, stat, v4_mapped,
};

/// Kernel TCP states (include/net/tcp_states.h).
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// enum in bpf.h: args[0] of HDR_OPT_LEN_CB for a SYN-ACK with a cookie.
const BPF_WRITE_HDR_TCP_SYNACK_COOKIE: u32 = 2;

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
    if !in_our_netns(s, ctx.ops.cast()) {
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
    if let Some(c) = conns_of(slot) {
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
    let Some(slot) = replica_slot(s, port) else {
        return;
    };
    if !in_our_netns(s, ctx.ops.cast()) {
        return;
    }
    let family = ctx.family();
    let local = ctx_addr!(family, ctx.ops, local_ip4, local_ip6);
    if local != s.replica_addr && !(s.accept_wildcard != 0 && is_wildcard(&local)) {
        return;
    }
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
    // With checks off, or for the very listener the agent verified (one
    // registered again), the slot may be picked at once; a new listener
    // waits for the agent's check, which then gives the weight back.
    if let (Some(b), Some(c)) = (BACKENDS.get(slot), conns_of(slot)) {
        if b.enabled != 0 && (s.require_verified == 0 || b.listener_cookie == cookie) {
            unsafe { core::ptr::write_volatile(&raw mut (*c).weight, b.weight) };
        }
    }
    event(EV_REGISTERED, slot, cookie, family, port, &local);
    // Ask for the state callback so the slot is cleared the moment this
    // listener closes (the kernel already drops it from the sockmap), and
    // for the header-option callback on its SYN-ACKs, which tells SYN-cookie
    // SYN-ACKs apart (see on_synack).
    let _ =
        ctx.set_cb_flags((BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// Tells the agent about a listener in `slot` (see `shared::send`).
#[inline(always)]
fn event(kind: u32, slot: u32, cookie: u64, family: u32, port: u32, addr: &[u8; 16]) {
    send(ListenEvent {
        kind,
        slot,
        cookie,
        family: family as u16,
        port: port as u16,
        uid: 0,
        addr: *addr,
    });
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
    let Some(s) = settings() else { return };
    // On the cgroup root (no replica_cgroup) every connection any server
    // of the host accepts comes here: those on neither the balanced port
    // nor a replica port leave before the socket-storage lookup.
    let port = ctx.local_port();
    if port != s.port as u32 && replica_slot(s, port).is_none() {
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
    if tag.state != TAG_LISTENER {
        return;
    }
    if port != s.port as u32 || tag.slot >= MAX_REPLICAS {
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
    if let Some(c) = conns_of(tag.slot) {
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
    // args[0] old state, args[1] new state. A listener closing, or a
    // connection leaving ESTABLISHED (its first step towards close, from
    // either side, or a reset); everything else, such as a child's
    // SYN_RECV -> ESTABLISHED, leaves here.
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    if new != TCP_CLOSE && old != TCP_ESTABLISHED {
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
    if old == TCP_LISTEN && tag.state == TAG_LISTENER {
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
                if let Some(c) = conns_of(tag.slot) {
                    unsafe {
                        core::ptr::write_volatile(&raw mut (*c).handshakes, 0);
                        // Not picked until a listener is back.
                        core::ptr::write_volatile(&raw mut (*c).weight, 0);
                    }
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
        // The connection is closing: it leaves its replica's count now,
        // and its state callbacks end here (FIN_WAIT1/2, CLOSE_WAIT,
        // LAST_ACK, CLOSE would cost a run each). The socket lock
        // serialises callbacks, and the tag changes: this runs once per
        // counted connection.
        tag.state = TAG_CLOSED;
        let _ = ctx.set_cb_flags(0);
        if let Some(c) = conns_of(tag.slot) {
            add(unsafe { &raw mut (*c).established }, (-1i64) as u64);
        }
        // The connection's byte counts move into its replica's totals
        // (per-CPU: no other CPU writes this slot's copy). Received bytes
        // are final when the client's FIN made this call; what the replica
        // gets acknowledged after this point is not counted.
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
