//! Types shared by the kernel programs (`mtlb-ebpf`) and the agent
//! (`mtlb-userspace`).
//!
//! Every type that lives in a map is `#[repr(C)]` with explicit padding so
//! the layout is the same on both sides and in the BTF that `bpftool` uses
//! to print the maps. Addresses are kept as byte arrays (network order) so
//! `bpftool map dump` shows them as bytes rather than as a host-order u32.
#![no_std]

/// Most replicas one balancer steers to. Bounds the selection loop in the
/// `sk_lookup` program (the verifier needs a constant bound).
pub const MAX_REPLICAS: u32 = 64;

/// Entries of the flow table that keeps a flow on the replica chosen for its
/// SYN while SYN cookies are in use (the final ACK of a cookie handshake
/// comes back through `sk_lookup` and must reach the same listener).
pub const MAX_FLOWS: u32 = 65_536;

/// How many replicas one `sk_lookup` run tries before it refuses the
/// connection.
pub const MAX_ATTEMPTS: u32 = 4;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Balancer-wide settings, one entry in the `SETTINGS` array map.
/// Written by the agent before any program is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `SO_NETNS_COOKIE` of the balancer's network namespace. Programs on the
    /// cgroup root see sockets of every namespace; this tells ours apart.
    pub netns_cookie: u64,
    /// Balanced TCP port, host byte order.
    pub port: u16,
    /// First replica port, host byte order; replica `i` listens on
    /// `base_port + i`.
    pub base_port: u16,
    /// Number of configured replica slots (<= MAX_REPLICAS).
    pub replicas: u16,
    /// 1: steer connections to every local address; 0: only to addresses in
    /// the `ADDRESSES` map.
    pub all_addresses: u8,
    /// 1: a listener bound to the wildcard address (0.0.0.0 / ::) on a
    /// replica port counts as that replica.
    pub accept_wildcard: u8,
    /// Address replicas listen on, IPv4-mapped IPv6 form for IPv4.
    pub replica_addr: [u8; 16],
    /// 1: only sockets bound by an allowed owner (ALLOWED_UIDS, checked by
    /// the bind hook) are registered by the listen hook.
    pub require_owner: u8,
    /// 1: a slot is steered to only when BACKENDS[slot].listener_cookie is
    /// the cookie of its listener (the agent verified that listener with a
    /// check); 0 (checks off): any registered listener.
    pub require_verified: u8,
    /// The pick: 0 compares every slot (exact least connections); 2 compares
    /// two slots drawn at random (HAProxy's `balance random(2)`).
    pub draws: u8,
    pub _pad: [u8; 5],
}

/// Per-slot configuration written only by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Relative weight (1..=256). Load is compared as connections / weight.
    pub weight: u32,
    /// 1 when the slot may take new connections (UP and READY, or waiting
    /// for its listener to come back).
    pub enabled: u32,
    /// Cookie of the listener a check has verified (with
    /// SETTINGS.require_verified): a new listener in the slot gets no
    /// connection before the agent has checked it. 0: none verified.
    pub listener_cookie: u64,
}

