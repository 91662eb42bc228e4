//! `mtlb_bind4`/`mtlb_bind6` (cgroup bind hooks on the cgroup2 root): mark
//! sockets bound to a replica port by an allowed owner (uid, and the
//! replicas' cgroup when one is set), the only ones the listen hook
//! registers, and refuse everyone else's bind to those ports.

use crate::{
    maps::{ALLOWED_UIDS, REFUSED_AT, REPLICA_CGROUP, SK_TAGS},
    shared::{IPPROTO_TCP, in_our_netns, replica_slot, send, settings, stat},
};
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_uid_gid,
        bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mtlb_common::{
    EV_REFUSED_BIND, EV_REFUSED_BIND_CGROUP, ListenEvent, MAX_CGROUP_LEVEL, SockTag, TAG_OWNER_OK,
    stat, v4_mapped,
};

/// At most one refused-bind event a second per slot: a loop of refused
/// binds must not flood the agent (or its log, or the ring).
const REFUSED_EVENT_GAP_NS: u64 = 1_000_000_000;

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
/// down. The owner is an allowed uid, and with `replica_cgroup` a task in
/// that cgroup or below: the official server binds as nobody, a uid any
/// other service may run as too. sock_ops cannot tell who owns a socket
/// (no uid helper there); bind runs in the owner's context. Returns 1 to
/// allow, 0 to refuse.
#[inline(always)]
fn on_bind(ctx: &SockAddrContext, addr: impl Fn(*mut bpf_sock_addr) -> [u8; 16]) -> i32 {
    let Some(s) = settings() else { return 1 };
    let cgroup = REPLICA_CGROUP.get(0).copied().unwrap_or(0);
    if s.require_owner == 0 && cgroup == 0 {
        return 1;
    }
    let a = unsafe { &*ctx.sock_addr };
    // TCP only: UDP and other sockets on these ports are none of ours.
    if a.protocol != IPPROTO_TCP {
        return 1;
    }
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(a.user_port as u16) as u32;
    let Some(slot) = replica_slot(s, port) else {
        return 1;
    };
    if !in_our_netns(s, ctx.sock_addr.cast()) {
        return 1;
    }
    // The low 32 bits are the uid.
    let uid = unsafe { bpf_get_current_uid_gid() } as u32;
    let refused = if s.require_owner != 0 && unsafe { ALLOWED_UIDS.get(&uid) }.is_none() {
        Some((EV_REFUSED_BIND, 0))
    } else if cgroup != 0 && !in_cgroup(cgroup) {
        Some((EV_REFUSED_BIND_CGROUP, unsafe {
            bpf_get_current_cgroup_id()
        }))
    } else {
        None
    };
    if let Some((kind, cookie)) = refused {
        stat(stat::REFUSED_LISTENERS);
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(last) = REFUSED_AT.get_ptr_mut(slot) {
            if now.saturating_sub(unsafe { *last }) < REFUSED_EVENT_GAP_NS {
                return 0;
            }
            unsafe { *last = now };
        }
        send(ListenEvent {
            kind,
            slot,
            // A socket refused its bind never listens: no socket cookie.
            cookie,
            family: a.user_family as u16,
            port: port as u16,
            uid,
            addr: addr(ctx.sock_addr),
        });
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

/// Whether the current task runs in cgroup `id` or below it. Ancestors are
/// looked up by level from the root (level 0) down; the level of `id`
/// itself is not needed, which also holds when the agent sees the
/// hierarchy through a cgroup namespace (its mount's root is then not
/// level 0). An id of 0 means the task's own cgroup is above that level.
#[inline(always)]
fn in_cgroup(id: u64) -> bool {
    let mut level = 0;
    while level <= MAX_CGROUP_LEVEL {
        let at = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if at == id {
            return true;
        }
        if at == 0 {
            return false;
        }
        level += 1;
    }
    false
}
