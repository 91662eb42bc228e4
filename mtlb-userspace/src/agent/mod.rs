//! The agent: [`Agent::start`] brings the balancer up (or takes over a
//! running one's pinned state), [`Agent::serve`] runs it until a stop
//! signal, and dropping it tears down what it set up.
//!
//! * [`core`]: every decision, as a pure `step(state, event) -> effects`.
//! * [`effect`]: what goes in (events) and comes out (effects, facts).
//! * [`render`]: facts as journal lines and notifications, in one place.
//! * [`slot`]: one [`slot::Slot`] per replica, its typed state.
//! * [`reconcile`]: state → map contents (SETTINGS, BACKENDS, STATUS).
//! * [`serve`]: the loop that waits for events; [`apply`] carries effects
//!   out; [`listeners`] reads replica listeners from the kernel.
//! * [`heal`]: bounds on the kernel's handshake counts.
//! * [`persist`]: operator choices kept across restarts.
//! * [`locate`]: finding a running agent's pins and control socket.

mod apply;
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

use crate::{
    config::{self, Config, ConfigError, Overrides},
    kernel::{
        loader::{self, Attached, Compat, LoadError, Loaded},
        maps::{Maps, MapsError},
        pins::{self, NetnsLock, PinError},
        registry::Registry,
    },
    system::{mounts, netns},
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Where the configuration comes from, to read it again on reload.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// Named by the operator: a missing file is an error.
    pub explicit: bool,
    pub overrides: Overrides,
}

