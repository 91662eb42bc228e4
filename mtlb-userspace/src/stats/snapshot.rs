//! One reading of everything an operator looks at, from the maps (live or
//! pinned): the same numbers feed /metrics, /stats and `mtlb status`.

use crate::{
    kernel::{
        maps::{Maps, MapsError},
        pins::names,
    },
    system::diag,
};
use mtlb_common::{MAX_REPLICAS, Settings, stat, state::ReplicaState};
use serde::{Serialize, Serializer};
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackendRow {
    pub name: String,
    pub address: String,
    /// Shown (and serialized) as UP, DOWN, "DOWN 1/2", "UP 1/3", DRAIN,
    /// MAINT.
    #[serde(serialize_with = "as_label")]
    pub state: ReplicaState,
    /// 1 when it takes new connections (UP and READY).
    pub up: bool,
    /// Connections now: established plus handshakes in flight.
    pub active: u64,
    pub handshakes: u64,
    /// Steered connections established since the maps were created.
    pub total: u64,
    pub weight: u32,
    /// "passed", "failed" or "-" before the first check.
    pub check: String,
    pub check_reason: String,
    pub check_duration_ms: u32,
    pub check_failures: u64,
    pub transitions_up: u64,
    pub transitions_down: u64,
    /// Seconds since the last state change.
    pub since_change_s: f64,
    pub downtime_s: f64,
    pub accept_queue: u32,
    /// Its accept queue is stalled: DOWN for it, or (when still UP) kept
    /// as the last replica taking connections.
    pub queue_stalled: bool,
    /// A process holding its listener was sent a stop signal: it takes no
    /// new connection until the listener closes or the grace ends.
    pub stopping: bool,
    /// Stop signals seen for it (kept across agent restarts).
    pub stop_signals: u64,
    /// Connections in its accept queue at those signals: accepted by the
    /// kernel before, so no balancer can move them.
    pub stop_queued: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProgStat {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    pub port: u16,
    pub backends: Vec<BackendRow>,
    pub lookups: u64,
    pub no_backend: u64,
    /// SYN-cookie ACKs kept on their replica through the flow table.
    pub flow_hits: u64,
    /// SYN-ACKs with a SYN cookie sent by replica listeners.
    pub cookie_synacks: u64,
    /// sk_lookup assignment errors and bookkeeping misses by reason.
    pub steer_errors: BTreeMap<String, u64>,
    /// Present when kernel.bpf_stats_enabled is on.
    pub programs: Vec<ProgStat>,
    /// Health checks the agent could not run, by reason (served by the
    /// agent only: `mtlb status` reads the maps, which do not keep them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub check_errors: BTreeMap<String, u64>,
    /// The host's service addresses and whether they are announced
    /// (served by the agent only; `None` without `[announce] vips`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceRow>,
}

/// The host's announcement, as the agent decided it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnnounceRow {
    pub vips: Vec<std::net::IpAddr>,
    pub announced: bool,
    /// "2 replicas UP", "drained by operator", …
    pub why: String,
    /// Announcements and withdrawals by this agent.
    pub changes: u64,
}

fn as_label<S: Serializer>(s: &ReplicaState, ser: S) -> Result<S::Ok, S::Error> {
    ser.collect_str(s)
}

/// Bytes received and sent by each slot's steered connections, open and
/// closed, in one reading (see [`bytes`]).
pub type Bytes = BTreeMap<u32, (u64, u64)>;

