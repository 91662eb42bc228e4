//! `mtlb rollout --exec CMD`: restart every replica with CMD, one at a
//! time, drained first.

use super::agent_args::AgentArgs;
use anyhow::Context as _;
use clap::builder::{StyledStr, styling::Style};
use mtlb::rollout::{self, Options};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[arg(long, value_name = "CMD", help = exec_help())]
    exec: String,
    /// Only these replicas, by name or number: mtp1,mtp3 or 1,3 [default:
    /// all].
    #[arg(long, value_delimiter = ',', value_name = "REPLICAS")]
    replicas: Vec<String>,
    /// How long a drained replica's clients have to leave before the
    /// restart cuts them.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Most time one command may take; past it, it is stopped and the
    /// rollout too.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Most time a restarted replica may take to be UP on a new listener.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    up_timeout: Duration,
    /// Say what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn run(a: RolloutArgs) -> anyhow::Result<()> {
    let at = a.agent.locate()?;
    let opts = Options {
        exec: a.exec,
        replicas: a.replicas,
        grace: a.grace,
        timeout: a.timeout,
        up_timeout: a.up_timeout,
        dry_run: a.dry_run,
    };
    // One thread: the namespace is per thread, and the command must run
    // in the agent's.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(rollout::run(&opts, &at))?;
    Ok(())
}

/// The help of --exec. clap turns a literal `{n}` in help text into a line
/// break, so each placeholder is written styled, with the style's escape
/// sequence between `{` and the name; output without styles (a pipe, the
/// man page) drops the sequence and shows `{n}`.
fn exec_help() -> StyledStr {
    let p = |name: &str| {
        let s = Style::new().bold();
        format!("{s}{{{s:#}{s}{name}}}{s:#}")
    };
    format!(
        "The restart command, run with `sh -c`: {} is the replica's number (1 for mtp1), {} its name; e.g. 'docker restart mtproxy{}'",
        p("n"),
        p("name"),
        p("n")
    )
    .into()
}
