//! The agent's decisions, as a pure function: [`step`] takes the state and
//! one [`Event`] (a signal, a control request, a check result, a listener
//! registered or closed, an accept-queue sample, time passing, a reloaded
//! configuration) and returns the [`Effect`]s to carry out (map writes,
//! checks to launch, facts to log, replies). No I/O happens here: the serve
//! loop (`serve.rs`) reads the kernel and the clock, and `apply.rs` carries
//! the effects out. Everything here is unit-tested without root.

use super::{
    announce::{Announcement, Change},
    effect::{
        BindWhy, Effect, Event, Fact, Inherited, Inputs, Notice, Origin, QueueReading,
        Registration, Registrations, Signal, StopMark,
    },
    heal::Assignments,
    persist::Saved,
    reconcile, render,
    slot::{CheckSchedule, Slot},
    throttle::Throttle,
};
use crate::{
    checks::{
        CheckSpec,
        health::{Admin, CheckResult, DownCause, LocalFault, Oper, Thresholds, Transition},
        reason,
    },
    config::WEIGHTS,
    config::{Config, ConfigError},
    control::{Request, Response},
};
use mtlb_common::{MAX_REPLICAS, Settings, state::ListenerState};
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

fn say(out: &mut Vec<Effect>, f: Fact) {
    out.push(Effect::Say(f));
}

/// At takeover: per slot, the listener the earlier agent let take clients
/// (enabled, UP by its checks, its cookie verified, or any listener when it
/// verified none), and the BACKENDS writes that make the kernel keep
/// steering to it under this agent's settings. A replica it had DOWN is
/// not trusted.
pub fn inherit(verifying: bool, slots: &[Inherited]) -> (Vec<u64>, Vec<Effect>) {
    let mut trusted = Vec::with_capacity(slots.len());
    let mut out = Vec::new();
    for (slot, s) in slots.iter().enumerate() {
        let b = s.backend;
        let ok = b.enabled != 0
            && s.oper == mtlb_common::STATE_UP
            && s.listener != 0
            && (!verifying || b.listener_cookie == s.listener);
        let cookie = if ok { s.listener } else { 0 };
        if b.listener_cookie != cookie {
            out.push(Effect::WriteBackend {
                slot: slot as u32,
                backend: mtlb_common::Backend {
                    listener_cookie: cookie,
                    ..b
                },
            });
        }
        trusted.push(cookie);
    }
    (trusted, out)
}

/// The agent's state: the configuration and one [`Slot`] per replica
/// (more than configured while scaled-away replicas drain).
#[derive(Debug)]
pub struct State {
    cfg: Config,
    /// For log lines and `Locate` answers.
    config_path: PathBuf,
    pin_dir: PathBuf,
    netns_cookie: u64,
    slots: Vec<Slot>,
    /// Whether some replica took connections at the last write, to say
    /// "no backend available!" once when the last one goes (not at start:
    /// replicas found then are checked before they take connections).
    any_active: bool,
    /// Source of check generations, never reused.
    generations: u64,
    /// The answer to an operator's change, sent once its saving is done.
    awaiting_save: Option<Response>,
    /// Refused binds, told once a minute per slot.
    refusals_logged: Throttle<u32>,
    /// Checks the agent could not run, told once a minute per kind.
    faults_logged: Throttle<LocalFault>,
    /// Assignments over time: the upper bound of handshakes in flight.
    assignments: Assignments,
    /// The operator's choices (admin state, weight) by replica name, as
    /// saved: a slot takes them when it is created, so a replica scaled
    /// away and back keeps its DRAIN, as a restart would.
    operator: Saved,
    /// Whether the service addresses are announced, and why.
    announcement: Announcement,
    /// Set once steering runs (at `Started`): the host is announced only
    /// while its agent steers.
    steering: bool,
    /// The last announcement change told, so a write retried after a
    /// failure is not told again.
    announce_told: Option<Change>,
    /// The reply awaiting its save is `mtlb host`'s: it says what the
    /// routes' write did.
    awaiting_host: bool,
}

impl State {
    pub fn new(
        cfg: Config,
        saved: &Saved,
        config_path: PathBuf,
        pin_dir: PathBuf,
        netns_cookie: u64,
        inp: &Inputs,
    ) -> Self {
        let n = cfg.replicas as usize;
        let inter = Duration::from_millis(cfg.check.inter_ms);
        let mut st = Self {
            cfg,
            config_path,
            pin_dir,
            netns_cookie,
            slots: Vec::with_capacity(n),
            any_active: false,
            generations: 0,
            awaiting_save: None,
            refusals_logged: Throttle::default(),
            faults_logged: Throttle::default(),
            assignments: Assignments::default(),
            operator: saved.clone(),
            announcement: Announcement::new(Some(false)),
            steering: false,
            announce_told: None,
            awaiting_host: false,
        };
        for i in 0..n {
            // Spread the first checks over one interval.
            let next = inp.now + inter.mul_f64(i as f64 / n as f64);
            let s = st.new_slot(i, next, inp);
            st.slots.push(s);
        }
        // An earlier agent's replicas beyond ours that still hold
        // connections drain and go, as after a reload that scaled them
        // away: their counts stay in use until then.
        let held = (n..MAX_REPLICAS as usize).rev().find(|&i| inp.conns(i) > 0);
        for i in held.map_or(n..n, |last| n..last + 1) {
            let mut s = st.new_slot(i, inp.now, inp);
            s.removing = true;
            st.slots.push(s);
        }
        st
    }

