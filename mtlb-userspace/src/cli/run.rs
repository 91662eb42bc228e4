//! `mtlb run`: the agent.

use anyhow::{Context as _, bail};
use mtlb::{
    caps,
    config::{self, Config, Overrides, replica_name},
    loader::{self, Attached},
    maps::Maps,
    mounts, netns, pins, reconcile,
    registry::{self, Change, Registry},
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML). Missing default file: built-in defaults.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let explicit = args.config != Path::new(config::DEFAULT_PATH);
    let mut cfg = Config::load(&args.config, explicit)?;
    cfg.apply(&args.overrides);
    // Validate before touching the kernel: a bad config attaches nothing.
    cfg.validate()?;

    let missing = caps::check();
    if !missing.is_empty() {
        bail!("missing capabilities: {}; run as root", missing.join(", "));
    }

    // Single-threaded runtime: the namespace is per thread, and everything
    // the agent does (attach to "this" namespace, read /proc/net) must
    // happen in the namespace it was started in.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(agent(cfg))
}

async fn agent(cfg: Config) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while starting up is kept and
    // handled (cleanly) once the loop runs, instead of killing the process
    // with programs attached.
    let signals = Signals {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
    };
    let bpffs = match mounts::ensure_bpffs(&cfg.bpffs)? {
        mounts::Bpffs::Present => cfg.bpffs.clone(),
        mounts::Bpffs::Host(p) => {
            tracing::info!(
                "no bpffs at {} in this mount namespace (ip netns exec remounts /sys); using the host's bpffs through {}",
                cfg.bpffs.display(),
                p.display()
            );
            p
        }
        mounts::Bpffs::Mounted => {
            if mounts::in_private_mount_ns() {
                tracing::warn!(
                    "mounted a new bpffs at {}; it is private to this mount namespace, so the pins are not visible from the host and go away with it",
                    cfg.bpffs.display()
                );
            } else {
                tracing::info!("mounted bpffs at {}", cfg.bpffs.display());
            }
            cfg.bpffs.clone()
        }
    };
    let (cgroup, mounted) = mounts::ensure_cgroup2()?;
    if mounted {
        tracing::info!("mounted cgroup2 at {}", cgroup.display());
    }
    let ino = pins::netns_inode()?;
    let _lock = pins::lock(ino)?;
    let dir = pins::pin_dir(&bpffs, ino);

    // Pins left by an agent that died or kept them: move them aside and
    // drop them only once our programs are attached, so steering never
    // stops in between.
    let stale = if pins::has_pins(&dir) {
        // bpffs refuses names with a dot.
        let aside = dir.with_file_name(format!("{ino}-old-{}", std::process::id()));
        std::fs::rename(&dir, &aside)
            .with_context(|| format!("moving stale pins {} aside", dir.display()))?;
        tracing::warn!(
            "found pins of an earlier agent in {}; replacing them",
            dir.display()
        );
        Some(aside)
    } else {
        None
    };

    pins::create_dir(&dir)?;
    let mut attached = Attached::new();
    let started = start(&cfg, &dir, &cgroup, &mut attached).await;
    let (mut loaded, mut registry) = match started {
        Ok(v) => v,
        Err(e) => {
            attached.detach();
            let _ = pins::remove(&dir);
            if let Some(old) = &stale {
                let _ = std::fs::rename(old, &dir);
            }
            return Err(e);
        }
    };
    if let Some(old) = stale {
        pins::remove(&old).with_context(|| format!("removing stale pins {}", old.display()))?;
    }
    pins::restrict(&dir).with_context(|| format!("restricting {}", dir.display()))?;

    let addrs = if cfg.addresses.is_empty() {
        "all local addresses".to_string()
    } else {
        cfg.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    tracing::info!(
        "steering TCP port {} on {} to {} replicas ({}..={} on {}), leastconn; pins in {}",
        cfg.port,
        addrs,
        cfg.replicas,
        replica_name(0),
        replica_name(cfg.replicas as usize - 1),
        cfg.replica_address,
        dir.display()
    );
    log_changes(&cfg, &mut registry, &mut loaded.maps)?;
    if registry.known().iter().all(Option::is_none) {
        tracing::info!(
            "no replica is listening yet; waiting for replicas on {}:{}..={}",
            cfg.replica_address,
            cfg.base_port,
            cfg.base_port + cfg.replicas - 1
        );
    }

    let result = serve(&cfg, &mut loaded, &mut registry, signals).await;

    if cfg.keep_pins {
        attached.keep();
        tracing::info!("keeping programs attached; pins stay in {}", dir.display());
    } else {
        attached.detach();
        pins::remove(&dir).with_context(|| format!("removing pins {}", dir.display()))?;
        tracing::info!("detached; removed pins in {}", dir.display());
    }
    result
}

