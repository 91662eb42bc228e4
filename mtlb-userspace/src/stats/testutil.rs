//! A small snapshot for the renderers' unit tests.

use super::snapshot::{BackendRow, Snapshot};
use mtlb_common::state::{Admin, ListenerState, Oper, OperState, ReplicaState};

/// A replica's state with rise 2 and fall 3.
pub fn state(oper: Oper, progress: u32, admin: Admin, listener: ListenerState) -> ReplicaState {
    ReplicaState {
        oper: OperState {
            oper,
            progress,
            rise: 2,
            fall: 3,
        },
        admin,
        listener,
    }
}

/// A ready, registered replica's state.
pub fn st(oper: Oper, progress: u32) -> ReplicaState {
    state(oper, progress, Admin::Ready, ListenerState::Registered)
}

/// mtp1 UP with 7 connections, mtp2 DOWN 1/2 with 3.
pub fn snap() -> Snapshot {
    let row = |name: &str, state: ReplicaState, up: bool, active| BackendRow {
        name: name.into(),
        address: "127.0.0.1:10000".into(),
        state,
        up,
        active,
        handshakes: 0,
        total: 10,
        weight: 1,
        check: "passed".into(),
        check_reason: "Layer4 check passed".into(),
        check_duration_ms: 3,
        check_failures: 2,
        transitions_up: 1,
        transitions_down: 1,
        since_change_s: 1.5,
        downtime_s: 0.5,
        accept_queue: 0,
        queue_stalled: false,
        stopping: false,
        stop_signals: 0,
        stop_queued: 0,
        bytes_in: 100,
        bytes_out: 200,
    };
    Snapshot {
        port: 443,
        backends: vec![
            row("mtp1", st(Oper::Up, 0), true, 7),
            row("mtp2", st(Oper::Down, 1), false, 3),
        ],
        lookups: 12,
        no_backend: 1,
        flow_hits: 0,
        cookie_synacks: 0,
        steer_errors: [("eafnosupport".to_string(), 0)].into(),
        check_errors: Default::default(),
        announce: None,
        programs: vec![],
    }
}
