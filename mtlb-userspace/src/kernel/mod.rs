//! The kernel side, seen from userspace: loading and attaching the
//! programs, pinning, the maps, replica listener registration, and the
//! SYN-cookie watch that switches flow tracking on.
//!
//! Where a connection is steered and counted is the kernel programs'
//! business (`mtlb-ebpf/src/main.rs`: `mtlb_steer`, `mtlb_sockops`); this
//! module only feeds and reads their maps.

pub mod cookies;
pub mod dataplane;
pub mod loader;
pub mod maps;
pub mod pins;
pub mod probe;
pub mod registry;
pub mod sys;
