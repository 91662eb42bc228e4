//! Control socket: operator commands to the running agent.
//!
//! A unix stream socket `<control_dir>/<netns inode>.sock` (mode 0600), one
//! JSON request per line and one JSON response per line. The CLI finds the
//! socket of its own network namespace, so `ip netns exec NS mtlb backend …`
//! talks to that namespace's agent. Clients are held within [`Limits`].

use crate::checks::health::Admin;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// Drain the host (`Some(true)`: withdraw its service addresses),
    /// make it ready (`Some(false)`), or only tell its announcement
    /// (`None`).
    Host { drain: Option<bool> },
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
    /// The agent answered and said no (an unknown name, a bad weight).
    #[error("{0}")]
    Refused(String),
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

/// What control clients may take. They are root, but a script that leaks
/// connections or writes without newlines must not take the descriptors
/// and memory the agent's checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once. A new one over it takes the place of the
    /// one idle longest; when none is idle (all wait for the agent), it is
    /// answered with an error and closed.
    pub max_connections: usize,
    /// Time to send a complete request line, and to take its answer. The
    /// agent's own time on a request (a reload) does not count.
    pub idle_timeout: Duration,
    /// Longest request line, its newline not counted.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    /// A request is a short JSON object and the CLI sends it at once.
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(10),
            max_request_bytes: 4096,
        }
    }
}

/// Accepts control connections and hands their requests to `tx`; each
/// connection sends one request line per answer. An accept error (out of
/// file descriptors) goes to `failed` and is waited out: the socket keeps
/// accepting.
pub async fn accept(
    l: tokio::net::UnixListener,
    tx: tokio::sync::mpsc::Sender<Incoming>,
    limits: Limits,
    mut failed: impl FnMut(&std::io::Error),
) {
    let held = Held::new(limits.max_connections);
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match held.admit().await {
            Some(seat) => {
                tokio::spawn(answer(s, tx.clone(), limits, seat));
            }
            None => {
                let (_, w) = s.into_split();
                last_word(
                    &w,
                    &format!(
                        "too many control connections ({}), all waiting for the agent; try again",
                        limits.max_connections
                    ),
                );
            }
        }
    }
}

/// The connections held, and since when each has waited for a request
/// (`None` while the agent works on one).
struct Held {
    /// One permit per connection; a connection's task gives its permit up
    /// only after closing it, so at most `max_connections` are ever open.
    slots: Arc<Semaphore>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, HeldConn>,
}

struct HeldConn {
    idle_since: Option<tokio::time::Instant>,
    evict: Arc<Notify>,
}

/// A connection's place in [`Held`], given up when dropped.
struct Seat {
    id: u64,
    held: Arc<Held>,
    evict: Arc<Notify>,
    _slot: OwnedSemaphorePermit,
}

impl Held {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max)),
            table: Default::default(),
        })
    }

    /// A place for a new connection, made when all are taken by closing
    /// the connection idle longest; `None` when none is idle.
    async fn admit(self: &Arc<Self>) -> Option<Seat> {
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.evict_idle_longest()?;
                // Its task closes it and gives its place up at once; only
                // this loop takes places.
                self.slots.clone().acquire_owned().await.ok()?
            }
        };
        let mut t = self.table.lock().expect("not poisoned");
        let id = t.next_id;
        t.next_id += 1;
        let evict = Arc::new(Notify::new());
        t.conns.insert(
            id,
            HeldConn {
                idle_since: Some(tokio::time::Instant::now()),
                evict: evict.clone(),
            },
        );
        Some(Seat {
            id,
            held: self.clone(),
            evict,
            _slot: slot,
        })
    }

    fn evict_idle_longest(&self) -> Option<()> {
        let mut t = self.table.lock().expect("not poisoned");
        let oldest = t
            .conns
            .iter()
            .filter_map(|(id, c)| Some((c.idle_since?, *id)))
            .min()?
            .1;
        let c = t.conns.remove(&oldest).expect("just found");
        // Kept as a permit if its task is not waiting on it yet.
        c.evict.notify_one();
        Some(())
    }
}