    fn new_slot(&mut self, i: usize, next: Instant, inp: &Inputs) -> Slot {
        let generation = self.next_generation();
        let mut s = Slot::new(
            i,
            inp.now,
            inp.unix_ms,
            CheckSchedule {
                next,
                generation,
                running: None,
            },
        );
        self.operator.apply(&mut s);
        s
    }

    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// When the next check is due (none while every slot has one running,
    /// or with `kind = "none"`).
    pub fn next_check_due(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| s.check.running.is_none())
            .map(|s| s.check.next)
            .min()
    }

    /// A map write for `slot` failed: write it again next time.
    pub fn forget_written(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.written_backend = None;
            s.written_status = None;
        }
    }

    pub fn settings(&self) -> Settings {
        reconcile::settings(&self.cfg, self.netns_cookie, self.slots.len() as u16)
    }

    fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| s.active()).count()
    }

    /// BACKENDS/STATUS writes for what changed, and the "no backend
    /// available!" line when the last active replica goes.
    fn apply(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        reconcile::slots(&self.cfg, &mut self.slots, inp.now, out);
        let active = self.active_count() > 0;
        if self.any_active && !active {
            say(out, Fact::NoBackend);
        }
        self.any_active = active;
    }

    fn save(&self, out: &mut Vec<Effect>) {
        out.push(Effect::Save(self.operator.clone()));
    }

    /// What the kernel held at start: the service addresses announced by
    /// an earlier agent (taken over as they stand) or not.
    pub fn found_announced(&mut self, announced: Option<bool>) {
        self.announcement = Announcement::new(announced);
    }

    pub fn announcement(&self) -> &Announcement {
        &self.announcement
    }

    /// Writing the announcement failed, maybe part way: rewritten whole a
    /// second later.
    pub fn announce_failed(&mut self, now: Instant) {
        self.announcement.failed(now);
    }

    /// Announces or withdraws the service addresses when the host's
    /// ability to serve (or the operator's drain) says so.
    fn announce(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        if !self.steering {
            return;
        }
        let a = &self.cfg.announce;
        let up = self.active_count() as u16;
        let Some(change) = self
            .announcement
            .decide(a, inp.now, up, self.operator.host_drained)
        else {
            return;
        };
        out.push(Effect::Announce {
            vips: a.vips.clone(),
            table: a.table,
            announce: change.announce,
        });
        if self.announce_told.replace(change) == Some(change) {
            return;
        }
        say(
            out,
            Fact::Announced {
                vips: a.vips.clone(),
                announce: change.announce,
                why: change.why,
                rise: Duration::from_millis(a.rise_ms),
                fall: Duration::from_millis(a.fall_ms),
            },
        );
    }

    /// `mtlb host drain|ready`, or only the question.
    fn host(&mut self, drain: Option<bool>, out: &mut Vec<Effect>) -> Result<Response, Response> {
        if self.cfg.announce.vips.is_empty() {
            return Err(Response::err(
                "no service addresses to announce: set [announce] vips in the config",
            ));
        }
        let Some(drain) = drain else {
            return Ok(Response::ok(render::announcement(
                &self.cfg.announce,
                &self.announcement,
            )));
        };
        if self.operator.host_drained != drain {
            self.operator.host_drained = drain;
            self.save(out);
            say(out, Fact::HostSet { drained: drain });
            // Answered once saved, by then with what the write did.
            self.awaiting_host = true;
        }
        Ok(Response::ok(render::host_set(drain, &self.cfg.announce)))
    }

    /// The operator's choices as saved (and as the live slots hold them).
    pub fn operator(&self) -> &Saved {
        &self.operator
    }

    /// Logs what a health event did; a state change is written to the
    /// kernel before its line, so the line is true when read.
    fn health_event(&mut self, slot: usize, ev: Transition, inp: &Inputs, out: &mut Vec<Effect>) {
        let t = Thresholds::of(&self.cfg);
        let last = |s: &Slot| s.health.last().cloned().expect("a check ran");
        match ev {
            Transition::Steady => {}
            Transition::Progress => {
                let s = &self.slots[slot];
                say(
                    out,
                    Fact::Progress {
                        name: s.name.clone(),
                        result: last(s),
                        state: s.health.state(&t),
                    },
                );
            }
            Transition::Changed(to) => {
                if to == Oper::Up {
                    // Its workers have been forked by now: the stop-signal
                    // watch learns their pids.
                    out.push(Effect::FindOwners);
                }
                self.slots[slot].changed(to, inp.now, inp.unix_ms);
                self.apply(inp, out);
                let active = self.active_count();
                let s = &self.slots[slot];
                say(
                    out,
                    Fact::Changed {
                        name: s.name.clone(),
                        to,
                        result: last(s),
                        active,
                        conns: inp.conns(slot),
                    },
                );
            }
        }
    }

    fn summary(&self) -> Fact {
        let cfg = &self.cfg;
        Fact::Steering {
            port: cfg.port,
            addresses: cfg.addresses.clone(),
            replicas: cfg.replicas,
            replica_address: cfg.replica_address,
            algorithm: cfg.algorithm,
            kind: cfg.check.kind,
            pin_dir: self.pin_dir.clone(),
        }
    }

    fn started(
        &mut self,
        listeners: Registrations,
        verified: Vec<u64>,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        say(out, self.summary());
        if self.cfg.any_replica_owner {
            say(out, Fact::AnyReplicaOwner);
        }
        if !self.cfg.replica_cgroup.as_os_str().is_empty() {
            say(
                out,
                Fact::ReplicaOwners {
                    replica_uids: (!self.cfg.any_replica_owner)
                        .then(|| self.cfg.replica_uids.clone()),
                    replica_cgroup: self.cfg.replica_cgroup.clone(),
                },
            );
        }
        for s in self.slots.iter().filter(|s| s.removing) {
            say(
                out,
                Fact::Draining {
                    name: s.name.clone(),
                },
            );
        }
        // Listeners an earlier agent proved keep their clients across the
        // restart.
        for (s, v) in self.slots.iter_mut().zip(verified) {
            s.verified = v;
        }
        self.listeners(listeners, inp, out);
        if self
            .slots
            .iter()
            .all(|s| s.listener() == ListenerState::Missing)
        {
            let c = &self.cfg;
            say(
                out,
                Fact::NothingListening {
                    replica_address: c.replica_address,
                    first_port: c.base_port,
                    last_port: c.base_port + c.replicas - 1,
                },
            );
        }
        self.apply(inp, out);
        // Slots an earlier agent may have used beyond ours.
        reconcile::clear(self.slots.len()..MAX_REPLICAS as usize, out);
        self.steering = true;
        // Taking over an announced host: listeners an earlier agent had not
        // proven count as down until their first check, so no withdrawal
        // before that could come.
        if self.announcement.announced() {
            let c = &self.cfg.check;
            self.announcement
                .grace(inp.now + Duration::from_millis(c.timeout_ms + c.inter_ms));
        }
        out.push(Effect::Notify(Notice::Ready {
            port: self.cfg.port,
        }));
    }

    /// Compares the registrations read from the maps with what each slot
    /// knows: a listener that left is unregistered, a new one registered.
    /// A slot the core has forgotten (scaled away and back) learns its
    /// listener again here, whatever the shell saw before.
    fn listeners(&mut self, now: Registrations, inp: &Inputs, out: &mut Vec<Effect>) {
        for (slot, reg) in now.into_iter().enumerate().take(self.slots.len()) {
            let known = self.slots[slot].listener_cookie;
            if reg.as_ref().map_or(0, |r| r.cookie) == known {
                continue;
            }
            if known != 0 {
                self.listener_closed(slot, inp, out);
            }
            if let Some(r) = reg {
                self.listener_registered(slot, r, inp, out);
            }
        }
        self.apply(inp, out);
    }

    fn listener_registered(
        &mut self,
        slot: usize,
        reg: Registration,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        let verify = reconcile::verifies(&self.cfg);
        say(
            out,
            Fact::Registered {
                slot,
                desc: reg.desc,
            },
        );
        out.push(Effect::FindOwners);
        let s = &mut self.slots[slot];
        s.listener_cookie = reg.cookie;
        s.listener_desc = reg.short;
        if !verify || s.verified == reg.cookie {
            // Checks off (registration alone decides), or a listener
            // already proven (taken over).
            let ev = s.health.listener_back(CheckResult::pass(
                reason::LISTENER_REGISTERED,
                Duration::ZERO,
            ));
            self.health_event(slot, ev, inp, out);
        } else {
            // It gets clients once a check passes: check now.
            self.check_now(slot, out);
        }
    }

    fn listener_closed(&mut self, slot: usize, inp: &Inputs, out: &mut Vec<Effect>) {
        let s = &mut self.slots[slot];
        say(
            out,
            Fact::Unregistered {
                slot,
                desc: std::mem::take(&mut s.listener_desc),
            },
        );
        if s.verified == s.listener_cookie {
            s.verified = 0;
        }
        s.listener_cookie = 0;
        self.stop_done(slot, out);
        out.push(Effect::FindOwners);
        let s = &mut self.slots[slot];
        let ev = s.health.force_down(
            DownCause::Listener,
            CheckResult::fail(
                reason::NO_LISTENER,
                Some("listener closed".into()),
                Duration::ZERO,
            ),
        );
        self.health_event(slot, ev, inp, out);
        // A replica that listened while this one still held the slot (a
        // quick restart) may take it now.
        out.push(Effect::Adopt);
    }

    /// Launches a check of `slot` now, under a new generation: results of
    /// checks launched before (of an earlier listener) are dropped.
    fn check_now(&mut self, slot: usize, out: &mut Vec<Effect>) {
        let g = self.next_generation();
        let s = &mut self.slots[slot];
        s.check.generation = g;
        match CheckSpec::for_slot(&self.cfg, slot) {
            Some(spec) => {
                s.check.running = Some(g);
                out.push(Effect::StartCheck {
                    slot,
                    generation: g,
                    cookie: s.listener_cookie,
                    spec,
                });
            }
            None => s.check.running = None,
        }
    }

    fn queues(&mut self, samples: Vec<Option<QueueReading>>, inp: &Inputs, out: &mut Vec<Effect>) {
        let stall = Duration::from_millis(self.cfg.check.stall_ms);
        let mut newly = Vec::new();
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let stalled = match samples.get(slot).copied().flatten() {
                Some(q) => s
                    .queue
                    .sample(q.queued, q.backlog, q.entered, inp.now, stall),
                None => {
                    s.queue.clear();
                    false
                }
            };
            if !stalled {
                s.health.set_stalled(false, String::new());
                s.stall_kept = false;
            } else if !s.health.stalled() {
                newly.push(slot);
            }
        }
        if newly.is_empty() {
            return;
        }
        // Queue evidence alone never takes the last replicas taking
        // connections down: when all are slow, steering to the least
        // loaded beats refusing everyone.
        let others = (0..self.slots.len())
            .filter(|i| !newly.contains(i) && self.slots[*i].active())
            .count();
        for slot in newly {
            let s = &mut self.slots[slot];
            if others == 0 && s.active() {
                if !s.stall_kept {
                    s.stall_kept = true;
                    say(
                        out,
                        Fact::StallKept {
                            name: s.name.clone(),
                            queued: s.queue.len,
                            backlog: s.queue.max,
                        },
                    );
                }
                continue;
            }
            let info = render::queue_info(s.queue.len, s.queue.max);
            let ev = s.health.set_stalled(true, info);
            self.health_event(slot, ev, inp, out);
        }
    }

    fn checks_due(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.check.running.is_some() || s.check.next > inp.now {
                continue;
            }
            if s.stopping.is_some() {
                // Its grace (or its listener closing) decides; checked
                // again after.
                s.check.next = inp.now + Duration::from_millis(self.cfg.check.inter_ms);
                continue;
            }
            match CheckSpec::for_slot(&self.cfg, i) {
                Some(spec) => {
                    s.check.running = Some(s.check.generation);
                    out.push(Effect::StartCheck {
                        slot: i,
                        generation: s.check.generation,
                        cookie: s.listener_cookie,
                        spec,
                    });
                }
                // No checks: registration alone decides.
                None => s.check.next = inp.now + Duration::from_secs(3600),
            }
        }
    }

    fn check_done(
        &mut self,
        slot: usize,
        generation: u64,
        cookie: u64,
        result: CheckResult,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        let verify = reconcile::verifies(&self.cfg);
        let t = Thresholds::of(&self.cfg);
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.check.running == Some(generation) {
            s.check.running = None;
        }
        if s.check.generation != generation {
            // Launched before a reload (or for a slot since removed).
            return;
        }
        if s.stopping.is_some() {
            return;
        }
        if let Some(fault) = result.local {
            // The agent could not run it: the replica keeps its state and
            // is checked again at its usual interval.
            s.check.next = inp.now + s.health.interval(&t);
            self.local_fault(fault, result, inp, out);
            return;
        }
        say(
            out,
            Fact::Checked {
                name: s.name.clone(),
                result: result.clone(),
            },
        );
        if !result.ok {
            s.check_failures += 1;
        }
        let registered = s.listener() == ListenerState::Registered;
        // A check of the registered listener, which no check has proven yet.
        let of_unproven =
            verify && registered && cookie == s.listener_cookie && s.verified != cookie;
        let proves = of_unproven && result.ok;
        let fails_proof =
            of_unproven && !result.ok && s.health.down_cause() == Some(DownCause::Listener);
        let ev = if fails_proof {
            s.health.not_proven(result)
        } else if proves {
            // The first passing check of a new listener: from now on the
            // kernel may steer to it; UP at once if only its listener was
            // missing.
            s.verified = cookie;
            match s.health.down_cause() {
                Some(DownCause::Listener) => s.health.listener_back(result),
                _ => s.health.on_result(result, &t),
            }
        } else if registered || !result.ok {
            s.health.on_result(result, &t)
        } else {
            // Something answers on the port, but no listener is registered
            // for it: it cannot get traffic anyway.
            Transition::Steady
        };
        s.check.next = inp.now + s.health.interval(&t);
        self.health_event(slot, ev, inp, out);
        self.apply(inp, out);
    }

    /// Removes trailing slots that a reload scaled away once their last
    /// connection has closed.
    fn finish_removals(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        let before = self.slots.len();
        while let Some(s) = self.slots.last() {
            let slot = self.slots.len() - 1;
            if !s.removing || inp.conns(slot) > 0 {
                break;
            }
            say(
                out,
                Fact::Removed {
                    name: s.name.clone(),
                },
            );
            self.slots.pop();
        }
        if self.slots.len() != before {
            out.push(Effect::WriteSettings(self.settings()));
            reconcile::clear(self.slots.len()..before, out);
        }
    }

    fn find(&self, name: &str) -> Result<usize, Response> {
        self.slots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                Response::err(format!(
                    "no backend named {name:?}; backends are {}",
                    self.slots
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Whether `name` is `mtp<N>` for a slot past the ones in use.
    fn beyond_slots(&self, name: &str) -> bool {
        name.strip_prefix("mtp")
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n > self.slots.len() && n <= MAX_REPLICAS as usize)
    }

    fn control(&mut self, req: Request, inp: &Inputs, out: &mut Vec<Effect>) {
        let reply = match req {
            Request::Admin { name, state } => self.set_admin(&name, state, inp, out),
            Request::Weight { name, weight } => self.set_weight(&name, weight, inp, out),
            Request::Locate { name } => match self.find(&name) {
                Ok(slot) => Ok(Response {
                    slot: Some(slot as u32),
                    pin_dir: Some(self.pin_dir.clone()),
                    ..Response::ok("")
                }),
                // A replica a reload scaled away is gone once drained.
                Err(_) if self.beyond_slots(&name) => Ok(Response::ok(format!(
                    "{name} is not configured (scaled away, or never was): nothing to drain"
                ))),
                Err(e) => Err(e),
            },
            Request::Host { drain } => self.host(drain, out),
            Request::Reload => {
                // The reply comes with Event::Reloaded.
                out.push(Effect::ReadConfig(Origin::Control));
                return;
            }
            Request::Remove => {
                say(out, Fact::RemovingByOperator);
                out.push(Effect::Reply(Response::ok(format!(
                    "detaching and removing {}",
                    self.pin_dir.display()
                ))));
                out.push(Effect::Remove);
                out.push(Effect::Stop);
                return;
            }
        };
        match reply {
            // Answered once saving is done: a change that is not saved
            // does not hold past a restart, and the operator must know.
            Ok(r) if out.iter().any(|e| matches!(e, Effect::Save(_))) => {
                self.awaiting_save = Some(r)
            }
            r => out.push(Effect::Reply(r.unwrap_or_else(|e| e))),
        }
    }

    /// The operator state was saved, or not: answer the change that asked
    /// for it.
    fn saved(&mut self, error: Option<String>, out: &mut Vec<Effect>) {
        let mut reply = self.awaiting_save.take();
        if std::mem::take(&mut self.awaiting_host) && self.announcement.pending() {
            reply = reply.map(|r| {
                Response::err(format!(
                    "{}, but writing the routes failed (see the journal): retried every second",
                    r.message
                ))
            });
        }
        let reply = match (error, reply) {
            (None, r) => r,
            (Some(e), r) => {
                say(out, Fact::SaveFailed { error: e.clone() });
                r.map(|r| {
                    Response::err(format!(
                        "{}, but it could not be saved ({e}): it holds until the agent restarts",
                        r.message
                    ))
                })
            }
        };
        if let Some(r) = reply {
            out.push(Effect::Reply(r));
        }
    }

    fn set_admin(
        &mut self,
        name: &str,
        admin: Admin,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) -> Result<Response, Response> {
        let slot = match self.find(name) {
            Ok(slot) => slot,
            // Scaled away with a choice saved: the operator may clear it
            // (anything else waits until the replica is configured, so a
            // mistyped name is an error).
            Err(_) if admin == Admin::Ready && self.operator.backends.contains_key(name) => {
                self.operator.set_admin(name, admin);
                self.save(out);
                return Ok(Response::ok(format!(
                    "{name} is not configured; its saved choices are cleared"
                )));
            }
            Err(e) => return Err(e),
        };
        self.slots[slot].admin = admin;
        self.operator.set_admin(name, admin);
        self.apply(inp, out);
        self.save(out);
        say(
            out,
            Fact::AdminSet {
                name: name.to_string(),
                admin,
                active: self.active_count(),
            },
        );
        Ok(Response::ok(render::admin_set(name, admin)))
    }

    fn set_weight(
        &mut self,
        name: &str,
        weight: u32,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) -> Result<Response, Response> {
        if !WEIGHTS.contains(&weight) {
            return Err(Response::err(format!(
                "weight {weight}: must be {}..={}",
                WEIGHTS.start(),
                WEIGHTS.end()
            )));
        }
        let slot = self.find(name)?;
        self.slots[slot].weight_override = Some(weight);
        self.operator.set_weight(name, weight);
        self.apply(inp, out);
        self.save(out);
        say(
            out,
            Fact::WeightSet {
                name: name.to_string(),
                weight,
            },
        );
        Ok(Response::ok(format!("backend {name} weight {weight}")))
    }

    fn reloaded(
        &mut self,
        origin: Origin,
        result: Result<Config, ConfigError>,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        let result = result
            .map_err(|e| crate::error::report(&e))
            .and_then(|new| match self.cfg.reload_blocker(&new) {
                Some(key) => Err(format!(
                    "`{key}` cannot change on reload; restart the agent"
                )),
                None => Ok(new),
            })
            .map(|new| self.apply_config(new, inp, out));
        match &result {
            Ok((replicas, port)) => say(
                out,
                Fact::Reloaded {
                    replicas: *replicas,
                    port: *port,
                },
            ),
            Err(e) => say(out, Fact::ReloadFailed { error: e.clone() }),
        }
        match origin {
            Origin::Control => out.push(Effect::Reply(match result {
                Ok((replicas, port)) => Response::ok(render::reloaded(replicas, port)),
                Err(e) => Response::err(e),
            })),
            Origin::Signal => out.push(Effect::Notify(Notice::Reloaded)),
        }
    }

    /// Takes a valid configuration that may change on reload. Scale up: new
    /// slots (and slots that were draining away come back). Scale down: the
    /// slots beyond drain, then go.
    /// Returns the replicas now, and the balanced port if it changed.
    fn apply_config(
        &mut self,
        new: Config,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) -> (u16, Option<u16>) {
        let old_n = self.slots.len();
        let new_n = new.replicas as usize;
        for s in self.slots.iter_mut().take(new_n) {
            s.removing = false;
        }
        for s in self.slots.iter_mut().skip(new_n) {
            if !s.removing {
                s.removing = true;
                say(
                    out,
                    Fact::Draining {
                        name: s.name.clone(),
                    },
                );
            }
        }
        let port_changed = self.cfg.port != new.port;
        if reconcile::verifies(&new) && !reconcile::verifies(&self.cfg) {
            // Checks turned on: the listeners taking clients now are
            // trusted as proven, so nothing is cut while they are checked.
            for s in &mut self.slots {
                if s.active() {
                    s.verified = s.listener_cookie;
                }
            }
        }
        self.cfg = new;
        for i in old_n..new_n {
            let s = self.new_slot(i, inp.now, inp);
            self.slots.push(s);
        }
        // Checks start over under the new settings; results of checks
        // launched before are dropped.
        for i in 0..self.slots.len() {
            let g = self.next_generation();
            let c = &mut self.slots[i].check;
            c.generation = g;
            c.next = inp.now;
        }
        // BACKENDS first (new slots, verified cookies), then what reads
        // them: SETTINGS must not require a cookie not written yet.
        self.apply(inp, out);
        out.push(Effect::SetAddresses(reconcile::addresses(&self.cfg)));
        out.push(Effect::SetAllowedUids(self.cfg.replica_uids.clone()));
        out.push(Effect::WriteSettings(self.settings()));
        // Listeners of new slots may be there already.
        out.push(Effect::Adopt);
        out.push(Effect::PollListeners);
        (self.cfg.replicas, port_changed.then_some(self.cfg.port))
    }

    /// A refused bind, logged once a minute per slot at most (the kernel
    /// reports one a second at most), with how many were not.
    fn bind_refused(
        &mut self,
        slot: u32,
        addr: std::net::SocketAddr,
        uid: u32,
        why: BindWhy,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        let Some(more) = self.refusals_logged.event(slot, inp.now) else {
            return;
        };
        say(
            out,
            Fact::BindRefused {
                slot,
                addr,
                uid,
                why,
                replica_uids: self.cfg.replica_uids.clone(),
                replica_cgroup: self.cfg.replica_cgroup.clone(),
                more,
            },
        );
    }

    /// A check the agent could not run: counted, and told once a minute
    /// per kind with how many since.
    fn local_fault(
        &mut self,
        fault: LocalFault,
        result: CheckResult,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        out.push(Effect::CountLocalFault(fault));
        let Some(untold) = self.faults_logged.event(fault, inp.now) else {
            return;
        };
        say(
            out,
            Fact::ChecksNotRun {
                fault,
                error: result.info.unwrap_or_default(),
                checks: untold + 1,
            },
        );
    }

    /// Handshakes older than the handshake timeout no longer count (see
    /// `heal`): per slot, how many can still be in flight.
    fn assigned(
        &mut self,
        totals: Vec<u64>,
        listening: Vec<bool>,
        inp: &Inputs,
        out: &mut Vec<Effect>,
    ) {
        let window = Duration::from_millis(self.cfg.handshake_timeout_ms);
        // Two samples a window apart and one tick to spare.
        self.assignments
            .record(inp.now, totals, window + Duration::from_secs(1));
        for slot in 0..self.slots.len() {
            let most = if listening.get(slot).copied().unwrap_or(false) {
                self.assignments.within(slot, window)
            } else {
                // No listener, no handshake in flight.
                Some(0)
            };
            out.push(Effect::BoundHandshakes { slot, most, window });
        }
    }
}

// Replicas told to stop. The kernel marks a slot the instant a process
// holding its listener is sent a stop signal (and steers around it from
// then on); here the agent takes the mark in: the replica is DOWN with
// the reason, its checks wait, and the mark ends with its listener (the
// process exited: a new listener is checked as any other) or with the
// grace (the process ignored the signal: checked again as usual).
impl State {
    /// The kernel's stop marks, read now: a new mark of a slot's listener
    /// takes the replica DOWN ("stopping (SIGTERM to pid P)").
    fn stop_marks(&mut self, marks: Vec<Option<StopMark>>, inp: &Inputs, out: &mut Vec<Effect>) {
        for slot in 0..self.slots.len() {
            let Some(m) = marks.get(slot).copied().flatten() else {
                continue;
            };
            let s = &mut self.slots[slot];
            if s.stop_seen == (m.cookie, m.at_ns) {
                continue;
            }
            if s.listener_cookie == 0 || m.cookie != s.listener_cookie {
                // A mark of a listener this slot does not hold: one that
                // closed (its next listener is never skipped for it, and
                // `stop_done` tidied it if it was ours), or one registered
                // since the registrations were read, taken in on the next
                // reading.
                continue;
            }
            s.stop_seen = (m.cookie, m.at_ns);
            s.stopping = Some((m, inp.now));
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: None,
                queued: m.queued.unwrap_or(0) as u64,
            });
            let why = format!(
                "{} ({} to pid {})",
                reason::STOPPING,
                render::stop_signal_name(m.signal),
                m.pid
            );
            // What waits in its accept queue was accepted by the kernel
            // before the signal: no balancer can move it.
            let info = m
                .queued
                .filter(|q| *q > 0)
                .map(|q| format!("{q} connections were in its accept queue"));
            let ev = s.health.force_down(
                DownCause::Stopping,
                CheckResult::fail(why, info, Duration::ZERO),
            );
            // A check in flight was launched before the signal: its result
            // says nothing now.
            let g = self.next_generation();
            let s = &mut self.slots[slot];
            s.check.generation = g;
            s.check.running = None;
            self.health_event(slot, ev, inp, out);
        }
        self.apply(inp, out);
    }

    /// Stop marks whose grace is over with their listener still there:
    /// lifted, and the replica checked as usual (UP again after `rise`
    /// passing checks; at once when checks are off).
    fn stop_graces(&mut self, inp: &Inputs, out: &mut Vec<Effect>) {
        let grace = Duration::from_millis(self.cfg.stop_grace_ms);
        let verify = reconcile::verifies(&self.cfg);
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let Some((m, since)) = s.stopping else {
                continue;
            };
            if inp.now.duration_since(since) < grace {
                continue;
            }
            s.stopping = None;
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: Some(m.cookie),
                queued: 0,
            });
            say(
                out,
                Fact::StopGraceOver {
                    name: s.name.clone(),
                    pid: m.pid,
                    signal: m.signal,
                    grace,
                },
            );
            s.health.stop_lifted();
            if verify {
                self.check_now(slot, out);
            } else {
                let ev = s.health.listener_back(CheckResult::pass(
                    reason::LISTENER_REGISTERED,
                    Duration::ZERO,
                ));
                self.health_event(slot, ev, inp, out);
            }
        }
        self.apply(inp, out);
    }

    /// The listener of a stopping slot closed: the mark has done its job.
    fn stop_done(&mut self, slot: usize, out: &mut Vec<Effect>) {
        if let Some((m, _)) = self.slots[slot].stopping.take() {
            out.push(Effect::SettleStop {
                slot: slot as u32,
                clear: Some(m.cookie),
                queued: 0,
            });
        }
    }
}

