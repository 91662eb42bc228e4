//! The package's life on the deployed guest, each step under a loop of
//! complete clients through port 443: an upgrade by the role to a later
//! version (the service restarts, the new agent takes over the pinned
//! state, no client refused, the counts kept), `apt remove` (the agent
//! stops, steering goes on from the pins) and a reinstall by the role (the
//! new agent takes over), `apt purge` (steering, pins and state gone; the
//! replicas' own ports still answer).

use crate::{
    Deployed, Host,
    clients::{self, Load, Outcome},
    guest::Guest,
    stats::{Stats, up},
    under_light_load,
};
use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

/// A built package and its version.
pub struct Deb {
    pub path: PathBuf,
    pub version: String,
}

impl Deb {
    fn new(path: PathBuf) -> anyhow::Result<Deb> {
        let out = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&path)
            .arg("Version")
            .output()
            .context("running dpkg-deb")?;
        if !out.status.success() {
            bail!("dpkg-deb -f {} Version failed", path.display());
        }
        Ok(Deb {
            version: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            path,
        })
    }

    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The package of this tree, and the same code as a later version ("+1":
/// Debian orders `X+1` after `X`), each copied into `dir` at once: cargo-deb
/// deletes the other versions' packages from its output directory.
pub fn build(host: &dyn Host, dir: &Path) -> anyhow::Result<((Deb, Deb), String)> {
    let keep = |built: PathBuf| -> anyhow::Result<Deb> {
        let kept = dir.join(built.file_name().context("a package path without a name")?);
        std::fs::copy(&built, &kept)
            .with_context(|| format!("copying {} to {}", built.display(), dir.display()))?;
        Deb::new(kept)
    };
    let first = keep(host.deb(None)?)?;
    let later = format!("{}+1", first.version);
    let second = keep(host.deb(Some(&later))?)?;
    if second.version != later {
        bail!("{} says version {}", second.file_name(), second.version);
    }
    let d = format!(
        "{} ({:.1} MB) and {} for the upgrade, in {}",
        first.file_name(),
        size_mb(&first.path),
        second.file_name(),
        dir.display()
    );
    Ok(((first, second), d))
}

fn size_mb(p: &Path) -> f64 {
    std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1e6)
}

/// The installed version of mtlb, empty when it is not installed.
fn installed(vm: &Guest) -> anyhow::Result<String> {
    Ok(vm
        .sh("dpkg-query -W -f '${db:Status-Status} ${Version}' mtlb 2>/dev/null || true")?
        .trim()
        .to_string())
}

fn main_pid(vm: &Guest) -> anyhow::Result<String> {
    Ok(vm
        .sh("systemctl show -p MainPID --value mtlb")?
        .trim()
        .to_string())
}

/// The sum of the replicas' connection totals as `mtlb status` reads them
/// from the pinned maps (so also while no agent runs), with `bin`.
fn status_total(vm: &Guest, bin: &str) -> anyhow::Result<u64> {
    let json = vm.sh(&format!("sudo {bin} status --json"))?;
    let v: serde_json::Value = serde_json::from_str(&json).context("mtlb status --json")?;
    v["backends"]
        .as_array()
        .context("no backends in mtlb status --json")?
        .iter()
        .map(|b| b["total"].as_u64().context("a backend without total"))
        .sum()
}

/// The guest's clock, for `journalctl --since @…`.
fn guest_now(vm: &Guest) -> anyhow::Result<String> {
    Ok(vm.sh("date +%s")?.trim().to_string())
}

/// The agent's line saying it took over the pinned state, logged since
/// `since` (guest clock).
fn took_over(vm: &Guest, since: &str) -> anyhow::Result<String> {
    let line = vm.sh(&format!(
        "sudo journalctl -u mtlb --no-pager -o cat --since @{since} | grep -m1 'taking over the pinned state' || true"
    ))?;
    if line.trim().is_empty() {
        bail!(
            "the new agent logged no `taking over the pinned state`; its journal:\n{}",
            vm.sh(&format!(
                "sudo journalctl -u mtlb --no-pager -o cat --since @{since} | tail -15"
            ))?
        );
    }
    Ok(line.trim().to_string())
}

