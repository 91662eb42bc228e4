//! SIGINT and SIGTERM, which stop a rollout where it is. Once installed,
//! neither kills the process: the rollout says where it stopped.

use std::task::{Context, Waker};
use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }

    /// A signal that came while nothing waited for one.
    pub fn pending(&mut self) -> Option<&'static str> {
        let mut cx = Context::from_waker(Waker::noop());
        if self.int.poll_recv(&mut cx).is_ready() {
            Some("SIGINT")
        } else if self.term.poll_recv(&mut cx).is_ready() {
            Some("SIGTERM")
        } else {
            None
        }
    }
}
