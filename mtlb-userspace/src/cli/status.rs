//! `mtlb status`: the replicas' table, read from the pinned maps, so it
//! works while the agent runs and after it has died.

use super::agent_args::AgentArgs;
use mtlb::{
    kernel::dataplane::Dataplane,
    stats::{snapshot, table},
};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let dir = a.agent.locate()?.pin_dir;
    let maps = Dataplane::open_read_only(&dir)?;
    let s = snapshot::collect(&maps, &dir, &snapshot::bytes(&maps)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", table::render(&s));
    }
    Ok(())
}