/// Handles one event: updates `state`, returns what to do.
pub fn step(state: &mut State, inp: &Inputs, ev: Event) -> Vec<Effect> {
    let mut out = Vec::new();
    match ev {
        Event::Started {
            listeners,
            verified,
        } => state.started(listeners, verified, inp, &mut out),
        Event::Signal(s @ (Signal::Interrupt | Signal::Terminate)) => {
            say(&mut out, Fact::Stopping(s));
            out.push(Effect::Stop);
        }
        Event::Signal(Signal::Hangup) => {
            say(
                &mut out,
                Fact::Reloading {
                    path: state.config_path.clone(),
                },
            );
            out.push(Effect::ReadConfig(Origin::Signal));
        }
        Event::Control(req) => state.control(req, inp, &mut out),
        Event::Reloaded { origin, result } => state.reloaded(origin, *result, inp, &mut out),
        Event::Saved { error } => state.saved(error, &mut out),
        Event::ChecksDue => state.checks_due(inp, &mut out),
        Event::CheckDone {
            slot,
            generation,
            cookie,
            result,
        } => state.check_done(slot, generation, cookie, result, inp, &mut out),
        Event::Listeners(changes) => state.listeners(changes, inp, &mut out),
        Event::Queues(samples) => {
            state.queues(samples, inp, &mut out);
            state.apply(inp, &mut out);
        }
        Event::Elapsed => {
            state.stop_graces(inp, &mut out);
            state.finish_removals(inp, &mut out);
            // Slowstart ramps need rewriting as time passes.
            state.apply(inp, &mut out);
            out.push(Effect::WatchCookies);
        }
        Event::Assigned { totals, listening } => state.assigned(totals, listening, inp, &mut out),
        Event::StopMarks(marks) => state.stop_marks(marks, inp, &mut out),
        // The hooks judge binds by the old cgroup's id and sock_ops is
        // attached to it: a new agent sets both up on the new one (taking
        // the pins over, so steering and counts go on meanwhile).
        Event::ReplicaCgroupRecreated { path, was, now } => {
            say(&mut out, Fact::ReplicaCgroupRecreated { path, was, now });
            out.push(Effect::Stop);
        }
        Event::BindRefused {
            slot,
            addr,
            uid,
            why,
        } => state.bind_refused(slot, addr, uid, why, inp, &mut out),
    }
    // Whatever happened may change what the host can serve; time passing
    // (Elapsed, ten times a second) carries rise and fall.
    state.announce(inp, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::announce::Why;
    use crate::config::CheckKind;
    use mtlb_common::Backend;
    use mtlb_common::STATE_UP;
    use std::net::SocketAddr;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// A state at t0 and a clock the test moves.
    struct H {
        st: State,
        now: Instant,
        conns: Vec<u64>,
        /// What the kernel's maps register, by slot.
        kernel: Vec<Option<Registration>>,
    }

    impl H {
        fn new(cfg: Config) -> Self {
            Self::with_saved(cfg, &Saved::default())
        }

        fn with_saved(cfg: Config, saved: &Saved) -> Self {
            let now = Instant::now();
            let inp = Inputs {
                now,
                unix_ms: 1,
                conns: &[],
            };
            Self {
                st: State::new(
                    cfg,
                    saved,
                    "/etc/mtlb/mtlb.toml".into(),
                    "/pins".into(),
                    7,
                    &inp,
                ),
                now,
                conns: vec![0; MAX_REPLICAS as usize],
                kernel: vec![None; MAX_REPLICAS as usize],
            }
        }

        /// Started, and the replicas in `up` registered.
        /// Started with the replicas in `up` registered, and (with
        /// checks on) their first checks passed.
        fn running(cfg: Config, up: &[usize]) -> Self {
            let mut h = Self::new(cfg);
            let fx = h.start(up.iter().map(|&s| reg(s)).collect());
            for slot in started_checks(&fx) {
                h.check(slot, true);
            }
            h
        }

        fn start(&mut self, listeners: Vec<ListenerChange>) -> Vec<Effect> {
            self.start_verified(listeners, vec![])
        }

        fn start_verified(
            &mut self,
            listeners: Vec<ListenerChange>,
            verified: Vec<u64>,
        ) -> Vec<Effect> {
            self.kernel_sees(listeners);
            let listeners = self.registrations();
            self.step(Event::Started {
                listeners,
                verified,
            })
        }

        /// Listeners registering or closing in the kernel, then read by
        /// the shell.
        fn listeners(&mut self, changes: Vec<ListenerChange>) -> Vec<Effect> {
            self.kernel_sees(changes);
            let now = self.registrations();
            self.step(Event::Listeners(now))
        }

        fn kernel_sees(&mut self, changes: Vec<ListenerChange>) {
            for c in changes {
                match c {
                    ListenerChange::Registered { slot, cookie } => {
                        let addr = format!("127.0.0.1:{}", 10000 + slot);
                        self.kernel[slot] = Some(Registration {
                            cookie,
                            desc: format!("{addr} (IPv4, via listen hook)"),
                            short: format!("{addr} (IPv4)"),
                        })
                    }
                    ListenerChange::Closed { slot, cookie } => {
                        assert_eq!(self.kernel[slot].as_ref().map(|r| r.cookie), Some(cookie));
                        self.kernel[slot] = None;
                    }
                }
            }
        }

        /// The registrations of the slots in use, as the shell reads them.
        fn registrations(&self) -> Registrations {
            self.kernel[..self.st.slots().len()].to_vec()
        }

        /// Steps `ev`; a save it asks for succeeds (its outcome is
        /// stepped too, as the shell does).
        fn step(&mut self, ev: Event) -> Vec<Effect> {
            let mut fx = self.step_only(ev);
            if fx.iter().any(|e| matches!(e, Effect::Save(_))) {
                fx.extend(self.step_only(Event::Saved { error: None }));
            }
            fx
        }

        fn step_only(&mut self, ev: Event) -> Vec<Effect> {
            let inp = Inputs {
                now: self.now,
                unix_ms: 1,
                conns: &self.conns,
            };
            step(&mut self.st, &inp, ev)
        }

        fn after(&mut self, d: Duration) -> &mut Self {
            self.now += d;
            self
        }

        fn slot(&self, i: usize) -> &Slot {
            &self.st.slots()[i]
        }

        fn label(&self, i: usize) -> String {
            self.slot(i).state(self.st.cfg()).to_string()
        }

        /// A check result for `slot` under its current generation and
        /// listener.
        fn check(&mut self, slot: usize, ok: bool) -> Vec<Effect> {
            let generation = self.slot(slot).check.generation;
            let cookie = self.slot(slot).listener_cookie;
            let result = if ok {
                CheckResult::pass(reason::L4_OK, MS(1))
            } else {
                CheckResult::fail(reason::L4_CON, Some("Connection refused".into()), MS(1))
            };
            self.step(Event::CheckDone {
                slot,
                generation,
                cookie,
                result,
            })
        }

        fn control(&mut self, req: Request) -> (Response, Vec<Effect>) {
            let fx = self.step(Event::Control(req));
            (reply(&fx).expect("a reply"), fx)
        }

        fn reload(&mut self, result: Result<Config, ConfigError>) -> Vec<Effect> {
            self.step(Event::Reloaded {
                origin: Origin::Control,
                result: Box::new(result),
            })
        }
    }

    /// Listener cookies: slot and incarnation.
    fn cookie(slot: usize, n: u64) -> u64 {
        (slot as u64 + 1) * 1000 + n
    }

    /// A listener registering in or leaving a slot, in the kernel.
    enum ListenerChange {
        Registered { slot: usize, cookie: u64 },
        Closed { slot: usize, cookie: u64 },
    }

    fn reg(slot: usize) -> ListenerChange {
        reg_as(slot, 0)
    }

    fn reg_as(slot: usize, n: u64) -> ListenerChange {
        ListenerChange::Registered {
            slot,
            cookie: cookie(slot, n),
        }
    }

    fn closed(slot: usize) -> ListenerChange {
        closed_as(slot, 0)
    }

    fn closed_as(slot: usize, n: u64) -> ListenerChange {
        ListenerChange::Closed {
            slot,
            cookie: cookie(slot, n),
        }
    }

    fn logs(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Say(f) => Some(render::line(f).1),
                _ => None,
            })
            .collect()
    }

    /// One effect as one line, as a reviewer reads a transcript.
    fn line_of(e: &Effect) -> String {
        match e {
            Effect::Say(f) => {
                let (level, line) = render::line(f);
                format!("{level:<5} {line}")
            }
            Effect::WriteBackend { slot, backend: b } => format!(
                "BACKENDS[{slot}] enabled={} weight={} listener={}",
                b.enabled, b.weight, b.listener_cookie
            ),
            Effect::WriteStatus { slot, status: s } => format!(
                "STATUS[{slot}] state={} count={} registered={} flags={}",
                s.state, s.count, s.registered, s.flags
            ),
            Effect::WriteSettings(s) => format!(
                "SETTINGS port={} replicas={} require_verified={} require_owner={}",
                s.port, s.replicas, s.require_verified, s.require_owner
            ),
            Effect::SetAddresses(a) => format!("ADDRESSES {} entries", a.len()),
            Effect::SetAllowedUids(u) => format!("ALLOWED_UIDS {u:?}"),
            Effect::Save(s) if s.backends.is_empty() => "save: no operator choices".into(),
            Effect::Save(s) => format!(
                "save {}",
                s.backends
                    .iter()
                    .map(|(n, b)| format!("{n}={}/{:?}", b.admin.as_str(), b.weight))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Effect::StartCheck { slot, cookie, .. } => {
                format!(
                    "check {} (listener {cookie})",
                    crate::config::replica_name(*slot)
                )
            }
            Effect::Reply(r) => {
                format!("reply {}: {}", if r.ok { "ok" } else { "error" }, r.message)
            }
            Effect::ReadConfig(o) => format!("read the configuration ({o:?})"),
            Effect::CountLocalFault(f) => format!("count local fault {f:?}"),
            Effect::BoundHandshakes { slot, most, .. } => match most {
                Some(m) => format!(
                    "handshakes of {} at most {m}",
                    crate::config::replica_name(*slot)
                ),
                None => format!(
                    "handshakes of {} not below 0",
                    crate::config::replica_name(*slot)
                ),
            },
            Effect::Announce {
                vips,
                table,
                announce,
            } => format!(
                "{} {vips:?} in table {table}",
                if *announce { "announce" } else { "withdraw" }
            ),
            other => format!("{other:?}"),
        }
    }

    /// `fx` as a transcript: one line per effect.
    fn transcript(fx: &[Effect]) -> String {
        fx.iter().map(line_of).collect::<Vec<_>>().join("\n")
    }

    /// Asserts that `fx` reads as `want` (one effect per line; leading
    /// blanks of each line ignored).
    #[track_caller]
    fn assert_transcript(fx: &[Effect], want: &str) {
        let want = want
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let got = transcript(fx);
        assert!(
            got == want,
            "transcript differs; got:\n{got}\n\nwant:\n{want}"
        );
    }

    fn has_log(fx: &[Effect], needle: &str) -> bool {
        logs(fx).iter().any(|l| l.contains(needle))
    }

    /// The last BACKENDS write for `slot` among `fx`.
    fn backend(fx: &[Effect], slot: u32) -> Option<Backend> {
        fx.iter().rev().find_map(|e| match e {
            Effect::WriteBackend { slot: s, backend } if *s == slot => Some(*backend),
            _ => None,
        })
    }

    fn reply(fx: &[Effect]) -> Option<Response> {
        fx.iter().find_map(|e| match e {
            Effect::Reply(r) => Some(r.clone()),
            _ => None,
        })
    }

    fn saved(fx: &[Effect]) -> Option<Saved> {
        fx.iter().find_map(|e| match e {
            Effect::Save(s) => Some(s.clone()),
            _ => None,
        })
    }

    fn settings(fx: &[Effect]) -> Option<Settings> {
        fx.iter().find_map(|e| match e {
            Effect::WriteSettings(s) => Some(*s),
            _ => None,
        })
    }

    fn started_checks(fx: &[Effect]) -> Vec<usize> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::StartCheck { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    fn cfg(replicas: u16) -> Config {
        Config {
            replicas,
            ..Config::default()
        }
    }

    // ------------------------------------------------------------ start

    #[test]
    fn start_with_nothing_listening_says_so_and_clears_other_slots() {
        let mut h = H::new(cfg(2));
        let fx = h.start(vec![]);
        let l = logs(&fx);
        assert!(l[0].starts_with("steering TCP port 443 on all local addresses to 2 replicas (mtp1..=mtp2 on 127.0.0.1), leastconn, Tcp checks; pins in /pins"), "{l:?}");
        assert!(has_log(
            &fx,
            "no replica is listening yet; waiting for replicas on 127.0.0.1:10000..=10001"
        ));
        // Waiting for their listeners, the slots stay eligible.
        assert_eq!(backend(&fx, 0).unwrap().enabled, 1);
        for slot in 2..MAX_REPLICAS {
            assert_eq!(backend(&fx, slot), Some(Backend::default()), "slot {slot}");
        }
        assert!(fx.contains(&Effect::Notify(Notice::Ready { port: 443 })));
        assert_eq!(h.label(0), "DOWN");
    }

    #[test]
    fn listeners_found_at_start_are_checked_at_once_then_up() {
        let mut h = H::new(cfg(2));
        let fx = h.start(vec![reg(0), reg(1)]);
        assert!(has_log(
            &fx,
            "replica mtp1 registered: 127.0.0.1:10000 (IPv4, via listen hook)"
        ));
        assert!(!has_log(&fx, "no replica is listening yet"));
        assert_eq!(started_checks(&fx), [0, 1], "checked now, not on schedule");
        assert_eq!(
            backend(&fx, 1).unwrap().listener_cookie,
            0,
            "not proven yet"
        );
        let fx = h.check(1, true);
        assert!(has_log(
            &fx,
            "backend mtp2 is UP, reason: Layer4 check passed"
        ));
        assert_eq!(backend(&fx, 1).unwrap().listener_cookie, cookie(1, 0));
        assert!(h.slot(1).active());
    }

    #[test]
    fn listeners_an_earlier_agent_proved_keep_their_clients() {
        let mut h = H::new(cfg(2));
        let fx = h.start_verified(vec![reg(0), reg(1)], vec![cookie(0, 0), cookie(1, 7)]);
        // mtp1's listener is the one proven before: UP at once, unchanged
        // in BACKENDS. mtp2's is another: checked first.
        assert!(has_log(
            &fx,
            "backend mtp1 is UP, reason: listener registered"
        ));
        assert_eq!(backend(&fx, 0).unwrap().listener_cookie, cookie(0, 0));
        assert_eq!(started_checks(&fx), [1]);
        assert_eq!(h.label(1), "DOWN");
    }

    #[test]
    fn with_checks_off_a_listener_is_up_at_once() {
        let mut c = cfg(2);
        c.check.kind = CheckKind::None;
        let mut h = H::new(c);
        let fx = h.start(vec![reg(0), reg(1)]);
        assert!(started_checks(&fx).is_empty());
        assert!(has_log(
            &fx,
            "backend mtp2 is UP, reason: listener registered"
        ));
        let fx = h.listeners(vec![closed(1), reg_as(1, 1)]);
        assert!(has_log(
            &fx,
            "backend mtp2 is UP, reason: listener registered"
        ));
        assert!(h.slot(1).active());
    }
    #[test]
    fn a_closing_listener_is_down_at_once_and_stays_eligible() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.conns[1] = 4;
        let fx = h.listeners(vec![closed(1)]);
        assert!(has_log(
            &fx,
            "replica mtp2 unregistered: 127.0.0.1:10001 (IPv4): its listener closed"
        ));
        let down = logs(&fx)
            .into_iter()
            .find(|l| l.starts_with("backend mtp2 is DOWN"))
            .unwrap();
        assert_eq!(
            down,
            "backend mtp2 is DOWN, reason: no listener registered, info: \"listener closed\", check duration: 0ms. 1 active backends left. 4 connections active."
        );
        // The kernel is told first, then the line.
        let line_at = fx
            .iter()
            .position(|e| matches!(e, Effect::Say(f) if render::line(f).1.starts_with("backend mtp2 is DOWN")))
            .unwrap();
        let write_at = fx
            .iter()
            .position(|e| matches!(e, Effect::WriteStatus { slot: 1, .. }))
            .unwrap();
        assert!(write_at < line_at);
        assert_eq!(h.label(1), "DOWN");
        assert!(h.slot(1).eligible(), "steered to from its next listen()");
        assert!(!h.slot(1).active());
    }

    #[test]
    fn a_returning_listener_proves_itself_with_one_check() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.listeners(vec![closed(1)]);
        let fx = h.after(MS(500)).listeners(vec![reg_as(1, 1)]);
        assert_eq!(started_checks(&fx), [1], "checked at once");
        assert!(!has_log(&fx, "is UP"));
        let b = h.slot(1).backend(h.st.cfg(), 1, h.now);
        assert_eq!(b.enabled, 1, "steerable the moment it is proven");
        assert_ne!(b.listener_cookie, cookie(1, 1), "not before");
        let fx = h.after(MS(2)).check(1, true);
        assert!(has_log(
            &fx,
            "backend mtp2 is UP, reason: Layer4 check passed, check duration: 1ms. 2 active backends online."
        ));
        assert_eq!(backend(&fx, 1).unwrap().listener_cookie, cookie(1, 1));
        assert_eq!(h.slot(1).transitions_up, 2);
        assert_eq!(h.slot(1).transitions_down, 1);
        assert_eq!(h.slot(1).downtime, MS(502));
    }

    #[test]
    fn a_returning_listener_that_fails_its_check_gets_no_clients() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.listeners(vec![closed(1), reg_as(1, 1)]);
        let fx = h.check(1, false);
        assert!(has_log(
            &fx,
            "backend mtp2 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\""
        ));
        assert_eq!(
            backend(&fx, 1).unwrap().enabled,
            0,
            "down by its checks now"
        );
        for _ in 0..4 {
            let fx = h.check(1, false);
            assert!(!has_log(&fx, "backend mtp2 is"), "{fx:?}");
        }
        assert_eq!(h.label(1), "DOWN");
        assert_eq!(h.slot(1).verified, 0);
        // Fixed (same listener): rise passing checks, as after any failure.
        assert!(!has_log(&h.check(1, true), "backend mtp2 is UP"));
        assert!(has_log(&h.check(1, true), "backend mtp2 is UP"));
        assert_eq!(
            h.slot(1).backend(h.st.cfg(), 1, h.now).listener_cookie,
            cookie(1, 1)
        );
    }
    #[test]
    fn a_check_of_an_earlier_listener_proves_nothing() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.after(MS(2000));
        h.step(Event::ChecksDue);
        let old = h.slot(1).check.generation;
        // Restarted while its scheduled check was in flight.
        let fx = h.listeners(vec![closed(1), reg_as(1, 1)]);
        assert_eq!(started_checks(&fx), [1], "a new check for the new listener");
        let fx = h.step(Event::CheckDone {
            slot: 1,
            generation: old,
            cookie: cookie(1, 0),
            result: CheckResult::pass(reason::L4_OK, MS(1)),
        });
        assert!(logs(&fx).is_empty(), "{fx:?}");
        assert_eq!(h.slot(1).verified, 0);
        assert!(has_log(&h.check(1, true), "backend mtp2 is UP"));
    }

    #[test]
    fn a_closing_listener_asks_for_a_scan() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.listeners(vec![closed(1)]);
        assert!(
            fx.contains(&Effect::Adopt),
            "a replica waiting for the slot"
        );
    }
    #[test]
    fn the_last_replica_going_says_no_backend_available_once() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.listeners(vec![closed(0)]);
        let fx = h.listeners(vec![closed(1)]);
        let said = |fx: &[Effect]| {
            logs(fx)
                .iter()
                .filter(|l| *l == "no backend available!")
                .count()
        };
        assert_eq!(said(&fx), 1);
        assert_eq!(said(&h.step(Event::Elapsed)), 0);
        h.listeners(vec![reg_as(0, 1)]);
        h.check(0, true);
        let fx = h.listeners(vec![closed_as(0, 1)]);
        assert_eq!(said(&fx), 1, "said again after one came back");
    }
    #[test]
    fn a_listener_replaced_in_place_is_checked_before_clients() {
        let mut h = H::running(cfg(1), &[0]);
        let fx = h.listeners(vec![closed(0), reg_as(0, 1)]);
        assert!(has_log(&fx, "backend mtp1 is DOWN"));
        assert!(!has_log(&fx, "backend mtp1 is UP"));
        assert_eq!(backend(&fx, 0).unwrap().listener_cookie, 0);
        h.check(0, true);
        assert!(h.slot(0).active());
    }

    #[test]
    fn turning_checks_on_trusts_the_listeners_taking_clients() {
        let mut c = cfg(2);
        c.check.kind = CheckKind::None;
        let mut h = H::running(c, &[0, 1]);
        let fx = h.reload(Ok(cfg(2)));
        assert_eq!(settings(&fx).unwrap().require_verified, 1);
        assert_eq!(backend(&fx, 0).unwrap().listener_cookie, cookie(0, 0));
        assert_eq!(backend(&fx, 1).unwrap().listener_cookie, cookie(1, 0));
    }

    #[test]
    fn a_reload_switches_the_pick() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let mut c = cfg(2);
        c.algorithm = crate::config::Algorithm::Random;
        assert_eq!(settings(&h.reload(Ok(c))).unwrap().draws, 2);
        assert_eq!(settings(&h.reload(Ok(cfg(2)))).unwrap().draws, 0);
    }

    #[test]
    fn replica_owners_are_sent_to_the_kernel_on_reload() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let mut c = cfg(2);
        c.replica_uids = vec![0, 995];
        let fx = h.reload(Ok(c));
        assert!(fx.contains(&Effect::SetAllowedUids(vec![0, 995])));
        assert_eq!(settings(&fx).unwrap().require_owner, 1);
        let mut c = cfg(2);
        c.any_replica_owner = true;
        let fx = h.reload(Ok(c));
        assert_eq!(settings(&fx).unwrap().require_owner, 0);
    }
    #[test]
    fn falls_after_fall_failures_with_progress_lines() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.check(1, false);
        assert_transcript(
            &fx,
            r#"
        DEBUG check mtp2: failed, reason: Layer4 connection problem, info: "Connection refused", 1ms
        INFO  Health check for backend mtp2 failed, reason: Layer4 connection problem, info: "Connection refused", check duration: 1ms, status: UP 1/3.
        STATUS[1] state=1 count=1 registered=1 flags=0
        "#,
        );
        assert_eq!(h.label(1), "UP 1/3");
        assert!(h.slot(1).active(), "still takes connections while falling");
        h.check(1, false);
        let fx = h.check(1, false);
        assert_transcript(
            &fx,
            r#"
        DEBUG check mtp2: failed, reason: Layer4 connection problem, info: "Connection refused", 1ms
        BACKENDS[1] enabled=0 weight=1 listener=2000
        STATUS[1] state=2 count=0 registered=1 flags=0
        WARN  backend mtp2 is DOWN, reason: Layer4 connection problem, info: "Connection refused", check duration: 1ms. 1 active backends left. 0 connections active.
        "#,
        );
        assert_eq!(h.slot(1).check_failures, 3);
    }

    #[test]
    fn rises_after_rise_successes() {
        let mut h = H::running(cfg(2), &[0, 1]);
        for _ in 0..3 {
            h.check(1, false);
        }
        let fx = h.check(1, true);
        assert!(has_log(
            &fx,
            "Health check for backend mtp2 succeeded, reason: Layer4 check passed, check duration: 1ms, status: DOWN 1/2."
        ));
        assert_eq!(h.label(1), "DOWN 1/2");
        assert!(!h.slot(1).eligible());
        let fx = h.check(1, true);
        assert!(has_log(
            &fx,
            "backend mtp2 is UP, reason: Layer4 check passed, check duration: 1ms. 2 active backends online."
        ));
        assert_eq!(backend(&fx, 1).unwrap().enabled, 1);
    }

    #[test]
    fn fastinter_while_changing_downinter_while_down_inter_when_steady() {
        let mut c = cfg(1);
        c.check.inter_ms = 2000;
        c.check.fastinter_ms = 300;
        c.check.downinter_ms = 5000;
        let mut h = H::running(c, &[0]);
        let t = h.now;
        h.check(0, true);
        assert_eq!(h.st.next_check_due(), Some(t + MS(2000)));
        h.check(0, false);
        assert_eq!(h.st.next_check_due(), Some(t + MS(300)), "falling");
        h.check(0, false);
        h.check(0, false);
        assert_eq!(h.st.next_check_due(), Some(t + MS(5000)), "down");
        h.check(0, true);
        assert_eq!(h.st.next_check_due(), Some(t + MS(300)), "rising");
    }

    #[test]
    fn first_checks_are_spread_over_one_interval() {
        let mut c = cfg(4);
        c.check.inter_ms = 2000;
        let h = H::new(c);
        let t0 = h.slot(0).check.next;
        let offsets: Vec<Duration> = h.st.slots().iter().map(|s| s.check.next - t0).collect();
        assert_eq!(offsets, [MS(0), MS(500), MS(1000), MS(1500)]);
    }

    #[test]
    fn a_due_check_starts_once_until_its_result() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.after(MS(2000));
        let fx = h.step(Event::ChecksDue);
        assert_eq!(started_checks(&fx), [0, 1]);
        let spec = fx
            .iter()
            .find_map(|e| match e {
                Effect::StartCheck { slot: 1, spec, .. } => Some(spec.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(spec.addr, "127.0.0.1:10001".parse().unwrap());
        assert_eq!(spec.timeout, MS(2000));
        assert!(started_checks(&h.step(Event::ChecksDue)).is_empty());
        assert_eq!(h.st.next_check_due(), None, "every slot has one running");
        h.check(0, true);
        assert!(h.st.next_check_due().is_some());
        h.after(MS(2000));
        assert_eq!(started_checks(&h.step(Event::ChecksDue)), [0]);
    }

    #[test]
    fn kind_none_launches_no_checks() {
        let mut c = cfg(2);
        c.check.kind = CheckKind::None;
        let mut h = H::running(c, &[0, 1]);
        h.after(MS(10_000));
        assert!(started_checks(&h.step(Event::ChecksDue)).is_empty());
        assert!(h.st.next_check_due().unwrap() > h.now + Duration::from_secs(3000));
        assert!(h.slot(0).active(), "registration alone decides");
    }

    #[test]
    fn a_passing_check_without_a_listener_does_not_raise() {
        let mut h = H::running(cfg(2), &[0]);
        for _ in 0..5 {
            h.check(1, true);
        }
        assert_eq!(h.label(1), "DOWN");
        assert_eq!(h.slot(1).health().count(), 0);
    }

    #[test]
    fn results_of_checks_launched_before_a_reload_are_dropped() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.after(MS(2000));
        h.step(Event::ChecksDue);
        let old = h.slot(1).check.generation;
        h.reload(Ok(cfg(2)));
        assert_ne!(h.slot(1).check.generation, old);
        for _ in 0..3 {
            let fx = h.step(Event::CheckDone {
                slot: 1,
                generation: old,
                cookie: cookie(1, 0),
                result: CheckResult::fail(reason::L4_CON, None, MS(1)),
            });
            assert!(logs(&fx).is_empty(), "{fx:?}");
        }
        assert_eq!(h.label(1), "UP");
        // mtp2's old check is over, so its next may start; mtp1's is still
        // in flight, and two checks of one replica never run at once.
        assert_eq!(started_checks(&h.step(Event::ChecksDue)), [1]);
    }

    // ------------------------------------------------------ accept queue

    /// mtp1 idle; mtp2 with `n` queued and `entered` steered to it so far.
    fn queued(n: u32, entered: u64) -> Vec<Option<QueueReading>> {
        vec![
            Some(QueueReading {
                queued: 0,
                backlog: 128,
                entered: 0,
            }),
            Some(QueueReading {
                queued: n,
                backlog: 128,
                entered,
            }),
        ]
    }

    /// STATUS flags written for `slot` by these effects, if written.
    fn status_flags(fx: &[Effect], slot: u32) -> Option<u32> {
        fx.iter().rev().find_map(|e| match e {
            Effect::WriteStatus { slot: s, status } if *s == slot => Some(status.flags),
            _ => None,
        })
    }

    #[test]
    fn a_stalled_queue_downs_the_replica_then_rise_checks_bring_it_back() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.step(Event::Queues(queued(3, 3)));
        let fx = h.after(MS(1000)).step(Event::Queues(queued(3, 3)));
        assert!(!has_log(&fx, "DOWN"));
        let fx = h.after(MS(1100)).step(Event::Queues(queued(4, 3)));
        let line = logs(&fx)
            .into_iter()
            .find(|l| l.starts_with("backend mtp2 is DOWN"))
            .expect("stalled");
        assert!(
            line.contains("reason: accept queue stalled, info: \"4 queued of 128\""),
            "{line}"
        );
        assert_eq!(backend(&fx, 1).unwrap().enabled, 0);
        assert_eq!(status_flags(&fx, 1), Some(mtlb_common::STATUS_STALLED));
        // Checks pass (the kernel completes handshakes) but count as failed.
        for _ in 0..4 {
            h.check(1, true);
        }
        assert_eq!(h.label(1), "DOWN");
        // It accepts again: rise passing checks bring it back.
        let fx = h.step(Event::Queues(queued(0, 3)));
        assert_eq!(status_flags(&fx, 1), Some(0), "no longer stalled");
        h.check(1, true);
        let fx = h.check(1, true);
        assert!(has_log(&fx, "backend mtp2 is UP"));
    }

    #[test]
    fn a_busy_replica_whose_queue_grows_stays_up() {
        let mut h = H::running(cfg(2), &[0, 1]);
        // Three arrive for each one accepted, for 6 s.
        for i in 1..=60u64 {
            let fx = h
                .after(MS(100))
                .step(Event::Queues(queued((20 * i) as u32, 30 * i)));
            assert!(!has_log(&fx, "DOWN"), "sample {i}");
        }
        assert!(h.slot(1).active());
    }

    #[test]
    fn the_last_replica_taking_connections_is_kept_when_it_stalls() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.listeners(vec![closed(0)]);
        h.step(Event::Queues(queued(3, 3)));
        let fx = h.after(MS(2100)).step(Event::Queues(queued(3, 3)));
        assert!(!has_log(&fx, "backend mtp2 is DOWN"), "{fx:?}");
        assert!(has_log(
            &fx,
            "backend mtp2: accept queue stalled (3 queued of 128), but no other backend takes connections: keeping it"
        ));
        assert_eq!(status_flags(&fx, 1), Some(mtlb_common::STATUS_STALL_KEPT));
        let fx = h.after(MS(100)).step(Event::Queues(queued(3, 3)));
        assert!(logs(&fx).is_empty(), "said once: {fx:?}");
        assert!(h.slot(1).active());
        // Once another takes connections, the stalled one goes.
        h.listeners(vec![reg_as(0, 1)]);
        h.check(0, true);
        let fx = h.after(MS(100)).step(Event::Queues(queued(3, 3)));
        assert!(has_log(
            &fx,
            "backend mtp2 is DOWN, reason: accept queue stalled"
        ));
    }

    #[test]
    fn a_vanished_listener_clears_its_queue_watch() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.step(Event::Queues(queued(3, 3)));
        h.after(MS(1500))
            .step(Event::Queues(vec![queued(0, 0)[0], None]));
        let fx = h.after(MS(1500)).step(Event::Queues(queued(3, 3)));
        assert!(!has_log(&fx, "stalled"), "the watch started over");
    }

    // ---------------------------------------------------- operator control

    #[test]
    fn drain_stops_new_connections_and_is_saved() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let (r, fx) = h.control(Request::Admin {
            name: "mtp2".into(),
            state: Admin::Drain,
        });
        assert!(r.ok);
        assert_transcript(
            &fx,
            r#"
        BACKENDS[1] enabled=0 weight=1 listener=2000
        STATUS[1] state=3 count=0 registered=1 flags=0
        save mtp2=DRAIN/None
        INFO  backend mtp2 is set to DRAIN mode (by operator). 1 active backends.
        reply ok: backend mtp2 is set to DRAIN mode (by operator)
        "#,
        );
        assert_eq!(saved(&fx).unwrap().backends["mtp2"].admin, Admin::Drain);
        assert_eq!(h.label(1), "DRAIN");
        // wait-drained asks where the counts are.
        let (r, _) = h.control(Request::Locate {
            name: "mtp2".into(),
        });
        assert_eq!((r.slot, r.pin_dir), (Some(1), Some("/pins".into())));
        // Ready again.
        let (r, fx) = h.control(Request::Admin {
            name: "mtp2".into(),
            state: Admin::Ready,
        });
        assert_eq!(r.message, "backend mtp2 is READY (by operator)");
        assert_transcript(
            &fx,
            r#"
        BACKENDS[1] enabled=1 weight=1 listener=2000
        STATUS[1] state=1 count=0 registered=1 flags=0
        save: no operator choices
        INFO  backend mtp2 is READY (by operator). 2 active backends.
        reply ok: backend mtp2 is READY (by operator)
        "#,
        );
    }

    #[test]
    fn maint_is_shown_as_maintenance() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let (r, fx) = h.control(Request::Admin {
            name: "mtp1".into(),
            state: Admin::Maint,
        });
        assert_eq!(
            r.message,
            "backend mtp1 is going into maintenance (by operator)"
        );
        assert_eq!(backend(&fx, 0).unwrap().enabled, 0);
        let st = fx
            .iter()
            .find_map(|e| match e {
                Effect::WriteStatus { slot: 0, status } => Some(*status),
                _ => None,
            })
            .unwrap();
        assert_eq!(st.state, mtlb_common::STATE_MAINT);
        assert_eq!(st.oper, STATE_UP, "checks still say UP under MAINT");
    }

    #[test]
    fn bad_names_states_and_weights_change_nothing() {
        let mut h = H::running(cfg(2), &[0, 1]);
        for req in [
            Request::Admin {
                name: "mtp9".into(),
                state: Admin::Drain,
            },
            Request::Weight {
                name: "mtp1".into(),
                weight: 0,
            },
            Request::Weight {
                name: "mtp1".into(),
                weight: 257,
            },
        ] {
            let (r, fx) = h.control(req);
            assert!(!r.ok);
            assert_eq!(fx.len(), 1, "only the reply: {fx:?}");
        }
        let (r, _) = h.control(Request::Locate {
            name: "nope".into(),
        });
        assert_eq!(
            r.message,
            "no backend named \"nope\"; backends are mtp1, mtp2"
        );
    }

    #[test]
    fn weight_is_written_and_saved() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let (r, fx) = h.control(Request::Weight {
            name: "mtp1".into(),
            weight: 3,
        });
        assert_eq!(r.message, "backend mtp1 weight 3");
        assert_eq!(backend(&fx, 0).unwrap().weight, 3);
        assert_eq!(saved(&fx).unwrap().backends["mtp1"].weight, Some(3));
    }

    #[test]
    fn operator_state_survives_a_restart() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let (_, fx) = h.control(Request::Admin {
            name: "mtp2".into(),
            state: Admin::Maint,
        });
        let (_, fx2) = h.control(Request::Weight {
            name: "mtp1".into(),
            weight: 5,
        });
        assert!(saved(&fx).is_some());
        // A new agent starts from the last saved file.
        let mut h = H::with_saved(cfg(2), &saved(&fx2).unwrap());
        let fx = h.start(vec![reg(0), reg(1)]);
        assert_eq!(h.label(1), "MAINT");
        assert_eq!(backend(&fx, 1).unwrap().enabled, 0);
        assert_eq!(backend(&fx, 0).unwrap().weight, 5);
    }

    #[test]
    fn slowstart_ramps_the_written_weight_over_ticks() {
        let mut c = cfg(1);
        c.check.slowstart_ms = 1000;
        c.weights = vec![10];
        let mut h = H::new(c);
        h.start(vec![reg(0)]);
        let fx = h.check(0, true);
        assert_eq!(backend(&fx, 0).unwrap().weight, 1);
        let fx = h.after(MS(500)).step(Event::Elapsed);
        assert_eq!(backend(&fx, 0).unwrap().weight, 5);
        let fx = h.after(MS(600)).step(Event::Elapsed);
        assert_eq!(backend(&fx, 0).unwrap().weight, 10);
        assert_eq!(
            backend(&h.step(Event::Elapsed), 0),
            None,
            "unchanged: no write"
        );
    }

    // ------------------------------------------------------------ reload

    #[test]
    fn scale_up_adds_a_slot_waiting_for_its_listener() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.reload(Ok(cfg(3)));
        assert_eq!(reply(&fx).unwrap(), Response::ok("3 replicas"));
        assert!(has_log(&fx, "configuration reloaded: 3 replicas"));
        assert_eq!(settings(&fx).unwrap().replicas, 3);
        assert!(fx.contains(&Effect::Adopt) && fx.contains(&Effect::PollListeners));
        assert_eq!(backend(&fx, 2).unwrap().enabled, 1);
        assert_eq!(h.label(2), "DOWN");
        let fx = h.listeners(vec![reg(2)]);
        assert_eq!(started_checks(&fx), [2]);
        let fx = h.check(2, true);
        assert!(has_log(&fx, "backend mtp3 is UP"));
    }

    #[test]
    fn scale_down_drains_then_removes_the_slot() {
        let mut h = H::running(cfg(3), &[0, 1, 2]);
        // Its counts stay in use: SETTINGS keeps 3 slots.
        let fx = h.reload(Ok(cfg(2)));
        assert_transcript(
            &fx,
            r#"
        INFO  backend mtp3 is draining before removal
        BACKENDS[2] enabled=0 weight=1 listener=3000
        ADDRESSES 0 entries
        ALLOWED_UIDS [0]
        SETTINGS port=443 replicas=3 require_verified=1 require_owner=1
        Adopt
        PollListeners
        INFO  configuration reloaded: 2 replicas
        reply ok: 2 replicas
        "#,
        );
        h.conns[2] = 2;
        let fx = h.step(Event::Elapsed);
        assert_transcript(
            &fx,
            r#"
        WatchCookies
        "#,
        );
        assert_eq!(h.st.slots().len(), 3);
        h.conns[2] = 0;
        let fx = h.step(Event::Elapsed);
        assert_transcript(
            &fx,
            r#"
        INFO  backend mtp3 removed: drained
        SETTINGS port=443 replicas=2 require_verified=1 require_owner=1
        BACKENDS[2] enabled=0 weight=0 listener=0
        STATUS[2] state=0 count=0 registered=0 flags=0
        WatchCookies
        "#,
        );
        assert_eq!(h.st.slots().len(), 2);
        // 2 -> 3 again: a fresh slot.
        h.reload(Ok(cfg(3)));
        assert_eq!(h.slot(2).transitions_up, 0);
    }

    #[test]
    fn scaling_back_up_while_draining_keeps_the_slot() {
        let mut h = H::running(cfg(3), &[0, 1, 2]);
        h.reload(Ok(cfg(2)));
        h.conns[2] = 1;
        let fx = h.reload(Ok(cfg(3)));
        assert_eq!(backend(&fx, 2).unwrap().enabled, 1);
        assert!(h.slot(2).active());
        h.conns[2] = 0;
        assert!(!has_log(&h.step(Event::Elapsed), "removed"));
    }

    #[test]
    fn a_replica_scaled_away_and_back_is_registered_again() {
        let mut h = H::running(cfg(3), &[0, 1, 2]);
        // The shell read the registrations (mtp3's too) just before the
        // slot went.
        h.reload(Ok(cfg(2)));
        h.listeners(vec![]);
        h.step(Event::Elapsed);
        assert_eq!(h.st.slots().len(), 2);
        h.reload(Ok(cfg(3)));
        // mtp3's listener never left the kernel: the next reading shows it.
        let fx = h.listeners(vec![]);
        assert!(has_log(
            &fx,
            "replica mtp3 registered: 127.0.0.1:10002 (IPv4, via listen hook)"
        ));
        assert_eq!(started_checks(&fx), [2]);
        let fx = h.check(2, true);
        assert!(has_log(&fx, "backend mtp3 is UP"), "{:?}", logs(&fx));
    }

    #[test]
    fn a_drained_replica_scaled_away_and_back_stays_drained() {
        let mut h = H::running(cfg(3), &[0, 1, 2]);
        h.control(Request::Admin {
            name: "mtp3".into(),
            state: Admin::Drain,
        });
        h.reload(Ok(cfg(2)));
        h.step(Event::Elapsed);
        assert_eq!(h.st.slots().len(), 2);
        // Saved while mtp3 is away: its DRAIN is kept.
        let (_, fx) = h.control(Request::Weight {
            name: "mtp1".into(),
            weight: 2,
        });
        assert_eq!(saved(&fx).unwrap().backends["mtp3"].admin, Admin::Drain);
        h.reload(Ok(cfg(3)));
        assert_eq!(h.label(2), "DRAIN");
        let fx = h.listeners(vec![]);
        h.check(2, true);
        assert!(!h.slot(2).active(), "{:?}", logs(&fx));
        assert_eq!(h.st.operator(), &Saved::from_slots(h.st.slots()));
        // The operator may clear it while it is away.
        h.reload(Ok(cfg(2)));
        h.step(Event::Elapsed);
        let (r, fx) = h.control(Request::Admin {
            name: "mtp3".into(),
            state: Admin::Ready,
        });
        assert!(r.ok, "{r:?}");
        assert!(!saved(&fx).unwrap().backends.contains_key("mtp3"));
        assert_eq!(
            h.st.operator().backends.keys().collect::<Vec<_>>(),
            ["mtp1"]
        );
        h.reload(Ok(cfg(3)));
        assert_eq!(h.label(2), "DOWN");
    }

    #[test]
    fn a_restart_with_fewer_replicas_drains_the_ones_holding_connections() {
        let now = Instant::now();
        let mut conns = vec![0; MAX_REPLICAS as usize];
        // The earlier agent ran 4; mtp4 still holds connections.
        conns[3] = 5;
        let inp = Inputs {
            now,
            unix_ms: 1,
            conns: &conns,
        };
        let st = State::new(cfg(2), &Saved::default(), "/c".into(), "/p".into(), 7, &inp);
        let mut h = H {
            st,
            now,
            conns,
            kernel: vec![None; MAX_REPLICAS as usize],
        };
        let fx = h.start(vec![reg(0), reg(1)]);
        assert!(has_log(&fx, "backend mtp3 is draining before removal"));
        assert!(has_log(&fx, "backend mtp4 is draining before removal"));
        assert_eq!(h.st.settings().replicas, 4, "their counts stay in use");
        assert!(!h.slot(3).active() && !h.slot(2).active());
        assert_eq!(backend(&fx, 3).map(|b| b.enabled), Some(0));
        assert!(!has_log(&h.step(Event::Elapsed), "removed"));
        h.conns[3] = 0;
        let fx = h.step(Event::Elapsed);
        assert!(has_log(&fx, "backend mtp4 removed: drained"));
        assert!(has_log(&fx, "backend mtp3 removed: drained"));
        assert_eq!(settings(&fx).unwrap().replicas, 2);
    }

    #[test]
    fn checks_the_agent_cannot_run_leave_replicas_as_they_are() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let not_run = |h: &mut H, slot: usize| {
            let generation = h.slot(slot).check.generation;
            let cookie = h.slot(slot).listener_cookie;
            h.step(Event::CheckDone {
                slot,
                generation,
                cookie,
                result: CheckResult::io_fail(
                    reason::L4_CON,
                    &emfile,
                    "Too many open files".into(),
                    MS(0),
                ),
            })
        };
        let fx = not_run(&mut h, 0);
        assert_transcript(
            &fx,
            r#"
        count local fault Files
        ERROR agent problem: 1 health check could not run (out of file descriptors: Too many open files); replicas keep their state until checks run again
        "#,
        );
        // Many more within the minute: counted, not told, and no replica
        // falls however many there are.
        for i in 0..20 {
            let fx = not_run(h.after(MS(100)), i % 2);
            assert_eq!(logs(&fx), Vec::<String>::new());
        }
        assert_eq!((h.label(0), h.label(1)), ("UP".into(), "UP".into()));
        assert!(h.slot(0).active() && h.slot(1).active());
        // A minute on: told again, with how many since.
        let fx = not_run(h.after(Duration::from_secs(60)), 1);
        assert!(
            has_log(
                &fx,
                "agent problem: 21 health checks could not run (out of file descriptors: Too many open files)"
            ),
            "{:?}",
            logs(&fx)
        );
        // A real failure still counts against the replica.
        h.check(1, false);
        h.check(1, false);
        h.check(1, false);
        assert_eq!(h.label(1), "DOWN");
    }

    #[test]
    fn a_failed_reload_keeps_the_running_state() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let before = h.st.cfg().clone();
        let err = Config::parse("replicas = 0", "t.toml".as_ref())
            .and_then(|c| c.validate().map(|()| c))
            .unwrap_err();
        let fx = h.reload(Err(err));
        let r = reply(&fx).unwrap();
        assert!(!r.ok && r.message.contains("`replicas`: 0"), "{r:?}");
        assert!(has_log(
            &fx,
            "reload failed, keeping the running configuration: invalid value for `replicas`: 0"
        ));
        assert_eq!(fx.len(), 2, "a log line and the reply: {fx:?}");
        assert_eq!(h.st.cfg(), &before);
        assert_eq!(h.st.slots().len(), 2);
    }

    #[test]
    fn a_key_that_needs_a_restart_fails_the_reload() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let mut new = cfg(3);
        new.base_port = 20000;
        let fx = h.reload(Ok(new));
        assert_eq!(
            reply(&fx).unwrap().message,
            "`base_port` cannot change on reload; restart the agent"
        );
        assert_eq!(h.st.slots().len(), 2);
        assert_eq!(h.st.cfg().base_port, 10000);
    }

    #[test]
    fn a_port_change_is_reported() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let mut new = cfg(2);
        new.port = 8443;
        let fx = h.reload(Ok(new));
        assert_eq!(
            reply(&fx).unwrap().message,
            "2 replicas, balanced port now 8443"
        );
        assert_eq!(settings(&fx).unwrap().port, 8443);
    }

    #[test]
    fn sighup_reads_the_config_and_notifies_ready_after() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.step(Event::Signal(Signal::Hangup));
        assert_transcript(
            &fx,
            "
            INFO  SIGHUP: reloading /etc/mtlb/mtlb.toml
            read the configuration (Signal)
            ",
        );
        let fx = h.step(Event::Reloaded {
            origin: Origin::Signal,
            result: Box::new(Ok(cfg(2))),
        });
        assert!(reply(&fx).is_none());
        assert_eq!(fx.last(), Some(&Effect::Notify(Notice::Reloaded)));
        // A reload asked on the control socket is answered after reading.
        let fx = h.step(Event::Control(Request::Reload));
        assert_eq!(fx, [Effect::ReadConfig(Origin::Control)]);
    }

    // ----------------------------------------------------------- the rest

    #[test]
    fn stop_signals_stop() {
        let mut h = H::running(cfg(2), &[0, 1]);
        for (s, line) in [
            (Signal::Interrupt, "SIGINT: stopping"),
            (Signal::Terminate, "SIGTERM: stopping"),
        ] {
            let fx = h.step(Event::Signal(s));
            assert_transcript(&fx, &format!("INFO  {line}\nStop"));
        }
    }

    #[test]
    fn time_passing_asks_for_the_cookie_watch() {
        let mut h = H::running(cfg(2), &[0, 1]);
        assert!(h.step(Event::Elapsed).contains(&Effect::WatchCookies));
    }

    #[test]
    fn a_failed_write_is_retried() {
        let mut h = H::running(cfg(2), &[0, 1]);
        assert_eq!(backend(&h.step(Event::Elapsed), 1), None);
        h.st.forget_written(1);
        let fx = h.step(Event::Elapsed);
        assert_eq!(backend(&fx, 1).unwrap().enabled, 1);
    }

    // ------------------------------------------------------ transcripts

    #[test]
    fn transcript_a_replica_restarts() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.conns[1] = 4;
        let fx = h.listeners(vec![closed(1), reg_as(1, 1)]);
        assert_transcript(
            &fx,
            r#"
        INFO  replica mtp2 unregistered: 127.0.0.1:10001 (IPv4): its listener closed
        FindOwners
        BACKENDS[1] enabled=1 weight=1 listener=0
        STATUS[1] state=2 count=0 registered=0 flags=0
        WARN  backend mtp2 is DOWN, reason: no listener registered, info: "listener closed", check duration: 0ms. 1 active backends left. 4 connections active.
        Adopt
        INFO  replica mtp2 registered: 127.0.0.1:10001 (IPv4, via listen hook)
        FindOwners
        check mtp2 (listener 2001)
        STATUS[1] state=2 count=0 registered=1 flags=0
        "#,
        );
        let fx = h.check(1, true);
        assert_transcript(
            &fx,
            r#"
        DEBUG check mtp2: passed, reason: Layer4 check passed, 1ms
        FindOwners
        BACKENDS[1] enabled=1 weight=1 listener=2001
        STATUS[1] state=1 count=0 registered=1 flags=0
        INFO  backend mtp2 is UP, reason: Layer4 check passed, check duration: 1ms. 2 active backends online.
        "#,
        );
    }

    fn announcing(replicas: u16) -> Config {
        let mut c = cfg(replicas);
        c.announce.vips = vec!["192.0.2.80".parse().unwrap()];
        c
    }

    fn announces(fx: &[Effect]) -> Vec<bool> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Announce { announce, .. } => Some(*announce),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn transcript_the_host_is_announced_after_rise_and_withdrawn_after_fall() {
        let mut h = H::running(announcing(2), &[0, 1]);
        assert!(announces(&h.after(MS(2900)).step(Event::Elapsed)).is_empty());
        let fx = h.after(MS(100)).step(Event::Elapsed);
        assert_transcript(
            &fx,
            r#"
        WatchCookies
        announce [192.0.2.80] in table 4242
        INFO  announcing 192.0.2.80: 2 replicas UP for 3.0s
        "#,
        );
        // One replica going leaves the host able.
        let fx = h.listeners(vec![closed(0)]);
        assert!(announces(&fx).is_empty());
        h.listeners(vec![closed(1)]);
        assert!(announces(&h.after(MS(900)).step(Event::Elapsed)).is_empty());
        let fx = h.after(MS(100)).step(Event::Elapsed);
        assert!(has_log(
            &fx,
            "withdrawing 192.0.2.80: no replica UP for 1.0s"
        ));
        assert_eq!(announces(&fx), [false]);
        assert_eq!(h.st.announcement().changes(), 2);
    }

    #[test]
    fn nothing_is_announced_before_steering_runs() {
        let mut c = announcing(1);
        c.announce.rise_ms = 0;
        let mut h = H::new(c);
        assert!(announces(&h.step(Event::Elapsed)).is_empty());
        let fx = h.start(vec![reg(0)]);
        assert!(announces(&fx).is_empty());
        let fx = h.check(0, true);
        assert_eq!(announces(&fx), [true]);
    }

    #[test]
    fn host_drain_withdraws_at_once_is_saved_and_answered_after_saving() {
        let mut h = H::running(announcing(2), &[0, 1]);
        h.after(MS(3000)).step(Event::Elapsed);
        assert!(h.st.announcement().announced());
        let fx = h.step_only(Event::Control(Request::Host { drain: Some(true) }));
        assert_eq!(announces(&fx), [false]);
        assert!(saved(&fx).unwrap().host_drained);
        assert_eq!(reply(&fx), None, "answered once saved");
        let fx = h.step_only(Event::Saved { error: None });
        let r = reply(&fx).unwrap();
        assert!(r.ok && r.message.contains("host drained"), "{r:?}");
        // The replicas are untouched: they still take clients.
        assert!(h.slot(0).active() && h.slot(1).active());
        let (r, _) = h.control(Request::Host { drain: None });
        assert_eq!(r.message, "192.0.2.80: withdrawn: drained by operator");
        // Ready: announced at once, the replicas having served all along.
        let (_, fx) = h.control(Request::Host { drain: Some(false) });
        assert_eq!(announces(&fx), [true]);
        let (r, _) = h.control(Request::Host { drain: None });
        assert_eq!(r.message, "192.0.2.80: announced (2 replicas UP)");
    }

    #[test]
    fn a_saved_host_drain_holds_across_a_restart() {
        let saved = Saved {
            host_drained: true,
            ..Saved::default()
        };
        let mut c = announcing(1);
        c.announce.rise_ms = 0;
        let mut h = H::with_saved(c, &saved);
        h.start(vec![reg(0)]);
        let fx = h.check(0, true);
        assert!(announces(&fx).is_empty());
        assert_eq!(h.st.announcement().why(), Why::Drained);
    }

    #[test]
    fn host_commands_without_vips_are_errors() {
        let mut h = H::running(cfg(1), &[0]);
        let (r, fx) = h.control(Request::Host { drain: Some(true) });
        assert!(!r.ok && r.message.contains("[announce] vips"), "{r:?}");
        assert_eq!(saved(&fx), None);
    }

    #[test]
    fn a_reload_raising_min_up_withdraws_after_fall() {
        let mut h = H::running(announcing(2), &[0, 1]);
        h.after(MS(3000)).step(Event::Elapsed);
        assert!(h.st.announcement().announced());
        h.listeners(vec![closed(1)]);
        let mut c = announcing(2);
        c.announce.min_up = 2;
        c.announce.fall_ms = 200;
        let fx = h.reload(Ok(c));
        assert!(
            announces(&fx).is_empty(),
            "fall counts from now: {}",
            transcript(&fx)
        );
        assert!(!has_log(&fx, "failed"), "{}", transcript(&fx));
        let fx = h.after(MS(200)).step(Event::Elapsed);
        assert!(
            has_log(
                &fx,
                "withdrawing 192.0.2.80: 1 replica UP, min_up 2 for 0.2s"
            ),
            "{}",
            transcript(&fx)
        );
        assert_eq!(announces(&fx), [false]);
    }

    #[test]
    fn a_drain_whose_withdrawal_fails_says_so_and_is_retried() {
        let mut h = H::running(announcing(2), &[0, 1]);
        h.after(MS(3000)).step(Event::Elapsed);
        let fx = h.step_only(Event::Control(Request::Host { drain: Some(true) }));
        assert_eq!(announces(&fx), [false]);
        h.st.announce_failed(h.now);
        let fx = h.step_only(Event::Saved { error: None });
        let r = reply(&fx).unwrap();
        assert!(
            !r.ok && r.message.contains("writing the routes failed"),
            "{r:?}"
        );
        let (r, _) = h.control(Request::Host { drain: None });
        assert!(r.message.contains("being rewritten"), "{r:?}");
        // A second later the withdrawal is written again, not told again.
        let fx = h.after(MS(1000)).step(Event::Elapsed);
        assert_eq!(announces(&fx), [false]);
        assert!(!has_log(&fx, "withdrawing"), "{}", transcript(&fx));
        let (r, _) = h.control(Request::Host { drain: None });
        assert_eq!(r.message, "192.0.2.80: withdrawn: drained by operator");
    }

    #[test]
    fn a_takeover_waits_for_the_first_checks_of_unproven_listeners() {
        let mut h = H::new(announcing(2));
        h.st.found_announced(Some(true));
        let fx = h.start(vec![reg(0), reg(1)]);
        assert_eq!(started_checks(&fx), [0, 1]);
        // Slower than fall_ms (1 s), within the check timeout + interval.
        assert!(announces(&h.after(MS(1500)).step(Event::Elapsed)).is_empty());
        assert!(announces(&h.check(0, true)).is_empty());
        assert!(announces(&h.after(MS(5000)).step(Event::Elapsed)).is_empty());
        assert!(h.st.announcement().announced());
    }

    #[test]
    fn a_takeover_of_an_announced_host_withdraws_nothing() {
        let mut h = H::new(announcing(2));
        h.st.found_announced(Some(true));
        let fx = h.start_verified(vec![reg(0), reg(1)], vec![cookie(0, 0), cookie(1, 0)]);
        assert!(announces(&fx).is_empty());
        assert!(announces(&h.after(MS(5000)).step(Event::Elapsed)).is_empty());
        assert!(h.st.announcement().announced());
    }

    #[test]
    fn transcript_refused_binds_are_logged_once_a_minute_per_slot() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let bind = |slot: u32| Event::BindRefused {
            slot,
            addr: SocketAddr::from(([127, 0, 0, 1], 10000 + slot as u16)),
            uid: 1000,
            why: BindWhy::Owner,
        };
        assert_transcript(
            &h.step(bind(1)),
            r#"
        WARN  refused a bind to 127.0.0.1:10001 (mtp2's port) by uid 1000: its owner is not in replica_uids [0]
        "#,
        );
        for _ in 0..3 {
            assert_transcript(&h.after(MS(1000)).step(bind(1)), "");
        }
        assert_transcript(
            &h.step(bind(0)),
            r#"
        WARN  refused a bind to 127.0.0.1:10000 (mtp1's port) by uid 1000: its owner is not in replica_uids [0]
        "#,
        );
        assert_transcript(
            &h.after(MS(57_000)).step(bind(1)),
            r#"
        WARN  refused a bind to 127.0.0.1:10001 (mtp2's port) by uid 1000: its owner is not in replica_uids [0] (3 more refusals reported since the last line)
        "#,
        );
    }

    #[test]
    fn transcript_with_a_replica_cgroup_start_and_refusals_name_it() {
        let mut c = cfg(2);
        c.replica_uids = vec![0, 65534];
        c.replica_cgroup = "mtproxy.slice".into();
        let mut h = H::new(c);
        let fx = h.start(vec![]);
        assert!(
            has_log(
                &fx,
                "replica ports belong to uids [0, 65534] in replica_cgroup mtproxy.slice: binds to them from anywhere else are refused; sock_ops runs in that cgroup only"
            ),
            "{:?}",
            logs(&fx)
        );
        // Outside the cgroup, by uid and the binder's cgroup (its path
        // when found).
        let outside = |slot: u32, uid: u32, path: Option<&str>| Event::BindRefused {
            slot,
            addr: SocketAddr::from(([127, 0, 0, 1], 10000 + slot as u16)),
            uid,
            why: BindWhy::Cgroup {
                id: 4242,
                path: path.map(Into::into),
            },
        };
        assert_transcript(
            &h.step(outside(1, 65534, Some("/user.slice"))),
            r#"
        WARN  refused a bind to 127.0.0.1:10001 (mtp2's port) by uid 65534 in cgroup /user.slice: it is not in replica_cgroup mtproxy.slice
        "#,
        );
        assert_transcript(
            &h.step(outside(0, 0, None)),
            r#"
        WARN  refused a bind to 127.0.0.1:10000 (mtp1's port) by uid 0 in cgroup id 4242: it is not in replica_cgroup mtproxy.slice
        "#,
        );
    }

    #[test]
    fn transcript_a_failed_save_fails_the_operators_command() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.step_only(Event::Control(Request::Admin {
            name: "mtp2".into(),
            state: Admin::Drain,
        }));
        assert_transcript(
            &fx,
            r#"
        BACKENDS[1] enabled=0 weight=1 listener=2000
        STATUS[1] state=3 count=0 registered=1 flags=0
        save mtp2=DRAIN/None
        INFO  backend mtp2 is set to DRAIN mode (by operator). 1 active backends.
        "#,
        );
        let fx = h.step_only(Event::Saved {
            error: Some("cannot write state file /var/lib/mtlb/state-1.json: No space left on device (os error 28)".into()),
        });
        assert_transcript(
            &fx,
            r#"
        ERROR saving operator state: cannot write state file /var/lib/mtlb/state-1.json: No space left on device (os error 28)
        reply error: backend mtp2 is set to DRAIN mode (by operator), but it could not be saved (cannot write state file /var/lib/mtlb/state-1.json: No space left on device (os error 28)): it holds until the agent restarts
        "#,
        );
        // The change holds in the running agent.
        assert_eq!(h.label(1), "DRAIN");
    }

    #[test]
    fn transcript_handshake_counts_are_bounded_by_recent_assignments() {
        let mut c = cfg(2);
        c.handshake_timeout_ms = 3000;
        let mut h = H::running(c, &[0]);
        let assigned = |a: u64| Event::Assigned {
            totals: vec![a, 0],
            listening: vec![true, false],
        };
        // No bound for a listening slot until samples span the window.
        assert_transcript(
            &h.step(assigned(10)),
            r#"
        handshakes of mtp1 not below 0
        handshakes of mtp2 at most 0
        "#,
        );
        // 5 assigned within the window: at most 5 still in flight.
        assert_transcript(
            &h.after(MS(3000)).step(assigned(15)),
            r#"
        handshakes of mtp1 at most 5
        handshakes of mtp2 at most 0
        "#,
        );
        // None assigned within the window: none can be in flight.
        assert_transcript(
            &h.after(MS(3000)).step(assigned(15)),
            r#"
        handshakes of mtp1 at most 0
        handshakes of mtp2 at most 0
        "#,
        );
    }

    #[test]
    fn transcript_takeover_trusts_what_the_earlier_agent_let_take_clients() {
        let up = mtlb_common::STATE_UP;
        let seen = |enabled: u32, listener_cookie: u64, oper: u32, listener: u64| Inherited {
            backend: Backend {
                weight: 1,
                enabled,
                listener_cookie,
            },
            oper,
            listener,
        };
        let slots = [
            // Proven, UP, enabled: kept as it is.
            seen(1, 1000, up, 1000),
            // A listener other than the proven one: not trusted.
            seen(1, 2000, up, 2001),
            // DOWN by the earlier agent's checks: not trusted.
            seen(0, 3000, mtlb_common::STATE_DOWN, 3000),
            // Nothing listening.
            seen(1, 0, up, 0),
        ];
        let cases = [
            (
                true,
                [1000, 0, 0, 0],
                r#"
        BACKENDS[1] enabled=1 weight=1 listener=0
        BACKENDS[2] enabled=0 weight=1 listener=0
        "#,
            ),
            // The earlier agent verified nothing: any listener it steered to.
            (
                false,
                [1000, 2001, 0, 0],
                r#"
        BACKENDS[1] enabled=1 weight=1 listener=2001
        BACKENDS[2] enabled=0 weight=1 listener=0
        "#,
            ),
        ];
        for (verifying, want, transcript) in cases {
            let (trusted, fx) = inherit(verifying, &slots);
            assert_eq!(trusted, want);
            assert_transcript(&fx, transcript);
        }
    }

    /// A stop mark of `slot`'s listener incarnation `n`, made at `at_ns`.
    fn mark(slot: usize, n: u64, at_ns: u64, queued: u32) -> super::super::effect::StopMark {
        super::super::effect::StopMark {
            cookie: cookie(slot, n),
            at_ns,
            pid: 4242,
            signal: mtlb_common::SIGTERM,
            queued: Some(queued),
        }
    }

    fn marks(slot: usize, m: super::super::effect::StopMark) -> Event {
        let mut v = vec![None; 2];
        v[slot] = Some(m);
        Event::StopMarks(v)
    }

    fn settles(fx: &[Effect]) -> Vec<(u32, Option<u64>, u64)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::SettleStop {
                    slot,
                    clear,
                    queued,
                } => Some((*slot, *clear, *queued)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stop_mark_takes_the_replica_down_once() {
        let mut h = H::running(cfg(2), &[0, 1]);
        let fx = h.step(marks(1, mark(1, 0, 5, 3)));
        assert!(
            has_log(
                &fx,
                "backend mtp2 is DOWN, reason: stopping (SIGTERM to pid 4242), info: \"3 connections were in its accept queue\""
            ),
            "{:?}",
            logs(&fx)
        );
        assert_eq!(backend(&fx, 1).unwrap().enabled, 0);
        assert_eq!(settles(&fx), [(1, None, 3)]);
        assert_ne!(
            h.slot(1).status(h.st.cfg(), 1, h.now).flags & mtlb_common::STATUS_STOPPING,
            0
        );
        // Read again on the next poll: nothing new.
        let fx = h.step(marks(1, mark(1, 0, 5, 3)));
        assert!(logs(&fx).is_empty() && settles(&fx).is_empty(), "{fx:?}");
        // Checks wait: a passing one does not bring it back.
        h.check(1, true);
        assert!(!h.slot(1).active());
        let fx = h.after(MS(200)).step(Event::ChecksDue);
        assert!(!started_checks(&fx).contains(&1));
    }

    #[test]
    fn a_stopping_replica_whose_listener_closes_comes_back_with_the_next() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.step(marks(1, mark(1, 0, 5, 0)));
        let fx = h.listeners(vec![closed(1)]);
        assert_eq!(settles(&fx), [(1, Some(cookie(1, 0)), 0)]);
        assert!(h.slot(1).stopping.is_none());
        // The mark stays in the map until settled; a read of it now (its
        // listener gone) changes nothing.
        let fx = h.step(marks(1, mark(1, 0, 6, 0)));
        assert!(logs(&fx).is_empty(), "{:?}", logs(&fx));
        let fx = h.listeners(vec![reg_as(1, 1)]);
        assert_eq!(started_checks(&fx), [1]);
        h.check(1, true);
        assert!(h.slot(1).active());
    }

    #[test]
    fn a_stop_mark_is_lifted_after_the_grace_and_the_replica_checked() {
        let mut c = cfg(2);
        c.stop_grace_ms = 1000;
        let mut h = H::running(c, &[0, 1]);
        h.step(marks(1, mark(1, 0, 5, 0)));
        let fx = h.after(MS(900)).step(Event::Elapsed);
        assert!(settles(&fx).is_empty());
        let fx = h.after(MS(200)).step(Event::Elapsed);
        assert_eq!(settles(&fx), [(1, Some(cookie(1, 0)), 0)]);
        assert!(
            has_log(
                &fx,
                "backend mtp2 still listens 1.0s after SIGTERM to pid 4242"
            ),
            "{:?}",
            logs(&fx)
        );
        assert_eq!(started_checks(&fx), [1]);
        // DOWN by its checks now: `rise` of them bring it back.
        assert_eq!(h.slot(1).health().down_cause(), Some(DownCause::Checks));
        h.check(1, true);
        h.check(1, true);
        assert!(h.slot(1).active());
        // A new signal later is a new mark.
        let fx = h.step(marks(1, mark(1, 0, 99, 0)));
        assert!(has_log(&fx, "backend mtp2 is DOWN, reason: stopping"));
    }

    #[test]
    fn a_mark_of_a_listener_the_slot_does_not_hold_changes_nothing() {
        let mut h = H::running(cfg(2), &[0, 1]);
        h.listeners(vec![closed(1), reg_as(1, 1)]);
        let fx = h.step(marks(1, mark(1, 0, 5, 0)));
        assert!(logs(&fx).is_empty(), "{:?}", logs(&fx));
        assert!(settles(&fx).is_empty());
        // A listener the core has not read yet, marked: taken in once the
        // registrations say it is the slot's.
        let fx = h.step(marks(1, mark(1, 2, 6, 0)));
        assert!(logs(&fx).is_empty());
        h.kernel_sees(vec![closed_as(1, 1), reg_as(1, 2)]);
        let now = h.registrations();
        h.step(Event::Listeners(now));
        // (Not proven yet, so DOWN already: no new DOWN line.)
        let fx = h.step(marks(1, mark(1, 2, 6, 0)));
        assert_eq!(settles(&fx), [(1, None, 0)]);
        assert!(h.slot(1).stopping.is_some());
        // Its check, launched at registration, is dropped: it stays out.
        h.check(1, true);
        assert!(!h.slot(1).active());
    }
}
