//! `mtlb host [drain|ready]`: the host's announcement of its service
//! addresses (`[announce] vips`), as the running agent decides it.

use super::agent_args::AgentArgs;
use mtlb::control::{self, Request};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Withdraw the service addresses at once (kept across restarts):
    /// the router sends new clients to the other hosts; replicas keep
    /// serving what arrives until the router has moved (on a plain ECMP
    /// router that includes the host's established connections, which
    /// then go to other hosts and are reset there).
    Drain,
    /// Announce the service addresses again while enough replicas are UP.
    Ready,
}

pub fn run(a: HostArgs) -> anyhow::Result<()> {
    let sock = a.agent.locate()?.control_socket;
    let drain = a.action.map(|a| matches!(a, Action::Drain));
    let r = control::request(&sock, &Request::Host { drain }, Duration::from_secs(10))?;
    println!("{}", r.message);
    Ok(())
}
