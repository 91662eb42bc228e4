//! Convergence as a property of the core: after any sequence of reloads,
//! operator commands, listeners registering and closing, check results,
//! connections and restarts, once things are quiet the agent shows what a
//! fresh agent started with the final configuration, the same listeners
//! and the same saved state shows, and its saved state is its live one.
//!
//! A small world stands in for the shell and the kernel: it carries the
//! core's effects out (map writes, saves, checks, re-reads) the way
//! `apply.rs` does, and holds what the kernel would (registrations,
//! BACKENDS, connection counts). proptest generates the sequences and
//! shrinks a failing one; the seed is printed with it.

use super::{
    core::{self, State},
    effect::{Effect, Event, Inherited, Inputs, Origin, Registration, Registrations},
    persist::Saved,
};
use crate::{
    checks::health::{Admin, CheckResult},
    checks::reason,
    config::{Config, ConfigError},
    control::Request,
};
use mtlb_common::{Backend, MAX_REPLICAS, STATE_UP};
use proptest::{
    prelude::*,
    test_runner::{Config as RunConfig, RngSeed, TestCaseError, TestRunner},
};
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Replica slots the world has ports for (one more than the most any
/// configuration asks, so a listener beyond the configured ones exists).
const PORTS: usize = 5;

#[derive(Debug, Clone)]
enum Action {
    /// The file says `replicas` now, and a reload is asked by `origin`.
    Reload(u16, Origin),
    /// The file is broken and a reload is asked.
    BadReload,
    Admin(usize, Admin),
    Weight(usize, u32),
    /// A replica starts listening (a new socket) or stops.
    Listen(usize),
    Close(usize),
    /// A replica's checks pass from now on, or fail.
    Healthy(usize, bool),
    /// The shell reads the registrations.
    Poll,
    /// One check in flight finishes (which one, modulo those in flight).
    Finish(usize),
    /// Time passes (tenths of a second), the 100 ms tick runs.
    Elapse(u8),
    ChecksDue,
    /// Clients connect to or leave a slot.
    Conns(usize, u8),
    /// The agent stops (kill -9) and a new one takes over.
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    let slot = 0..PORTS;
    let origin = prop_oneof![Just(Origin::Control), Just(Origin::Signal)];
    let admin = prop_oneof![Just(Admin::Ready), Just(Admin::Drain), Just(Admin::Maint)];
    prop_oneof![
        4 => (1..=4u16, origin).prop_map(|(n, o)| Action::Reload(n, o)),
        1 => Just(Action::BadReload),
        2 => (slot.clone(), admin).prop_map(|(s, a)| Action::Admin(s, a)),
        1 => (slot.clone(), 1..=4u32).prop_map(|(s, w)| Action::Weight(s, w)),
        2 => slot.clone().prop_map(Action::Listen),
        2 => slot.clone().prop_map(Action::Close),
        2 => (slot.clone(), any::<bool>()).prop_map(|(s, h)| Action::Healthy(s, h)),
        3 => Just(Action::Poll),
        4 => any::<usize>().prop_map(Action::Finish),
        3 => (0..30u8).prop_map(Action::Elapse),
        2 => Just(Action::ChecksDue),
        2 => (slot, 0..3u8).prop_map(|(s, n)| Action::Conns(s, n)),
        1 => Just(Action::Restart),
    ]
}

fn config(replicas: u16) -> Config {
    Config {
        replicas,
        ..Config::default()
    }
}

/// The core as `Agent::start` makes it.
fn core_state(cfg: Config, saved: &Saved, now: Instant, conns: &[u64]) -> State {
    let inp = Inputs {
        now,
        unix_ms: 1,
        conns,
    };
    State::new(cfg, saved, "/c".into(), "/p".into(), 7, &inp)
}

/// A check in flight, as the shell launched it.
#[derive(Debug, Clone, Copy)]
struct Running {
    slot: usize,
    generation: u64,
    cookie: u64,
}

/// The shell and the kernel around one core.
struct World {
    st: State,
    now: Instant,
    /// What the configuration file says.
    file: Result<Config, ()>,
    /// The state file.
    saved: Saved,
    /// Registered listeners by slot, and the next socket cookie.
    kernel: Vec<Option<u64>>,
    cookies: u64,
    /// BACKENDS as last written.
    backends: Vec<Backend>,
    /// STATUS oper state as last written.
    opers: Vec<u32>,
    /// Connections per slot (established, as the kernel counts).
    conns: Vec<u64>,
    healthy: Vec<bool>,
    checks: Vec<Running>,
}

fn registration(slot: usize, cookie: u64) -> Registration {
    let addr = format!("127.0.0.1:{}", 10000 + slot);
    Registration {
        cookie,
        desc: format!("{addr} (IPv4, via listen hook)"),
        short: format!("{addr} (IPv4)"),
    }
}

impl World {
    /// Every replica listening and healthy, under `replicas`.
    fn new(replicas: u16) -> Self {
        let kernel = (0..MAX_REPLICAS as u64)
            .map(|i| (i < PORTS as u64).then_some(i + 1))
            .collect();
        let cfg = config(replicas);
        Self::started(
            Ok(cfg),
            Saved::default(),
            kernel,
            vec![true; PORTS],
            Instant::now(),
        )
    }

    /// A fresh agent over `kernel`'s listeners (cookies up to their
    /// highest used) and maps that hold nothing yet, started.
    fn started(
        file: Result<Config, ()>,
        saved: Saved,
        kernel: Vec<Option<u64>>,
        healthy: Vec<bool>,
        now: Instant,
    ) -> Self {
        let n = MAX_REPLICAS as usize;
        let cfg = file.clone().expect("a fresh agent starts on a valid file");
        let mut w = Self {
            st: core_state(cfg, &saved, now, &[]),
            now,
            file,
            saved,
            cookies: kernel.iter().flatten().copied().max().unwrap_or(0),
            kernel,
            backends: vec![Backend::default(); n],
            opers: vec![0; n],
            conns: vec![0; n],
            healthy,
            checks: Vec::new(),
        };
        let listeners = w.registrations();
        w.step(Event::Started {
            listeners,
            verified: vec![],
        });
        w
    }

    fn listen(&mut self, slot: usize) {
        self.cookies += 1;
        self.kernel[slot] = Some(self.cookies);
    }

    /// The registrations of the slots in use, as the shell reads them.
    fn registrations(&self) -> Registrations {
        (0..self.st.slots().len())
            .map(|i| self.kernel[i].map(|c| registration(i, c)))
            .collect()
    }

    /// Steps `ev` and carries out the effects, as `apply.rs` does: the
    /// events some effects produce are stepped in the same turn.
    fn step(&mut self, ev: Event) {
        let mut queue = VecDeque::from([ev]);
        while let Some(ev) = queue.pop_front() {
            let inp = Inputs {
                now: self.now,
                unix_ms: 1,
                conns: &self.conns[..self.st.slots().len()],
            };
            for e in core::step(&mut self.st, &inp, ev) {
                match e {
                    Effect::WriteBackend { slot, backend } => {
                        self.backends[slot as usize] = backend
                    }
                    Effect::WriteStatus { slot, status } => {
                        self.opers[slot as usize] = status.state
                    }
                    Effect::Save(s) => {
                        self.saved = s;
                        queue.push_back(Event::Saved { error: None });
                    }
                    Effect::StartCheck {
                        slot,
                        generation,
                        cookie,
                        ..
                    } => self.checks.push(Running {
                        slot,
                        generation,
                        cookie,
                    }),
                    Effect::ReadConfig(origin) => queue.push_back(Event::Reloaded {
                        origin,
                        result: Box::new(self.read_config()),
                    }),
                    // Every listener registers itself here: adopting finds
                    // nothing more than a reading does.
                    Effect::Adopt | Effect::PollListeners => {
                        queue.push_back(Event::Listeners(self.registrations()))
                    }
                    _ => {}
                }
            }
        }
    }

    fn read_config(&self) -> Result<Config, ConfigError> {
        match &self.file {
            Ok(c) => Ok(c.clone()),
            Err(()) => Err(Config::parse("replicas = 0", "t.toml".as_ref())
                .and_then(|c| c.validate().map(|()| c))
                .expect_err("replicas = 0 is invalid")),
        }
    }

    /// What a check of `r` finds: a pass while the replica is healthy and
    /// the listener it was launched for is the one listening.
    fn result(&self, r: Running) -> CheckResult {
        let listening = self.kernel[r.slot].is_some_and(|c| r.cookie == 0 || c == r.cookie);
        if self.healthy[r.slot] && listening {
            CheckResult::pass(reason::L4_OK, Duration::from_millis(1))
        } else {
            CheckResult::fail(reason::L4_CON, None, Duration::from_millis(1))
        }
    }

    fn finish(&mut self, i: usize) {
        if self.checks.is_empty() {
            return;
        }
        let r = self.checks.remove(i % self.checks.len());
        let result = self.result(r);
        self.step(Event::CheckDone {
            slot: r.slot,
            generation: r.generation,
            cookie: r.cookie,
            result,
        });
    }

    fn request(&mut self, req: Request) {
        self.step(Event::Control(req));
    }

    /// kill -9 and a new agent: the maps and the files stay, checks in
    /// flight are lost; the new one trusts what the earlier one let take
    /// clients, as `Agent::start` does.
    fn restart(&mut self) {
        // A new agent with a broken file would not start: the operator
        // fixes the file first.
        if let Ok(cfg) = self.file.clone() {
            self.restart_with(cfg)
        }
    }

    fn restart_with(&mut self, cfg: Config) {
        self.checks.clear();
        let n = cfg.replicas as usize;
        let inherited: Vec<Inherited> = (0..n)
            .map(|i| Inherited {
                backend: self.backends[i],
                oper: self.opers[i],
                listener: self.kernel[i].unwrap_or(0),
            })
            .collect();
        let (verified, writes) = core::inherit(super::reconcile::verifies(&cfg), &inherited);
        for w in writes {
            if let Effect::WriteBackend { slot, backend } = w {
                self.backends[slot as usize] = backend;
            }
        }
        self.st = core_state(cfg, &self.saved, self.now, &self.conns);
        let listeners = self.registrations();
        self.step(Event::Started {
            listeners,
            verified,
        });
    }

    fn act(&mut self, a: &Action) {
        let name = |s: usize| format!("mtp{}", s + 1);
        match *a {
            Action::Reload(n, origin) => {
                self.file = Ok(config(n));
                self.reload(origin);
            }
            Action::BadReload => {
                self.file = Err(());
                self.reload(Origin::Control);
            }
            Action::Admin(s, state) => self.request(Request::Admin {
                name: name(s),
                state,
            }),
            Action::Weight(s, weight) => self.request(Request::Weight {
                name: name(s),
                weight,
            }),
            Action::Listen(s) => self.listen(s),
            Action::Close(s) => self.kernel[s] = None,
            Action::Healthy(s, h) => self.healthy[s] = h,
            Action::Poll => self.step(Event::Listeners(self.registrations())),
            Action::Finish(i) => self.finish(i),
            Action::Elapse(t) => {
                self.now += Duration::from_millis(100 * t as u64);
                self.step(Event::Elapsed);
            }
            Action::ChecksDue => self.step(Event::ChecksDue),
            Action::Conns(s, n) => self.conns[s] = n as u64,
            Action::Restart => self.restart(),
        }
    }

    fn reload(&mut self, origin: Origin) {
        match origin {
            Origin::Control => self.request(Request::Reload),
            Origin::Signal => self.step(Event::Signal(super::effect::Signal::Hangup)),
        }
    }

    /// Things get quiet: the file is valid, clients of replicas scaled
    /// away leave, and time passes with every check answered, long enough
    /// for any rise or fall to complete.
    fn settle(&mut self) {
        for c in self.conns.iter_mut() {
            *c = 0;
        }
        for _ in 0..12 {
            self.now += Duration::from_secs(30);
            self.step(Event::Elapsed);
            self.step(Event::Listeners(self.registrations()));
            self.step(Event::ChecksDue);
            while !self.checks.is_empty() {
                self.finish(0);
            }
        }
    }

    /// What an operator sees of each replica: name, listener, state label,
    /// admin state, weight, and what the kernel is told.
    fn shown(&self) -> Vec<String> {
        let cfg = self.st.cfg();
        self.st
            .slots()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let b = acted_on(s.backend(cfg, i, self.now));
                format!(
                    "{} listener={} {} weight={} enabled={} verified={} status={}",
                    s.name,
                    s.listener_cookie,
                    s.state(cfg),
                    s.weight(cfg, i),
                    b.enabled,
                    b.listener_cookie,
                    (self.opers[i] == STATE_UP) as u8,
                )
            })
            .collect()
    }
}

