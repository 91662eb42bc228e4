//! mtlb agent library: everything `mtlb` does, one module per concern.
//!
//! * [`config`]: TOML config, flags, validation.
//! * [`loader`]: load, attach and pin the kernel programs.
//! * [`maps`]: typed access to the maps (live or pinned).
//! * [`registry`]: replica listeners: adoption and registration events.
//! * [`reconcile`]: configuration to map contents.
//! * [`backends`], [`health`], [`checks`], [`mtproxy`], [`queue`]: replica
//!   states, health checks and hung-replica detection.
//! * [`control`]: the control socket.
//! * [`cookies`]: when to track flows (SYN cookies in use).
//! * [`mounts`], [`pins`], [`caps`], [`sys`]: system plumbing.

pub mod backends;
pub mod caps;
pub mod checks;
pub mod config;
pub mod control;
pub mod cookies;
pub mod diag;
pub mod health;
pub mod http;
pub mod link;
pub mod loader;
pub mod maps;
pub mod mounts;
pub mod mtproxy;
pub mod netns;
pub mod notify;
pub mod pins;
pub mod queue;
pub mod reconcile;
pub mod registry;
pub mod snapshot;
pub mod sys;
