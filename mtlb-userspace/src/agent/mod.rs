//! The agent: [`Agent::start`] brings the balancer up (or takes over a
//! running one's pinned state), [`Agent::serve`] runs it until a stop
//! signal, and dropping it tears down what it set up.
//!
//! * [`core`]: every decision, as a pure `step(state, event) -> effects`.
//! * [`slot`]: one [`slot::Slot`] per replica, its typed state.
//! * [`reconcile`]: state → map contents (SETTINGS, BACKENDS, STATUS).
//! * [`effect`]: what goes in (events) and comes out (effects, facts).
//! * [`render`]: facts as journal lines and notifications, in one place.
//! * [`serve`]: the loop that waits for events; [`apply`] carries effects
//!   out; [`listeners`] reads replica listeners from the kernel; [`adopt`]
//!   registers replicas that were listening before they could say so.
//! * [`announce`]: whether the host's service addresses are announced.
//! * [`heal`]: bounds on the kernel's handshake counts.
//! * [`persist`]: operator choices kept across restarts.
//! * [`locate`]: finding a running agent's pins and control socket.
//! * [`start_facts`]: what start-up and teardown did, as typed facts.

mod adopt;
pub mod announce;
mod apply;
#[cfg(test)]
mod converge;
pub mod core;
pub mod effect;
pub mod heal;
mod listeners;
pub mod locate;
pub mod persist;
pub mod reconcile;
pub mod render;
pub mod serve;
pub mod slot;
pub mod start_facts;
mod throttle;

use crate::{
    config::{self, Config, ConfigError, Overrides},
    kernel::{
        dataplane::{Dataplane, DataplaneError, Hooks, Place},
        maps::{Maps, MapsError},
        pins::{self, NetnsLock, PinError},
        registry::Registrations,
    },
    system::{mounts, netns},
};
use start_facts::StartFact;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Where the configuration comes from, to read it again on reload.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Named by the operator: a missing file is an error.
    pub explicit: bool,
    pub overrides: Overrides,
}

