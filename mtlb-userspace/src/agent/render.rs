//! The one place where the agent's facts become text: journal lines (in
//! HAProxy's wording where HAProxy has one: operators and tests grep them),
//! systemd notifications and the operator-facing answers that repeat a
//! line. The only `tracing` calls of the agent are here.

use super::{
    announce::{Announcement, Why},
    effect::{BindWhy, Fact, Notice, Reading, Signal, Written},
    start_facts::StartFact,
};
use crate::{
    checks::health::{Admin, CheckResult, LocalFault, Oper},
    config::replica_name,
    kernel::{dataplane, registry::RefuseWhy},
};
use tracing::Level;

/// The journal line for `f`, and its level.
pub fn line(f: &Fact) -> (Level, String) {
    use Level as L;
    match f {
        Fact::Steering {
            port,
            addresses,
            replicas,
            replica_address,
            algorithm,
            kind,
            pin_dir,
        } => {
            let addrs = if addresses.is_empty() {
                "all local addresses".to_string()
            } else {
                addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            (
                L::INFO,
                format!(
                    "steering TCP port {port} on {addrs} to {replicas} replicas ({}..={} on {replica_address}), {}, {kind:?} checks; pins in {}",
                    replica_name(0),
                    replica_name(*replicas as usize - 1),
                    algorithm.name(),
                    pin_dir.display()
                ),
            )
        }
        Fact::ReplicaOwners {
            replica_uids,
            replica_cgroup,
        } => (
            L::INFO,
            format!(
                "replica ports belong to {} in replica_cgroup {}: binds to them from anywhere else are refused; sock_ops runs in that cgroup only",
                replica_uids
                    .as_ref()
                    .map_or_else(|| "any uid".to_string(), |u| format!("uids {u:?}")),
                replica_cgroup.display()
            ),
        ),
        Fact::AnyReplicaOwner => (
            L::WARN,
            "any_replica_owner is set: any local user who listens on a replica port first becomes that replica".into(),
        ),
        Fact::NothingListening {
            replica_address,
            first_port,
            last_port,
        } => (
            L::INFO,
            format!(
                "no replica is listening yet; waiting for replicas on {replica_address}:{first_port}..={last_port}"
            ),
        ),
        Fact::Registered { slot, desc } => (
            L::INFO,
            format!("replica {} registered: {desc}", replica_name(*slot)),
        ),
        Fact::Unregistered { slot, desc } => (
            L::INFO,
            format!(
                "replica {} unregistered: {desc}: its listener closed",
                replica_name(*slot)
            ),
        ),
        Fact::Checked { name, result: r } => (
            L::DEBUG,
            format!(
                "check {name}: {}, reason: {}{}, {}ms",
                if r.ok { "passed" } else { "failed" },
                r.reason,
                r.info
                    .as_deref()
                    .map(|i| format!(", info: \"{i}\""))
                    .unwrap_or_default(),
                r.duration.as_millis()
            ),
        ),
        Fact::Progress {
            name,
            result,
            state,
        } => (
            L::INFO,
            format!(
                "Health check for backend {name} {}, {}, status: {state}.",
                if result.ok { "succeeded" } else { "failed" },
                describe(result),
            ),
        ),
        Fact::Changed {
            name,
            to: Oper::Down,
            result,
            active,
            conns,
        } => (
            L::WARN,
            format!(
                "backend {name} is DOWN, {}. {active} active backends left. {conns} connections active.",
                describe(result)
            ),
        ),
        Fact::Changed {
            name,
            to: Oper::Up,
            result,
            active,
            ..
        } => (
            L::INFO,
            format!(
                "backend {name} is UP, {}. {active} active backends online.",
                describe(result)
            ),
        ),
        Fact::NoBackend => (L::ERROR, "no backend available!".into()),
        Fact::StallKept {
            name,
            queued,
            backlog,
        } => (
            L::WARN,
            format!(
                "backend {name}: accept queue stalled ({}), but no other backend takes connections: keeping it",
                queue_info(*queued, *backlog)
            ),
        ),
        Fact::AdminSet {
            name,
            admin,
            active,
        } => (
            L::INFO,
            format!("{}. {active} active backends.", admin_set(name, *admin)),
        ),
        Fact::WeightSet { name, weight } => (
            L::INFO,
            format!("backend {name} weight set to {weight} (by operator)"),
        ),
        Fact::RemovingByOperator => (
            L::WARN,
            "removing mtlb from this namespace (by operator): steering stops".into(),
        ),
        Fact::SaveFailed { error } => (L::ERROR, format!("saving operator state: {error}")),
        Fact::Reloading { path } => (
            L::INFO,
            format!(
                "{}: reloading {}",
                signal_name(Signal::Hangup),
                path.display()
            ),
        ),
        Fact::Reloaded { replicas, port } => (
            L::INFO,
            format!("configuration reloaded: {}", reloaded(*replicas, *port)),
        ),
        Fact::ReloadFailed { error } => (
            L::ERROR,
            format!("reload failed, keeping the running configuration: {error}"),
        ),
        Fact::Draining { name } => (
            L::INFO,
            format!("backend {name} is draining before removal"),
        ),
        Fact::Removed { name } => (L::INFO, format!("backend {name} removed: drained")),
        Fact::Stopping(s) => (L::INFO, format!("{}: stopping", signal_name(*s))),
        Fact::BindRefused {
            slot,
            addr,
            uid,
            why,
            replica_uids,
            replica_cgroup,
            more,
        } => (
            L::WARN,
            format!(
                "refused a bind to {addr} ({}'s port) by uid {uid}{}{}",
                replica_name(*slot as usize),
                match why {
                    BindWhy::Owner =>
                        format!(": its owner is not in replica_uids {replica_uids:?}"),
                    BindWhy::Cgroup { id, path } => format!(
                        " in cgroup {}: it is not in replica_cgroup {}",
                        path.as_ref()
                            .map_or_else(|| format!("id {id}"), |p| p.display().to_string()),
                        replica_cgroup.display()
                    ),
                },
                if *more > 0 {
                    format!(" ({more} more refusals reported since the last line)")
                } else {
                    String::new()
                }
            ),
        ),
        Fact::ListenerRefused {
            slot,
            addr,
            pid,
            uid,
            why,
            replica_uids,
            replica_cgroup,
        } => {
            let who = |v: Option<String>| v.unwrap_or_else(|| "?".into());
            let why = match why {
                RefuseWhy::Owner => format!("its owner is not in replica_uids {replica_uids:?}"),
                RefuseWhy::Taken => "the slot holds a live listener".to_string(),
                RefuseWhy::Cgroup => format!(
                    "it was not created in replica_cgroup {}",
                    replica_cgroup.display()
                ),
            };
            (
                L::WARN,
                format!(
                    "refused a listener for {} on {addr} (pid {}, uid {}): {why}; it gets no clients",
                    replica_name(*slot as usize),
                    who(pid.map(|p| p.to_string())),
                    who(uid.map(|u| u.to_string())),
                ),
            )
        }
        Fact::Adopted { slot, addr, pid } => (
            L::DEBUG,
            format!(
                "adopted {} listener {addr} from pid {pid}",
                replica_name(*slot as usize)
            ),
        ),
        Fact::Scanning => (
            L::DEBUG,
            "scanning for replica listeners that did not register".into(),
        ),
        Fact::HandshakesBounded {
            slot,
            was,
            now,
            window,
        } => (
            L::DEBUG,
            format!(
                "{}: {was} handshakes counted, {now} can still be in flight (assigned within {} ms)",
                replica_name(*slot),
                window.as_millis()
            ),
        ),
        Fact::SynCookies { sent } => (
            L::INFO,
            format!(
                "replicas are sending SYN cookies ({sent} so far): keeping flows on their replica"
            ),
        ),
        Fact::NoListenEvents => (
            L::WARN,
            "cannot read listener events; registrations are noticed on the 100 ms poll".into(),
        ),
        Fact::WriteFailed { what, error } => {
            let what = match what {
                Written::Backend(slot) => format!("BACKENDS[{slot}]"),
                Written::Status(slot) => format!("STATUS[{slot}]"),
                Written::Settings => "SETTINGS".into(),
                Written::Addresses => "ADDRESSES".into(),
                Written::AllowedUids => "ALLOWED_UIDS".into(),
                Written::Stopping(slot) => format!("STOPPING[{slot}]"),
                Written::OwnerPids => "OWNER_PIDS".into(),
                Written::Announcement => "the announce table's routes".into(),
            };
            (L::WARN, format!("updating {what}: {error}"))
        }
        Fact::ReadFailed { what, error } => {
            let what = match what {
                Reading::Registrations => "reading replica registrations",
                Reading::RefusedListener => "looking up a refused listener",
                Reading::RunningReplicas => "looking for running replicas",
                Reading::SynCookies => "watching SYN cookies",
                Reading::StopMarks => "reading the stop marks",
            };
            (L::WARN, format!("{what}: {error}"))
        }
        Fact::ChecksNotRun {
            fault,
            error,
            checks,
        } => (
            L::ERROR,
            format!(
                "agent problem: {checks} health {} could not run ({}: {error}); replicas keep their state until checks run again",
                if *checks == 1 { "check" } else { "checks" },
                match fault {
                    LocalFault::Files => "out of file descriptors",
                    LocalFault::Memory => "out of memory",
                },
            ),
        ),
        Fact::StopGraceOver {
            name,
            pid,
            signal,
            grace,
        } => (
            L::WARN,
            format!(
                "backend {name} still listens {:.1}s after {} to pid {pid}; checking it again",
                grace.as_secs_f64(),
                stop_signal_name(*signal)
            ),
        ),
        Fact::OwnersUnknown { error } => (
            L::WARN,
            format!(
                "cannot tell which processes hold the replica listeners ({error}): a stop signal to them is noticed only when the listener closes"
            ),
        ),
        Fact::ControlAcceptFailed { error } => {
            (L::WARN, format!("control socket: accepting: {error}"))
        }
        Fact::AdoptFailed { error } => (L::WARN, error.clone()),
        Fact::Announced {
            vips,
            announce,
            why,
            rise,
            fall,
        } => {
            let held = match why {
                Why::Serving { .. } if *rise > std::time::Duration::ZERO => {
                    format!(" for {:.1}s", rise.as_secs_f64())
                }
                Why::TooFewUp { .. } if *fall > std::time::Duration::ZERO => {
                    format!(" for {:.1}s", fall.as_secs_f64())
                }
                _ => String::new(),
            };
            (
                if *announce { L::INFO } else { L::WARN },
                format!(
                    "{} {}: {}{held}",
                    if *announce {
                        "announcing"
                    } else {
                        "withdrawing"
                    },
                    crate::system::vip::list(vips),
                    why_text(*why)
                ),
            )
        }
        Fact::ReplicaCgroupRecreated { path, was, now } => (
            L::ERROR,
            format!(
                "replica_cgroup {} was made again (id {was}, now {now}): the replicas' binds are refused until mtlb follows it; stopping so that the service manager starts mtlb again (steering goes on from the pins)",
                path.display()
            ),
        ),
        Fact::HostSet { drained } => (
            L::INFO,
            if *drained {
                "host drained by operator: its service addresses are withdrawn".into()
            } else {
                "host made ready by operator: its service addresses are announced while replicas serve".into()
            },
        ),
        Fact::Start(f) => start_line(f),
    }
}

/// Start-up and teardown, in the agent's wording.
fn start_line(f: &StartFact) -> (Level, String) {
    use dataplane::Fact as D;
    type L = Level;
    match f {
        StartFact::BpffsFromHost {
            configured,
            through,
        } => (
            L::INFO,
            format!(
                "no bpffs at {} in this mount namespace (ip netns exec remounts /sys); using the host's bpffs through {}",
                configured.display(),
                through.display()
            ),
        ),
        StartFact::BpffsMounted { at, private: true } => (
            L::WARN,
            format!(
                "mounted a new bpffs at {}; it is private to this mount namespace, so the pins are not visible from the host and go away with it",
                at.display()
            ),
        ),
        StartFact::BpffsMounted { at, private: false } => {
            (L::INFO, format!("mounted bpffs at {}", at.display()))
        }
        StartFact::Cgroup2Mounted(at) => (L::INFO, format!("mounted cgroup2 at {}", at.display())),
        StartFact::VipsAdded(v) => (
            L::INFO,
            format!("added {} to lo", crate::system::vip::list(v)),
        ),
        StartFact::AnnouncedAtStart(v) => (
            L::INFO,
            format!(
                "{} announced as the last agent left it; taking the decision over",
                crate::system::vip::list(v)
            ),
        ),
        StartFact::StrayWithdrawn(v) => (
            L::INFO,
            format!(
                "withdrawing {}: not in announce.vips",
                crate::system::vip::list(v)
            ),
        ),
        StartFact::OldTableWithdrawn { from, to, vips } => (
            L::INFO,
            format!(
                "withdrawing {} from table {from}: announce.table is {to} now",
                crate::system::vip::list(vips)
            ),
        ),
        StartFact::DroppedVipsRemoved(v) => (
            L::INFO,
            format!(
                "took {} off lo: not in announce.vips any more",
                crate::system::vip::list(v)
            ),
        ),
        StartFact::DroppedVipsKept(v) => (
            L::INFO,
            format!(
                "{}: not in announce.vips any more; withdrawn, left on lo while the router converges (the next start or `mtlb remove` takes it off)",
                crate::system::vip::list(v)
            ),
        ),
        StartFact::VipsRemoved(v) => (
            L::INFO,
            format!(
                "withdrew {} and took it off lo",
                crate::system::vip::list(v)
            ),
        ),
        StartFact::StatsListening(addr) => (
            L::INFO,
            format!("stats on http://{addr}/stats, metrics on http://{addr}/metrics"),
        ),
        StartFact::Dataplane(D::TookOver { dir }) => (
            L::INFO,
            format!(
                "taking over the pinned state of an earlier agent in {}",
                dir.display()
            ),
        ),
        StartFact::Dataplane(D::ReplacedStale { dir, why }) => (
            L::WARN,
            format!(
                "found pins of an earlier agent in {} that this build cannot take over ({why}); replacing them, counts start from zero",
                dir.display()
            ),
        ),
        StartFact::Dataplane(D::ReplacedLink { path }) => (
            L::DEBUG,
            format!("replaced the previous agent's link {}", path.display()),
        ),
        StartFact::Dataplane(D::UnpinFailed { path, error }) => {
            (L::WARN, format!("cannot unpin {}: {error}", path.display()))
        }
        StartFact::Dataplane(D::KeepingPins { dir }) => (
            L::INFO,
            format!("keeping programs attached; pins stay in {}", dir.display()),
        ),
        StartFact::Dataplane(D::Detached { dir }) => (
            L::INFO,
            format!("detached; removed pins in {}", dir.display()),
        ),
        StartFact::Dataplane(D::Swept { dir }) => (
            L::INFO,
            format!(
                "removed the pins of a network namespace that is gone in {}; its programs are detached",
                dir.display()
            ),
        ),
        StartFact::Dataplane(D::SweepFailed { dir, error }) => (
            L::WARN,
            format!(
                "cannot remove the pins of a network namespace that is gone in {}: {error}",
                dir.display()
            ),
        ),
        StartFact::Dataplane(D::NoStopWatch { error }) => (
            L::WARN,
            format!(
                "cannot watch for replicas told to stop ({error}): a replica being stopped keeps getting clients until its listener closes"
            ),
        ),
        StartFact::TeardownFailed(report) => (L::ERROR, report.clone()),
    }
}

/// Writes `f` to the journal.
pub fn emit(f: &Fact) {
    let (level, line) = line(f);
    match level {
        Level::ERROR => tracing::error!("{line}"),
        Level::WARN => tracing::warn!("{line}"),
        Level::INFO => tracing::info!("{line}"),
        Level::DEBUG => tracing::debug!("{line}"),
        Level::TRACE => tracing::trace!("{line}"),
    }
}

/// Tells the service manager (`Type=notify`, sd_notify(3)); without one,
/// nothing.
pub fn notify(n: &Notice) {
    use sd_notify::NotifyState;
    let status;
    let states: &[NotifyState] = match n {
        Notice::Ready { port } => {
            status = format!("steering port {port}");
            &[NotifyState::Ready, NotifyState::Status(&status)]
        }
        Notice::Reloaded => &[NotifyState::Ready],
        Notice::Stopping => &[NotifyState::Stopping],
    };
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify {n:?}: {e}");
    }
}

