//! `mtlb_signal` (tracepoint `signal:signal_generate`): the instant a
//! process that owns a replica listener is sent a stop signal, its slot is
//! marked "stopping" and sk_lookup gives it no new connection. A server
//! told to stop keeps its listener open for a while as it shuts down, and
//! closes what it accepts in that time; the agent's checks would notice
//! only after the listener is gone, too late for those clients.
//!
//! The tracepoint runs for every signal on the machine (SIGCHLD at each
//! process exit): the signal number is tested first and everything else
//! returns at once.

use crate::{
    maps::{LISTENERS, OWNER_PIDS, STOPPING, conns_of},
    shared::{add, send},
};
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_ktime_get_ns, macros::tracepoint,
    programs::TracePointContext,
};
use mtlb_common::{EV_STOPPING, ListenEvent, MAX_REPLICAS, SIGINT, SIGQUIT, SIGTERM};

/// Offsets in the tracepoint's record, from
/// /sys/kernel/tracing/events/signal/signal_generate/format (the same from
/// Linux 3.x to 6.18); the agent reads that file and refuses to attach this
/// program if they differ.
pub const OFF_SIG: usize = 8;
pub const OFF_PID: usize = 36;
pub const OFF_RESULT: usize = 44;

/// `result` of a signal the target ignores (enum trace_signal_result):
/// nothing will happen to the process, so its slot is not marked.
const TRACE_SIGNAL_IGNORED: i32 = 1;

#[tracepoint]
pub fn mtlb_signal(ctx: TracePointContext) -> u32 {
    // The record is readable in place (read-only context access).
    let rec = ctx.as_ptr().cast::<u8>();
    let field = |off: usize| unsafe { core::ptr::read_volatile(rec.add(off).cast::<i32>()) };
    let sig = field(OFF_SIG) as u32;
    if sig != SIGTERM && sig != SIGINT && sig != SIGQUIT {
        return 0;
    }
    if field(OFF_RESULT) == TRACE_SIGNAL_IGNORED {
        return 0;
    }
    let pid = field(OFF_PID) as u32;
    let Some(mask) = (unsafe { OWNER_PIDS.get(&pid) }).copied() else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut slot = 0;
    while slot < MAX_REPLICAS {
        if mask & (1u64 << slot) != 0 {
            mark(slot, pid, sig, now);
        }
        slot += 1;
    }
    0
}

#[inline(always)]
fn mark(slot: u32, pid: u32, sig: u32, now: u64) {
    let Some(l) = LISTENERS.get(slot) else { return };
    let cookie = l.cookie;
    if cookie == 0 {
        return;
    }
    let Some(m) = STOPPING.get_ptr_mut(slot) else {
        return;
    };
    // A second signal (the master forwarding TERM to its workers, or a
    // repeated kill) keeps the first mark and tells nothing new.
    if unsafe { core::ptr::read_volatile(&(*m).cookie) } == cookie {
        return;
    }
    // Field by field: `marks` counts on, and `queued` is the agent's.
    unsafe {
        (*m).at_ns = now;
        (*m).pid = pid;
        (*m).signal = sig;
        core::ptr::write_volatile(&raw mut (*m).cookie, cookie);
    }
    add(unsafe { &raw mut (*m).marks }, 1);
    // Out of the pick at once (sk_lookup would skip it anyway, after a
    // pick wasted on it); the agent gives the weight back if it clears
    // the mark.
    if let Some(c) = conns_of(slot) {
        unsafe { core::ptr::write_volatile(&raw mut (*c).weight, 0) };
    }
    send(ListenEvent {
        kind: EV_STOPPING,
        slot,
        cookie,
        family: sig as u16,
        port: l.port,
        uid: pid,
        addr: [0; 16],
    });
}
