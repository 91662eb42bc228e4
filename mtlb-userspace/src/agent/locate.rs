//! Finding the agent of this network namespace: its pin directory and its
//! control socket, from the configuration (file and flags) — the same way
//! for `mtlb run`, `status`, `backend` and `reload`.

use crate::{
    config::Config,
    control,
    kernel::pins::{self, PinError},
    system::mounts,
};
use std::path::PathBuf;

/// Where the agent of this network namespace keeps its pins and listens for
/// control requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub netns_ino: u64,
    /// `<bpffs>/mtlb/<netns inode>`, through the parent's mount namespace
    /// when this one lacks the bpffs (as under `ip netns exec`).
    pub pin_dir: PathBuf,
    /// `<control_dir>/<netns inode>.sock`.
    pub control_socket: PathBuf,
}

impl Location {
    /// The agent that runs (or ran) in this thread's network namespace
    /// under `cfg`.
    pub fn of(cfg: &Config) -> Result<Self, PinError> {
        let ino = pins::netns_inode()?;
        Ok(Self {
            netns_ino: ino,
            pin_dir: pins::pin_dir(&mounts::visible_bpffs(&cfg.bpffs), ino),
            control_socket: control::socket_path(&cfg.control_dir, ino),
        })
    }
}