/// Loads everything, attaches accounting, adopts running replicas, then
/// attaches steering.
async fn start(
    cfg: &Config,
    dir: &Path,
    cgroup: &Path,
    attached: &mut Attached,
) -> anyhow::Result<(loader::Loaded, Registry)> {
    let mut loaded = loader::load(dir)?;
    let maps = &mut loaded.maps;
    let cookie = netns::cookie().context("reading SO_NETNS_COOKIE (Linux 5.14+)")?;
    maps.set_settings(reconcile::settings(cfg, cookie))?;
    for (slot, b) in reconcile::backends(cfg).into_iter().enumerate() {
        maps.set_backend(slot as u32, b)?;
    }
    for a in &cfg.addresses {
        maps.add_address(reconcile::addr16(*a))?;
    }
    let mut seen = None;
    watch_cookies(&mut loaded.maps, &mut seen)?;
    loaded.attach_accounting(cgroup, dir, attached)?;
    let mut registry = Registry::new(cfg.replicas as usize);
    adopt(cfg, &mut registry, &mut loaded.maps);
    loaded.attach_steering(dir, attached)?;
    Ok((loaded, registry))
}

fn adopt(cfg: &Config, registry: &mut Registry, maps: &mut Maps) {
    match registry.adopt_missing(cfg, maps) {
        Ok(list) => {
            for (slot, addr, pid) in list {
                tracing::debug!(
                    "adopted {} listener {addr} from pid {pid}",
                    replica_name(slot as usize)
                );
            }
        }
        Err(e) => tracing::warn!("looking for running replicas: {e}"),
    }
}

fn log_changes(cfg: &Config, registry: &mut Registry, maps: &mut Maps) -> anyhow::Result<()> {
    for c in registry.poll(maps)? {
        match c {
            Change::Registered { slot, view } => {
                let (addr, v6only) = match registry.addr_of(view.cookie) {
                    Some((a, v)) => (Some(a), v),
                    None => (registry::find_addr(cfg, slot), None),
                };
                tracing::info!(
                    "replica {} registered: {} ({}, via {})",
                    replica_name(slot as usize),
                    show(addr, cfg, slot),
                    registry::family_name(view.family, v6only),
                    registry::how_name(view.how),
                );
            }
            Change::Unregistered { slot, view } => {
                let known = registry.addr_of(view.cookie);
                tracing::info!(
                    "replica {} unregistered: {} ({}): its listener closed",
                    replica_name(slot as usize),
                    show(known.map(|k| k.0), cfg, slot),
                    registry::family_name(view.family, known.and_then(|k| k.1)),
                );
            }
        }
    }
    Ok(())
}

fn show(addr: Option<SocketAddr>, cfg: &Config, slot: u32) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| {
        SocketAddr::new(cfg.replica_address, cfg.replica_port(slot as usize)).to_string()
    })
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

async fn serve(
    cfg: &Config,
    loaded: &mut loader::Loaded,
    registry: &mut Registry,
    mut sig: Signals,
) -> anyhow::Result<()> {
    // Registration itself happens in the kernel at listen(); this only
    // notices it for the logs, so 100 ms is plenty.
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    let mut scan = tokio::time::interval(Duration::from_millis(cfg.scan_interval_ms));
    let mut expire = tokio::time::interval(Duration::from_millis(250));
    let mut cookies_seen = None;
    let timeout_ns = cfg.handshake_timeout_ms * 1_000_000;
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sig.int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
            _ = sig.term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
            _ = sig.hup.recv() => {
                tracing::warn!("SIGHUP: configuration reload is not supported by this version; keeping the running configuration");
            }
            _ = poll.tick() => {
                if let Err(e) = log_changes(cfg, registry, &mut loaded.maps) {
                    tracing::warn!("reading replica registrations: {e:#}");
                }
                if let Err(e) = watch_cookies(&mut loaded.maps, &mut cookies_seen) {
                    tracing::warn!("watching SYN cookies: {e:#}");
                }
            }
            _ = expire.tick() => {
                let cutoff = monotonic_ns().saturating_sub(timeout_ns);
                match loaded.maps.expire_handshakes(cutoff) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!("{n} handshakes did not complete within {} ms", cfg.handshake_timeout_ms),
                    Err(e) => tracing::warn!("expiring handshakes: {e:#}"),
                }
            }
            _ = scan.tick() => {
                adopt(cfg, registry, &mut loaded.maps);
            }
        }
    }
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns().
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Turns flow tracking on while the namespace sends SYN cookies (see
/// `mtlb::cookies`).
fn watch_cookies(
    maps: &mut Maps,
    prev: &mut Option<mtlb::cookies::Observed>,
) -> anyhow::Result<()> {
    let now = mtlb::cookies::observe()?;
    let mut rt = maps.runtime()?;
    if let Some(until) =
        mtlb::cookies::next_deadline(*prev, now, rt.track_flows_until_ns, monotonic_ns())
    {
        if prev.is_some_and(|p| now.sent > p.sent) {
            tracing::info!(
                "replicas are sending SYN cookies ({} so far): keeping flows on their replica",
                now.sent
            );
        }
        rt.track_flows_until_ns = until;
        maps.set_runtime(rt)?;
    }
    *prev = Some(now);
    Ok(())
}
