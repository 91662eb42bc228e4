//! `mtlb remove`: take mtlb off this network namespace for good: the
//! programs detached, the pins removed. A running agent is asked to do it
//! and stop; without one, the pins an earlier agent kept are removed here.

use super::agent_args::AgentArgs;
use anyhow::{Context as _, bail};
use mtlb::{
    agent::persist,
    control::{self, ControlError, Request},
    kernel::{dataplane::Dataplane, pins},
    system::vip,
};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// Instead: remove the pins of network namespaces that are gone (and
    /// so detach their programs from the host's cgroups); every live
    /// namespace's are left alone.
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    agent: AgentArgs,
}

pub fn run(a: RemoveArgs) -> anyhow::Result<()> {
    let at = a.agent.locate()?;
    if a.stale {
        return sweep(&at.pin_dir);
    }
    match control::call(
        &at.control_socket,
        &Request::Remove,
        Duration::from_secs(30),
    ) {
        Ok(r) if r.ok => {
            // The agent detaches on its way out: wait for its lock.
            let lock = wait_for_lock(at.netns_ino)?;
            drop(lock);
            println!("{}", r.message);
            return Ok(());
        }
        Ok(r) => bail!("the agent refused: {}", r.message),
        Err(ControlError::Connect { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // No agent answers: it must not be running (its lock says).
    let _lock = pins::lock(at.netns_ino)
        .context("an agent holds this namespace but does not answer on its control socket")?;
    // Withdrawn before steering stops, so the router sends no client
    // that nothing steers; whatever the table holds goes (the dead agent
    // may have run another config).
    let cfg = a.agent.config()?;
    let announce = cfg.announce;
    // What the last start recorded: addresses an earlier config put on lo,
    // and its table if that changed since.
    let state = persist::state_file(&cfg.state_dir, at.netns_ino);
    // A state file that cannot be read must not keep mtlb from going.
    let earlier = persist::Saved::load(&state)
        .inspect_err(|e| {
            eprintln!(
                "warning: {}; only announce.vips taken off lo",
                mtlb::error::report(e)
            )
        })
        .ok()
        .and_then(|s| s.announce);
    let vips = persist::held_vips(&announce.vips, earlier.as_ref());
    let mut gone = Vec::new();
    if let Some(e) = earlier.filter(|e| e.table != announce.table) {
        gone = vip::retire(e.table, &[]).context("withdrawing the earlier table's routes")?;
    }
    for v in vip::retire(announce.table, &vips).context("withdrawing the service addresses")? {
        if !gone.contains(&v) {
            gone.push(v);
        }
    }
    if !gone.is_empty() {
        println!(
            "withdrew {} and took the service addresses off lo",
            vip::list(&gone)
        );
    }
    if Dataplane::unload(&at.pin_dir)? {
        println!("detached; removed {}", at.pin_dir.display());
    } else {
        println!("nothing to remove: no pins in {}", at.pin_dir.display());
    }
    Ok(())
}

fn sweep(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    use mtlb::kernel::dataplane::{Fact, sweep_stale};
    let Some(root) = pin_dir.parent() else {
        return Ok(());
    };
    let mut failed = 0;
    for f in sweep_stale(root) {
        match f {
            Fact::Swept { dir } => println!("detached; removed {}", dir.display()),
            Fact::SweepFailed { dir, error } => {
                eprintln!("cannot remove {}: {error}", dir.display());
                failed += 1;
            }
            _ => {}
        }
    }
    if failed > 0 {
        bail!("{failed} stale pin directories could not be removed");
    }
    Ok(())
}

fn wait_for_lock(ino: u64) -> anyhow::Result<pins::NetnsLock> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match pins::lock(ino) {
            Ok(l) => return Ok(l),
            Err(pins::PinError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("waiting for the agent to exit"),
        }
    }
}
