//! `mtlb reload`: make the running agent re-read its configuration.

use super::agent_args::AgentArgs;
use anyhow::bail;
use mtlb::control::{self, Request};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn run(a: ReloadArgs) -> anyhow::Result<()> {
    let at = a.agent.locate()?;
    let r = control::call(
        &at.control_socket,
        &Request::Reload,
        Duration::from_secs(30),
    )?;
    if !r.ok {
        bail!(
            "reload failed, the agent keeps its running configuration: {}",
            r.message
        );
    }
    println!("reloaded: {}", r.message);
    Ok(())
}
