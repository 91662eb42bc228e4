//! `mtlb status`: the replicas' table, read from the pinned maps, so it
//! works while the agent runs and after it has died.

use anyhow::Context as _;
use mtlb::{maps::Maps, pins, snapshot};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// bpffs mount the agent pins under.
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
}

pub fn run(a: StatusArgs) -> anyhow::Result<()> {
    let ino = pins::netns_inode()?;
    let mut dir = pins::pin_dir(&a.bpffs, ino);
    if !dir.exists() {
        // Under `ip netns exec` /sys is the namespace's own: look through
        // the parent's root, as the agent does.
        let ppid = nix::unistd::getppid().as_raw();
        let alt = pins::pin_dir(
            &PathBuf::from(format!("/proc/{ppid}/root"))
                .join(a.bpffs.strip_prefix("/").unwrap_or(&a.bpffs)),
            ino,
        );
        if alt.exists() {
            dir = alt;
        }
    }
    let maps = Maps::from_pins(&dir).with_context(|| {
        format!(
            "no mtlb pins for this network namespace in {} (is `mtlb run` running, or did it run with keep_pins?)",
            dir.display()
        )
    })?;
    let s = snapshot::collect(&maps, &dir)?;
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
            b.name, b.address, b.state, b.active, b.total, b.weight, check, b.bytes_in, b.bytes_out
        );
    }
    println!(
        "port {}: {} lookups, {} refused (no backend)",
        s.port, s.lookups, s.no_backend
    );
    Ok(())
}
