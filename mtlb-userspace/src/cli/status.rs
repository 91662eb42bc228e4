//! `mtlb status`: the replicas' table, read from the pinned maps, so it
//! works while the agent runs and after it has died.

use super::agent_args::AgentArgs;
use mtlb::{kernel::dataplane::Dataplane, stats::snapshot};

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
        return Ok(());
    }
    println!(
        "{:<6} {:<22} {:<10} {:>7} {:>9} {:>6} {:<34} {:>12} {:>12}",
        "NAME",
        "ADDRESS",
        "STATE",
        "ACTIVE",
        "TOTAL",
        "WEIGHT",
        "LAST CHECK",
        "BYTES IN",
        "BYTES OUT"
    );
    for b in &s.backends {
        let check = if b.check == "-" {
            "-".to_string()
        } else {
            format!("{} {} ({}ms)", b.check, b.check_reason, b.check_duration_ms)
        };
        println!(
            "{:<6} {:<22} {:<10} {:>7} {:>9} {:>6} {:<34} {:>12} {:>12}",
            b.name,
            b.address,
            b.state.to_string(),
            b.active,
            b.total,
            b.weight,
            check,
            b.bytes_in,
            b.bytes_out
        );
    }
    println!(
        "port {}: {} lookups, {} refused (no backend)",
        s.port, s.lookups, s.no_backend
    );
    Ok(())
}
