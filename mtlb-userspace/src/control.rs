//! Control socket: operator commands to the running agent.
//!
//! A unix stream socket `<control_dir>/<netns inode>.sock` (mode 0600), one
//! JSON request per line and one JSON response per line. The CLI finds the
//! socket of its own network namespace, so `ip netns exec NS mtlb backend …`
//! talks to that namespace's agent.

use serde::{Deserialize, Serialize};
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Set a replica's administrative state: "ready", "drain" or "maint".
    Admin { name: String, state: String },
    /// Set a replica's weight (1..=256).
    Weight { name: String, weight: u32 },
    /// Where a replica's counts are: its slot and the pin directory.
    Locate { name: String },
    /// Re-read the configuration file.
    Reload,
    /// Detach everything, remove the pins and stop: mtlb off this
    /// namespace for good.
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: message.into(),
            slot: None,
            pin_dir: None,
        }
    }

    pub fn err(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            message: message.into(),
            slot: None,
            pin_dir: None,
        }
    }
}

pub fn socket_path(dir: &Path, netns_ino: u64) -> PathBuf {
    dir.join(format!("{netns_ino}.sock"))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "no mtlb agent answers on {path}; is `mtlb run` running in this network namespace (and with this control_dir)?"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad answer from the agent: {answer:?}")]
    Protocol {
        answer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("bad request")]
    BadRequest(#[source] serde_json::Error),
}

/// Sends one request and waits for its answer.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|source| ControlError::Protocol { answer, source })
}

/// Parses one request line.
pub fn parse(line: &str) -> Result<Request, ControlError> {
    serde_json::from_str(line.trim()).map_err(ControlError::BadRequest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Admin {
                name: "mtp2".into(),
                state: "drain".into(),
            },
            Request::Weight {
                name: "mtp1".into(),
                weight: 3,
            },
            Request::Locate {
                name: "mtp1".into(),
            },
            Request::Reload,
            Request::Remove,
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(parse(&line).unwrap(), r);
        }
        assert!(parse("{\"cmd\":\"nope\"}").is_err());
        assert!(parse("garbage").is_err());
    }
}
