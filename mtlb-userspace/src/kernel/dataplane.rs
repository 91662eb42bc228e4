//! The balancer's kernel side as one object: create it (or take over an
//! earlier agent's pins), attach it, open it read-only, tear it down.
//!
//! * [`Dataplane::create_or_take_over`]: the pin directory of this
//!   namespace; an earlier agent's pins are taken over when this build can
//!   (map shapes match and they are this namespace's), else moved aside.
//!   The programs are loaded, nothing is attached yet: the caller writes
//!   the maps first. Pins of namespaces that are gone are swept first
//!   ([`sweep_stale`]).
//! * [`Dataplane::attach`]: accounting and bind hooks, then the caller's
//!   adoption of running replicas, then steering; the stale pins go, the
//!   new ones are restricted.
//! * [`Dataplane::teardown`]: detach and unpin, or leave steering running
//!   from the pins.
//! * [`Dataplane::open_read_only`] and [`Dataplane::unload`]: for `mtlb
//!   status`, the stats endpoint and `mtlb remove`, with or without an
//!   agent.
//!
//! Until `attach` has finished, dropping the dataplane undoes what it did:
//! its own programs are detached and its pins removed, pins moved aside are
//! put back, and taken-over pins (an earlier agent's programs, still
//! steering) are left as they are.

use super::{
    loader::{self, Attached, Compat, LoadError, Loaded},
    maps::{Maps, MapsError},
    pins::{self, PinError},
};
use mtlb_common::{Backend, Listener, Status};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("{what} {path}")]
    Fs {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no mtlb pins for this network namespace in {path} (has `mtlb run` run in this namespace, and was it not removed with `mtlb remove`?)"
    )]
    NoPins {
        path: PathBuf,
        #[source]
        source: Box<MapsError>,
    },
}

fn fs_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.to_owned();
    move |source| DataplaneError::Fs { what, path, source }
}

/// What the dataplane did that the operator is told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// An earlier agent's pins are taken over: registrations, counts and
    /// socket tags carry on.
    TookOver { dir: PathBuf },
    /// An earlier agent's pins could not be taken over; they are replaced.
    ReplacedStale { dir: PathBuf, why: String },
    /// A link pinned by an earlier agent was replaced by ours.
    ReplacedLink { path: PathBuf },
    /// A link could not be unpinned at teardown.
    UnpinFailed { path: PathBuf, error: String },
    /// Teardown with `keep_pins`: the programs stay attached.
    KeepingPins { dir: PathBuf },
    /// Teardown: the programs detached and the pins removed.
    Detached { dir: PathBuf },
    /// The pins of a network namespace that is gone, removed: its
    /// programs on the host's cgroups are detached.
    Swept { dir: PathBuf },
    /// Such pins could not be removed.
    SweepFailed { dir: PathBuf, error: String },
    /// The stop-signal watch could not be attached: replicas are taken out
    /// of rotation when their listener closes, not at the signal.
    NoStopWatch { error: String },
}

/// Where the dataplane lives: the bpffs and the network namespace (its
/// inode names the pin directory; its cookie, unlike the inode, is not
/// reused during the boot).
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub bpffs: &'a Path,
    pub netns_ino: u64,
    pub netns_cookie: u64,
}

/// Where the kernel side, attached by [`Dataplane::attach`], hooks in.
#[derive(Debug, Clone, Copy)]
pub struct Hooks<'a> {
    /// The cgroup2 root: the bind hooks, so no process anywhere binds a
    /// replica port unless allowed.
    pub cgroup_root: &'a Path,
    /// The replicas' cgroup: accounting and registration (sock_ops).
    pub replica_cgroup: &'a Path,
}

/// What an earlier agent left, per slot, for the takeover trust decision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TakeoverView {
    /// Its SETTINGS required verified listeners.
    pub require_verified: bool,
    /// Per slot: BACKENDS, STATUS and LISTENERS entries.
    pub slots: Vec<(Backend, Status, Listener)>,
}

enum Phase {
    /// Loaded, maybe partly attached: dropping undoes it.
    BringingUp {
        /// An earlier agent's pins we could not take over, moved aside:
        /// put back on failure, removed once our programs are attached.
        stale: Option<PathBuf>,
    },
    Up,
}

/// The loaded (and, after [`Dataplane::attach`], attached) balancer of one
/// network namespace.
pub struct Dataplane {
    loaded: Loaded,
    /// `None` once torn down.
    attached: Option<Attached>,
    pin_dir: PathBuf,
    /// An earlier agent's pins were taken over: a failed bring-up leaves
    /// them (and its programs) running.
    took_over: bool,
    phase: Phase,
}

