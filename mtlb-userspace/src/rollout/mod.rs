//! `mtlb rollout`: the replicas restarted by the operator's command, one
//! at a time, with no client refused. Each in turn is drained (new clients
//! go to the others) until its connections close or a grace ends (Telegram
//! clients hold theirs for hours and reconnect when cut, so the restart
//! cuts what is left), restarted, awaited until a new listener of its is
//! UP, and readied. It starts only with two replicas taking clients, goes
//! on to a replica only while another takes clients, and stops at the
//! first failure or signal, leaving the replica it was at in DRAIN.
//!
//! [`plan`] decides from the replicas' states; the rest carries it out
//! through the control socket (DRAIN, READY) and the pinned maps
//! (connection counts, listeners, STATUS).

mod command;
pub mod plan;
mod progress;
mod signals;

use crate::{
    agent::locate::Location,
    checks::health::Admin,
    config::replica_name,
    control::{self, Request},
    error::report,
    kernel::{
        dataplane::{Dataplane, DataplaneError, ReadOnly},
        maps::{Maps, MapsError},
    },
    stats::{snapshot, table},
};
use command::Ended;
use mtlb_common::state::ReplicaState;
use plan::{Before, Reading, Skip};
use progress::Progress;
use signals::Signals;
use std::{
    fmt,
    time::{Duration, Instant},
};

/// What `mtlb rollout` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The restart command, with `{n}` and `{name}` (see
    /// [`plan::command_for`]).
    pub exec: String,
    /// The replicas to restart, by name or number; empty: all.
    pub replicas: Vec<String>,
    /// How long a draining replica's clients have to leave before its
    /// restart cuts them.
    pub grace: Duration,
    /// Most time one command may take.
    pub timeout: Duration,
    /// Most time a restarted replica may take to be UP on a new listener.
    pub up_timeout: Duration,
    /// Say what would be done, change nothing.
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Replicas(String),
    #[error("refusing to start: {0}")]
    Refused(String),
    /// Stopped part way: the message says where, which replica is left in
    /// DRAIN and how to undo it.
    #[error("rollout stopped {0}")]
    Stopped(String),
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("reading the maps")]
    Maps(#[from] MapsError),
}

/// What a rollout did.
#[derive(Debug, Default)]
pub struct Summary {
    pub restarted: Vec<String>,
    pub skipped: Vec<String>,
    /// Connections still open when their replica restarted (left after
    /// the grace).
    pub cut: u64,
    pub took: Duration,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rollout done in {:.1} s: ", self.took.as_secs_f64())?;
        if self.restarted.is_empty() {
            f.write_str("nothing restarted")?;
        } else {
            write!(
                f,
                "restarted {}; {} connections cut by the restarts (left after the grace)",
                self.restarted.join(", "),
                self.cut
            )?;
        }
        if !self.skipped.is_empty() {
            write!(f, "; skipped {}", self.skipped.join(", "))?;
        }
        Ok(())
    }
}

/// Timeout of each control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the maps are read while a replica drains or comes back (the
/// kernel has no event to wait on).
const POLL: Duration = Duration::from_millis(10);

/// Runs the rollout of the agent at `at`; progress goes to stdout, one
/// line per step. On a stop the replicas' table is printed too.
pub async fn run(opts: &Options, at: &Location) -> Result<Summary, RolloutError> {
    let signals = Signals::install().map_err(RolloutError::Signals)?;
    let maps = Dataplane::open_read_only(&at.pin_dir)?;
    let replicas = u32::from(maps.settings()?.replicas);
    let selected = plan::select(&opts.replicas, replicas).map_err(RolloutError::Replicas)?;
    let states = states(&maps, replicas)?;
    if let Some(why) = plan::refusal(&states) {
        return Err(RolloutError::Refused(why));
    }
    let mut r = Rollout {
        opts,
        at,
        replicas,
        progress: Progress::default(),
        signals,
    };
    if !plan::has_placeholder(&opts.exec) {
        r.progress
            .line("note: the command has neither {n} nor {name}: every replica runs it as it is");
    }
    if opts.dry_run {
        r.dry_run(&selected, &states);
        return Ok(Summary::default());
    }
    r.progress.line(&format!(
        "restarting {} one at a time (grace {}, command timeout {}, up-timeout {})",
        names(&selected),
        humantime::format_duration(opts.grace),
        humantime::format_duration(opts.timeout),
        humantime::format_duration(opts.up_timeout),
    ));
    let t0 = Instant::now();
    let mut summary = Summary::default();
    for (i, &slot) in selected.iter().enumerate() {
        let name = replica_name(slot as usize);
        match r.step(slot).await {
            Ok(Step::Restarted { cut }) => {
                summary.restarted.push(name);
                summary.cut += cut;
            }
            Ok(Step::Skipped(skip)) => {
                r.progress.line(&format!("{name}: skipped: {skip}"));
                summary.skipped.push(name);
            }
            Err(stop) => return Err(r.stopped(stop, &summary, &selected[i + 1..])),
        }
    }
    summary.took = t0.elapsed();
    r.progress.line(&summary.to_string());
    Ok(summary)
}

