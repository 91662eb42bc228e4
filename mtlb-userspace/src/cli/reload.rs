//! `mtlb reload`: make the running agent re-read its configuration.

use anyhow::bail;
use mtlb::control::{self, Request};
use std::{path::PathBuf, time::Duration};

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// Directory of the agent's control socket.
    #[arg(long, default_value = "/run/mtlb")]
    control_dir: PathBuf,
}

pub fn run(a: ReloadArgs) -> anyhow::Result<()> {
    let sock = control::socket_path(&a.control_dir, mtlb::pins::netns_inode()?);
    let r = control::call(&sock, &Request::Reload, Duration::from_secs(30))?;
    if !r.ok {
        bail!(
            "reload failed, the agent keeps its running configuration: {}",
            r.message
        );
    }
    println!("reloaded: {}", r.message);
    Ok(())
}
