//! SYN cookies and the flow table.
//!
//! The final ACK of a SYN-cookie handshake comes back through sk_lookup and
//! must reach the listener that sent the cookie. The kernel programs record
//! such flows themselves for listeners registered by the listen hook; for
//! listeners adopted at startup (which the agent cannot ask for the
//! SYN-ACK callback) the agent watches the namespace's `SyncookiesSent`
//! counter and turns flow tracking on when it moves. With
//! `net.ipv4.tcp_syncookies = 2` every SYN gets a cookie: tracking is on
//! for good.

use super::maps::{Maps, MapsError};
use mtlb_common::COOKIE_TRACK_NS;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("reading /proc/net/netstat")]
    Netstat(#[source] std::io::Error),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Turns flow tracking on while the namespace sends SYN cookies: observes
/// the counter, moves the deadline in RUNTIME when it must, and remembers
/// the observation in `prev`. Returns the cookies sent so far when they
/// moved and tracking was extended for them (worth a line in the journal).
pub fn watch(maps: &mut Maps, prev: &mut Option<Observed>) -> Result<Option<u64>, WatchError> {
    let now = observe().map_err(WatchError::Netstat)?;
    let mut rt = maps.runtime()?;
    let mut moved = None;
    if let Some(until) = next_deadline(*prev, now, rt.track_flows_until_ns, monotonic_ns()) {
        if prev.is_some_and(|p| now.sent > p.sent) {
            moved = Some(now.sent);
        }
        rt.track_flows_until_ns = until;
        maps.set_runtime(rt)?;
    }
    *prev = Some(now);
    Ok(moved)
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns().
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// What the namespace's cookie settings and counters say now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// net.ipv4.tcp_syncookies (0, 1 or 2).
    pub mode: u8,
    /// TcpExt SyncookiesSent.
    pub sent: u64,
}

/// The flow-tracking deadline to write, if it must change, given the last
/// observation, this one, the current deadline and the time.
pub fn next_deadline(
    prev: Option<Observed>,
    now: Observed,
    current: u64,
    now_ns: u64,
) -> Option<u64> {
    if now.mode == 2 {
        return (current != u64::MAX).then_some(u64::MAX);
    }
    if current == u64::MAX {
        // Cookies are no longer always on: keep tracking for the life of
        // cookies already sent, then stop.
        return Some(now_ns + COOKIE_TRACK_NS);
    }
    let moved = prev.is_some_and(|p| now.sent > p.sent);
    let want = now_ns + COOKIE_TRACK_NS;
    (moved && want > current).then_some(want)
}

/// Reads the current namespace's cookie mode and counter.
pub fn observe() -> std::io::Result<Observed> {
    let mode = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies")?
        .trim()
        .parse()
        .unwrap_or(1);
    let netstat = std::fs::read_to_string("/proc/net/netstat")?;
    Ok(Observed {
        mode,
        sent: syncookies_sent(&netstat).unwrap_or(0),
    })
}

/// SyncookiesSent from /proc/net/netstat (a header line of names followed
/// by a line of values, per group).
pub fn syncookies_sent(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "SyncookiesSent")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn always_on_with_mode_2() {
        let o = Observed { mode: 2, sent: 0 };
        assert_eq!(next_deadline(None, o, 0, S), Some(u64::MAX));
        assert_eq!(next_deadline(Some(o), o, u64::MAX, S), None);
    }

    #[test]
    fn cookies_sent_switch_tracking_on_for_a_while() {
        let a = Observed { mode: 1, sent: 5 };
        let b = Observed { mode: 1, sent: 9 };
        assert_eq!(next_deadline(None, a, 0, S), None);
        assert_eq!(next_deadline(Some(a), a, 0, S), None);
        assert_eq!(next_deadline(Some(a), b, 0, S), Some(S + COOKIE_TRACK_NS));
        // A later deadline set by the programs is kept.
        assert_eq!(next_deadline(Some(a), b, 10 * COOKIE_TRACK_NS, S), None);
        // Leaving mode 2 keeps tracking for the life of sent cookies.
        assert_eq!(
            next_deadline(Some(a), a, u64::MAX, S),
            Some(S + COOKIE_TRACK_NS)
        );
    }

    #[test]
    fn parses_netstat() {
        let t = "TcpExt: SyncookiesSent SyncookiesRecv\nTcpExt: 7 3\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(syncookies_sent(t), Some(7));
        assert_eq!(syncookies_sent("IpExt: A\nIpExt: 1\n"), None);
    }
}
