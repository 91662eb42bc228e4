//! The HTTP client for the stats endpoint and Prometheus text.

use crate::*;
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

/// HTTP/1.0 GET of `path` on the stats endpoint (127.0.0.1:8404 in the
/// calling thread's namespace): (status code, body).
pub fn http_get(path: &str) -> (u16, String) {
    let r = http_request("127.0.0.1:8404", path, &[]);
    (r.code, r.body)
}

/// An HTTP response: status code, head (status line and headers), body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub code: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// HTTP/1.0 GET of `path` on `addr` (in the calling thread's namespace)
/// with extra request `headers`; panics when it cannot connect.
pub fn http_request(addr: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    HttpResponse {
        code,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// `s` percent-encoded for a URL query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `mtlb_backend_connections_total` of `backend` from the agent's
/// /metrics (the test's namespace, default stats port).
pub fn backend_total(backend: &str) -> f64 {
    let (_, text) = http_get("/metrics");
    metric(
        &text,
        &format!("mtlb_backend_connections_total{{backend=\"{backend}\"}}"),
    )
    .unwrap_or_else(|| panic!("no total for {backend}:\n{text}"))
}

/// Waits (bounded by [`wait_limit`]) until `backend` has been given more
/// than `than` connections; returns its total.
pub fn wait_backend_total_above(backend: &str, than: f64) -> f64 {
    let deadline = Instant::now() + wait_limit();
    loop {
        let t = backend_total(backend);
        if t > than {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{backend} got no connection beyond {than} within {:?}",
            wait_limit()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Value of the sample `name{labels}` in Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l[sample.len()..].trim().parse().ok())
}
