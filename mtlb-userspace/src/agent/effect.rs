//! What goes into the core and what comes out of it: [`Event`]s (things
//! that happened, read by the shell) and [`Effect`]s (what to do about
//! them). Log lines and systemd notifications are typed here, as [`Fact`]s
//! and [`Notice`]s; `render.rs` turns them into text.

pub use super::announce::Why;
use super::persist::Saved;
pub use super::slot::StopMark;
use crate::{
    checks::{
        CheckSpec,
        health::{Admin, CheckResult, LocalFault, Oper, OperState},
    },
    config::{Algorithm, CheckKind, Config, ConfigError},
    control::{Request, Response},
    kernel::registry::RefuseWhy,
};
use mtlb_common::{Backend, Settings, Status};
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

/// What the serve loop read just before the step: the clocks and each
/// slot's connection count (established + handshakes, from the kernel).
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub now: Instant,
    /// Wall clock, for STATUS (read by other processes).
    pub unix_ms: u64,
    /// Indexed by slot; missing slots count as 0.
    pub conns: &'a [u64],
}

impl Inputs<'_> {
    pub(super) fn conns(&self, slot: usize) -> u64 {
        self.conns.get(slot).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
    Hangup,
}

/// Who asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Signal,
    Control,
}

/// The listener registered in a slot, as the kernel's maps show it, with
/// how to show it: `desc` when it registers ("127.0.0.1:10001 (IPv4, via
/// listen hook)"), `short` when it goes ("127.0.0.1:10001 (IPv4)").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub cookie: u64,
    pub desc: String,
    pub short: String,
}

/// Every slot's registration as read from the maps, indexed by slot (the
/// slots in use when it was read). The core compares it with what it
/// knows, so a slot it forgot (scaled away and back) learns its listener
/// again from the next reading.
pub type Registrations = Vec<Option<Registration>>;

/// One accept-queue sample of a slot's listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueReading {
    pub queued: u32,
    pub backlog: u32,
    /// Connections steered to it that reached its queue, so far (the
    /// kernel's count).
    pub entered: u64,
}

/// One slot as an earlier agent left it in the maps, read at takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inherited {
    pub backend: Backend,
    /// STATUS oper state (`mtlb_common::STATE_UP`, …).
    pub oper: u32,
    /// Cookie of the listener registered in the slot (0: none).
    pub listener: u64,
}

/// Why the bind hook refused a bind to a replica port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindWhy {
    /// Its uid is not in `replica_uids`.
    Owner,
    /// It ran outside `replica_cgroup`, in the cgroup with this id (and
    /// this path under the cgroup2 mount, when found).
    Cgroup { id: u64, path: Option<PathBuf> },
}

#[derive(Debug)]
pub enum Event {
    /// Programs attached, state taken over; `listeners` are the
    /// registrations found at start, `verified` the listener cookie each
    /// slot's BACKENDS entry held (an earlier agent's proven listeners).
    Started {
        listeners: Registrations,
        verified: Vec<u64>,
    },
    Signal(Signal),
    Control(Request),
    /// The configuration file was read again (after [`Effect::ReadConfig`]).
    Reloaded {
        origin: Origin,
        result: Box<Result<Config, ConfigError>>,
    },
    /// The operator state was written (after [`Effect::Save`]), or not.
    Saved {
        error: Option<String>,
    },
    /// The earliest `State::next_check_due` has passed.
    ChecksDue,
    CheckDone {
        slot: usize,
        generation: u64,
        /// The listener the check was launched for.
        cookie: u64,
        result: CheckResult,
    },
    /// The registrations read now.
    Listeners(Registrations),
    /// Accept-queue samples, indexed by slot (`None`: no listener seen).
    Queues(Vec<Option<QueueReading>>),
    /// Time passed (a tenth of a second): drained slots can go, slowstart
    /// ramps move, the SYN-cookie counter may have moved.
    Elapsed,
    /// The kernel's assignment totals per slot (SLOT_TOTALS.assigned) and
    /// whether each slot has a registered listener: what bounds the
    /// handshakes still in flight.
    Assigned {
        totals: Vec<u64>,
        listening: Vec<bool>,
    },
    /// The stop marks the kernel holds now, indexed by slot (`None`: no
    /// mark), read at a stop event or on the poll.
    StopMarks(Vec<Option<StopMark>>),
    /// `replica_cgroup` (the directory at `path`) is another cgroup than
    /// the one the kernel's hooks were set up with (id `was`, now `now`).
    ReplicaCgroupRecreated {
        path: PathBuf,
        was: u64,
        now: u64,
    },
    /// The kernel refused a bind to a replica port (the socket never got
    /// the port): a uid not in `replica_uids`, or a task outside
    /// `replica_cgroup`.
    BindRefused {
        slot: u32,
        addr: SocketAddr,
        uid: u32,
        why: BindWhy,
    },
}

