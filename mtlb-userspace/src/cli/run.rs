//! `mtlb run`: the agent.

use anyhow::{Context as _, bail};
use mtlb::{
    backends::{Replica, Saved, state_file},
    caps,
    checks::{self, reason},
    config::{self, CheckKind, Config, Overrides, replica_name},
    control::{self, Request, Response},
    health::{Admin, CheckResult, Event, Oper},
    loader::{self, Attached},
    maps::Maps,
    mounts, netns, pins, reconcile,
    registry::{self, Change, Registry},
};
use mtlb_common::{Backend, MAX_REPLICAS};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Config file (TOML). Missing default file: built-in defaults.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
}

/// Where the configuration comes from, to read it again on reload.
struct Source {
    path: PathBuf,
    explicit: bool,
    overrides: Overrides,
}

impl Source {
    fn read(&self) -> Result<Config, config::ConfigError> {
        let mut cfg = Config::load(&self.path, self.explicit)?;
        cfg.apply(&self.overrides);
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = Source {
        explicit: args.config != Path::new(config::DEFAULT_PATH),
        path: args.config,
        overrides: args.overrides,
    };
    // Validate before touching the kernel: a bad config attaches nothing.
    let cfg = source.read()?;

    let missing = caps::check();
    if !missing.is_empty() {
        bail!("missing capabilities: {}; run as root", missing.join(", "));
    }

    // Single-threaded runtime: the namespace is per thread, and everything
    // the agent does (attach to "this" namespace, read /proc/net, connect
    // to replicas for checks) must happen in the namespace it started in.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(agent(cfg, source))
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

async fn agent(cfg: Config, source: Source) -> anyhow::Result<()> {
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
    // Bind the stats endpoint before attaching anything: a port in use is
    // a startup error that leaves nothing behind.
    let stats_addr = SocketAddr::new(cfg.stats_address, cfg.stats_port);
    let stats_listener = std::net::TcpListener::bind(stats_addr).with_context(|| {
        format!("binding the stats endpoint {stats_addr} (stats_address, stats_port)")
    })?;
    stats_listener.set_nonblocking(true)?;
    let dir = pins::pin_dir(&bpffs, ino);

    // Pins of an earlier agent (killed, or stopped with keep_pins): take its
    // maps over when their shapes match this build, so registrations,
    // counts and socket tags carry on; else move them aside and drop them
    // once our programs are attached. Either way steering never stops.
    let mut stale = None;
    let mut adopted = false;
    if pins::has_pins(&dir) {
        match loader::pins_compatible(&dir)? {
            Ok(()) => {
                adopted = true;
                tracing::info!(
                    "taking over the pinned state of an earlier agent in {}",
                    dir.display()
                );
            }
            Err(why) => {
                // bpffs refuses names with a dot.
                let aside = dir.with_file_name(format!("{ino}-old-{}", std::process::id()));
                std::fs::rename(&dir, &aside)
                    .with_context(|| format!("moving stale pins {} aside", dir.display()))?;
                tracing::warn!(
                    "found pins of an earlier agent in {} that this build cannot take over ({why}); replacing them, counts start from zero",
                    dir.display()
                );
                stale = Some(aside);
            }
        }
    }

    pins::create_dir(&dir)?;
    let mut attached = Attached::new();
    let started = start(&cfg, &dir, &cgroup, &mut attached).await;
    let (loaded, registry) = match started {
        Ok(v) => v,
        Err(e) => {
            if adopted {
                // The earlier agent's programs are still attached and
                // pinned: leave them running.
                drop(attached);
            } else {
                attached.detach();
                let _ = pins::remove(&dir);
                if let Some(old) = &stale {
                    let _ = std::fs::rename(old, &dir);
                }
            }
            return Err(e);
        }
    };
    if let Some(old) = stale {
        pins::remove(&old).with_context(|| format!("removing stale pins {}", old.display()))?;
    }
    pins::restrict(&dir).with_context(|| format!("restricting {}", dir.display()))?;

    // The stats endpoint reads the maps through their pins, with handles of
    // its own.
    let stats_source = std::sync::Arc::new(mtlb::http::Source::new(
        Maps::from_pins(&dir).context("opening the pins for the stats endpoint")?,
        dir.clone(),
    ));
    let listener = tokio::net::TcpListener::from_std(stats_listener)?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, mtlb::http::router(stats_source)).await {
            tracing::error!("stats endpoint stopped: {e}");
        }
    });
    tracing::info!("stats on http://{stats_addr}/stats, metrics on http://{stats_addr}/metrics");

    let control_path = control::socket_path(&cfg.control_dir, ino);
    let control = bind_control(&control_path)?;
    let saved_path = state_file(&cfg.state_dir, ino);
    let saved = Saved::load(&saved_path).unwrap_or_else(|e| {
        tracing::warn!("ignoring unreadable state file {e}");
        Saved::default()
    });

    let mut a = Agent::new(
        cfg,
        source,
        dir.clone(),
        loaded,
        registry,
        saved,
        saved_path,
    );
    a.log_summary();
    a.poll_registrations();
    if a.registry.known().iter().all(Option::is_none) {
        tracing::info!(
            "no replica is listening yet; waiting for replicas on {}:{}..={}",
            a.cfg.replica_address,
            a.cfg.base_port,
            a.cfg.base_port + a.cfg.replicas - 1
        );
    }
    a.apply_backends();
    mtlb::notify::notify(&format!("READY=1\nSTATUS=steering port {}", a.cfg.port));

    let result = a.serve(signals, control).await;
    mtlb::notify::notify("STOPPING=1");
    let _ = std::fs::remove_file(&control_path);

    if a.cfg.keep_pins {
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
    maps.set_settings(reconcile::settings(cfg, cookie, cfg.replicas))?;
    set_addresses(maps, cfg)?;
    let mut seen = None;
    watch_cookies(maps, &mut seen)?;
    loaded.attach_accounting(cgroup, dir, attached)?;
    let mut registry = Registry::default();
    adopt(cfg, &mut registry, &mut loaded.maps);
    loaded.attach_steering(dir, attached)?;
    Ok((loaded, registry))
}

