//! Command line: one file per subcommand.

mod run;

use clap::{Parser, Subcommand};

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
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run::run(a),
    }
}