impl Dataplane {
    /// Loads the programs with their maps pinned in this namespace's pin
    /// directory: an earlier agent's (killed, or stopped with `keep_pins`)
    /// taken over when their shapes match this build and they are this
    /// namespace's, so registrations, counts and socket tags carry on;
    /// else moved aside and dropped once our programs are attached. Either
    /// way steering never stops. Nothing is attached yet.
    pub fn create_or_take_over<F: From<Fact>>(
        at: Place<'_>,
        facts: &mut Vec<F>,
    ) -> Result<Self, DataplaneError> {
        let dir = pins::pin_dir(at.bpffs, at.netns_ino);
        if let Some(root) = dir.parent() {
            facts.extend(sweep_stale(root).into_iter().map(F::from));
        }
        let mut took_over = false;
        let mut stale = None;
        if pins::has_pins(&dir) {
            match compatibility(&dir, at.netns_cookie)? {
                Compat::Compatible => {
                    took_over = true;
                    facts.push(Fact::TookOver { dir: dir.clone() }.into());
                }
                Compat::Incompatible(why) => {
                    // bpffs refuses names with a dot.
                    let aside =
                        dir.with_file_name(format!("{}-old-{}", at.netns_ino, std::process::id()));
                    std::fs::rename(&dir, &aside)
                        .map_err(fs_err("moving stale pins aside", &dir))?;
                    facts.push(
                        Fact::ReplacedStale {
                            dir: dir.clone(),
                            why,
                        }
                        .into(),
                    );
                    stale = Some(aside);
                }
            }
        }
        pins::create_dir(&dir)?;
        // From here on a failure unwinds: `PartialLoad` until the object
        // is loaded, then the dataplane itself until attached.
        let mut dp = PartialLoad {
            attached: Some(Attached::new()),
            pin_dir: dir,
            took_over,
            stale,
        };
        let loaded = loader::load(&dp.pin_dir)?;
        Ok(dp.finish(loaded))
    }

    /// Whether an earlier agent's pins were taken over.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn maps(&self) -> &Maps {
        &self.loaded.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.loaded.maps
    }

    /// What the maps hold for the first `slots` slots: after a takeover,
    /// what the earlier agent left.
    pub fn takeover_view(&self, slots: usize) -> Result<TakeoverView, MapsError> {
        let maps = &self.loaded.maps;
        Ok(TakeoverView {
            require_verified: maps.settings()?.require_verified != 0,
            slots: (0..slots as u32)
                .map(|s| Ok((maps.backend(s)?, maps.status(s)?, maps.listener(s)?)))
                .collect::<Result<_, MapsError>>()?,
        })
    }

    /// Attaches accounting first, so connections steered from the first
    /// instant are counted; then `adopt` registers replicas already
    /// running; then steering. The pins moved aside are removed (their
    /// programs detach) and ours restricted to root.
    pub fn attach<F: From<Fact>>(
        &mut self,
        hooks: Hooks<'_>,
        facts: &mut Vec<F>,
        adopt: impl FnOnce(&mut Maps),
    ) -> Result<(), DataplaneError> {
        let attached = self.attached.as_mut().expect("attached before teardown");
        let dir = &self.pin_dir;
        self.loaded
            .attach_accounting(hooks.cgroup_root, hooks.replica_cgroup, dir, attached)?;
        // Not fatal: steering and checks work without it, a stopping
        // replica is then noticed when its listener closes.
        if let Err(e) = self.loaded.attach_signal(dir, attached) {
            facts.push(
                Fact::NoStopWatch {
                    error: crate::error::report(&e),
                }
                .into(),
            );
        }
        adopt(&mut self.loaded.maps);
        self.loaded.attach_steering(dir, attached)?;
        facts.extend(
            attached
                .take_replaced()
                .into_iter()
                .map(|path| Fact::ReplacedLink { path }.into()),
        );
        if let Phase::BringingUp { stale, .. } = &mut self.phase
            && let Some(old) = stale.take()
        {
            pins::remove(&old).map_err(fs_err("removing stale pins", &old))?;
        }
        pins::restrict(dir).map_err(fs_err("restricting", dir))?;
        self.phase = Phase::Up;
        Ok(())
    }

    /// Detaches and unpins, or with `keep` leaves everything attached and
    /// pinned (steering carries on; the next agent takes it over). Once.
    pub fn teardown(&mut self, keep: bool) -> Result<Vec<Fact>, DataplaneError> {
        let Some(attached) = self.attached.take() else {
            return Ok(Vec::new());
        };
        let dir = self.pin_dir.clone();
        if keep {
            attached.keep();
            return Ok(vec![Fact::KeepingPins { dir }]);
        }
        let mut facts = unpin_failures(attached.detach());
        pins::remove(&dir).map_err(fs_err("removing pins", &dir))?;
        facts.push(Fact::Detached { dir });
        Ok(facts)
    }

    /// The maps pinned in `pin_dir`, with handles of their own, read-only
    /// (no method that writes is reachable through the result).
    pub fn open_read_only(pin_dir: &Path) -> Result<ReadOnly, DataplaneError> {
        Maps::from_pins(pin_dir)
            .map(ReadOnly)
            .map_err(|source| DataplaneError::NoPins {
                path: pin_dir.to_owned(),
                source: Box::new(source),
            })
    }

    /// Removes the pins in `pin_dir` without an agent: unpinning the links
    /// detaches the programs. `Ok(false)`: nothing was pinned there. The
    /// caller holds the namespace's lock.
    pub fn unload(pin_dir: &Path) -> Result<bool, DataplaneError> {
        if !pin_dir.exists() {
            return Ok(false);
        }
        pins::remove(pin_dir).map_err(fs_err("removing", pin_dir))?;
        Ok(true)
    }
}

