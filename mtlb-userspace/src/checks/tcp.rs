//! The layer-4 part of every check.

use super::{health::CheckResult, reason};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::net::TcpStream;

/// Connects with a timeout, mapping failures to HAProxy's layer-4 reasons.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, CheckResult> {
    let t0 = Instant::now();
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(CheckResult::io_fail(
            reason::L4_CON,
            &e,
            os_error_text(&e),
            t0.elapsed(),
        )),
        Err(_) => Err(CheckResult::fail(reason::L4_TOUT, None, t0.elapsed())),
    }
}

/// "Connection refused" rather than "Connection refused (os error 111)".
pub(super) fn os_error_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
