//! Clients of the agent's control socket that misbehave: many connections
//! held idle or half-written, from processes of their own
//! (`mtlb-test-hold`), since one process may not open enough files.

use crate::*;
use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

/// A connection to the control socket at `socket`. The connect waits for
/// room in the socket's accept queue at most scaled(5 s): a queue full
/// that long means the agent stopped accepting.
pub fn dial_control(socket: &Path) -> std::io::Result<UnixStream> {
    let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // A blocking AF_UNIX connect waits for the queue up to SO_SNDTIMEO.
    s.set_write_timeout(Some(scaled(Duration::from_secs(5))))?;
    s.connect(&socket2::SockAddr::unix(socket)?)?;
    Ok(s.into())
}

/// The next line from `s` within `limit`; what happened instead otherwise.
pub fn read_line_within(s: &UnixStream, limit: Duration) -> Result<String, String> {
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(0) => Err("closed with no answer".into()),
        Ok(_) => Ok(line),
        Err(e) => Err(e.to_string()),
    }
}

/// A process holding control connections (`mtlb-test-hold`).
pub struct ControlHolder {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl ControlHolder {
    /// Starts opening `n` connections to `socket`, each sending `send`
    /// once.
    pub fn start(socket: &Path, n: usize, send: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .and_then(|d| d.parent())
            .unwrap()
            .join("mtlb-test-hold");
        let mut child = Command::new(&bin)
            .arg(socket)
            .arg(n.to_string())
            .arg(send)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, out }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        assert!(!l.is_empty(), "mtlb-test-hold ended early");
        l.trim_end().to_string()
    }

    /// Waits until every connection is open, calling `progress` after
    /// each thousand; the number held, or the error that stopped it.
    pub fn wait_held(&mut self, mut progress: impl FnMut(usize)) -> Result<usize, String> {
        loop {
            let l = self.line();
            if let Ok(n) = l.parse() {
                progress(n);
            } else if let Some(n) = l.strip_prefix("held ") {
                return Ok(n.parse().unwrap());
            } else {
                return Err(l);
            }
        }
    }

    /// Stops holding; returns what the first and the last connection were
    /// told (waiting for it within [`wait_limit`]).
    pub fn release(mut self) -> (String, String) {
        drop(self.child.stdin.take());
        let (first, last) = (self.line(), self.line());
        self.child.wait().unwrap();
        (first, last)
    }
}

impl Drop for ControlHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
