//! mtlb agent library: everything `mtlb` does, one module per concern.
//!
//! * [`agent`]: the agent: start-up and takeover, the pure event→effect
//!   core over one [`agent::slot::Slot`] per replica, the serve loop, and
//!   finding a running agent.
//! * [`kernel`]: programs and maps: load, attach, pin, register listeners.
//! * [`checks`]: health checks (tcp, stats, mtproxy), the HAProxy-style
//!   state machine, accept-queue stall detection.
//! * [`stats`]: the snapshot behind /metrics, /stats and `mtlb status`.
//! * [`config`], [`control`]: configuration and the control protocol.
//! * [`system`]: mounts, capabilities, namespaces, sock_diag, sd_notify.
//! * [`rollout`]: every replica restarted by the operator's command, one
//!   at a time, drained first.

pub mod agent;
pub mod checks;
pub mod config;
pub mod control;
pub mod error;
pub mod kernel;
pub mod link;
pub mod rollout;
pub mod stats;
pub mod system;
