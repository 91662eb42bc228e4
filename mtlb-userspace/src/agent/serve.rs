//! The serve loop: waits for the next event (signal, control request,
//! check result, timer), reads what the core needs from the kernel, steps
//! the core, and carries out its effects. Decisions live in `core.rs`.

use super::{
    Agent,
    core::{self, Effect, Event, Inputs, ListenerChange, QueueReading, Signal},
    slot::unix_ms,
};
use crate::{
    checks::health::CheckResult,
    config::{Config, replica_name},
    control::{self, Request, Response},
    error::report,
    kernel::{
        cookies,
        maps::{Maps, MapsError},
        registry::{self, Change, Refusal, RefuseWhy, Registry},
    },
    system::notify::notify,
};
use mtlb_common::{
    EV_CLOSED, EV_REFUSED_BIND, EV_REFUSED_OWNER, EV_REFUSED_TAKEN, EV_REGISTERED, ListenEvent,
};
use std::{collections::VecDeque, net::SocketAddr, path::Path, time::Duration};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tracing::Level;

/// The agent's signal handlers. Install them before [`Agent::start`]: a
/// signal that arrives while starting is then handled (cleanly) once the
/// loop runs, instead of killing the process with programs attached.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// A control request, where to answer, and (from the connection's task)
/// word that the answer was written, so the agent can stop after answering.
type ControlMsg = (Request, oneshot::Sender<Response>, oneshot::Receiver<()>);
/// A finished check: slot, generation, listener cookie, result.
type CheckDone = (usize, u64, u64, CheckResult);