/// A systemd notification (sd_notify(3)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Up and steering `port`.
    Ready {
        port: u16,
    },
    /// A reload asked by signal is done.
    Reloaded,
    Stopping,
}

/// A map the shell failed to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Backend(u32),
    Status(u32),
    Settings,
    Addresses,
    AllowedUids,
    Stopping(u32),
    OwnerPids,
    /// The announce table's routes.
    Announcement,
}

/// What happened that an operator reads in the journal: one line each,
/// rendered by `render::line`.
#[derive(Debug, Clone, PartialEq)]
pub enum Fact {
    /// What this agent steers (at start).
    Steering {
        port: u16,
        addresses: Vec<IpAddr>,
        replicas: u16,
        replica_address: IpAddr,
        algorithm: Algorithm,
        kind: CheckKind,
        pin_dir: PathBuf,
    },
    AnyReplicaOwner,
    NothingListening {
        replica_address: IpAddr,
        first_port: u16,
        last_port: u16,
    },
    Registered {
        slot: usize,
        desc: String,
    },
    Unregistered {
        slot: usize,
        desc: String,
    },
    /// A check result (debug).
    Checked {
        name: String,
        result: CheckResult,
    },
    /// A check moved the counter toward a change ("UP 1/3").
    Progress {
        name: String,
        result: CheckResult,
        state: OperState,
    },
    /// UP or DOWN, with what caused it and what is left.
    Changed {
        name: String,
        to: Oper,
        result: CheckResult,
        active: usize,
        conns: u64,
    },
    NoBackend,
    StallKept {
        name: String,
        queued: u32,
        backlog: u32,
    },
    AdminSet {
        name: String,
        admin: Admin,
        active: usize,
    },
    WeightSet {
        name: String,
        weight: u32,
    },
    RemovingByOperator,
    SaveFailed {
        error: String,
    },
    Reloading {
        path: PathBuf,
    },
    Reloaded {
        replicas: u16,
        port: Option<u16>,
    },
    ReloadFailed {
        error: String,
    },
    Draining {
        name: String,
    },
    Removed {
        name: String,
    },
    Stopping(Signal),
    BindRefused {
        slot: u32,
        addr: SocketAddr,
        uid: u32,
        why: BindWhy,
        replica_uids: Vec<u32>,
        replica_cgroup: PathBuf,
        /// Refusals not logged since the last line.
        more: u64,
    },
    /// Start-up with `replica_cgroup`: who may bind replica ports, and
    /// where sock_ops runs.
    ReplicaOwners {
        replica_uids: Option<Vec<u32>>,
        replica_cgroup: PathBuf,
    },
    /// A listener on a replica port that gets no clients.
    ListenerRefused {
        slot: u32,
        addr: SocketAddr,
        pid: Option<i32>,
        uid: Option<u32>,
        why: RefuseWhy,
        replica_uids: Vec<u32>,
        replica_cgroup: PathBuf,
    },
    Adopted {
        slot: u32,
        addr: SocketAddr,
        pid: i32,
    },
    Scanning,
    HandshakesBounded {
        slot: usize,
        was: i64,
        now: u64,
        window: Duration,
    },
    SynCookies {
        sent: u64,
    },
    NoListenEvents,
    WriteFailed {
        what: Written,
        error: String,
    },
    /// Reading something from the kernel failed; `what` says what.
    ReadFailed {
        what: Reading,
        error: String,
    },
    /// Checks the agent could not run for a shortage of its own (`checks`
    /// of them since the last line, the last with `error`).
    ChecksNotRun {
        fault: LocalFault,
        error: String,
        checks: u64,
    },
    /// A replica told to stop still listens after the grace: checked again.
    StopGraceOver {
        name: String,
        pid: u32,
        signal: u32,
        grace: Duration,
    },
    /// Finding the owners of the replica listeners failed (or their table
    /// is full): stop signals to them are not seen.
    OwnersUnknown {
        error: String,
    },
    /// Accepting a control connection failed (out of file descriptors).
    ControlAcceptFailed {
        error: String,
    },
    /// Adopting a running replica's listener failed.
    AdoptFailed {
        error: String,
    },
    /// `replica_cgroup` was made again: the agent stops so that the service
    /// manager starts it again on the new cgroup.
    ReplicaCgroupRecreated {
        path: PathBuf,
        was: u64,
        now: u64,
    },
    /// The host's service addresses announced or withdrawn.
    Announced {
        vips: Vec<IpAddr>,
        announce: bool,
        why: Why,
        rise: Duration,
        fall: Duration,
    },
    /// The operator drained the host, or made it ready.
    HostSet {
        drained: bool,
    },
    /// What bringing the agent up or down did.
    Start(super::start_facts::StartFact),
}

