//! `mtlb.toml` for a test, written by one builder.

use crate::*;

/// A config for MTProxy replicas with the `mtproxy` check and fast timings.
/// `[check]` timings for the MTProxy tests: fast intervals, and a check
/// timeout scaled with [`time_scale`] (a check goes through a real proxy
/// and its upstream, which under emulation can take longer than 1.5 s).
pub fn fast_check_timings() -> String {
    format!(
        "inter_ms = 200\nfastinter_ms = 100\ndowninter_ms = 200\nrise = 2\nfall = 2\ntimeout_ms = {}\n",
        1500 * time_scale()
    )
}

pub fn mtproxy_config(ns: &Netns, secret: &str) -> String {
    let dir = ns.state_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("mtlb.toml");
    std::fs::write(
        &p,
        format!(
            "secret = \"{secret}\"\n[check]\nkind = \"mtproxy\"\n{}",
            fast_check_timings()
        ),
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}