fn replicas_up(up: u16) -> String {
    match up {
        0 => "no replica UP".into(),
        1 => "1 replica UP".into(),
        n => format!("{n} replicas UP"),
    }
}

/// Why the host is announced or not, in the operator's words.
pub fn why_text(why: Why) -> String {
    match why {
        Why::Serving { up } => replicas_up(up),
        Why::Drained => "drained by operator".into(),
        Why::TooFewUp { up, min_up } if min_up <= 1 => replicas_up(up),
        Why::TooFewUp { up, min_up } => format!("{}, min_up {min_up}", replicas_up(up)),
        Why::Rising { up } => format!("{}, announced once that holds rise_ms", replicas_up(up)),
        Why::Falling { up, min_up } => format!(
            "{}, min_up {min_up}; withdrawn if that holds fall_ms",
            replicas_up(up)
        ),
    }
}

/// The host's announcement as `mtlb host` and `mtlb status` tell it:
/// "announced (2 replicas UP)", "withdrawn: drained by operator".
pub fn announcement(cfg: &crate::config::AnnounceConfig, a: &Announcement) -> String {
    let why = why_text(a.why());
    let state = if a.pending() {
        format!("routes being rewritten after a failed write ({why})")
    } else if a.announced() {
        format!("announced ({why})")
    } else {
        format!("withdrawn: {why}")
    };
    format!("{}: {state}", crate::system::vip::list(&cfg.vips))
}

