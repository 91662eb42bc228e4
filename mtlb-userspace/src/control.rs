//! Control socket: operator commands to the running agent.
//!
//! A unix stream socket `<control_dir>/<netns inode>.sock` (mode 0600), one
//! JSON request per line and one JSON response per line. The CLI finds the
//! socket of its own network namespace, so `ip netns exec NS mtlb backend …`
//! talks to that namespace's agent.

use crate::checks::health::Admin;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Set a replica's administrative state: "ready", "drain" or "maint"
    /// on the wire.
    Admin {
        name: String,
        #[serde(serialize_with = "admin_out", deserialize_with = "admin_in")]
        state: Admin,
    },
    /// Set a replica's weight (in [`crate::config::WEIGHTS`]).
    Weight { name: String, weight: u32 },
    /// Where a replica's counts are: its slot and the pin directory.
    Locate { name: String },
    /// Re-read the configuration file.
    Reload,
    /// Detach everything, remove the pins and stop: mtlb off this
    /// namespace for good.
    Remove,
}

/// The operator's word for an admin state, as the CLI sends it.
fn admin_out<S: Serializer>(a: &Admin, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&a.as_str().to_ascii_lowercase())
}

fn admin_in<'de, D: Deserializer<'de>>(d: D) -> Result<Admin, D::Error> {
    let s = String::deserialize(d)?;
    Admin::parse(&s).ok_or_else(|| {
        serde::de::Error::custom(format!("unknown state {s:?}: use ready, drain or maint"))
    })
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

/// A control request, where to answer, and (from the connection's task)
/// word that the answer was written, so the agent can stop after answering.
pub type Incoming = (
    Request,
    tokio::sync::oneshot::Sender<Response>,
    tokio::sync::oneshot::Receiver<()>,
);

/// The control socket, mode 0600 (only root talks to the agent).
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    // The caller holds the namespace lock: a socket file left here is a
    // dead agent's.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Accepts control connections and hands their requests to `tx`; each
/// connection sends one request line per answer. An accept error (out of
/// file descriptors) goes to `failed` and is waited out: the socket keeps
/// accepting.
pub async fn accept(
    l: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::Sender<Incoming>,
    failed: impl Fn(&std::io::Error),
) {
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(answer(s, tx.clone()));
    }
}

/// Reads one connection's requests and writes their answers, in order.
async fn answer(s: tokio::net::UnixStream, tx: tokio::sync::mpsc::Sender<Incoming>) {
    use tokio::{
        io::{AsyncBufReadExt as _, AsyncWriteExt as _},
        sync::oneshot,
    };
    let (r, mut w) = s.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (wtx, wrx) = oneshot::channel();
        let resp = match parse(&line) {
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                if tx.send((req, otx, wrx)).await.is_err() {
                    return;
                }
                match orx.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(e) => Response::err(crate::error::report(&e)),
        };
        let mut out = serde_json::to_string(&resp).expect("responses serialize");
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() {
            return;
        }
        let _ = wtx.send(());
    }
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
                state: Admin::Drain,
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
        // The wire format the CLI speaks.
        assert_eq!(
            parse(r#"{"cmd":"admin","name":"mtp2","state":"maint"}"#).unwrap(),
            Request::Admin {
                name: "mtp2".into(),
                state: Admin::Maint
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Admin {
                name: "mtp1".into(),
                state: Admin::Ready
            })
            .unwrap(),
            r#"{"cmd":"admin","name":"mtp1","state":"ready"}"#
        );
        let e = parse(r#"{"cmd":"admin","name":"mtp1","state":"sleep"}"#).unwrap_err();
        assert!(
            crate::error::report(&e).contains("unknown state \"sleep\": use ready, drain or maint"),
            "{}",
            crate::error::report(&e)
        );
        assert!(parse("garbage").is_err());
    }
}
