//! mtlb kernel programs, one file each:
//!
//! * [`steer`]: `mtlb_steer` (sk_lookup) hands each new connection to the
//!   balanced port to the least-loaded enabled replica's listener.
//! * [`sockops`]: `mtlb_sockops` (sock_ops) registers replica listeners as
//!   they call listen(), and counts handshakes and connections per replica.
//! * [`bind`]: `mtlb_bind4`/`mtlb_bind6` (cgroup bind hooks) let only
//!   allowed owners bind replica ports.
//! * [`signal`]: `mtlb_signal` (tracepoint `signal:signal_generate`) marks
//!   a replica "stopping" the instant a process owning its listener is
//!   sent SIGTERM, SIGINT or SIGQUIT.
//!
//! [`maps`] holds the maps they share with the agent, [`shared`] the
//! helpers more than one program uses. Program and map names are what the
//! agent attaches and pins by: they do not change between versions.
//!
//! fentry/fexit would see request sockets die, but BPF_PROG_TYPE_TRACING is
//! not available on the kernels mtlb targets, so everything here runs from
//! sk_lookup, sock_ops, the bind hooks and a classic tracepoint.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bind;
mod maps;
mod shared;
mod signal;
mod sockops;
mod steer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