impl Source {
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
    #[error(transparent)]
    Load(#[from] LoadError),
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
    #[error("{what} {path}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "replica_cgroup {0} is not a cgroup directory (create it and start the replicas in it, or leave the key out)"
    )]
    ReplicaCgroup(PathBuf),
    #[error("reading SO_NETNS_COOKIE (Linux 5.14+)")]
    NetnsCookie(#[source] std::io::Error),
    #[error(transparent)]
    Cookies(#[from] crate::kernel::cookies::WatchError),
    #[error(transparent)]
    State(#[from] persist::PersistError),
}

fn fs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError {
    let path = path.to_owned();
    move |source| StartError::Fs { what, path, source }
}

/// A running agent: holds the namespace lock, the attached programs, the
/// maps and the control socket. Dropping it detaches and unpins (or, with
/// `keep_pins`, leaves steering running from the pins).
pub struct Agent {
    source: Source,
    state: core::State,
    loaded: Loaded,
    registry: Registry,
    /// `None` once torn down.
    attached: Option<Attached>,
    pin_dir: PathBuf,
    keep_pins: bool,
    control_path: PathBuf,
    control: Option<tokio::net::UnixListener>,
    saved_path: PathBuf,
    cookies_seen: Option<crate::kernel::cookies::Observed>,
    /// Per slot, the listener an earlier agent had proven (0: none).
    seeded: Vec<u64>,
    _lock: NetnsLock,
}

/// At takeover: reads each slot as the earlier agent left it; the core
/// decides which listeners keep their clients, and their cookies are
/// written into BACKENDS here, before SETTINGS may require them.
fn seed_verified(maps: &mut Maps, slots: usize) -> Result<Vec<u64>, MapsError> {
    let verifying = maps.settings()?.require_verified != 0;
    let inherited = (0..slots as u32)
        .map(|slot| {
            Ok(effect::Inherited {
                backend: maps.backend(slot)?,
                oper: maps.status(slot)?.oper,
                listener: maps.listener(slot)?.cookie,
            })
        })
        .collect::<Result<Vec<_>, MapsError>>()?;
    let (trusted, writes) = core::inherit(verifying, &inherited);
    for w in writes {
        if let effect::Effect::WriteBackend { slot, backend } = w {
            maps.set_backend(slot, backend)?;
        }
    }
    Ok(trusted)
}

/// What start-up has done so far, undone if it fails part way.
struct Bringup {
    pin_dir: PathBuf,
    /// An earlier agent's pins we took over: on failure, leave them (and
    /// its programs) running.
    took_over: bool,
    /// An earlier agent's pins we could not take over, moved aside: put
    /// back on failure, removed once our programs are attached.
    stale: Option<PathBuf>,
    attached: Option<Attached>,
}

impl Drop for Bringup {
    fn drop(&mut self) {
        let Some(attached) = self.attached.take() else {
            return;
        };
        if self.took_over {
            // The earlier agent's programs are still attached and pinned.
            drop(attached);
            return;
        }
        attached.detach();
        let _ = pins::remove(&self.pin_dir);
        if let Some(old) = &self.stale {
            let _ = std::fs::rename(old, &self.pin_dir);
        }
    }
}

impl Agent {
    /// Loads, attaches and pins everything (taking over an earlier agent's
    /// pinned maps when their shapes match), adopts running replicas, binds
    /// the stats endpoint and the control socket. Must run on a
    /// current-thread runtime in the namespace to balance.
    pub async fn start(cfg: Config, source: Source) -> Result<Self, StartError> {
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
        // Before anything is touched: a cgroup that is not there is a
        // configuration error.
        let replica_cgroup = cfg.replica_cgroup_in(&cgroup);
        if !replica_cgroup.is_dir() {
            return Err(StartError::ReplicaCgroup(replica_cgroup));
        }
        let ino = pins::netns_inode()?;
        let lock = pins::lock(ino)?;
        // Operator choices must not be lost silently: a replica in MAINT
        // coming back READY would take traffic. Unreadable means stop,
        // before anything is attached.
        let saved_path = persist::state_file(&cfg.state_dir, ino);
        let saved = persist::Saved::load(&saved_path)?;
        // Bind the stats endpoint before attaching anything: a port in use
        // is a startup error that leaves nothing behind.
        let stats_addr = SocketAddr::new(cfg.stats_address, cfg.stats_port);
        let stats_listener =
            crate::stats::server::bind(stats_addr).map_err(|source| StartError::Stats {
                addr: stats_addr,
                source,
            })?;
        let dir = pins::pin_dir(&bpffs, ino);
        let mut up = Bringup {
            pin_dir: dir.clone(),
            took_over: false,
            stale: None,
            attached: None,
        };

        // Pins of an earlier agent (killed, or stopped with keep_pins): take
        // its maps over when their shapes match this build, so
        // registrations, counts and socket tags carry on; else move them
        // aside and drop them once our programs are attached. Either way
        // steering never stops.
        let cookie = netns::cookie().map_err(StartError::NetnsCookie)?;
        if pins::has_pins(&dir) {
            // Inode numbers of namespaces are reused: pins under ours may
            // be a dead namespace's. The cookie in their SETTINGS is not
            // reused (for the boot).
            let compat = match loader::pins_compatible(&dir)? {
                Compat::Compatible => match Maps::from_pins(&dir).and_then(|m| m.settings()) {
                    Ok(s) if s.netns_cookie == cookie => Compat::Compatible,
                    Ok(_) => Compat::Incompatible(
                        "they belong to another network namespace that had this inode number"
                            .into(),
                    ),
                    Err(e) => Compat::Incompatible(crate::error::report(&e)),
                },
                other => other,
            };
            match compat {
                Compat::Compatible => {
                    up.took_over = true;
                    tracing::info!(
                        "taking over the pinned state of an earlier agent in {}",
                        dir.display()
                    );
                }
                Compat::Incompatible(why) => {
                    // bpffs refuses names with a dot.
                    let aside = dir.with_file_name(format!("{ino}-old-{}", std::process::id()));
                    std::fs::rename(&dir, &aside)
                        .map_err(fs_err("moving stale pins aside", &dir))?;
                    tracing::warn!(
                        "found pins of an earlier agent in {} that this build cannot take over ({why}); replacing them, counts start from zero",
                        dir.display()
                    );
                    up.stale = Some(aside);
                }
            }
        }
        pins::create_dir(&dir)?;
        up.attached = Some(Attached::new());
        let attached = up.attached.as_mut().expect("set above");

        // Accounting first, so connections steered from the first instant
        // are counted; running replicas adopted before steering starts.
        let mut loaded = loader::load(&dir)?;
        let inp_now = std::time::Instant::now();
        let counts = loaded.maps.counts(cfg.replicas as usize);
        let state = core::State::new(
            cfg.clone(),
            &saved,
            source.path.clone(),
            dir.clone(),
            cookie,
            &effect::Inputs {
                now: inp_now,
                unix_ms: slot::unix_ms(),
                conns: &counts,
            },
        );
        // Listeners the earlier agent trusted keep their clients: their
        // cookies go into BACKENDS before SETTINGS may require them.
        let seeded = if up.took_over {
            seed_verified(&mut loaded.maps, cfg.replicas as usize)?
        } else {
            Vec::new()
        };
        loaded.maps.set_settings(state.settings())?;
        loaded.maps.set_allowed_uids(&cfg.replica_uids)?;
        loaded.maps.set_addresses(&reconcile::addresses(&cfg))?;
        let mut cookies_seen = None;
        crate::kernel::cookies::watch(&mut loaded.maps, &mut cookies_seen)?;
        loaded.attach_accounting(&cgroup, &replica_cgroup, &dir, attached)?;
        let mut registry = Registry::default();
        listeners::adopt(&cfg, &mut registry, &mut loaded.maps);
        loaded.attach_steering(&dir, attached)?;

        if let Some(old) = up.stale.take() {
            pins::remove(&old).map_err(fs_err("removing stale pins", &old))?;
        }
        pins::restrict(&dir).map_err(fs_err("restricting", &dir))?;

        // The stats endpoint reads the maps through their pins, with
        // handles of its own.
        let stats = std::sync::Arc::new(crate::stats::Collector::new(
            Maps::from_pins(&dir)?,
            dir.clone(),
            std::time::Duration::from_millis(cfg.stats_sample_ms),
        )?);
        crate::stats::server::spawn(
            stats_listener,
            stats,
            crate::stats::server::Limits::default(),
        )
        .map_err(|source| StartError::Stats {
            addr: stats_addr,
            source,
        })?;
        tracing::info!(
            "stats on http://{stats_addr}/stats, metrics on http://{stats_addr}/metrics"
        );

        let control_path = crate::control::socket_path(&cfg.control_dir, ino);
        let control =
            crate::control::bind(&control_path).map_err(|source| StartError::Control {
                path: control_path.clone(),
                source,
            })?;

        Ok(Self {
            source,
            state,
            loaded,
            registry,
            attached: up.attached.take(),
            pin_dir: dir,
            keep_pins: cfg.keep_pins,
            control_path,
            control: Some(control),
            saved_path,
            cookies_seen,
            seeded,
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
        let Some(attached) = self.attached.take() else {
            return Ok(());
        };
        render::notify(&effect::Notice::Stopping);
        let _ = std::fs::remove_file(&self.control_path);
        if self.keep_pins {
            attached.keep();
            render::emit(&effect::Fact::KeepingPins {
                dir: self.pin_dir.clone(),
            });
        } else {
            attached.detach();
            pins::remove(&self.pin_dir).map_err(fs_err("removing pins", &self.pin_dir))?;
            render::emit(&effect::Fact::PinsRemoved {
                dir: self.pin_dir.clone(),
            });
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            render::emit(&effect::Fact::TeardownFailed {
                error: crate::error::report(&e),
            });
        }
    }
}