/// A BACKENDS entry as the kernel acts on it: the proven listener of a
/// disabled slot is never looked at (steer.rs), so which one an agent
/// remembers there is history, not behaviour.
fn acted_on(b: Backend) -> Backend {
    if b.enabled == 0 {
        Backend {
            listener_cookie: 0,
            ..b
        }
    } else {
        b
    }
}

/// Runs `actions`, settles, and compares with a fresh agent given the
/// final configuration, listeners and saved state.
fn converges(start: u16, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut w = World::new(start);
    for a in actions {
        w.act(a);
    }
    // Quiet means a valid file, read: a broken one keeps the running
    // config, which is what a fresh agent must be given then.
    if w.file.is_err() {
        w.file = Ok(w.st.cfg().clone());
    }
    w.settle();
    // The live slots hold exactly the saved choices.
    let live = super::persist::Saved::from_slots(w.st.slots());
    let saved_here: Saved = Saved {
        backends: w
            .saved
            .backends
            .iter()
            .filter(|(k, _)| w.st.slots().iter().any(|s| &s.name == *k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        host_drained: false,
        announce: None,
    };
    prop_assert_eq!(&live, &saved_here, "live and saved choices differ");
    prop_assert_eq!(
        w.st.operator(),
        &w.saved,
        "the core's choices are not the saved ones"
    );

    let mut fresh = World::started(
        w.file.clone(),
        w.saved.clone(),
        w.kernel.clone(),
        w.healthy.clone(),
        w.now,
    );
    fresh.settle();
    prop_assert_eq!(w.shown(), fresh.shown());
    let kernel = |w: &World| w.backends.iter().copied().map(acted_on).collect::<Vec<_>>();
    prop_assert_eq!(kernel(&w), kernel(&fresh), "BACKENDS differ");
    Ok(())
}

#[test]
fn any_sequence_converges_to_what_a_fresh_agent_shows() {
    let seed = std::env::var("MTLB_PROP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand_seed);
    let cases = std::env::var("MTLB_PROP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut runner = TestRunner::new(RunConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..RunConfig::default()
    });
    let strategy = (1..=4u16, proptest::collection::vec(action(), 0..40));
    if let Err(e) = runner.run(&strategy, |(start, actions)| converges(start, &actions)) {
        panic!("{e}\nseed {seed}: rerun with MTLB_PROP_SEED={seed}");
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish()
}

/// The sequences that found the bugs this test was written for, kept as
/// plain tests.
#[test]
fn a_quick_scale_down_and_up_converges() {
    let seq = [
        Action::Reload(2, Origin::Control),
        Action::Poll,
        Action::Elapse(1),
        Action::Reload(3, Origin::Control),
    ];
    converges(3, &seq).unwrap();
}

#[test]
fn a_drain_across_a_scale_down_and_up_converges() {
    let seq = [
        Action::Admin(2, Admin::Drain),
        Action::Reload(2, Origin::Signal),
        Action::Elapse(1),
        Action::Reload(3, Origin::Signal),
    ];
    converges(3, &seq).unwrap();
}