/// Per-slot connection counts, changed only with atomic adds (by the kernel
/// programs, and by the agent when it heals `handshakes`).
///
/// `handshakes` counts handshakes in flight: +1 when a request socket is
/// created for a SYN sk_lookup steered to the slot (or when the ACK of a
/// SYN-cookie handshake is steered back to it), -1 when a child of the
/// slot's listener establishes. No per-flow state is kept, so a handshake
/// that never completes leaves its +1 behind, and a child whose +1 was
/// cleared already takes a -1 it no longer has: the word is read as an
/// `i64`, below zero counts as zero, and the agent clamps it into [0,
/// assignments to the slot within the handshake timeout] (see
/// `agent::heal`). `established` counts steered connections from
/// establishment until they leave ESTABLISHED (a FIN either way, or a
/// reset): their state callbacks end there.
///
/// `weight` is what the pick reads instead of BACKENDS, LISTENERS and
/// STOPPING for each slot: the slot's weight while it may be picked
/// (enabled, with a weight, holding a listener), 0 while it may not. The
/// agent writes it with each change of the slot's backend entry; the
/// listen hook sets it from the backend entry when a listener registers,
/// and the close of a registered listener sets it to 0, so a replica that
/// dies or comes back is seen without waiting for the agent. It only
/// narrows the scan: the slot picked is still checked against its
/// listener, its verification and the stop mark before it gets a
/// connection. Plain 4-byte stores, each writer for the slot's own field:
/// no read-modify-write across slots.
///
/// 64 bytes, one cache line per slot (the table starts on a page and has no
/// gaps): CPUs counting for different replicas do not bounce one line
/// between them, and a pick reads one line per slot. Padded by hand rather
/// than `align(64)`: the BPF stack is 8-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conns {
    pub handshakes: u64,
    pub established: u64,
    pub weight: u32,
    pub _pad32: u32,
    pub _pad: [u64; 5],
}

/// The one value of the `CONNS` map (BPF_F_MMAPABLE): every slot's counts
/// in one array, so that sk_lookup makes one map lookup for all slots and
/// indexes the rest (a lookup in each of four maps for each slot was most
/// of a pick's cost).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnsTable {
    pub slots: [Conns; MAX_REPLICAS as usize],
}

impl Default for ConnsTable {
    fn default() -> Self {
        Self {
            slots: [Conns::default(); MAX_REPLICAS as usize],
        }
    }
}

const _: () = assert!(core::mem::size_of::<Conns>() == 64);

impl Conns {
    /// Handshakes in flight, never below zero (see above).
    pub fn handshakes_now(&self) -> u64 {
        (self.handshakes as i64).max(0) as u64
    }

    /// Connections now: established plus handshakes in flight.
    pub fn active(&self) -> u64 {
        self.established + self.handshakes_now()
    }

    /// No connection and no handshake counted (whatever the weight).
    pub fn is_empty(&self) -> bool {
        self.handshakes == 0 && self.established == 0
    }
}

/// The listening socket registered in a slot; kept beside the sockmap because
/// a sockmap cannot be dumped in a readable way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listener {
    /// Socket cookie; 0 when the slot is empty.
    pub cookie: u64,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    /// How it got here: REG_LISTEN_HOOK or REG_ADOPTED.
    pub how: u32,
}

pub const REG_LISTEN_HOOK: u32 = 1;
pub const REG_ADOPTED: u32 = 2;

/// Socket-local storage tag (`BPF_F_CLONE`, so a listener's tag is copied
/// into every child socket it creates; that is how a connection knows its
/// replica, since its local address is the balanced one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockTag {
    pub slot: u32,
    pub state: u32,
}

/// Tag states.
pub const TAG_LISTENER: u32 = 1;
pub const TAG_COUNTED: u32 = 2;
pub const TAG_IGNORED: u32 = 3;
pub const TAG_CLOSED: u32 = 4;
/// Bound to a replica port by an allowed owner (set by the bind hook): the
/// listen hook may register it.
pub const TAG_OWNER_OK: u32 = 5;

/// Most uids ALLOWED_UIDS holds.
pub const MAX_ALLOWED_UIDS: u32 = 64;

/// What the programs tell the agent at once (the EVENTS ring buffer), so it
/// reacts to a listener without waiting for its next poll.
///
/// 40 bytes, no implicit padding (asserted below). A ring buffer's map
/// shape has no value size, so the agent's pin compatibility check cannot
/// see a change here: keep the size and every offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenEvent {
    /// EV_* below.
    pub kind: u32,
    /// The replica slot of the port.
    pub slot: u32,
    /// Socket cookie of the listener; 0 for EV_REFUSED_BIND; the binding
    /// task's cgroup id for EV_REFUSED_BIND_CGROUP.
    pub cookie: u64,
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    /// EV_REFUSED_BIND*: the uid whose bind was refused; 0 otherwise.
    pub uid: u32,
    /// Local address, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
}