impl Seat {
    /// Marks the connection waiting (`true`) or busy; `false` when it was
    /// evicted meanwhile.
    fn waiting(&self, waiting: bool) -> bool {
        let mut t = self.held.table.lock().expect("not poisoned");
        match t.conns.get_mut(&self.id) {
            Some(c) => {
                c.idle_since = waiting.then(tokio::time::Instant::now);
                true
            }
            None => false,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Ok(mut t) = self.held.table.lock() {
            t.conns.remove(&self.id);
        }
    }
}

/// What a connection sent next.
enum Next {
    Line(Vec<u8>),
    Closed,
    TooLong,
}

/// Reads one request line of at most `max` bytes, never buffering more.
async fn next_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    max: usize,
) -> std::io::Result<Next> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let mut line = Vec::new();
    // One byte past the limit tells a line of `max` bytes and its newline
    // from a longer one.
    let n = (&mut *r)
        .take(max as u64 + 1)
        .read_until(b'\n', &mut line)
        .await?;
    Ok(if line.last() == Some(&b'\n') {
        line.pop();
        Next::Line(line)
    } else if n == 0 {
        Next::Closed
    } else if line.len() > max {
        Next::TooLong
    } else {
        // The last line, cut by the end of the stream.
        Next::Line(line)
    })
}

/// An error answer for a connection about to be closed. It is written
/// with `try_write`, only if it fits in the socket buffer at once: closing
/// must not wait for a client that does not read.
fn last_word(w: &tokio::net::unix::OwnedWriteHalf, message: &str) {
    let mut out = serde_json::to_vec(&Response::err(message)).expect("responses serialize");
    out.push(b'\n');
    let _ = w.try_write(&out);
}