/// Whether to go on after carrying out a step's effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Agent {
    /// Runs until SIGINT or SIGTERM. Teardown is up to the caller
    /// ([`Agent::shutdown`], or dropping the agent).
    pub async fn serve(&mut self, mut sig: Signals) {
        let listeners = self.poll_listeners().unwrap_or_default();
        let verified = std::mem::take(&mut self.seeded);
        let mut checks: JoinSet<CheckDone> = JoinSet::new();
        self.run(
            Event::Started {
                listeners,
                verified,
            },
            None,
            &mut checks,
        );
        // Listener events from the kernel wake the loop at once (a
        // returning replica is checked the moment it listens); without the
        // ring buffer the 100 ms poll still finds every change.
        let mut events = self
            .loaded
            .maps
            .take_events()
            // SAFETY: the ring buffer owns its fd, and the AsyncFd owns
            // the ring buffer: the fd outlives its registration.
            .and_then(|rb| unsafe { tokio::io::unix::AsyncFd::register(rb) }.ok());
        if events.is_none() {
            tracing::warn!(
                "cannot read listener events; registrations are noticed on the 100 ms poll"
            );
        }

        let (tx, mut rx) = mpsc::channel::<ControlMsg>(16);
        if let Some(l) = self.control.take() {
            tokio::spawn(accept_control(l, tx));
        }
        // Registration itself happens in the kernel at listen(); this only
        // notices it, so 100 ms is plenty.
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        let mut scan_ms = self.state.cfg().scan_interval_ms;
        let mut scan = tokio::time::interval(Duration::from_millis(scan_ms));
        let mut expire = tokio::time::interval(Duration::from_millis(250));
        for t in [&mut poll, &mut scan, &mut expire] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let due = self
                .state
                .next_check_due()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let mut reply = None;
            let mut written = None;
            let ev = tokio::select! {
                _ = sig.int.recv() => Event::Signal(Signal::Interrupt),
                _ = sig.term.recv() => Event::Signal(Signal::Terminate),
                _ = sig.hup.recv() => Event::Signal(Signal::Hangup),
                Some((req, r, w)) = rx.recv() => {
                    reply = Some(r);
                    written = Some(w);
                    Event::Control(req)
                }
                _ = tokio::time::sleep_until(due) => Event::ChecksDue,
                Some(done) = checks.join_next(), if !checks.is_empty() => {
                    let Ok((slot, generation, cookie, result)) = done else { continue };
                    Event::CheckDone { slot, generation, cookie, result }
                }
                Ok(mut guard) = async { events.as_mut().expect("guarded").readable_mut().await }, if events.is_some() => {
                    let mut kinds = Vec::new();
                    while let Some(item) = guard.get_inner_mut().next() {
                        if item.len() >= std::mem::size_of::<ListenEvent>() {
                            // SAFETY: the programs write whole ListenEvents;
                            // read unaligned from the ring's bytes.
                            kinds.push(unsafe {
                                std::ptr::read_unaligned(item.as_ptr().cast::<ListenEvent>())
                            });
                        }
                    }
                    guard.clear_ready();
                    drop(guard);
                    self.on_listen_events(kinds, &mut checks);
                    continue;
                }
                _ = poll.tick() => {
                    if let Some(changes) = self.poll_listeners() {
                        self.run(Event::Listeners(changes), None, &mut checks);
                    }
                    if let Some(samples) = self.sample_queues() {
                        self.run(Event::Queues(samples), None, &mut checks);
                    }
                    Event::Tick
                }
                _ = expire.tick() => Event::ExpiryTick,
                _ = scan.tick() => {
                    tracing::debug!("scanning for replica listeners that did not register");
                    Event::ScanTick
                }
            };
            if self.run(ev, reply, &mut checks) == Flow::Stop {
                // Stopped by a control request (`mtlb remove`): its answer
                // goes out first.
                if let Some(w) = written {
                    let _ = tokio::time::timeout(Duration::from_secs(1), w).await;
                }
                return;
            }
            // A reload may have changed the scan interval.
            if self.state.cfg().scan_interval_ms != scan_ms {
                scan_ms = self.state.cfg().scan_interval_ms;
                scan = tokio::time::interval(Duration::from_millis(scan_ms));
                scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
        }
    }

    /// Steps the core with `ev` and carries out the effects, including
    /// the events some of them produce (a re-read configuration, new
    /// registrations).
    fn run(
        &mut self,
        ev: Event,
        mut reply: Option<oneshot::Sender<Response>>,
        checks: &mut JoinSet<CheckDone>,
    ) -> Flow {
        let mut flow = Flow::Continue;
        // A failed save fails the operator's command that asked for it.
        let mut save_failed: Option<String> = None;
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let conns = self.loaded.maps.counts(self.state.slots().len());
            let inp = Inputs {
                now: std::time::Instant::now(),
                unix_ms: unix_ms(),
                conns: &conns,
            };
            for effect in core::step(&mut self.state, &inp, ev) {
                match effect {
                    Effect::Log(level, line) => emit(level, &line),
                    Effect::WriteBackend { slot, backend } => {
                        if let Err(e) = self.loaded.maps.set_backend(slot, backend) {
                            tracing::warn!("updating BACKENDS[{slot}]: {}", report(&e));
                            self.state.forget_written(slot);
                        }
                    }
                    Effect::WriteStatus { slot, status } => {
                        if let Err(e) = self.loaded.maps.set_status(slot, status) {
                            tracing::warn!("updating STATUS[{slot}]: {}", report(&e));
                            self.state.forget_written(slot);
                        }
                    }
                    Effect::WriteSettings(s) => {
                        if let Err(e) = self.loaded.maps.set_settings(s) {
                            tracing::warn!("updating SETTINGS: {}", report(&e));
                        }
                    }
                    Effect::SetAddresses(a) => {
                        if let Err(e) = self.loaded.maps.set_addresses(&a) {
                            tracing::warn!("updating ADDRESSES: {}", report(&e));
                        }
                    }
                    Effect::Save(saved) => {
                        if let Err(e) = saved.store(&self.saved_path) {
                            let e = report(&e);
                            tracing::error!("saving operator state: {e}");
                            save_failed = Some(e);
                        }
                    }
                    Effect::StartCheck {
                        slot,
                        generation,
                        cookie,
                        spec,
                    } => {
                        checks.spawn(async move {
                            // Its own task: a check that panics is a
                            // failed check, and the slot is checked again.
                            let result = tokio::spawn(spec.run()).await.unwrap_or_else(|e| {
                                CheckResult::fail(
                                    "check crashed",
                                    Some(e.to_string()),
                                    Duration::ZERO,
                                )
                            });
                            (slot, generation, cookie, result)
                        });
                    }
                    Effect::SetAllowedUids(uids) => {
                        if let Err(e) = self.loaded.maps.set_allowed_uids(&uids) {
                            tracing::warn!("updating ALLOWED_UIDS: {}", report(&e));
                        }
                    }
                    Effect::Reply(r) => {
                        let r = match save_failed.take() {
                            Some(e) if r.ok => Response::err(format!(
                                "{}, but it could not be saved ({e}): it holds until the agent restarts",
                                r.message
                            )),
                            _ => r,
                        };
                        if let Some(tx) = reply.take() {
                            let _ = tx.send(r);
                        }
                    }
                    Effect::ReadConfig(origin) => queue.push_back(Event::Reloaded {
                        origin,
                        result: Box::new(self.source.read()),
                    }),
                    Effect::Adopt => {
                        let cfg = self.state.cfg().clone();
                        if adopt(&cfg, &mut self.registry, &mut self.loaded.maps) {
                            // Adopted listeners are noticed (and checked)
                            // now, not on the next poll.
                            if let Some(changes) = self.poll_listeners() {
                                queue.push_back(Event::Listeners(changes));
                            }
                        }
                    }
                    Effect::PollListeners => {
                        if let Some(changes) = self.poll_listeners() {
                            queue.push_back(Event::Listeners(changes));
                        }
                    }
                    Effect::ExpireHandshakes { older_than } => self.heal_handshakes(older_than),
                    Effect::WatchCookies => {
                        if let Err(e) = watch_cookies(&mut self.loaded.maps, &mut self.cookies_seen)
                        {
                            tracing::warn!("watching SYN cookies: {}", report(&e));
                        }
                    }
                    Effect::Notify(s) => notify(&s),
                    Effect::Remove => self.keep_pins = false,
                    Effect::Stop => flow = Flow::Stop,
                }
            }
        }
        flow
    }

    /// Registrations and departures since the last look, with how to show
    /// each listener.
    fn poll_listeners(&mut self) -> Option<Vec<ListenerChange>> {
        let cfg = self.state.cfg();
        let changes = match self
            .registry
            .poll(&mut self.loaded.maps, self.state.slots().len())
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading replica registrations: {}", report(&e));
                return None;
            }
        };
        Some(
            changes
                .into_iter()
                .map(|c| match c {
                    Change::Registered { slot, view } => {
                        let (addr, v6only) = match self.registry.addr_of(view.cookie) {
                            Some((a, v)) => (Some(a), v),
                            None => (registry::find_addr(cfg, slot), None),
                        };
                        ListenerChange::Registered {
                            slot: slot as usize,
                            cookie: view.cookie,
                            desc: format!(
                                "{} ({}, via {})",
                                show(addr, cfg, slot),
                                registry::family_name(view.family, v6only),
                                registry::how_name(view.how),
                            ),
                        }
                    }
                    Change::Unregistered { slot, view } => {
                        let known = self.registry.addr_of(view.cookie);
                        ListenerChange::Closed {
                            slot: slot as usize,
                            cookie: view.cookie,
                            desc: format!(
                                "{} ({})",
                                show(known.map(|k| k.0), cfg, slot),
                                registry::family_name(view.family, known.and_then(|k| k.1)),
                            ),
                        }
                    }
                })
                .collect(),
        )
    }

    /// Listener events from the kernel: registrations and closes are read
    /// from the maps at once; refusals are explained (owner, pid) in the
    /// log.
    fn on_listen_events(&mut self, evs: Vec<ListenEvent>, checks: &mut JoinSet<CheckDone>) {
        let mut changed = false;
        let mut scan = false;
        for ev in evs {
            let why = match ev.kind {
                EV_REGISTERED | EV_CLOSED => {
                    changed = true;
                    continue;
                }
                EV_REFUSED_OWNER => {
                    // Not marked at bind: bound before the agent ran, or by
                    // someone else. The scan tells which (it reads the
                    // owner), adopting the first kind and reporting the
                    // other.
                    scan = true;
                    continue;
                }
                EV_REFUSED_TAKEN => RefuseWhy::Taken,
                EV_REFUSED_BIND => {
                    // The socket never got its port: nothing to look up.
                    // Logged once a minute per slot at most (the kernel
                    // sends one a second at most).
                    let now = std::time::Instant::now();
                    let e = self
                        .refusals_logged
                        .entry(ev.slot)
                        .or_insert((now - Duration::from_secs(3600), 0));
                    if now.duration_since(e.0) < Duration::from_secs(60) {
                        e.1 += 1;
                        continue;
                    }
                    let more = std::mem::take(&mut e.1);
                    e.0 = now;
                    tracing::warn!(
                        "refused a bind to {} ({}'s port) by uid {}: its owner is not in replica_uids {:?}{}",
                        event_addr(&ev),
                        replica_name(ev.slot as usize),
                        ev.refused_uid(),
                        self.state.cfg().replica_uids,
                        if more > 0 {
                            format!(" ({more} more refusals reported since the last line)")
                        } else {
                            String::new()
                        }
                    );
                    continue;
                }
                _ => continue,
            };
            let addr = event_addr(&ev);
            match self.registry.explain(ev.slot, addr, why) {
                Ok(Some(r)) => log_refusal(self.state.cfg(), &r),
                Ok(None) => {}
                Err(e) => tracing::warn!("looking up a refused listener: {}", report(&e)),
            }
        }
        // One scan for however many refusals came in this batch.
        if scan {
            let cfg = self.state.cfg().clone();
            changed |= adopt(&cfg, &mut self.registry, &mut self.loaded.maps);
        }
        if changed && let Some(changes) = self.poll_listeners() {
            self.run(Event::Listeners(changes), None, checks);
        }
    }

    /// Keeps each slot's handshake count within what can still be in
    /// flight (see `heal`): handshakes older than `window` stop counting.
    fn heal_handshakes(&mut self, window: Duration) {
        let slots = self.state.slots().len();
        let totals = (0..slots as u32)
            .map(|s| self.loaded.maps.slot_totals(s).map_or(0, |t| t.assigned))
            .collect();
        // Two samples a window apart and one tick to spare.
        self.assignments.record(
            std::time::Instant::now(),
            totals,
            window + Duration::from_secs(1),
        );
        let known = self.registry.known();
        for slot in 0..slots {
            let most = if known.get(slot).copied().flatten().is_some() {
                self.assignments.within(slot, window)
            } else {
                // No listener, no handshake in flight.
                Some(0)
            };
            if let Some((was, now)) = self
                .loaded
                .maps
                .fix_handshakes(slot as u32, |raw| super::heal::clamp(raw, most))
            {
                tracing::debug!(
                    "{}: {was} handshakes counted, {now} can still be in flight (assigned within {} ms)",
                    replica_name(slot),
                    window.as_millis()
                );
            }
        }
    }

    /// Every slot's accept queue (sock_diag) and what entered it (the
    /// kernel's count).
    fn sample_queues(&self) -> Option<Vec<Option<QueueReading>>> {
        let listeners = registry::listeners().ok()?;
        let known = self.registry.known();
        Some(
            (0..self.state.slots().len())
                .map(|slot| {
                    // The registered socket's queue (by cookie): another
                    // listener on the same port says nothing about it.
                    let cookie = known.get(slot).copied().flatten()?.cookie;
                    listeners
                        .iter()
                        .find(|l| l.cookie == cookie)
                        .map(|l| QueueReading {
                            queued: l.queued,
                            backlog: l.backlog,
                            entered: self
                                .loaded
                                .maps
                                .slot_totals(slot as u32)
                                .map_or(0, |t| t.established),
                        })
                })
                .collect(),
        )
    }
}

