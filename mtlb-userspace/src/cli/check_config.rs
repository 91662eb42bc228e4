//! `mtlb check-config`: validate a configuration without touching the
//! kernel (what a deployment runs before reloading the agent).

use mtlb::config::{self, Config, replica_name};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// Config file to check.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

pub fn run(a: CheckConfigArgs) -> anyhow::Result<()> {
    // An explicit check of a file that does not exist is an error.
    let cfg = Config::load(&a.config, true)?;
    cfg.validate()?;
    println!(
        "{}: OK: port {}, {} replicas ({}..={} on {}:{}..={}), {}, {:?} checks, stats on {}:{}{}",
        a.config.display(),
        cfg.port,
        cfg.replicas,
        replica_name(0),
        replica_name(cfg.replicas as usize - 1),
        cfg.replica_address,
        cfg.base_port,
        cfg.base_port + cfg.replicas - 1,
        cfg.algorithm.name(),
        cfg.check.kind,
        cfg.stats_address,
        cfg.stats_port,
        announce(&cfg.announce)
    );
    Ok(())
}

/// ", announces 192.0.2.80 while 1 replica is UP (table 4242)", or "".
fn announce(a: &mtlb::config::AnnounceConfig) -> String {
    if a.vips.is_empty() {
        return String::new();
    }
    format!(
        ", announces {} while {} replica{} UP (table {})",
        mtlb::system::vip::list(&a.vips),
        a.min_up,
        if a.min_up == 1 { " is" } else { "s are" },
        a.table
    )
}