/// Passes when no client was refused and none failed otherwise.
fn all_served(outcomes: &[Outcome], rest: String) -> anyhow::Result<String> {
    crate::clients_verdict(outcomes, rest)
}

pub fn check_upgrade(d: &Deployed) -> anyhow::Result<String> {
    let vm = &d.vm;
    let from = installed(vm)?;
    let pid = main_pid(vm)?;
    let before = status_total(vm, "/usr/sbin/mtlb")?;
    let since = guest_now(vm)?;
    let (outcomes, recap) = under_light_load(&d.probe, || {
        d.ansible.run_deb(2, "upgrade", &d.upgrade.path)
    });
    let recap = recap?;
    let to = installed(vm)?;
    if to != format!("installed {}", d.upgrade.version) {
        bail!(
            "after the upgrade dpkg says `{to}`, not version {}",
            d.upgrade.version
        );
    }
    let new_pid = main_pid(vm)?;
    if new_pid == pid || new_pid == "0" {
        bail!("the service did not restart (MainPID {pid} → {new_pid})");
    }
    let line = took_over(vm, &since)?;
    let rows = d.stats.wait(vm, Duration::from_secs(120), |r| {
        up(r, "mtp1") && up(r, "mtp2")
    })?;
    let after = status_total(vm, "/usr/sbin/mtlb")?;
    let text = format!(
        "{recap}\ndpkg: `{from}` → `{to}`; MainPID {pid} → {new_pid}\n{line}\n\
         mtlb status totals: {before} before, {after} after\n{}",
        Stats::show(&rows)
    );
    if after == 0 || after < before {
        bail!("counts not kept across the upgrade: {text}");
    }
    all_served(&outcomes, text)
}

pub fn check_remove(d: &Deployed) -> anyhow::Result<String> {
    let vm = &d.vm;
    let load = Load::start(d.probe.clone(), 1, Duration::from_millis(500));
    let r = (|| {
        let before = status_total(vm, "/usr/sbin/mtlb")?;
        vm.sh("sudo DEBIAN_FRONTEND=noninteractive apt-get remove -y mtlb")?;
        let state = installed(vm)?;
        if state.starts_with("installed") {
            bail!("dpkg still says `{state}` after apt remove");
        }
        let active = vm.ssh("systemctl is-active mtlb")?;
        let active = String::from_utf8_lossy(&active.stdout).trim().to_string();
        if active == "active" {
            bail!("the agent still runs after apt remove");
        }
        let pins = vm.sh("sudo find /sys/fs/bpf/mtlb -mindepth 1 | wc -l")?;
        if pins.trim() == "0" {
            bail!("no pins left under /sys/fs/bpf/mtlb after apt remove");
        }
        // No agent now: the replicas take the clients steering gives them,
        // counted in the pinned maps (read with the copy prerm kept).
        let removed = status_total(vm, "/var/lib/mtlb/purge/mtlb")?;
        load.wait_more(10, Duration::from_secs(120))?;
        let served = status_total(vm, "/var/lib/mtlb/purge/mtlb")?;
        // At most one of those 10 was connected before `removed` was read.
        if served < removed + 9 {
            bail!(
                "with the agent removed, 10 clients ended but the replicas' totals went only {removed} → {served}"
            );
        }
        let since = guest_now(vm)?;
        let recap = d.ansible.run_deb(2, "reinstall", &d.upgrade.path)?;
        let line = took_over(vm, &since)?;
        let rows = d.stats.wait(vm, Duration::from_secs(120), |r| {
            up(r, "mtp1") && up(r, "mtp2")
        })?;
        let after = status_total(vm, "/usr/sbin/mtlb")?;
        if after < served {
            bail!("counts not kept across the reinstall: {served} → {after}");
        }
        anyhow::Ok(format!(
            "apt remove: dpkg `{state}`, unit {active}, {} pinned objects left; \
             mtlb status totals {before} → {removed} after the remove → {served} \
             with no agent (10 clients later)\nreinstall by the role: {recap}\n{line}\n\
             mtlb status totals {after} after\n{}",
            pins.trim(),
            Stats::show(&rows)
        ))
    })();
    let outcomes = load.finish();
    all_served(&outcomes, r?)
}