struct Rollout<'a> {
    opts: &'a Options,
    at: &'a Location,
    replicas: u32,
    progress: Progress,
    signals: Signals,
}

enum Step {
    Restarted { cut: u64 },
    Skipped(Skip),
}

/// Why the rollout stopped at a replica.
struct Stop {
    at: String,
    /// The replica is left in DRAIN.
    draining: bool,
    why: String,
}

impl Rollout<'_> {
    /// One replica: drain, restart, wait for it, ready.
    async fn step(&mut self, slot: u32) -> Result<Step, Stop> {
        let name = replica_name(slot as usize);
        let stop = |draining: bool, why: String| Stop {
            at: name.clone(),
            draining,
            why,
        };
        if let Some(sig) = self.signals.pending() {
            return Err(stop(false, format!("interrupted by {sig}")));
        }
        // Opened again for each replica: an agent restarted meanwhile may
        // have made new maps.
        let maps =
            Dataplane::open_read_only(&self.at.pin_dir).map_err(|e| stop(false, report(&e)))?;
        let now = states(&maps, self.replicas).map_err(|e| stop(false, report(&e)))?;
        if let Some(skip) = plan::Skip::of(now[slot as usize]) {
            return Ok(Step::Skipped(skip));
        }
        if !plan::other_taking(&now, slot) {
            return Err(stop(
                false,
                format!("no other replica takes clients ({})", plan::describe(&now)),
            ));
        }
        let before = reading(&maps, slot)
            .map(|r| Before::of(&r))
            .map_err(|e| stop(false, report(&e)))?;
        self.admin(&name, Admin::Drain)
            .map_err(|e| stop(false, format!("draining it: {e}")))?;
        let left = self
            .drain(&maps, slot, &name)
            .await
            .map_err(|why| stop(true, why))?;

        // The others may have gone while it drained: it is still UP, so
        // it takes clients again rather than leaving none.
        let now = states(&maps, self.replicas).map_err(|e| stop(true, report(&e)))?;
        if !plan::other_taking(&now, slot) {
            let why = format!("no other replica takes clients ({})", plan::describe(&now));
            return Err(match self.admin(&name, Admin::Ready) {
                Ok(()) => stop(false, format!("{why}; it is READY again, not restarted")),
                Err(e) => stop(true, format!("{why}; readying it again: {e}")),
            });
        }

        self.restart(slot, &name)
            .await
            .map_err(|why| stop(true, why))?;

        let t = Instant::now();
        self.progress.begin(format!("{name}: new listener"));
        let back = tokio::select! {
            back = wait_back(&maps, slot, &before, self.opts.up_timeout) => back,
            sig = self.signals.recv() => {
                self.progress.finish("interrupted");
                return Err(stop(true, format!("interrupted by {sig} while waiting for its new listener")));
            }
        };
        if let Err(why) = back {
            self.progress.finish("not UP");
            return Err(stop(
                true,
                format!(
                    "no new listener UP within {}: {why}",
                    humantime::format_duration(self.opts.up_timeout)
                ),
            ));
        }
        if let Err(e) = self.admin(&name, Admin::Ready) {
            self.progress.finish("UP, not readied");
            return Err(stop(true, format!("readying it: {e}")));
        }
        self.progress
            .finish(&format!("UP in {:.1} s, ready", t.elapsed().as_secs_f64()));
        Ok(Step::Restarted { cut: left })
    }

    /// Waits until the replica has no connection, or the grace is over;
    /// returns how many are left (the restart cuts them).
    async fn drain(&mut self, maps: &Maps, slot: u32, name: &str) -> Result<u64, String> {
        let t = Instant::now();
        self.progress.begin(format!("{name}: drain"));
        let left = tokio::select! {
            left = drained(maps, slot, self.opts.grace) => left,
            sig = self.signals.recv() => {
                self.progress.finish("interrupted");
                return Err(format!("interrupted by {sig} while it drained"));
            }
        };
        let left = left.map_err(|e| {
            self.progress.finish("failed");
            format!("reading its connections: {}", report(&e))
        })?;
        self.progress.finish(&if left == 0 {
            format!("drained in {:.1} s (0 cut)", t.elapsed().as_secs_f64())
        } else {
            format!(
                "{left} connections left after the {} grace: the restart cuts them",
                humantime::format_duration(self.opts.grace)
            )
        });
        Ok(left)
    }

    /// Runs the restart command for `slot`.
    async fn restart(&mut self, slot: u32, name: &str) -> Result<(), String> {
        let line = plan::command_for(&self.opts.exec, slot);
        let t = Instant::now();
        self.progress.begin(format!("{name}: {line}"));
        let took = || format!("{:.1} s", t.elapsed().as_secs_f64());
        let ended = command::run(&line, self.opts.timeout, &self.progress, &mut self.signals)
            .await
            .map_err(|e| {
                self.progress.finish("not started");
                format!("`{line}` did not start: {e}")
            })?;
        match ended {
            Ended::Exited(s) if s.success() => {
                self.progress.finish(&format!("ok in {}", took()));
                Ok(())
            }
            Ended::Exited(s) => {
                self.progress.finish(&format!("failed in {} ({s})", took()));
                Err(format!("`{line}` failed ({s})"))
            }
            Ended::TimedOut => {
                self.progress.finish("timed out, stopped");
                Err(format!(
                    "`{line}` did not end within {}; it was stopped",
                    humantime::format_duration(self.opts.timeout)
                ))
            }
            Ended::Interrupted(sig) => {
                self.progress.finish("interrupted, stopped");
                Err(format!(
                    "interrupted by {sig} while `{line}` ran; the command was stopped, the replica may be down"
                ))
            }
        }
    }

    /// Sets a replica's admin state through the agent.
    fn admin(&self, name: &str, state: Admin) -> Result<(), String> {
        let req = Request::Admin {
            name: name.to_string(),
            state,
        };
        control::request(&self.at.control_socket, &req, CONTROL_TIMEOUT)
            .map(drop)
            .map_err(|e| report(&e))
    }

    fn dry_run(&self, selected: &[u32], states: &plan::States) {
        self.progress.line("dry run: nothing is changed");
        for &slot in selected {
            let name = replica_name(slot as usize);
            self.progress.line(&match Skip::of(states[slot as usize]) {
                Some(skip) => format!("{name}: would be skipped: {skip}"),
                None => format!(
                    "{name}: would drain (up to {}), run `{}` (up to {}), wait for a new listener UP (up to {}), ready",
                    humantime::format_duration(self.opts.grace),
                    plan::command_for(&self.opts.exec, slot),
                    humantime::format_duration(self.opts.timeout),
                    humantime::format_duration(self.opts.up_timeout),
                ),
            });
        }
    }

    /// Shows the replicas' table and says where the rollout stopped, what
    /// is left in DRAIN and how to undo it, and what it did not reach.
    fn stopped(&self, stop: Stop, done: &Summary, not_reached: &[u32]) -> RolloutError {
        match Dataplane::open_read_only(&self.at.pin_dir).map(|m| table_of(&m, &self.at.pin_dir)) {
            Ok(Ok(t)) => self.progress.line(t.trim_end()),
            Ok(Err(e)) => self.progress.line(&format!("(no table: {})", report(&e))),
            Err(e) => self.progress.line(&format!("(no table: {})", report(&e))),
        }
        let Stop { at, draining, why } = stop;
        let mut msg = if draining {
            format!(
                "at {at}: {why}. {at} is left in DRAIN: `mtlb backend {at} ready` undoes it once it is UP (`mtlb status`)."
            )
        } else {
            format!("before {at}: {why}. {at} is as it was.")
        };
        if !done.restarted.is_empty() {
            msg.push_str(&format!(" Restarted: {}.", done.restarted.join(", ")));
        }
        if !not_reached.is_empty() {
            msg.push_str(&format!(" Not reached: {}.", names(not_reached)));
        }
        RolloutError::Stopped(msg)
    }
}