/// What the shell failed to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reading {
    Registrations,
    RefusedListener,
    RunningReplicas,
    SynCookies,
    StopMarks,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Say(Fact),
    WriteBackend {
        slot: u32,
        backend: Backend,
    },
    WriteStatus {
        slot: u32,
        status: Status,
    },
    WriteSettings(Settings),
    SetAddresses(Vec<[u8; 16]>),
    SetAllowedUids(Vec<u32>),
    /// Store the operator state and step [`Event::Saved`].
    Save(Saved),
    StartCheck {
        slot: usize,
        generation: u64,
        cookie: u64,
        spec: CheckSpec,
    },
    /// The answer to the control request being handled.
    Reply(Response),
    /// Read the configuration again and step [`Event::Reloaded`].
    ReadConfig(Origin),
    /// Detach and unpin on the way out, whatever `keep_pins` says.
    Remove,
    /// Adopt listeners on replica ports that are not registered.
    Adopt,
    /// Read the registrations now and step [`Event::Listeners`].
    PollListeners,
    /// At most `most` handshakes of `slot` can still be in flight (`None`:
    /// no bound known, only never below zero): clamp its count.
    BoundHandshakes {
        slot: usize,
        most: Option<u64>,
        window: Duration,
    },
    /// Look at the SYN-cookie counter and track flows while it moves.
    WatchCookies,
    /// Record a stop mark as handled: clear it when it still marks `clear`,
    /// add `queued` to the slot's stranded connections.
    SettleStop {
        slot: u32,
        clear: Option<u64>,
        queued: u64,
    },
    /// Find the processes holding the registered listeners again (for the
    /// stop-signal watch).
    FindOwners,
    /// Announce the service addresses (their routes into `table`) or
    /// withdraw them.
    Announce {
        vips: Vec<IpAddr>,
        table: u32,
        announce: bool,
    },
    /// A check the agent could not run, for `mtlb_agent_check_errors_total`.
    CountLocalFault(LocalFault),
    Notify(Notice),
    Stop,
}