pub fn check_purge(d: &Deployed) -> anyhow::Result<String> {
    let vm = &d.vm;
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let load = Load::start(d.probe.clone(), 1, Duration::from_millis(500));
    let r = (|| {
        load.wait_more(3, Duration::from_secs(60))?;
        let t0 = SystemTime::now();
        let out = vm.sh("sudo DEBIAN_FRONTEND=noninteractive apt-get purge -y mtlb 2>&1")?;
        let t1 = SystemTime::now();
        // Clients started once the purge ended find no steering.
        load.wait_more(5, Duration::from_secs(60))?;
        anyhow::Ok((t0, t1, out))
    })();
    let outcomes = load.finish();
    let (t0, t1, out) = r?;
    let before: Vec<&Outcome> = outcomes.iter().filter(|o| o.start < t0).collect();
    let during = outcomes
        .iter()
        .filter(|o| o.start >= t0 && o.start <= t1)
        .count();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.start > t1).collect();
    let mut problems = Vec::new();
    let refused_before = before.iter().filter(|o| !o.ok).count();
    if refused_before > 0 {
        problems.push(format!(
            "{refused_before} of the clients before the purge not served"
        ));
    }
    if let Some(o) = after.iter().find(|o| !o.refused) {
        problems.push(format!(
            "a client after the purge was not refused: {}",
            o.detail
        ));
    }
    let state = installed(vm)?;
    if !state.is_empty() && state != "not-installed" && !state.starts_with("not-installed") {
        problems.push(format!("dpkg still knows mtlb: `{state}`"));
    }
    let pins = vm.sh("sudo find /sys/fs/bpf/mtlb -mindepth 1 2>/dev/null || true")?;
    if !pins.trim().is_empty() {
        problems.push(format!("pins left:\n{}", pins.trim()));
    }
    let left = vm.sh("for p in /var/lib/mtlb /etc/mtlb; do [ -e $p ] && echo $p; done; true")?;
    if !left.trim().is_empty() {
        problems.push(format!(
            "state left: {}",
            left.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    let listen = vm.sh("ss -Hltn 'sport = :443' | wc -l")?;
    let sk_lookup = vm.sh(
        "if command -v bpftool >/dev/null; then sudo bpftool link show | grep -c sk_lookup || true; else echo 'not counted (no bpftool)'; fi",
    )?;
    if sk_lookup.trim().parse::<u32>().is_ok_and(|n| n > 0) {
        problems.push(format!(
            "{} sk_lookup links still attached",
            sk_lookup.trim()
        ));
    }
    // The replicas' own ports answer a connect in the guest.
    let mut direct = Vec::new();
    for n in 1..=2u16 {
        let port = d.vars.base_port + n - 1;
        let ok = vm
            .ssh(&format!(
                "python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 5).close()\""
            ))?
            .status
            .success();
        if !ok {
            problems.push(format!("mtproxy{n}'s port {port} does not answer"));
        }
        direct.push(format!(
            "mtproxy{n} :{port} {}",
            if ok { "accepts" } else { "refuses" }
        ));
    }
    let text = format!(
        "{}\n{} before the purge (all must be served), {during} during it (`apt-get purge` took {:.1} s), \
         {} after it (all must be refused: port 443 no longer steered, {} listener on it)\n\
         dpkg: `{}`; pins under /sys/fs/bpf/mtlb: {}; /var/lib/mtlb, /etc/mtlb: {}; \
         sk_lookup links: {}\nreplicas directly (connect in the guest): {}\npurge said: {}",
        clients::counts(&outcomes),
        before.len(),
        secs(t1) - secs(t0),
        after.len(),
        listen.trim(),
        if state.is_empty() {
            "unknown to dpkg"
        } else {
            state.as_str()
        },
        if pins.trim().is_empty() {
            "none"
        } else {
            "some"
        },
        if left.trim().is_empty() {
            "gone"
        } else {
            left.trim()
        },
        sk_lookup.trim(),
        direct.join(", "),
        out.lines()
            .filter(|l| l.contains("mtlb")
                && !l.starts_with("Reading")
                && !l.contains("will be REMOVED"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    if !problems.is_empty() {
        bail!("{}\n{text}", problems.join("\n"));
    }
    Ok(text)
}