/// "mtp1, mtp3".
fn names(slots: &[u32]) -> String {
    slots
        .iter()
        .map(|s| replica_name(*s as usize))
        .collect::<Vec<_>>()
        .join(", ")
}

fn states(maps: &Maps, replicas: u32) -> Result<Vec<Option<ReplicaState>>, MapsError> {
    (0..replicas)
        .map(|s| Ok(ReplicaState::read(&maps.status(s)?)))
        .collect()
}

fn reading(maps: &Maps, slot: u32) -> Result<Reading, MapsError> {
    Ok(Reading {
        status: maps.status(slot)?,
        listener: maps.listener(slot)?.cookie,
        verified: maps.backend(slot)?.listener_cookie,
        require_verified: maps.settings()?.require_verified == 1,
    })
}

fn table_of(maps: &ReadOnly, pin_dir: &std::path::Path) -> Result<String, MapsError> {
    Ok(table::render(&snapshot::collect(
        maps,
        pin_dir,
        &snapshot::bytes(maps)?,
    )?))
}

/// The replica's connections once they are 0, or when `grace` is over.
async fn drained(maps: &Maps, slot: u32, grace: Duration) -> Result<u64, MapsError> {
    let deadline = Instant::now() + grace;
    loop {
        let n = maps.conns(slot)?.active();
        if n == 0 || Instant::now() >= deadline {
            return Ok(n);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the replica is back on a new listener ([`plan::back`]);
/// `Err` says what was missing when `limit` ran out.
async fn wait_back(maps: &Maps, slot: u32, before: &Before, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let missing = match reading(maps, slot) {
            Ok(r) => match plan::back(before, &r) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Err(e) => report(&e),
        };
        if Instant::now() >= deadline {
            return Err(missing);
        }
        tokio::time::sleep(POLL).await;
    }
}