/// The answer to `mtlb host drain|ready`.
pub fn host_set(drained: bool, cfg: &crate::config::AnnounceConfig) -> String {
    if drained {
        format!(
            "host drained: {} withdrawn; the replicas serve what still arrives until the router has moved",
            crate::system::vip::list(&cfg.vips)
        )
    } else {
        format!(
            "host ready: {} announced while at least {} replica(s) are UP",
            crate::system::vip::list(&cfg.vips),
            cfg.min_up
        )
    }
}

/// The answer to an admin change (also the start of its journal line).
pub fn admin_set(name: &str, admin: Admin) -> String {
    match admin {
        Admin::Maint => format!("backend {name} is going into maintenance (by operator)"),
        Admin::Drain => format!("backend {name} is set to DRAIN mode (by operator)"),
        Admin::Ready => format!("backend {name} is READY (by operator)"),
    }
}

/// What a reload changed: "3 replicas, balanced port now 8443".
pub fn reloaded(replicas: u16, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{replicas} replicas, balanced port now {p}"),
        None => format!("{replicas} replicas"),
    }
}

/// The accept-queue detail of a stall: "4 queued of 128".
pub fn queue_info(queued: u32, backlog: u32) -> String {
    format!("{queued} queued of {backlog}")
}

fn signal_name(s: Signal) -> &'static str {
    match s {
        Signal::Interrupt => "SIGINT",
        Signal::Terminate => "SIGTERM",
        Signal::Hangup => "SIGHUP",
    }
}

