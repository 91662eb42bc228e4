//! Harness for mtlb's privileged integration tests.
//!
//! Every test runs in a network namespace of its own ([`Netns`]): the test
//! thread enters it, so replicas (threads of the test process) and clients
//! live there; the agent (`$MTLB_BIN run`) is started inside it and shares
//! the host's mount namespace, so its pins are visible at
//! `/sys/fs/bpf/mtlb/<netns inode>`. Guards clean up namespaces, agents and
//! pins. Helpers panic with context instead of returning errors.
//!
//! By concern: [`netns`] (namespaces), [`agent`] (the agent under test,
//! its CLI, and the state oracle: a replica's state read from the STATUS
//! map, so tests await states rather than log lines), [`config`] (one
//! builder for `mtlb.toml`), [`replica`] (stand-in replicas), [`peers`]
//! (MTProxy servers, Python fixtures, middle-proxy stand-in), [`conn`]
//! (clients and the one connect loop), [`control`] (misbehaving control
//! clients), [`http`] (stats endpoint and Prometheus text), [`cgroup`],
//! [`files`] (temp dirs, bounded commands), [`docker`], [`ansible`] (deploy/
//! and its Ansible, offline), [`bgp`] (the several-hosts lab: BIRD, a
//! router, ECMP).

pub mod agent;
pub mod ansible;
pub mod bgp;
pub mod cgroup;
pub mod clients;
pub mod config;
pub mod conn;
pub mod control;
pub mod docker;
pub mod files;
pub mod http;
pub mod netns;
pub mod peers;
pub mod replica;

pub use agent::*;
pub use ansible::*;
pub use bgp::*;
pub use cgroup::*;
pub use clients::*;
pub use config::*;
pub use conn::*;
pub use control::*;
pub use files::*;
pub use http::*;
pub use netns::*;
pub use peers::*;
pub use replica::*;

use std::{
    process::Command,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::Duration,
};

pub use mtlb_common::Conns;

/// The balanced address tests connect to.
pub const BALANCED: &str = "127.0.0.1:443";

/// How much slower than this machine the tests run: `cargo xtask test
/// --kernel` sets MTLB_TEST_TIME_SCALE under emulation. Time limits scale
/// by it; what is asserted does not change.
pub fn time_scale() -> u32 {
    std::env::var("MTLB_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// `d`, scaled for a slower machine (see [`time_scale`]).
pub fn scaled(d: Duration) -> Duration {
    d * time_scale()
}

/// Generous bound for anything awaited in a test.
pub fn wait_limit() -> Duration {
    scaled(Duration::from_secs(15))
}

/// Waits until `ok` holds, polling (for what gives no event to wait on:
/// kernel counters, map contents), bounded by [`wait_limit`].
pub fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + wait_limit();
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {:?}",
            wait_limit()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` while another thread checks `holds` every 10 ms (for a state
/// that must never lapse, e.g. a route across an agent restart; at most
/// 100,000 readings); returns what `f` returned, the readings and those in
/// which `holds` was false.
pub fn sampling<T>(holds: impl Fn() -> bool + Sync, f: impl FnOnce() -> T) -> (T, usize, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let (mut readings, mut lapses) = (0, 0);
            while !done.load(Ordering::Relaxed) && readings < 100_000 {
                readings += 1;
                if !holds() {
                    lapses += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (readings, lapses)
        });
        let r = f();
        done.store(true, Ordering::Relaxed);
        let (readings, lapses) = w.join().unwrap();
        (r, readings, lapses)
    })
}

/// A number unique within this test process, for names of namespaces,
/// cgroups and directories.
pub(crate) fn unique() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Runs `cmd`, panics unless it succeeds; returns its stdout.
pub(crate) fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