const _: () = {
    assert!(core::mem::size_of::<ListenEvent>() == 40);
    assert!(core::mem::offset_of!(ListenEvent, cookie) == 8);
    assert!(core::mem::offset_of!(ListenEvent, uid) == 20);
    assert!(core::mem::offset_of!(ListenEvent, addr) == 24);
};

impl ListenEvent {
    /// The pid and signal of an EV_STOPPING.
    pub fn stopping(&self) -> (u32, u32) {
        (self.uid, self.family as u32)
    }

    /// The uid of an EV_REFUSED_BIND. Bind hooks of an older build (still
    /// attached while a new agent takes their pins over, or whose events
    /// wait in the ring) put it in `cookie` and left `uid` 0; these put it
    /// in `uid` and leave `cookie` 0, so either reads right here.
    pub fn refused_uid(&self) -> u32 {
        if self.uid != 0 {
            self.uid
        } else {
            self.cookie as u32
        }
    }
}

/// A listener was registered in its slot.
pub const EV_REGISTERED: u32 = 1;
/// A registered listener closed.
pub const EV_CLOSED: u32 = 2;
/// A listener on a replica port was not registered: not bound by an allowed
/// owner.
pub const EV_REFUSED_OWNER: u32 = 3;
/// A listener on a replica port was not registered: its slot holds a live
/// listener already.
pub const EV_REFUSED_TAKEN: u32 = 4;
/// A bind() to a replica port by a uid not allowed to run replicas was
/// refused (EPERM); `uid` holds that uid.
pub const EV_REFUSED_BIND: u32 = 5;

/// A process that owns a replica listener was sent a stop signal: `cookie`
/// is the slot's listener then, `uid` holds the pid signalled and `family`
/// the signal number (read them with [`ListenEvent::stopping`]).
pub const EV_STOPPING: u32 = 6;
/// A bind() to a replica port by a task outside `replica_cgroup` was
/// refused (EPERM); `uid` holds its uid (not refused for itself: the uid
/// is judged first) and `cookie` the id of the cgroup it ran in. A kind of
/// its own, so an agent of an earlier build skips it instead of misreading
/// `cookie`.
pub const EV_REFUSED_BIND_CGROUP: u32 = 7;

/// How deep below the cgroup2 root the bind hook looks for
/// `replica_cgroup` among a task's ancestors (the verifier needs a bound).
/// systemd and Docker nest containers 2 to 5 levels deep.
pub const MAX_CGROUP_LEVEL: u32 = 32;

/// The signals that mark a replica "stopping" when sent to a process that
/// owns its listener: what `docker stop`, systemd, Ctrl-C and an operator's
/// `kill` send to make a server shut down. (SIGKILL is not one: the
/// process is gone at once and its listener closes with it.)
pub const SIGINT: u32 = 2;
pub const SIGQUIT: u32 = 3;
pub const SIGTERM: u32 = 15;

/// A slot's listener marked "stopping" by the signal program (the
/// `STOPPING` array): sk_lookup skips the slot while `cookie` is the slot's
/// listener. A new listener (the replica restarted) has another cookie, so
/// it is never skipped by an old mark; the agent clears a mark whose
/// listener is still there after its grace (a process that ignored the
/// signal) by zeroing `cookie`. The counters stay, across agents.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopping {
    /// Cookie of the listener marked; 0: no mark.
    pub cookie: u64,
    /// bpf_ktime_get_ns() of the signal.
    pub at_ns: u64,
    /// The pid (tgid, in the initial pid namespace) the signal was sent to.
    pub pid: u32,
    pub signal: u32,
    /// Marks made in this slot (the kernel counts).
    pub marks: u64,
    /// Connections that were in the listener's accept queue when it was
    /// marked, summed (the agent adds them): those no balancer can move.
    pub queued: u64,
}

/// Most processes (replica masters and workers) the signal program knows
/// as listener owners (the `OWNER_PIDS` hash: pid -> bitmask of slots).
pub const MAX_OWNER_PIDS: u32 = 4096;