/// A check result as HAProxy describes it: reason, info, duration.
fn describe(r: &CheckResult) -> String {
    let mut s = format!("reason: {}", r.reason);
    if let Some(i) = &r.info {
        s.push_str(&format!(", info: \"{i}\""));
    }
    s.push_str(&format!(", check duration: {}ms", r.duration.as_millis()));
    s
}

/// "SIGTERM", or "signal 40" for one mtlb does not watch.
pub fn stop_signal_name(sig: u32) -> String {
    match sig {
        mtlb_common::SIGINT => "SIGINT".into(),
        mtlb_common::SIGQUIT => "SIGQUIT".into(),
        mtlb_common::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::health::OperState;
    use std::time::Duration;

    fn refused() -> CheckResult {
        CheckResult::fail(
            "Layer4 connection problem",
            Some("Connection refused".into()),
            Duration::from_millis(1),
        )
    }

    #[test]
    fn state_changes_and_progress_read_as_haproxy_writes_them() {
        let down = Fact::Changed {
            name: "mtp2".into(),
            to: Oper::Down,
            result: refused(),
            active: 1,
            conns: 0,
        };
        assert_eq!(
            line(&down),
            (
                Level::WARN,
                "backend mtp2 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 1ms. 1 active backends left. 0 connections active.".into()
            )
        );
        let rising = Fact::Progress {
            name: "mtp2".into(),
            result: CheckResult::pass("Layer4 check passed", Duration::ZERO),
            state: OperState {
                oper: Oper::Down,
                progress: 1,
                rise: 2,
                fall: 3,
            },
        };
        assert!(line(&rising).1.ends_with("status: DOWN 1/2."));
        assert_eq!(line(&Fact::NoBackend).1, "no backend available!");
    }

    #[test]
    fn notifies_the_service_manager() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notify");
        let rx = UnixDatagram::bind(&p).unwrap();
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &p) };
        notify(&Notice::Ready { port: 443 });
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        let sent = String::from_utf8_lossy(&buf[..n]);
        assert!(
            sent.lines().eq(["READY=1", "STATUS=steering port 443"]),
            "{sent:?}"
        );
    }
}
