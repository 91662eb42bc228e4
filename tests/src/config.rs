//! `mtlb.toml` for a test, written by one builder.

use crate::*;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// A test's `mtlb.toml`: top-level keys and `[check]` keys, serialized by
/// the `toml` crate.
///
/// ```ignore
/// let cfg = Config::new().replicas(3).fast_checks().write(&ns);
/// let agent = ns.agent(&["--config", &cfg]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Config {
    top: Table,
    check: Table,
    announce: Table,
}

impl Config {
    /// No key set: every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// For MTProxy replicas: `secret`, the `mtproxy` check and
    /// [`mtproxy_timings`](Self::mtproxy_timings).
    pub fn mtproxy(secret: &str) -> Self {
        Self::new()
            .secret(secret)
            .check_kind("mtproxy")
            .mtproxy_timings()
    }

    /// Top-level `key = value` (any key, a wrong one included: tests of
    /// rejected configs use it).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.top.insert(key.into(), value.into());
        self
    }

    /// `[check]` `key = value`.
    pub fn check(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.check.insert(key.into(), value.into());
        self
    }

    /// `[announce]` `key = value`.
    pub fn announce(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.announce.insert(key.into(), value.into());
        self
    }

    /// `[announce] vips`.
    pub fn vips(self, vips: &[&str]) -> Self {
        self.announce(
            "vips",
            Value::Array(vips.iter().map(|v| Value::from(*v)).collect()),
        )
    }

    pub fn replicas(self, n: u16) -> Self {
        self.set("replicas", i64::from(n))
    }

    pub fn port(self, port: u16) -> Self {
        self.set("port", i64::from(port))
    }

    pub fn secret(self, secret: &str) -> Self {
        self.set("secret", secret)
    }

    pub fn check_kind(self, kind: &str) -> Self {
        self.check("kind", kind)
    }

    pub fn stats_base_port(self, port: u16) -> Self {
        self.check("stats_base_port", i64::from(port))
    }

    /// Fast checks so that tests take seconds: inter 100 ms, rise 2,
    /// fall 2, timeout 500 ms.
    pub fn fast_checks(self) -> Self {
        self.check_timings(100, 50, 100, 500)
    }

    /// `[check]` timings for the MTProxy tests: fast intervals, and a check
    /// timeout scaled with [`time_scale`] (a check goes through a real
    /// proxy and its upstream, which under emulation can take longer than
    /// 1.5 s).
    pub fn mtproxy_timings(self) -> Self {
        self.check_timings(200, 100, 200, 1500 * i64::from(time_scale()))
    }

    fn check_timings(self, inter: i64, fastinter: i64, downinter: i64, timeout: i64) -> Self {
        self.check("inter_ms", inter)
            .check("fastinter_ms", fastinter)
            .check("downinter_ms", downinter)
            .check("rise", 2)
            .check("fall", 2)
            .check("timeout_ms", timeout)
    }

    /// The TOML text.
    pub fn text(&self) -> String {
        let mut t = self.top.clone();
        if !self.check.is_empty() {
            t.insert("check".into(), Value::Table(self.check.clone()));
        }
        if !self.announce.is_empty() {
            t.insert("announce".into(), Value::Table(self.announce.clone()));
        }
        toml::to_string(&t).expect("a config serializes")
    }

    /// Writes it to `path`; returns `path`.
    pub fn write_to(&self, path: &Path) -> PathBuf {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, self.text())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.to_path_buf()
    }

    /// Writes it as `ns`'s `mtlb.toml` (in its state dir); returns the
    /// path, for `--config`.
    pub fn write(&self, ns: &Netns) -> String {
        self.write_to(&ns.state_dir().join("mtlb.toml"))
            .to_string_lossy()
            .into_owned()
    }
}