/// Key of the flow table: remote and local address (IPv4-mapped for IPv4,
/// network byte order) and ports in host byte order.
///
/// Aligned to 4 (its size stays 36): the BPF target has no unaligned
/// loads, so with the byte arrays' alignment of 1 LLVM copies a key byte
/// by byte (a 36-step loop in sk_lookup for each LAST write).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub remote_addr: [u8; 16],
    pub local_addr: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
}

/// State that the programs and the agent both write (one entry in the
/// RUNTIME array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// Until this bpf_ktime_get_ns() time, sk_lookup records every new flow
    /// in FLOWS and consults it first. Set when SYN cookies are being sent
    /// (their final ACK comes back through sk_lookup and must reach the
    /// listener that sent the cookie); u64::MAX while the namespace sends
    /// cookies always (net.ipv4.tcp_syncookies = 2).
    pub track_flows_until_ns: u64,
}

/// How long flows are tracked after the last SYN cookie was seen: longer
/// than a cookie stays valid (the kernel accepts cookies up to about two
/// minutes old).
pub const COOKIE_TRACK_NS: u64 = 150 * 1_000_000_000;

/// The last decision sk_lookup made on this CPU. The SYN's request socket
/// is created in the same softirq right after, on the same CPU, so sock_ops
/// reads the replica from here instead of from a hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastChoice {
    pub key: FlowKey,
    pub slot: u32,
}

/// Indices into the per-CPU `STATS` array.
pub mod stat {
    /// `sk_lookup` runs for the balanced port/addresses.
    pub const LOOKUPS: u32 = 0;
    /// Connections refused because no replica could take them.
    pub const NO_BACKEND: u32 = 1;
    /// `bpf_sk_assign` failures, by errno.
    pub const ERR_EAFNOSUPPORT: u32 = 2;
    pub const ERR_EPROTOTYPE: u32 = 3;
    pub const ERR_ESOCKTNOSUPPORT: u32 = 4;
    pub const ERR_EEXIST: u32 = 5;
    pub const ERR_OTHER: u32 = 6;
    /// The chosen slot's socket was gone from the sockmap.
    pub const ERR_NO_SOCKET: u32 = 7;
    /// Flow table full: the connection is steered but not remembered.
    pub const FLOW_TABLE_FULL: u32 = 8;
    /// Flows that came back to sk_lookup and were kept on their replica.
    pub const FLOW_HITS: u32 = 9;
    /// SYN-ACKs carrying a SYN cookie sent by a replica listener.
    pub const COOKIE_SYNACKS: u32 = 10;
    /// Listeners on replica ports that were not registered (owner not
    /// allowed, or the slot taken).
    pub const REFUSED_LISTENERS: u32 = 11;
    /// EVENTS was full: the agent finds out on its next poll instead.
    pub const EVENTS_LOST: u32 = 12;
    pub const COUNT: u32 = 13;

    /// Names as used in logs and metrics (`reason` label).
    pub const NAMES: [&str; COUNT as usize] = [
        "lookups",
        "no_backend",
        "eafnosupport",
        "eprototype",
        "esocktnosupport",
        "eexist",
        "other",
        "no_socket",
        "flow_table_full",
        "flow_hits",
        "cookie_synacks",
        "refused_listeners",
        "events_lost",
    ];
}

/// Per-slot per-CPU totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotTotals {
    /// Lookups `sk_lookup` assigned to this slot: new flows (SYNs), the
    /// ACKs of SYN-cookie handshakes, and stray segments that matched no
    /// socket (an ACK or RST after a close).
    pub assigned: u64,
    /// Steered connections that reached ESTABLISHED on this slot.
    pub established: u64,
    /// Bytes received from clients (tcpi_bytes_received) by connections of
    /// this slot that have closed; live ones are added at scrape time.
    pub bytes_in: u64,
    /// Bytes sent to clients and acknowledged (tcpi_bytes_acked), likewise.
    pub bytes_out: u64,
}