/// Removes the pin directories under `root` (`<bpffs>/mtlb`) of network
/// namespaces that are gone: their sock_ops and bind programs, attached to
/// the host's cgroups, would otherwise run for every socket of the host for
/// good. A directory is swept only when its sk_lookup link reports itself
/// detached (the kernel detaches a namespace's links when it is
/// dismantled; a live namespace's link always names it) and no agent holds
/// the lock of that inode (an agent starting in a namespace that reused
/// the number; the calling agent holds its own). One without that link (an
/// agent starting, or pins moved aside) is left alone.
pub fn sweep_stale(root: &Path) -> Vec<Fact> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut facts = Vec::new();
    for e in entries.flatten() {
        let Some(ino) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let dir = e.path();
        let link = dir.join(pins::names::LINK_SK_LOOKUP);
        if !matches!(super::sys::pinned_netns_link_ino(&link), Ok(0)) {
            continue;
        }
        let Ok(_lock) = pins::lock(ino) else {
            continue;
        };
        facts.push(match pins::remove(&dir) {
            Ok(()) => Fact::Swept { dir },
            Err(e) => Fact::SweepFailed {
                dir,
                error: e.to_string(),
            },
        });
    }
    facts
}

/// The maps of a dataplane opened from its pins, for reading.
pub struct ReadOnly(Maps);

impl ReadOnly {
    /// The handles themselves, for a reader that keeps them (the stats
    /// endpoint).
    pub fn into_maps(self) -> Maps {
        self.0
    }
}

impl std::ops::Deref for ReadOnly {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        &self.0
    }
}

fn unpin_failures(failed: Vec<(PathBuf, String)>) -> Vec<Fact> {
    failed
        .into_iter()
        .map(|(path, error)| Fact::UnpinFailed { path, error })
        .collect()
}

/// Whether the pins in `dir` can be taken over: this build's shapes, and
/// this namespace's. Inode numbers of namespaces are reused: pins under
/// ours may be a dead namespace's; the cookie in their SETTINGS is not
/// reused (for the boot).
fn compatibility(dir: &Path, netns_cookie: u64) -> Result<Compat, LoadError> {
    Ok(match loader::pins_compatible(dir)? {
        Compat::Compatible => match Maps::from_pins(dir).and_then(|m| m.settings()) {
            Ok(s) if s.netns_cookie == netns_cookie => Compat::Compatible,
            Ok(_) => Compat::Incompatible(
                "they belong to another network namespace that had this inode number".into(),
            ),
            Err(e) => Compat::Incompatible(crate::error::report(&e)),
        },
        other => other,
    })
}

/// The pin directory exists and may hold our pins, the object is not
/// loaded yet: dropped on a failed load, it undoes the same as a
/// dataplane still bringing up.
struct PartialLoad {
    attached: Option<Attached>,
    pin_dir: PathBuf,
    took_over: bool,
    stale: Option<PathBuf>,
}

impl PartialLoad {
    fn finish(&mut self, loaded: Loaded) -> Dataplane {
        Dataplane {
            loaded,
            attached: self.attached.take(),
            pin_dir: self.pin_dir.clone(),
            took_over: self.took_over,
            phase: Phase::BringingUp {
                stale: self.stale.take(),
            },
        }
    }
}

impl Drop for PartialLoad {
    fn drop(&mut self) {
        if let Some(attached) = self.attached.take() {
            unwind(
                attached,
                &self.pin_dir,
                self.took_over,
                self.stale.as_deref(),
            );
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        let Phase::BringingUp { stale } = &self.phase else {
            // Up: the owner tears down (or keeps) with `teardown`.
            return;
        };
        if let Some(attached) = self.attached.take() {
            unwind(attached, &self.pin_dir, self.took_over, stale.as_deref());
        }
    }
}

/// Undoes a bring-up that failed part way.
fn unwind(attached: Attached, pin_dir: &Path, took_over: bool, stale: Option<&Path>) {
    if took_over {
        // The earlier agent's programs are still attached and pinned.
        drop(attached);
        return;
    }
    // Nobody to tell: the start-up error is what the operator sees.
    let _ = attached.detach();
    let _ = pins::remove(pin_dir);
    if let Some(old) = stale {
        let _ = std::fs::rename(old, pin_dir);
    }
}
