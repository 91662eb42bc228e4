//! The options every command that talks to a running agent takes.

use mtlb::{
    agent::{ConfigSource, locate::Location},
    config::{Config, Overrides},
};
use std::path::PathBuf;

/// Which agent a command talks to: the one of this network namespace,
/// found as `mtlb run` with the same config file and flags would place it.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent's config file, for `control_dir` and `bpffs` [default:
    /// /etc/mtlb/mtlb.toml; when that is missing and not named here,
    /// built-in defaults].
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Directory of the agent's control socket [config: control_dir,
    /// default /run/mtlb].
    #[arg(long, global = true)]
    control_dir: Option<PathBuf>,
    /// bpffs mount the agent pins under [config: bpffs, default
    /// /sys/fs/bpf].
    #[arg(long, global = true)]
    bpffs: Option<PathBuf>,
    /// Directory of the agent's saved state [config: state_dir, default
    /// /var/lib/mtlb].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
}

impl AgentArgs {
    pub fn config(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            control_dir: self.control_dir.clone(),
            bpffs: self.bpffs.clone(),
            state_dir: self.state_dir.clone(),
            ..Overrides::default()
        };
        Ok(ConfigSource::new(self.config.clone(), overrides).read()?)
    }

    pub fn locate(&self) -> anyhow::Result<Location> {
        Ok(Location::of(&self.config()?)?)
    }
}