impl ConfigSource {
    /// `path` as given on the command line: `None` is the default path,
    /// which may be missing; a path given is an error when missing, even
    /// the default one.
    pub fn new(path: Option<PathBuf>, overrides: Overrides) -> Self {
        Self {
            explicit: path.is_some(),
            path: path.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH)),
            overrides,
        }
    }

    /// The file with the flags over it, validated.
    pub fn read(&self) -> Result<Config, ConfigError> {
        let mut cfg = Config::load(&self.path, self.explicit)?;
        cfg.apply(&self.overrides);
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
    #[error(transparent)]
    Pins(#[from] PinError),
    /// Boxed: the largest of these by far.
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    StatsCollector(#[from] crate::stats::CollectorError),
    #[error("binding the stats endpoint {addr} (stats_address, stats_port)")]
    Stats {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "replica_cgroup {0} is not a cgroup directory (create it and start the replicas in it, or leave the key out)"
    )]
    ReplicaCgroup(PathBuf),
    #[error(
        "replica_cgroup {path} is {depth} levels below the cgroup2 root; the bind hook looks {max} levels deep"
    )]
    ReplicaCgroupDepth {
        path: PathBuf,
        depth: usize,
        max: u32,
    },
    #[error("reading SO_NETNS_COOKIE (Linux 5.14+)")]
    NetnsCookie(#[source] std::io::Error),
    #[error(transparent)]
    Cookies(#[from] crate::kernel::cookies::WatchError),
    #[error(transparent)]
    State(#[from] persist::PersistError),
    #[error("{what} (announce.vips, announce.table)")]
    Announce {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl From<DataplaneError> for StartError {
    fn from(e: DataplaneError) -> Self {
        Self::Dataplane(Box::new(e))
    }
}

/// A running agent: holds the namespace lock, the dataplane and the
/// control socket. Dropping it detaches and unpins (or, with `keep_pins`,
/// leaves steering running from the pins).
pub struct Agent {
    source: ConfigSource,
    state: core::State,
    dataplane: Dataplane,
    registry: Registrations,
    keep_pins: bool,
    control_path: PathBuf,
    control: Option<tokio::net::UnixListener>,
    saved_path: PathBuf,
    cookies_seen: Option<crate::kernel::cookies::Observed>,
    /// Failures to find (or write) the listeners' owner pids, told once a
    /// minute.
    owners_failed: throttle::Throttle<()>,
    /// Failed reads (the scans, the polls, the SYN-cookie counter every
    /// tick) and adoptions, told once a minute per kind.
    failures: adopt::Failures,
    /// The replicas' cgroup directory (`None`: the root, every process).
    replica_cgroup_dir: Option<PathBuf>,
    /// Failed writes of the announce table's routes, told once a minute.
    announce_failed: throttle::Throttle<()>,
    /// A scan for the listeners' owners is asked for.
    owners_wanted: bool,
    /// Where the owners the last scan found hold their listeners: what the
    /// periodic look checks again (`registry::owners_again`).
    owner_fds: crate::kernel::registry::OwnerFds,
    /// Checks the agent could not run and the announcement, shared with
    /// the stats endpoint.
    report: std::sync::Arc<crate::stats::AgentReport>,
    /// The announcement as last given to `report`.
    shown: Option<(bool, effect::Why, u64)>,
    /// Per slot, the listener an earlier agent had proven (0: none).
    seeded: Vec<u64>,
    /// Whether teardown has run.
    torn_down: bool,
    _lock: NetnsLock,
}

/// At takeover: reads each slot as the earlier agent left it; the core
/// decides which listeners keep their clients, and their cookies are
/// written into BACKENDS here, before SETTINGS may require them.
fn seed_verified(dataplane: &mut Dataplane, slots: usize) -> Result<Vec<u64>, MapsError> {
    let view = dataplane.takeover_view(slots)?;
    let inherited: Vec<_> = view
        .slots
        .iter()
        .map(|(backend, status, listener)| effect::Inherited {
            backend: *backend,
            oper: status.oper,
            listener: listener.cookie,
        })
        .collect();
    let (trusted, writes) = core::inherit(view.require_verified, &inherited);
    for w in writes {
        if let effect::Effect::WriteBackend { slot, backend } = w {
            dataplane.maps_mut().set_backend(slot, backend)?;
        }
    }
    Ok(trusted)
}

/// Logs the start-up facts gathered so far, in order, as start-up goes:
/// a start that hangs or fails shows how far it got.
fn tell(facts: &mut Vec<StartFact>) {
    for f in facts.drain(..) {
        render::emit(&effect::Fact::Start(f));
    }
}

/// Makes sure bpffs and cgroup2 are mounted. Returns the bpffs to pin in,
/// the cgroup2 root and the replicas' cgroup.
fn mounts(
    cfg: &Config,
    facts: &mut Vec<StartFact>,
) -> Result<(PathBuf, PathBuf, PathBuf), StartError> {
    let bpffs = match mounts::ensure_bpffs(&cfg.bpffs)? {
        mounts::Bpffs::Present => cfg.bpffs.clone(),
        mounts::Bpffs::Host(p) => {
            facts.push(StartFact::BpffsFromHost {
                configured: cfg.bpffs.clone(),
                through: p.clone(),
            });
            p
        }
        mounts::Bpffs::Mounted => {
            facts.push(StartFact::BpffsMounted {
                at: cfg.bpffs.clone(),
                private: mounts::in_private_mount_ns(),
            });
            cfg.bpffs.clone()
        }
    };
    let (cgroup, mounted) = mounts::ensure_cgroup2()?;
    if mounted {
        facts.push(StartFact::Cgroup2Mounted(cgroup.clone()));
    }
    // Before anything is touched: a cgroup that is not there is a
    // configuration error.
    let replica_cgroup = cfg.replica_cgroup_in(&cgroup);
    if !replica_cgroup.is_dir() {
        return Err(StartError::ReplicaCgroup(replica_cgroup));
    }
    Ok((bpffs, cgroup, replica_cgroup))
}

/// The id the bind hooks judge binds to replica ports by: `replica_cgroup`'s
/// (its directory's inode number, as cgroup v2 numbers them), 0 when none is
/// configured (the root: every task is in it).
fn replica_cgroup_id(cfg: &Config, mount: &Path, dir: &Path) -> Result<u64, StartError> {
    use std::os::unix::fs::MetadataExt as _;
    if cfg.replica_cgroup.as_os_str().is_empty() {
        return Ok(0);
    }
    // Relative to this mount; a cgroup namespace's mount starts deeper, so
    // this is the least depth: the hook's own bound is the last word.
    let depth = dir
        .strip_prefix(mount)
        .map_or(0, |r| r.components().count());
    if depth > mtlb_common::MAX_CGROUP_LEVEL as usize {
        return Err(StartError::ReplicaCgroupDepth {
            path: dir.to_owned(),
            depth,
            max: mtlb_common::MAX_CGROUP_LEVEL,
        });
    }
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|_| StartError::ReplicaCgroup(dir.to_owned()))
}

/// The maps as this agent's configuration wants them, before anything is
/// attached (or, after a takeover, before the new programs replace the old).
fn write_settings(
    cfg: &Config,
    state: &core::State,
    maps: &mut Maps,
    replica_cgroup: u64,
    cookies_seen: &mut Option<crate::kernel::cookies::Observed>,
) -> Result<(), StartError> {
    maps.set_settings(state.settings())?;
    maps.set_allowed_uids(&cfg.replica_uids)?;
    maps.set_replica_cgroup(replica_cgroup)?;
    maps.set_addresses(&reconcile::addresses(cfg))?;
    crate::kernel::cookies::watch(maps, cookies_seen)?;
    Ok(())
}

/// Makes the service addresses local and reads whether they are announced
/// (an earlier agent's routes, taken over: `Some(true)` all of them,
/// `Some(false)` none, `None` some); withdraws routes of addresses that
/// are no longer service addresses, and those left in the table of an
/// earlier start's (`earlier`) if `announce.table` changed; takes the
/// addresses an earlier start put on `lo` and the config dropped back
/// off (see `announce::dropped`). Returns the record for the next start.
/// Before anything is attached: a failure here stops the start with no
/// program attached (VIPs added to lo before it stay; they route nothing
/// by themselves).
fn prepare_announce(
    cfg: &Config,
    earlier: Option<&persist::SavedAnnounce>,
    facts: &mut Vec<StartFact>,
) -> Result<(Option<bool>, Option<persist::SavedAnnounce>), StartError> {
    use crate::system::vip;
    let a = &cfg.announce;
    let table_err = |what| move |source| StartError::Announce { what, source };
    let found = vip::announced(a.table).map_err(table_err("reading the announce table"))?;
    let mut was_announced = found.clone();
    if let Some(e) = earlier.filter(|e| e.table != a.table) {
        let old =
            vip::announced(e.table).map_err(table_err("reading the earlier announce table"))?;
        if !old.is_empty() {
            vip::first_failure(vip::write(e.table, &old, false))
                .map_err(table_err("withdrawing from the earlier announce table"))?;
            facts.push(StartFact::OldTableWithdrawn {
                from: e.table,
                to: a.table,
                vips: old.clone(),
            });
            was_announced.extend(old);
        }
    }
    let stray: Vec<_> = found
        .iter()
        .copied()
        .filter(|v| !a.vips.contains(v))
        .collect();
    if !stray.is_empty() {
        vip::first_failure(vip::write(a.table, &stray, false))
            .map_err(table_err("withdrawing a stray route"))?;
        facts.push(StartFact::StrayWithdrawn(stray));
    }
    let (off, kept) = announce::dropped(
        earlier.map_or(&[][..], |e| &e.vips),
        &a.vips,
        &was_announced,
    );
    if !off.is_empty() {
        vip::remove_local(&off).map_err(table_err("taking dropped service addresses off lo"))?;
        facts.push(StartFact::DroppedVipsRemoved(off));
    }
    let mut held = a.vips.clone();
    held.extend(kept.iter().copied());
    let record = (!held.is_empty()).then_some(persist::SavedAnnounce {
        table: a.table,
        vips: held,
    });
    if !kept.is_empty() {
        facts.push(StartFact::DroppedVipsKept(kept));
    }
    if a.vips.is_empty() {
        return Ok((Some(false), record));
    }
    let added =
        vip::ensure_local(&a.vips).map_err(table_err("adding the service addresses to lo"))?;
    if !added.is_empty() {
        facts.push(StartFact::VipsAdded(added));
    }
    let on = vip::among(&a.vips, &found);
    if !on.is_empty() {
        facts.push(StartFact::AnnouncedAtStart(on.clone()));
    }
    let announced = match on.len() {
        0 => Some(false),
        n if n == a.vips.len() => Some(true),
        _ => None,
    };
    Ok((announced, record))
}

/// Serves /stats and /metrics on `listener`. The endpoint reads the maps
/// through their pins, with handles of its own.
fn serve_stats(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    pin_dir: &std::path::Path,
    cfg: &Config,
    report: std::sync::Arc<crate::stats::AgentReport>,
) -> Result<(), StartError> {
    let collector = std::sync::Arc::new(crate::stats::Collector::new(
        Dataplane::open_read_only(pin_dir)?.into_maps(),
        pin_dir.to_owned(),
        std::time::Duration::from_millis(cfg.stats_sample_ms),
        report,
    )?);
    let limits = crate::stats::server::Limits::default();
    crate::stats::server::spawn(listener, collector, limits)
        .map(drop)
        .map_err(|source| StartError::Stats { addr, source })
}

impl Agent {
    /// Loads, attaches and pins everything (taking over an earlier agent's
    /// pinned maps when their shapes match), adopts running replicas, binds
    /// the stats endpoint and the control socket. Must run on a
    /// current-thread runtime in the namespace to balance.
    pub async fn start(cfg: Config, source: ConfigSource) -> Result<Self, StartError> {
        let mut facts = Vec::new();
        let started = Self::bring_up(cfg, source, &mut facts);
        tell(&mut facts);
        started
    }

    fn bring_up(
        cfg: Config,
        source: ConfigSource,
        facts: &mut Vec<StartFact>,
    ) -> Result<Self, StartError> {
        let (bpffs, cgroup, replica_cgroup) = mounts(&cfg, facts)?;
        let replica_cgroup_id = replica_cgroup_id(&cfg, &cgroup, &replica_cgroup)?;
        let ino = pins::netns_inode()?;
        let lock = pins::lock(ino)?;
        // Operator choices must not be lost silently: a replica in MAINT
        // coming back READY would take traffic. Unreadable means stop,
        // before anything is attached.
        let saved_path = persist::state_file(&cfg.state_dir, ino);
        let mut saved = persist::Saved::load(&saved_path)?;
        // Bind the stats endpoint before attaching anything: a port in use
        // is a startup error that leaves nothing behind.
        let stats_addr = SocketAddr::new(cfg.stats_address, cfg.stats_port);
        let stats_listener =
            crate::stats::server::bind(stats_addr).map_err(|source| StartError::Stats {
                addr: stats_addr,
                source,
            })?;

        let (announced, record) = prepare_announce(&cfg, saved.announce.as_ref(), facts)?;
        if saved.announce != record {
            saved.announce = record;
            saved.store(&saved_path)?;
        }

        let cookie = netns::cookie().map_err(StartError::NetnsCookie)?;
        let place = Place {
            bpffs: &bpffs,
            netns_ino: ino,
            netns_cookie: cookie,
        };
        tell(facts);
        let mut dataplane = Dataplane::create_or_take_over(place, facts)?;
        // Told before attaching: adopting running replicas logs as it goes.
        tell(facts);
        let dir = dataplane.pin_dir().to_owned();
        let mut state = core::State::new(
            cfg.clone(),
            &saved,
            source.path.clone(),
            dir.clone(),
            cookie,
            &effect::Inputs {
                now: std::time::Instant::now(),
                unix_ms: slot::unix_ms(),
                // All slots: an earlier agent's beyond ours may hold some.
                conns: &dataplane.maps().counts(mtlb_common::MAX_REPLICAS as usize),
            },
        );
        state.found_announced(announced);
        // Listeners the earlier agent trusted keep their clients: their
        // cookies go into BACKENDS before SETTINGS may require them.
        let seeded = if dataplane.took_over() {
            seed_verified(&mut dataplane, cfg.replicas as usize)?
        } else {
            Vec::new()
        };
        let mut cookies_seen = None;
        write_settings(
            &cfg,
            &state,
            dataplane.maps_mut(),
            replica_cgroup_id,
            &mut cookies_seen,
        )?;
        let mut registry = Registrations::default();
        let mut failures = adopt::Failures::default();
        let hooks = Hooks {
            cgroup_root: &cgroup,
            replica_cgroup: &replica_cgroup,
        };
        dataplane.attach(hooks, facts, |maps| {
            adopt::adopt(&cfg, &mut registry, maps, &mut failures);
        })?;

        let report = std::sync::Arc::new(crate::stats::AgentReport::default());
        serve_stats(stats_listener, stats_addr, &dir, &cfg, report.clone())?;
        facts.push(StartFact::StatsListening(stats_addr));

        let control_path = crate::control::socket_path(&cfg.control_dir, ino);
        let control =
            crate::control::bind(&control_path).map_err(|source| StartError::Control {
                path: control_path.clone(),
                source,
            })?;

        Ok(Self {
            source,
            state,
            dataplane,
            registry,
            keep_pins: cfg.keep_pins,
            control_path,
            control: Some(control),
            saved_path,
            cookies_seen,
            owners_failed: throttle::Throttle::default(),
            failures,
            announce_failed: throttle::Throttle::default(),
            replica_cgroup_dir: (replica_cgroup_id != 0).then_some(replica_cgroup),
            owners_wanted: false,
            owner_fds: Default::default(),
            report,
            shown: None,
            seeded,
            torn_down: false,
            _lock: lock,
        })
    }

    pub fn state(&self) -> &core::State {
        &self.state
    }

    /// Detaches and unpins, or leaves everything attached with
    /// `keep_pins`. Also what dropping does; this one reports errors.
    pub fn shutdown(mut self) -> Result<(), StartError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), StartError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        render::notify(&effect::Notice::Stopping);
        let _ = std::fs::remove_file(&self.control_path);
        // Steering is about to stop: the host must not be announced first
        // (else the router sends clients that nothing steers), and its
        // service addresses are mtlb's. Detaching goes on whatever this
        // does.
        let a = &self.state.cfg().announce;
        // With those an earlier config's start left on lo.
        let vips = persist::held_vips(&a.vips, self.state.operator().announce.as_ref());
        let retired = (!self.keep_pins && !vips.is_empty()).then(|| {
            crate::system::vip::retire(a.table, &vips).map_err(|source| StartError::Announce {
                what: "withdrawing the service addresses",
                source,
            })
        });
        if let Some(Ok(gone)) = &retired {
            render::emit(&effect::Fact::Start(StartFact::VipsRemoved(gone.clone())));
        }
        let facts = self.dataplane.teardown(self.keep_pins)?;
        for f in facts {
            render::emit(&effect::Fact::Start(f.into()));
        }
        retired.transpose().map(drop)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            render::emit(&effect::Fact::Start(StartFact::TeardownFailed(
                crate::error::report(&e),
            )));
        }
    }
}