/// Makes ADDRESSES hold exactly the configured addresses, adding before
/// removing so a balanced address is never missing in between.
fn set_addresses(maps: &mut Maps, cfg: &Config) -> anyhow::Result<()> {
    let want: Vec<[u8; 16]> = cfg
        .addresses
        .iter()
        .map(|a| reconcile::addr16(*a))
        .collect();
    for a in &want {
        maps.add_address(*a)?;
    }
    for old in maps.addresses()? {
        if !want.contains(&old) {
            maps.remove_address(&old)?;
        }
    }
    Ok(())
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

fn bind_control(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // We hold the namespace lock: a socket file left here is a dead agent's.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

type ControlMsg = (Request, oneshot::Sender<Response>);

struct Agent {
    cfg: Config,
    source: Source,
    dir: PathBuf,
    loaded: loader::Loaded,
    registry: Registry,
    replicas: Vec<Replica>,
    written: Vec<Option<Backend>>,
    status_written: Vec<Option<mtlb_common::Status>>,
    next_check: Vec<Instant>,
    /// Bumped when a slot's check must restart (reload); stale results are
    /// dropped.
    generation: Vec<u64>,
    cookies_seen: Option<mtlb::cookies::Observed>,
    saved_path: PathBuf,
    any_active: bool,
}

impl Agent {
    fn new(
        cfg: Config,
        source: Source,
        dir: PathBuf,
        loaded: loader::Loaded,
        registry: Registry,
        saved: Saved,
        saved_path: PathBuf,
    ) -> Self {
        let now = std::time::Instant::now();
        let n = cfg.replicas as usize;
        let replicas = (0..n)
            .map(|slot| {
                // DOWN until its listener is seen; then UP at once (as
                // HAProxy starts servers UP) and checked from there.
                let mut r = Replica::new(slot, Oper::Down, now);
                r.down_by_listener = true;
                saved.apply(&mut r);
                r
            })
            .collect();
        let t0 = Instant::now();
        let inter = Duration::from_millis(cfg.check.inter_ms);
        // Spread the first checks over one interval.
        let next_check = (0..n)
            .map(|i| t0 + inter.mul_f64(i as f64 / n as f64))
            .collect();
        Self {
            cfg,
            source,
            dir,
            loaded,
            registry,
            replicas,
            written: vec![None; MAX_REPLICAS as usize],
            status_written: vec![None; MAX_REPLICAS as usize],
            next_check,
            generation: vec![0; n],
            cookies_seen: None,
            saved_path,
            any_active: true,
        }
    }

    fn log_summary(&self) {
        let cfg = &self.cfg;
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
            "steering TCP port {} on {} to {} replicas ({}..={} on {}), leastconn, {:?} checks; pins in {}",
            cfg.port,
            addrs,
            cfg.replicas,
            replica_name(0),
            replica_name(cfg.replicas as usize - 1),
            cfg.replica_address,
            cfg.check.kind,
            self.dir.display()
        );
    }

    fn maps(&mut self) -> &mut Maps {
        &mut self.loaded.maps
    }

    fn conns(&self, slot: usize) -> u64 {
        self.loaded
            .maps
            .conns(slot as u32)
            .map(|c| c.established + c.handshakes)
            .unwrap_or(0)
    }

    fn active_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.active()).count()
    }

    /// Writes BACKENDS entries that changed, and says when the last active
    /// replica goes or one comes back.
    fn apply_backends(&mut self) {
        let now = std::time::Instant::now();
        for slot in 0..MAX_REPLICAS as usize {
            let b = match self.replicas.get(slot) {
                Some(r) => r.backend(&self.cfg, slot, now),
                None => Backend::default(),
            };
            if self.written[slot] != Some(b) {
                match self.loaded.maps.set_backend(slot as u32, b) {
                    Ok(()) => self.written[slot] = Some(b),
                    Err(e) => tracing::warn!("updating BACKENDS[{slot}]: {e}"),
                }
            }
        }
        for slot in 0..MAX_REPLICAS as usize {
            let st = match self.replicas.get(slot) {
                Some(r) => r.status(&self.cfg, slot, now),
                None => mtlb_common::Status::default(),
            };
            if self.status_written[slot] == Some(st) {
                continue;
            }
            match self.loaded.maps.set_status(slot as u32, st) {
                Ok(()) => self.status_written[slot] = Some(st),
                Err(e) => tracing::warn!("updating STATUS[{slot}]: {e}"),
            }
        }
        let active = self.active_count() > 0;
        if self.any_active && !active {
            tracing::error!("no backend available!");
        }
        self.any_active = active;
    }

    fn set_oper_log(&mut self, slot: usize, ev: Event) {
        let t = self.cfg.thresholds();
        match ev {
            Event::Steady => {}
            Event::Progress => {
                let r = &self.replicas[slot];
                tracing::info!("{}", r.health.progress_line(&r.name, &t));
            }
            Event::Changed(to) => {
                let now = std::time::Instant::now();
                self.replicas[slot].changed(to, now);
                // Write the kernel's view first, so the line below is true.
                self.apply_backends();
                let active = self.active_count();
                let conns = self.conns(slot);
                let r = &self.replicas[slot];
                let line = r.health.change_line(&r.name, active, conns);
                match to {
                    Oper::Down => tracing::warn!("{line}"),
                    Oper::Up => tracing::info!("{line}"),
                }
            }
        }
    }

    fn poll_registrations(&mut self) {
        let changes = match self
            .registry
            .poll(&mut self.loaded.maps, self.replicas.len())
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading replica registrations: {e:#}");
                return;
            }
        };
        for c in changes {
            match c {
                Change::Registered { slot, view } => {
                    let (addr, v6only) = match self.registry.addr_of(view.cookie) {
                        Some((a, v)) => (Some(a), v),
                        None => (registry::find_addr(&self.cfg, slot), None),
                    };
                    tracing::info!(
                        "replica {} registered: {} ({}, via {})",
                        replica_name(slot as usize),
                        show(addr, &self.cfg, slot),
                        registry::family_name(view.family, v6only),
                        registry::how_name(view.how),
                    );
                    let slot = slot as usize;
                    if let Some(r) = self.replicas.get_mut(slot) {
                        r.registered = true;
                        // Down only because its listener was gone: a new
                        // listener is the replica back (the kernel steers to
                        // it from listen() on); checks keep watching.
                        if r.health.oper == Oper::Down && r.down_by_listener {
                            r.down_by_listener = false;
                            r.health.oper = Oper::Up;
                            r.health.count = 0;
                            r.health.last =
                                Some(CheckResult::pass("listener registered", Duration::ZERO));
                            self.set_oper_log(slot, Event::Changed(Oper::Up));
                        }
                    }
                }
                Change::Unregistered { slot, view } => {
                    let known = self.registry.addr_of(view.cookie);
                    tracing::info!(
                        "replica {} unregistered: {} ({}): its listener closed",
                        replica_name(slot as usize),
                        show(known.map(|k| k.0), &self.cfg, slot),
                        registry::family_name(view.family, known.and_then(|k| k.1)),
                    );
                    let slot = slot as usize;
                    if let Some(r) = self.replicas.get_mut(slot) {
                        r.registered = false;
                        r.down_by_listener = true;
                        let ev = r.health.force_down(CheckResult::fail(
                            reason::NO_LISTENER,
                            Some("listener closed".into()),
                            Duration::ZERO,
                        ));
                        self.set_oper_log(slot, ev);
                    }
                }
            }
        }
        // Callers write BACKENDS/STATUS afterwards (state changes above did
        // already, through set_oper_log).
    }

    /// Samples every replica's accept queue; a stalled one goes DOWN.
    fn sample_queues(&mut self) {
        let Ok(listeners) = registry::proc_listeners() else {
            return;
        };
        let now = std::time::Instant::now();
        let stall = Duration::from_millis(self.cfg.check.stall_ms);
        for slot in 0..self.replicas.len() {
            let l = listeners
                .iter()
                .find(|l| registry::slot_for(&self.cfg, l.addr) == Some(slot as u32));
            let r = &mut self.replicas[slot];
            let stalled = match l {
                Some(l) => r.queue.sample(l.queued, l.backlog, now, stall),
                None => {
                    r.queue.clear();
                    false
                }
            };
            let was = r.health.stalled;
            r.health.stalled = stalled;
            if stalled && !was {
                let info = format!("{} queued of {}", r.queue.len, r.queue.max);
                let ev = r.health.force_down(CheckResult::fail(
                    reason::QUEUE_STALLED,
                    Some(info),
                    Duration::ZERO,
                ));
                r.down_by_listener = false;
                self.set_oper_log(slot, ev);
            }
        }
    }

    /// Removes trailing replicas that a reload scaled away once their last
    /// connection has closed.
    fn finish_removals(&mut self) {
        let mut changed = false;
        while let Some(r) = self.replicas.last() {
            let slot = self.replicas.len() - 1;
            if !r.removing || self.conns(slot) > 0 {
                break;
            }
            tracing::info!("backend {} removed: drained", r.name);
            self.replicas.pop();
            self.next_check.pop();
            self.generation.pop();
            changed = true;
        }
        if changed {
            self.write_settings();
            self.apply_backends();
        }
    }

    fn write_settings(&mut self) {
        let n = self.replicas.len() as u16;
        let cfg = self.cfg.clone();
        let maps = self.maps();
        let cookie = maps.settings().map(|s| s.netns_cookie).unwrap_or(0);
        if let Err(e) = maps.set_settings(reconcile::settings(&cfg, cookie, n)) {
            tracing::warn!("updating SETTINGS: {e}");
        }
    }

    fn save(&self) {
        if let Err(e) = Saved::from_replicas(&self.replicas).store(&self.saved_path) {
            tracing::warn!("saving state to {}: {e}", self.saved_path.display());
        }
    }

    fn find(&self, name: &str) -> Result<usize, Response> {
        self.replicas
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| {
                Response::err(format!(
                    "no backend named {name:?}; backends are {}",
                    self.replicas
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Admin { name, state } => {
                let slot = match self.find(&name) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                let Some(admin) = Admin::parse(&state) else {
                    return Response::err(format!(
                        "unknown state {state:?}: use ready, drain or maint"
                    ));
                };
                self.replicas[slot].admin = admin;
                self.apply_backends();
                self.save();
                let line = match admin {
                    Admin::Maint => {
                        format!("backend {name} is going into maintenance (by operator)")
                    }
                    Admin::Drain => format!("backend {name} is set to DRAIN mode (by operator)"),
                    Admin::Ready => format!("backend {name} is READY (by operator)"),
                };
                tracing::info!("{line}. {} active backends.", self.active_count());
                Response::ok(line)
            }
            Request::Weight { name, weight } => {
                let slot = match self.find(&name) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                if !(1..=256).contains(&weight) {
                    return Response::err(format!("weight {weight}: must be 1..=256"));
                }
                self.replicas[slot].weight_override = Some(weight);
                self.apply_backends();
                self.save();
                tracing::info!("backend {name} weight set to {weight} (by operator)");
                Response::ok(format!("backend {name} weight {weight}"))
            }
            Request::Locate { name } => match self.find(&name) {
                Ok(slot) => Response {
                    slot: Some(slot as u32),
                    pin_dir: Some(self.dir.clone()),
                    ..Response::ok("")
                },
                Err(r) => r,
            },
            Request::Reload => match self.reload() {
                Ok(msg) => Response::ok(msg),
                Err(e) => Response::err(e),
            },
        }
    }

    /// Re-reads the configuration; on any error the running one stays.
    fn reload(&mut self) -> Result<String, String> {
        let result = self.try_reload();
        match &result {
            Ok(m) => tracing::info!("configuration reloaded: {m}"),
            Err(e) => tracing::error!("reload failed, keeping the running configuration: {e}"),
        }
        result
    }

    fn try_reload(&mut self) -> Result<String, String> {
        let new = self.source.read().map_err(|e| e.to_string())?;
        if let Some(key) = self.cfg.reload_blocker(&new) {
            return Err(format!(
                "`{key}` cannot change on reload; restart the agent"
            ));
        }
        let old_n = self.replicas.len();
        let new_n = new.replicas as usize;
        let now = std::time::Instant::now();
        // Scale up: new slots (and slots that were draining away come
        // back). Scale down: the slots beyond drain, then go.
        for slot in 0..old_n.min(new_n) {
            self.replicas[slot].removing = false;
        }
        for slot in old_n..new_n {
            let mut r = Replica::new(slot, Oper::Down, now);
            r.down_by_listener = true;
            self.replicas.push(r);
            self.next_check.push(Instant::now());
            self.generation.push(0);
        }
        for slot in new_n..self.replicas.len() {
            if !self.replicas[slot].removing {
                self.replicas[slot].removing = true;
                tracing::info!(
                    "backend {} is draining before removal",
                    self.replicas[slot].name
                );
            }
        }
        let port_changed = self.cfg.port != new.port;
        self.cfg = new;
        set_addresses(&mut self.loaded.maps, &self.cfg).map_err(|e| format!("{e:#}"))?;
        self.write_settings();
        // Registrations of new slots: listeners may already be there.
        let cfg = self.cfg.clone();
        adopt(&cfg, &mut self.registry, &mut self.loaded.maps);
        self.poll_registrations();
        self.apply_backends();
        for g in &mut self.generation {
            *g += 1;
        }
        let t0 = Instant::now();
        for t in &mut self.next_check {
            *t = t0;
        }
        Ok(format!(
            "{} replicas{}",
            new_n,
            if port_changed {
                format!(", balanced port now {}", self.cfg.port)
            } else {
                String::new()
            }
        ))
    }

    fn check_future(
        &self,
        slot: usize,
    ) -> Option<impl std::future::Future<Output = CheckResult> + 'static> {
        let kind = self.cfg.check.kind;
        if kind == CheckKind::None {
            return None;
        }
        let timeout = Duration::from_millis(self.cfg.check.timeout_ms);
        let addr = SocketAddr::new(self.cfg.replica_address, self.cfg.replica_port(slot));
        let stats = self
            .cfg
            .check
            .stats_base_port
            .map(|b| SocketAddr::new(self.cfg.replica_address, b + slot as u16));
        let secret = self.cfg.secret.clone();
        Some(async move {
            let main = match kind {
                CheckKind::Tcp => checks::tcp(addr, timeout).await,
                CheckKind::Mtproxy => mtlb::mtproxy::check(addr, &secret, timeout).await,
                CheckKind::Stats | CheckKind::None => CheckResult::pass("", Duration::ZERO),
            };
            match stats {
                Some(s) if main.ok => {
                    let r = checks::stats(s, timeout).await;
                    if r.ok && kind != CheckKind::Stats {
                        main
                    } else {
                        r
                    }
                }
                _ => main,
            }
        })
    }

    async fn serve(
        &mut self,
        mut sig: Signals,
        control: tokio::net::UnixListener,
    ) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::channel::<ControlMsg>(16);
        tokio::spawn(accept_control(control, tx));
        // Registration itself happens in the kernel at listen(); this only
        // notices it, so 100 ms is plenty.
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        let mut scan = tokio::time::interval(Duration::from_millis(self.cfg.scan_interval_ms));
        let mut expire = tokio::time::interval(Duration::from_millis(250));
        for t in [&mut poll, &mut scan, &mut expire] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut checks: JoinSet<(usize, u64, CheckResult)> = JoinSet::new();
        let mut running = vec![false; MAX_REPLICAS as usize];
        loop {
            let due = self
                .next_check
                .iter()
                .enumerate()
                .filter(|(i, _)| !running[*i])
                .map(|(_, t)| *t)
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = sig.int.recv() => { tracing::info!("SIGINT: stopping"); return Ok(()); }
                _ = sig.term.recv() => { tracing::info!("SIGTERM: stopping"); return Ok(()); }
                _ = sig.hup.recv() => {
                    tracing::info!("SIGHUP: reloading {}", self.source.path.display());
                    let _ = self.reload();
                    mtlb::notify::notify("READY=1");
                }
                Some((req, reply)) = rx.recv() => {
                    let resp = self.handle(req);
                    let _ = reply.send(resp);
                }
                _ = tokio::time::sleep_until(due) => {
                    let now = Instant::now();
                    let due: Vec<usize> = (0..self.next_check.len())
                        .filter(|&slot| !running[slot] && self.next_check[slot] <= now)
                        .collect();
                    for slot in due {
                        match self.check_future(slot) {
                            Some(f) => {
                                running[slot] = true;
                                let g = self.generation[slot];
                                checks.spawn(async move { (slot, g, f.await) });
                            }
                            None => {
                                // No checks: registration alone decides.
                                self.next_check[slot] = now + Duration::from_secs(3600);
                            }
                        }
                    }
                }
                Some(done) = checks.join_next(), if !checks.is_empty() => {
                    let Ok((slot, g, result)) = done else { continue };
                    running[slot] = false;
                    if slot >= self.replicas.len() || self.generation[slot] != g {
                        continue;
                    }
                    let t = self.cfg.thresholds();
                    let r = &mut self.replicas[slot];
                    tracing::debug!(
                        "check {}: {}, reason: {}{}, {}ms",
                        r.name,
                        if result.ok { "passed" } else { "failed" },
                        result.reason,
                        result.info.as_deref().map(|i| format!(", info: \"{i}\"")).unwrap_or_default(),
                        result.duration.as_millis()
                    );
                    if !result.ok {
                        r.check_failures += 1;
                    }
                    let ev = if r.registered || !result.ok {
                        if !result.ok && r.health.oper == Oper::Up {
                            r.down_by_listener = false;
                        }
                        r.health.on_result(result, &t)
                    } else {
                        // Something answers on the port, but no listener is
                        // registered for it: it cannot get traffic anyway.
                        Event::Steady
                    };
                    let next = r.health.interval(&t);
                    self.next_check[slot] = Instant::now() + next;
                    self.set_oper_log(slot, ev);
                    self.apply_backends();
                }
                _ = poll.tick() => {
                    self.poll_registrations();
                    self.sample_queues();
                    self.finish_removals();
                    // Slowstart ramps need rewriting as time passes.
                    self.apply_backends();
                    if let Err(e) = watch_cookies(&mut self.loaded.maps, &mut self.cookies_seen) {
                        tracing::warn!("watching SYN cookies: {e:#}");
                    }
                }
                _ = expire.tick() => {
                    let cutoff = monotonic_ns().saturating_sub(self.cfg.handshake_timeout_ms * 1_000_000);
                    match self.loaded.maps.expire_handshakes(cutoff) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!("{n} handshakes did not complete within {} ms", self.cfg.handshake_timeout_ms),
                        Err(e) => tracing::warn!("expiring handshakes: {e:#}"),
                    }
                }
                _ = scan.tick() => {
                    let cfg = self.cfg.clone();
                    adopt(&cfg, &mut self.registry, &mut self.loaded.maps);
                }
            }
        }
    }
}

/// Accepts control connections; each sends one request line per answer.
async fn accept_control(l: tokio::net::UnixListener, tx: mpsc::Sender<ControlMsg>) {
    while let Ok((s, _)) = l.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match control::parse(&line) {
                    Ok(req) => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send((req, otx)).await.is_err() {
                            return;
                        }
                        match orx.await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                    Err(e) => Response::err(e),
                };
                let mut out = serde_json::to_string(&resp).expect("responses serialize");
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn show(addr: Option<SocketAddr>, cfg: &Config, slot: u32) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| {
        SocketAddr::new(cfg.replica_address, cfg.replica_port(slot as usize)).to_string()
    })
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
