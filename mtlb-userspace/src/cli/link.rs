//! `mtlb link`: the links users add the proxy with.

use anyhow::{Context as _, bail};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct LinkArgs {
    /// Address or name clients connect to. Default: this host's address on
    /// its default route.
    #[arg(long)]
    server: Option<String>,
    /// Config file whose port and secret to use [default:
    /// /etc/mtlb/mtlb.toml; when that is missing and not named here,
    /// built-in defaults].
    #[arg(long, short)]
    config: Option<PathBuf>,
}

pub fn run(a: LinkArgs) -> anyhow::Result<()> {
    let cfg = mtlb::agent::ConfigSource::new(a.config, Default::default()).read()?;
    let server = match a.server {
        Some(s) if s.is_empty() || s.contains(['&', '?', '#', ' ', '/']) => {
            bail!("--server {s:?}: give a host name or an address")
        }
        Some(s) => s,
        None => mtlb::link::detect_server()
            .context("cannot find this host's address (no default route?); pass --server")?
            .to_string(),
    };
    for l in mtlb::link::links(&server, cfg.port, &cfg.secret) {
        println!("{l}");
    }
    Ok(())
}
