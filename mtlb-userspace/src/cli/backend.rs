//! `mtlb backend NAME …`: operator control of one replica.

use super::agent_args::AgentArgs;
use anyhow::{Context as _, bail};
use mtlb::{
    checks::health::Admin,
    control::{self, Request},
    kernel::maps::Maps,
};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Replica name: mtp1, mtp2, …
    name: String,
    #[command(subcommand)]
    action: Action,
    #[command(flatten)]
    agent: AgentArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// No new connections; existing ones continue.
    Drain,
    /// Maintenance: no new connections; existing ones continue.
    Maint,
    /// Back to taking new connections (when UP).
    Ready,
    /// Set the weight (1..=256); load is compared as connections / weight.
    Weight { weight: u32 },
    /// Wait until the replica's connection count, read from the kernel,
    /// is 0. Exits 0 then, 1 on timeout.
    WaitDrained {
        /// How long to wait, e.g. 60s, 500ms, 2m.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

pub fn run(a: BackendArgs) -> anyhow::Result<()> {
    let sock = a.agent.locate()?.control_socket;
    let call = |req: Request| control::request(&sock, &req, Duration::from_secs(10));
    let admin = |state: Admin| {
        call(Request::Admin {
            name: a.name.clone(),
            state,
        })
    };
    let r = match a.action {
        Action::Drain => admin(Admin::Drain)?,
        Action::Maint => admin(Admin::Maint)?,
        Action::Ready => admin(Admin::Ready)?,
        Action::Weight { weight } => call(Request::Weight {
            name: a.name.clone(),
            weight,
        })?,
        Action::WaitDrained { timeout } => {
            let r = call(Request::Locate {
                name: a.name.clone(),
            })?;
            let (Some(slot), Some(dir)) = (r.slot, r.pin_dir) else {
                // Not configured (scaled away and removed): drained.
                println!("{}", r.message);
                return Ok(());
            };
            return wait_drained(&a.name, slot, &dir, timeout);
        }
    };
    println!("{}", r.message);
    Ok(())
}

/// Polls the replica's exact count (handshakes + established) in the pinned
/// CONNS map; the kernel has no event to wait on.
fn wait_drained(
    name: &str,
    slot: u32,
    dir: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let maps =
        Maps::from_pins(dir).with_context(|| format!("opening pins in {}", dir.display()))?;
    let t0 = Instant::now();
    loop {
        let n = maps.conns(slot)?.active();
        if n == 0 {
            println!("{name} drained after {:.1}s", t0.elapsed().as_secs_f64());
            return Ok(());
        }
        if t0.elapsed() >= timeout {
            bail!(
                "{name} still has {n} connections after {}",
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