/// Reads one connection's requests and writes their answers, in order,
/// within `limits`. `seat`, a parameter, is dropped after the body's
/// locals: the connection is closed before its place is given up.
async fn answer(
    s: tokio::net::UnixStream,
    tx: tokio::sync::mpsc::Sender<Incoming>,
    limits: Limits,
    seat: Seat,
) {
    use tokio::{io::AsyncWriteExt as _, sync::oneshot, time::timeout};
    let (r, mut w) = s.into_split();
    let mut r = tokio::io::BufReader::new(r);
    let evicted = || {
        format!(
            "closed: {} control connections were open and this one was idle longest",
            limits.max_connections
        )
    };
    loop {
        if !seat.waiting(true) {
            return last_word(&w, &evicted());
        }
        let next = tokio::select! {
            _ = seat.evict.notified() => return last_word(&w, &evicted()),
            next = timeout(limits.idle_timeout, next_line(&mut r, limits.max_request_bytes)) => next,
        };
        let line = match next {
            Err(_) => {
                let idle = humantime::format_duration(limits.idle_timeout);
                return last_word(&w, &format!("closed: no request line within {idle}"));
            }
            Ok(Err(_) | Ok(Next::Closed)) => return,
            Ok(Ok(Next::TooLong)) => {
                let max = limits.max_request_bytes;
                return last_word(&w, &format!("request too long: over {max} bytes"));
            }
            Ok(Ok(Next::Line(line))) => line,
        };
        if !seat.waiting(false) {
            return last_word(&w, &evicted());
        }
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
        match timeout(limits.idle_timeout, w.write_all(out.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => return,
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

/// Like [`call`], with a refusal as an error: the answer when the agent
/// did what was asked.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let r = call(path, req, timeout)?;
    if !r.ok {
        return Err(ControlError::Refused(r.message));
    }
    Ok(r)
}

/// Parses one request line.
pub fn parse(line: impl AsRef<[u8]>) -> Result<Request, ControlError> {
    serde_json::from_slice(line.as_ref().trim_ascii()).map_err(ControlError::BadRequest)
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
            Request::Host { drain: None },
            Request::Host { drain: Some(true) },
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

    use tokio::{
        io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
        net::UnixStream as Client,
        sync::mpsc,
        time::timeout,
    };

    /// Bounds every wait in these tests.
    const LIMIT: Duration = Duration::from_secs(10);

    /// A control socket served with `limits` in a temporary directory, and
    /// the agent's end of it.
    struct Served {
        _dir: tempfile::TempDir,
        path: PathBuf,
        rx: mpsc::Receiver<Incoming>,
    }

    fn serve(limits: Limits) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let l = bind(&path).unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(accept(l, tx, limits, |e| panic!("accept: {e}")));
        Served {
            _dir: dir,
            path,
            rx,
        }
    }

    impl Served {
        async fn connect(&self) -> Client {
            Client::connect(&self.path).await.unwrap()
        }

        /// Answers every request with "done", `delay` after it came.
        fn answer_all(mut self, delay: Duration) -> Self {
            let (_, none) = mpsc::channel(1);
            let mut requests = std::mem::replace(&mut self.rx, none);
            tokio::spawn(async move {
                while let Some((_, reply, _)) = requests.recv().await {
                    tokio::time::sleep(delay).await;
                    let _ = reply.send(Response::ok("done"));
                }
            });
            self
        }
    }

    /// Sends `line` and returns the answer line.
    async fn ask(c: &mut Client, line: &[u8]) -> Response {
        c.write_all(line).await.unwrap();
        next_answer(c).await.expect("an answer")
    }

    /// The next answer line; `None` at the end of the stream.
    async fn next_answer(c: &mut Client) -> Option<Response> {
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(c);
        timeout(LIMIT, r.read_line(&mut line))
            .await
            .expect("an answer in time")
            .unwrap();
        (!line.is_empty()).then(|| serde_json::from_str(&line).unwrap())
    }

    /// The connection's last answer, then the end of the stream.
    async fn closed_with(c: &mut Client) -> Response {
        let r = next_answer(c).await.expect("an answer before the close");
        let mut rest = Vec::new();
        timeout(LIMIT, c.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .unwrap();
        assert!(rest.is_empty(), "more after the last answer");
        r
    }

    const LOCATE: &[u8] = b"{\"cmd\":\"locate\",\"name\":\"mtp1\"}\n";

    #[tokio::test]
    async fn a_request_is_answered_while_the_cap_is_held_by_idle_connections() {
        let limits = Limits {
            max_connections: 4,
            ..Limits::default()
        };
        let served = serve(limits).answer_all(Duration::ZERO);
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(served.connect().await);
        }
        // Answered: the idle connection that came first makes room.
        let mut c = served.connect().await;
        assert_eq!(ask(&mut c, LOCATE).await, Response::ok("done"));
        let r = closed_with(&mut idle[0]).await;
        assert!(!r.ok && r.message.contains("idle longest"), "{r:?}");
        // The others are still held: they are answered too.
        for c in &mut idle[1..] {
            assert_eq!(ask(c, LOCATE).await, Response::ok("done"));
        }
    }

    #[tokio::test]
    async fn over_the_cap_with_every_connection_busy_is_refused() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let mut served = serve(limits);
        let mut busy = Vec::new();
        let mut pending = Vec::new();
        for _ in 0..2 {
            let mut c = served.connect().await;
            c.write_all(LOCATE).await.unwrap();
            // Busy from here until the agent answers.
            pending.push(timeout(LIMIT, served.rx.recv()).await.unwrap().unwrap());
            busy.push(c);
        }
        let mut over = served.connect().await;
        let r = closed_with(&mut over).await;
        assert!(
            !r.ok && r.message.contains("too many control connections (2)"),
            "{r:?}"
        );
        for (_, reply, _) in pending {
            reply.send(Response::ok("done")).unwrap();
        }
        for c in &mut busy {
            assert_eq!(next_answer(c).await, Some(Response::ok("done")));
        }
    }

    #[tokio::test]
    async fn an_oversized_line_is_answered_and_closed() {
        let served = serve(Limits::default()).answer_all(Duration::ZERO);
        // A line of exactly the limit is read (and answered as the bad
        // request it is); the connection stays.
        let mut c = served.connect().await;
        let mut line = vec![b' '; 4096];
        line.push(b'\n');
        assert!(!ask(&mut c, &line).await.ok);
        assert_eq!(ask(&mut c, LOCATE).await, Response::ok("done"));
        // One byte more, with no newline in sight: the answer says why,
        // and what the client still sends is not read.
        let (mut r, mut w) = served.connect().await.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 64 << 20 && w.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let mut answer = String::new();
        let mut r = tokio::io::BufReader::new(&mut r);
        timeout(LIMIT, r.read_line(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        let resp: Response = serde_json::from_str(&answer).unwrap();
        assert_eq!(resp, Response::err("request too long: over 4096 bytes"));
        let sent = timeout(LIMIT, writer).await.unwrap().unwrap();
        assert!(sent < 8 << 20, "the agent read {sent} bytes");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_but_the_agents_time_does_not_count() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        // The agent takes longer than the timeout to answer.
        let served = serve(limits).answer_all(Duration::from_millis(600));
        let mut c = served.connect().await;
        assert_eq!(ask(&mut c, LOCATE).await, Response::ok("done"));
        // Then nothing, or half a line: closed, saying why.
        let mut half = served.connect().await;
        half.write_all(b"{\"cmd\":").await.unwrap();
        for c in [&mut c, &mut half] {
            let r = closed_with(c).await;
            assert_eq!(r, Response::err("closed: no request line within 200ms"));
        }
    }
}
