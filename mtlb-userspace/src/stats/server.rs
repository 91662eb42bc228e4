//! The stats endpoint's server: on a thread and runtime of its own, so
//! nothing a client does on the stats port reaches the agent's loop (checks,
//! registrations, control commands), and bounded: connections at once,
//! header size, the time to send a request head, a connection's lifetime.
//! Memory is bounded by connections × header buffer.

use super::{collector::Collector, http::router};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::Semaphore;

/// What one stats client may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as they come.
    pub max_connections: usize,
    /// Time to send a request head (also the idle time allowed between
    /// requests on a kept-alive connection).
    pub header_timeout: Duration,
    /// Read buffer, and so the largest request head.
    pub max_header_bytes: usize,
    /// Longest a connection may stay, whatever it does.
    pub max_lifetime: Duration,
}

impl Default for Limits {
    /// Plenty for a few Prometheus servers and operators' browsers.
    fn default() -> Self {
        Self {
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_lifetime: Duration::from_secs(60),
        }
    }
}

/// Room in the stats listener's accept queue. std's 128 fills within a
/// fraction of a second when many connect at once (a flood, or every
/// browser tab and scraper after a restart) faster than the loop below
/// accepts and closes the excess; a full queue drops SYNs, and a scraper
/// that comes then waits a SYN retransmission (1 s, then 3 s) before the
/// server even sees it. Capped by net.core.somaxconn.
pub const BACKLOG: i32 = 4096;

/// The stats listener on `addr`, non-blocking, with SO_REUSEADDR as std's
/// bind sets it (a restart binds again while the old connections sit in
/// TIME_WAIT) and a [`BACKLOG`]-long accept queue.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_nonblocking(true)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Serves `/metrics`, `/stats`, `/healthz` on `listener` (non-blocking)
/// from a thread of its own. The thread inherits this thread's network
/// namespace.
pub fn spawn(
    listener: std::net::TcpListener,
    src: Arc<Collector>,
    limits: Limits,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("mtlb-stats".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l, src, limits).await,
                    Err(e) => tracing::error!("stats endpoint: {e}"),
                }
            })
        })
}

async fn serve(listener: tokio::net::TcpListener, src: Arc<Collector>, limits: Limits) {
    // The sparklines' samples, on this thread too: nothing of the stats
    // reaches the agent's loop.
    tokio::spawn(src.clone().sample_forever());
    let app = router(src);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut last_error: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors or memory: say so (once a
                // second at most), wait a little, go on.
                if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!("stats endpoint: accepting: {e}");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once.
            drop(stream);
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(limits.max_lifetime, conn).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connects that nobody accepts yet all complete: std's
    /// 128-long queue would drop the SYNs past it (and the connects
    /// below would time out).
    #[test]
    fn the_accept_queue_takes_a_burst() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _held: Vec<_> = (0..300)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .unwrap_or_else(|e| panic!("connect {i}: {e}"))
            })
            .collect();
        // Non-blocking, as the runtime needs it: with the queue drained,
        // accept says so instead of waiting.
        for _ in 0..300 {
            l.accept().unwrap();
        }
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }
}