/// The local address of a listener event.
fn event_addr(ev: &ListenEvent) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(ev.addr);
    let ip = ip
        .to_ipv4_mapped()
        .filter(|_| ev.family == mtlb_common::AF_INET)
        .map_or(std::net::IpAddr::V6(ip), std::net::IpAddr::V4);
    SocketAddr::new(ip, ev.port)
}

fn emit(level: Level, line: &str) {
    match level {
        Level::ERROR => tracing::error!("{line}"),
        Level::WARN => tracing::warn!("{line}"),
        Level::INFO => tracing::info!("{line}"),
        Level::DEBUG => tracing::debug!("{line}"),
        Level::TRACE => tracing::trace!("{line}"),
    }
}

fn show(addr: Option<SocketAddr>, cfg: &Config, slot: u32) -> String {
    addr.map(|a| a.to_string()).unwrap_or_else(|| {
        SocketAddr::new(cfg.replica_address, cfg.replica_port(slot as usize)).to_string()
    })
}

/// Adopts listeners on replica ports that did not register themselves and
/// whose owner may run replicas; logs the others. True when one was
/// adopted.
pub(super) fn adopt(cfg: &Config, registry: &mut Registry, maps: &mut Maps) -> bool {
    match registry.adopt_missing(cfg, maps) {
        Ok((adopted, refused)) => {
            for a in &adopted {
                tracing::debug!(
                    "adopted {} listener {} from pid {}",
                    replica_name(a.slot as usize),
                    a.addr,
                    a.pid
                );
            }
            for r in &refused {
                log_refusal(cfg, r);
            }
            !adopted.is_empty()
        }
        Err(e) => {
            tracing::warn!("looking for running replicas: {}", report(&e));
            false
        }
    }
}

