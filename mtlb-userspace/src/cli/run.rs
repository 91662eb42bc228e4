//! `mtlb run`: the agent.

use anyhow::{Context as _, bail};
use mtlb::{
    agent::{Agent, ConfigSource, serve::Signals},
    config::Overrides,
    system::caps,
};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML) [default: /etc/mtlb/mtlb.toml; when that is
    /// missing and not named here, built-in defaults].
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = ConfigSource::new(args.config, args.overrides);
    // Validate before touching the kernel: a bad config attaches nothing.
    let cfg = source.read()?;
    if let Err(e) = mtlb::system::raise_nofile_limit() {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    let missing = caps::check();
    if !missing.is_empty() {
        bail!("missing capabilities: {}; run as root", missing.join(", "));
    }
    // Before loading anything: a missing kernel feature is named.
    mtlb::kernel::probe::check()?;
    // Single-threaded runtime: the namespace is per thread, and everything
    // the agent does (attach to "this" namespace, read /proc/net, connect
    // to replicas for checks) must happen in the namespace it started in.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(async {
            let signals = Signals::install().context("installing signal handlers")?;
            let mut agent = Agent::start(cfg, source).await?;
            agent.serve(signals).await;
            agent.shutdown()?;
            Ok(())
        })
}