/// Each slot's bytes: the totals of closed connections (per-CPU, kept by
/// sock_ops as they leave ESTABLISHED), then the open ones' tcp_info from
/// one sock_diag dump of the balanced port, each socket's replica from its
/// tag. Totals first: a connection that closes in between is missed by
/// both for this reading (the server never shows less than it showed),
/// where the other order would count it twice. The dump costs a message
/// per connection: callers share readings (see `collector::Collector`).
pub fn bytes(maps: &Maps) -> Result<Bytes, MapsError> {
    let settings = maps.settings()?;
    let mut out = Bytes::new();
    for slot in 0..settings.replicas as u32 {
        let t = maps.slot_totals(slot)?;
        out.insert(slot, (t.bytes_in, t.bytes_out));
    }
    match diag::connections(maps.tags_fd()) {
        Ok(conns) => {
            for c in conns {
                // Direct connections to a replica port carry a tag too
                // (ignored); a closed one's bytes are in the totals.
                if c.tag.state == mtlb_common::TAG_COUNTED && c.tag.slot < MAX_REPLICAS {
                    let e = out.entry(c.tag.slot).or_default();
                    e.0 += c.bytes_received;
                    e.1 += c.bytes_acked;
                }
            }
        }
        Err(e) => tracing::warn!("reading live connections' bytes (sock_diag): {e}"),
    }
    Ok(out)
}

/// Reads the snapshot from the maps, with `bytes` (see [`bytes`]) for
/// the traffic. `pin_dir` locates the program links (for run statistics).
pub fn collect(maps: &Maps, pin_dir: &Path, bytes: &Bytes) -> Result<Snapshot, MapsError> {
    collect_at(maps, pin_dir, bytes, SystemTime::now())
}

/// Milliseconds since the epoch, as the agent writes STATUS.last_change_ms
/// (wall clock: other processes read it).
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// [`collect`] with the wall-clock time `now`, from which the ages of the
/// last state changes are told.
pub fn collect_at(
    maps: &Maps,
    pin_dir: &Path,
    bytes: &Bytes,
    now: SystemTime,
) -> Result<Snapshot, MapsError> {
    let settings = maps.settings()?;
    let now_ms = unix_ms(now);
    let mut backends = Vec::new();
    for slot in 0..settings.replicas as u32 {
        backends.extend(backend(maps, &settings, slot, bytes, now_ms)?);
    }
    let stats = maps.stats()?;
    let get = |n: &str| stats.iter().find(|(k, _)| *k == n).map_or(0, |(_, v)| *v);
    Ok(Snapshot {
        port: settings.port,
        backends,
        lookups: get("lookups"),
        no_backend: get("no_backend"),
        flow_hits: get("flow_hits"),
        cookie_synacks: get("cookie_synacks"),
        steer_errors: steer_errors(&stats),
        check_errors: BTreeMap::new(),
        announce: None,
        programs: programs(pin_dir),
    })
}

/// The replicas' address, as STATUS readers show it (IPv4 unmapped).
fn replica_ip(settings: &Settings) -> IpAddr {
    let a = std::net::Ipv6Addr::from(settings.replica_addr);
    a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a))
}

/// `slot`'s row; `None` for an unused slot (state 0), or one written by a
/// build that knew other words.
fn backend(
    maps: &Maps,
    settings: &Settings,
    slot: u32,
    bytes: &Bytes,
    now_ms: u64,
) -> Result<Option<BackendRow>, MapsError> {
    let s = maps.status(slot)?;
    let Some(state) = ReplicaState::read(&s) else {
        return Ok(None);
    };
    let c = maps.conns(slot)?;
    let t = maps.slot_totals(slot)?;
    let stop = maps.stop_record(slot)?;
    let (bytes_in, bytes_out) = bytes.get(&slot).copied().unwrap_or_default();
    let reason_len = s
        .reason
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(s.reason.len());
    Ok(Some(BackendRow {
        name: crate::config::replica_name(slot as usize),
        address: std::net::SocketAddr::new(replica_ip(settings), settings.base_port + slot as u16)
            .to_string(),
        state,
        up: state.takes_connections(),
        active: c.active(),
        handshakes: c.handshakes,
        total: t.established,
        weight: s.weight,
        check: match s.check_ok {
            1 => "passed",
            0 => "failed",
            _ => "-",
        }
        .into(),
        check_reason: String::from_utf8_lossy(&s.reason[..reason_len]).into_owned(),
        check_duration_ms: s.check_ms,
        check_failures: s.check_failures,
        transitions_up: s.transitions_up,
        transitions_down: s.transitions_down,
        since_change_s: now_ms.saturating_sub(s.last_change_ms) as f64 / 1000.0,
        downtime_s: s.downtime_ms as f64 / 1000.0,
        accept_queue: s.accept_queue,
        queue_stalled: s.flags & (mtlb_common::STATUS_STALLED | mtlb_common::STATUS_STALL_KEPT)
            != 0,
        stopping: s.flags & mtlb_common::STATUS_STOPPING != 0,
        stop_signals: stop.marks,
        stop_queued: stop.queued,
        bytes_in,
        bytes_out,
    }))
}