/// One warning per refused listener, with who owns it.
fn log_refusal(cfg: &Config, r: &Refusal) {
    let who = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    let why = match r.why {
        RefuseWhy::Owner => format!("its owner is not in replica_uids {:?}", cfg.replica_uids),
        RefuseWhy::Taken => "the slot holds a live listener".to_string(),
        RefuseWhy::Cgroup => format!(
            "it was not created in replica_cgroup {}",
            cfg.replica_cgroup.display()
        ),
    };
    tracing::warn!(
        "refused a listener for {} on {} (pid {}, uid {}): {why}; it gets no clients",
        replica_name(r.slot as usize),
        r.addr,
        who(r.pid.map(|p| p.to_string())),
        who(r.uid.map(|u| u.to_string())),
    );
}

/// The control socket, mode 0600 (only root talks to the agent).
pub(super) fn bind_control(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    // We hold the namespace lock: a socket file left here is a dead agent's.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts control connections; each sends one request line per answer.
/// An accept error (out of file descriptors) is logged and waited out: the
/// socket keeps accepting.
async fn accept_control(l: tokio::net::UnixListener, tx: mpsc::Sender<ControlMsg>) {
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control socket: accepting: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (wtx, wrx) = oneshot::channel();
                let resp = match control::parse(&line) {
                    Ok(req) => {
                        let (otx, orx) = oneshot::channel();
                        if tx.send((req, otx, wrx)).await.is_err() {
                            return;
                        }
                        match orx.await {
                            Ok(r) => r,
                            Err(_) => return,
                        }
                    }
                    Err(e) => Response::err(report(&e)),
                };
                let mut out = serde_json::to_string(&resp).expect("responses serialize");
                out.push('\n');
                if w.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                let _ = wtx.send(());
            }
        });
    }
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns().
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[derive(Debug, thiserror::Error)]
pub enum CookieWatchError {
    #[error("reading /proc/net/netstat")]
    Netstat(#[source] std::io::Error),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Turns flow tracking on while the namespace sends SYN cookies (see
/// `kernel::cookies`).
pub(super) fn watch_cookies(
    maps: &mut Maps,
    prev: &mut Option<cookies::Observed>,
) -> Result<(), CookieWatchError> {
    let now = cookies::observe().map_err(CookieWatchError::Netstat)?;
    let mut rt = maps.runtime()?;
    if let Some(until) = cookies::next_deadline(*prev, now, rt.track_flows_until_ns, monotonic_ns())
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
