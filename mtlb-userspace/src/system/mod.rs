//! System plumbing: mounts, capabilities, namespaces, sock_diag, systemd
//! notification.

pub mod caps;
pub mod diag;
pub mod mounts;
pub mod netns;
pub mod notify;
