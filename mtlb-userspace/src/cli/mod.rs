//! Command line: one file per subcommand.

mod agent_args;
mod backend;
mod check_config;
mod generate;
mod host;
mod link;
mod reload;
mod remove;
mod rollout;
mod run;
mod status;

use clap::{CommandFactory as _, Parser, Subcommand};

/// mtlb: eBPF balancer for MTProxy replicas on one host. New connections to
/// the balanced port go straight to the least-loaded replica's listening
/// socket; no proxy sits in the data path.
#[derive(Debug, Parser)]
#[command(name = "mtlb", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancer agent: load and attach the programs, register
    /// replicas, keep the maps up to date. Stops on SIGINT/SIGTERM.
    Run(run::RunArgs),
    /// Control one replica of the running agent: drain, maint, ready,
    /// weight N, wait-drained.
    Backend(backend::BackendArgs),
    /// Restart every replica with a command, one at a time, each drained
    /// first and readied once its new listener is UP.
    ///
    /// Each replica in turn: set it DRAIN, wait until its connections close
    /// (at most --grace; the restart cuts the rest, and they are counted),
    /// run the command, wait until a new listener of the replica is UP (at
    /// most --up-timeout), set it READY. Refuses to start unless two
    /// replicas are UP and READY, and goes on to a replica only while
    /// another one takes clients. Replicas the operator put in DRAIN or
    /// MAINT, and replicas that are DOWN, are skipped and left as they
    /// are. Stops at the first failure, or on SIGINT or SIGTERM, leaving
    /// the replica it was at in DRAIN, and says how to undo that.
    Rollout(rollout::RolloutArgs),
    /// The host's announcement of its service addresses ([announce] vips)
    /// over BGP: show it, or drain / ready the whole host.
    Host(host::HostArgs),
    /// Make the running agent re-read its configuration (as SIGHUP does);
    /// an invalid one is rejected and the running one stays.
    Reload(reload::ReloadArgs),
    /// Take mtlb off this network namespace for good: detach the programs
    /// and remove the pins (a running agent is asked to, and stops).
    /// Stopping the agent alone leaves steering running.
    Remove(remove::RemoveArgs),
    /// Show the replicas: state, connections, last check, traffic. Reads
    /// the pinned maps, so it works after the agent has died too.
    Status(status::StatusArgs),
    /// Print the tg:// and t.me links for the configured port and secret.
    Link(link::LinkArgs),
    /// Validate a config file without touching the kernel.
    CheckConfig(check_config::CheckConfigArgs),
    /// Write the man pages or shell completions (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
        Command::Backend(a) => backend::run(a),
        Command::Rollout(a) => rollout::run(a),
        Command::Host(a) => host::run(a),
        Command::Reload(a) => reload::run(a),
        Command::Remove(a) => remove::run(a),
        Command::Status(a) => status::run(a),
        Command::Link(a) => link::run(a),
        Command::CheckConfig(a) => check_config::run(a),
        Command::Generate(a) => generate::run(a, Cli::command()),
    }
}