/// Everything but the counters reported on their own: flow hits and cookie
/// SYN-ACKs are not errors, and an alert on steering errors must not fire
/// on them.
fn steer_errors(stats: &[(&str, u64)]) -> BTreeMap<String, u64> {
    stats
        .iter()
        .filter(|(k, _)| {
            ![
                stat::NAMES[stat::LOOKUPS as usize],
                stat::NAMES[stat::NO_BACKEND as usize],
                stat::NAMES[stat::FLOW_HITS as usize],
                stat::NAMES[stat::COOKIE_SYNACKS as usize],
            ]
            .contains(k)
        })
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// Run statistics of our attached programs (found through their pinned
/// links, so other namespaces' agents are not mixed in, and by id, without
/// walking the host's programs); only when the kernel collects them.
fn programs(pin_dir: &Path) -> Vec<ProgStat> {
    // Not gated on the sysctl: a BPF_ENABLE_STATS descriptor (bpftool prog
    // profile, a benchmark) turns counting on while the sysctl still reads
    // 0. Counters that never moved mean counting is off.
    let mut out = Vec::new();
    for link in names::LINKS {
        let Ok(pinned) = aya::programs::links::PinnedLink::from_pin(pin_dir.join(link)) else {
            continue;
        };
        let fd: aya::programs::links::FdLink = pinned.into();
        let Ok(info) = fd.info() else { continue };
        let id = info.program_id();
        // Dropping `fd` closes it; the pin keeps the link.
        if let Ok((name, run_count, run_time_ns)) = crate::kernel::sys::prog_stats(id) {
            out.push(ProgStat {
                name,
                run_count,
                run_time_ns,
            });
        }
    }
    if out.iter().all(|p| p.run_count == 0) {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtlb_common::{
        STATE_DOWN, STATE_UP, Status,
        state::{Admin, ListenerState, Oper},
    };

    /// Every typed state survives STATUS, and the label is the one the
    /// agent logs.
    #[test]
    fn typed_state_round_trips_through_status() {
        for oper in [Oper::Up, Oper::Down] {
            for progress in [0, 1, 2] {
                for admin in [Admin::Ready, Admin::Drain, Admin::Maint] {
                    for listener in [ListenerState::Registered, ListenerState::Missing] {
                        let st = crate::stats::testutil::state(oper, progress, admin, listener);
                        let mut s = Status::default();
                        st.write(&mut s);
                        assert_eq!(ReplicaState::read(&s), Some(st));
                    }
                }
            }
        }
        assert_eq!(ReplicaState::read(&Status::default()), None, "unused slot");
    }

    #[test]
    fn labels() {
        let mut s = Status {
            state: STATE_DOWN,
            oper: STATE_DOWN,
            count: 1,
            rise: 2,
            fall: 3,
            registered: 1,
            ..Default::default()
        };
        let label = |s: &Status| ReplicaState::read(s).unwrap().to_string();
        assert_eq!(label(&s), "DOWN 1/2");
        s.registered = 0;
        assert_eq!(label(&s), "DOWN", "nothing rises without a listener");
        s.registered = 1;
        s.state = STATE_UP;
        s.oper = STATE_UP;
        assert_eq!(label(&s), "UP 1/3");
        s.count = 0;
        assert_eq!(label(&s), "UP");
        s.state = mtlb_common::STATE_DRAIN;
        assert_eq!(label(&s), "DRAIN");
        s.state = mtlb_common::STATE_MAINT;
        assert_eq!(label(&s), "MAINT");
    }
}
