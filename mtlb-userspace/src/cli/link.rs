//! `mtlb link`: the links users add the proxy with.

use anyhow::{Context as _, bail};
use mtlb::config::{self, Config};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct LinkArgs {
    /// Address or name clients connect to. Default: this host's address on
    /// its default route.
    #[arg(long)]
    server: Option<String>,
    /// Config file whose port and secret to use.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

pub fn run(a: LinkArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&a.config, a.config != Path::new(config::DEFAULT_PATH))?;
    cfg.validate()?;
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