/// A replica's state as the agent last saw it (the STATUS array, written by
/// the agent only), so that `mtlb status` and bpftool can show it from the
/// pins, even with the agent gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// 0 unused slot, then one of the STATE_* values.
    pub state: u32,
    /// Checks counted toward a change ("DOWN 1/2" is state DOWN, count 1
    /// of rise 2).
    pub count: u32,
    pub rise: u32,
    pub fall: u32,
    /// 1 when it has a registered listener.
    pub registered: u32,
    /// Effective weight.
    pub weight: u32,
    /// Last check: 1 passed, 0 failed, 2 none yet.
    pub check_ok: u32,
    pub check_ms: u32,
    /// Accept queue length and limit at the last sample.
    pub accept_queue: u32,
    pub accept_backlog: u32,
    /// Operational state from checks alone (STATE_UP or STATE_DOWN), also
    /// under DRAIN/MAINT, so the typed state round-trips.
    pub oper: u32,
    /// STATUS_* flags below: what the agent knows that the state word does
    /// not say (an alert needs to tell a hung replica kept UP from a busy
    /// one).
    pub flags: u32,
    /// Unix time (ms) of the last state change.
    pub last_change_ms: u64,
    /// Time spent DOWN so far, ms (the current DOWN period included).
    pub downtime_ms: u64,
    pub transitions_up: u64,
    pub transitions_down: u64,
    pub check_failures: u64,
    /// Last check's reason, NUL-padded.
    pub reason: [u8; 48],
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: 0,
            count: 0,
            rise: 0,
            fall: 0,
            registered: 0,
            weight: 0,
            check_ok: 2,
            check_ms: 0,
            accept_queue: 0,
            accept_backlog: 0,
            oper: 0,
            flags: 0,
            last_change_ms: 0,
            downtime_ms: 0,
            transitions_up: 0,
            transitions_down: 0,
            check_failures: 0,
            reason: [0; 48],
        }
    }
}

/// Status::flags: its accept queue is stalled (connections wait, none is
/// accepted) and it was taken DOWN for it.
pub const STATUS_STALLED: u32 = 1;
/// Status::flags: its accept queue is stalled, but it is kept taking
/// connections as the last replica that does.
pub const STATUS_STALL_KEPT: u32 = 2;
/// Status::flags: a process owning its listener was sent a stop signal;
/// it gets no new connection until the listener goes or the grace ends.
pub const STATUS_STOPPING: u32 = 4;

pub const STATE_UP: u32 = 1;
pub const STATE_DOWN: u32 = 2;
pub const STATE_DRAIN: u32 = 3;
pub const STATE_MAINT: u32 = 4;

/// Converts an IPv4 address to its IPv4-mapped IPv6 bytes.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
pub mod state;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, and every bit pattern is valid.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Conns {}
    unsafe impl aya::Pod for ConnsTable {}
    unsafe impl aya::Pod for Listener {}
    unsafe impl aya::Pod for SockTag {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for SlotTotals {}
    unsafe impl aya::Pod for Runtime {}
    unsafe impl aya::Pod for Status {}
    unsafe impl aya::Pod for LastChoice {}
    unsafe impl aya::Pod for Stopping {}
    unsafe impl aya::Pod for ListenEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_uid_reads_either_field() {
        let ours = ListenEvent {
            kind: EV_REFUSED_BIND,
            uid: 1000,
            ..Default::default()
        };
        assert_eq!(ours.refused_uid(), 1000);
        // An older bind hook's event: the uid in the cookie, uid left 0.
        let older = ListenEvent {
            kind: EV_REFUSED_BIND,
            cookie: 1000,
            ..Default::default()
        };
        assert_eq!(older.refused_uid(), 1000);
        // root, refused: 0 either way.
        let root = ListenEvent {
            kind: EV_REFUSED_BIND,
            ..Default::default()
        };
        assert_eq!(root.refused_uid(), 0);
    }
}
