//! Reasons, as in HAProxy's vocabulary where one exists (docs/operating.md
//! "Reasons").

pub const L4_OK: &str = "Layer4 check passed";
pub const L4_CON: &str = "Layer4 connection problem";
pub const L4_TOUT: &str = "Layer4 timeout";
pub const MTPROXY_OK: &str = "MTProxy answered through upstream";
pub const WRONG_SECRET: &str = "wrong secret or not MTProxy";
pub const NO_ANSWER: &str = "no answer through proxy";
pub const TLS_HMAC: &str = "TLS reply HMAC mismatch";
pub const STATS_OK: &str = "stats: upstream ready";
pub const STATS_NOT_READY: &str = "stats: no ready upstream targets";
pub const STATS_UNREACHABLE: &str = "stats endpoint unreachable";
pub const QUEUE_STALLED: &str = "accept queue stalled";
pub const NO_LISTENER: &str = "no listener registered";
pub const LISTENER_REGISTERED: &str = "listener registered";
/// The start of a stopping replica's reason: "stopping (SIGTERM to pid 42)".
pub const STOPPING: &str = "stopping";
