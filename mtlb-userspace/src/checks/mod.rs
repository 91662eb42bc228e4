//! Health checks, run by the agent against each replica's own port.
//!
//! Check connections go straight to `replica_address:base_port+i`: the
//! sk_lookup program lets them through untouched and they are not counted.

pub mod health;
pub mod mtproxy;
pub mod queue;
pub mod reason;
mod tcp;

pub use tcp::connect;
use tcp::os_error_text;

use crate::config::{CheckKind, Config};
use health::CheckResult;
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// One check to run against one replica: what the agent's core asks for
/// and the serve loop runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    /// The replica's own port.
    pub addr: SocketAddr,
    /// Its MTProxy HTTP stats endpoint, when `stats_base_port` is set.
    pub stats: Option<SocketAddr>,
    pub secret: String,
    pub timeout: Duration,
}

impl CheckSpec {
    /// The check of replica `slot` under `cfg`; `None` with `kind = "none"`.
    pub fn for_slot(cfg: &Config, slot: usize) -> Option<Self> {
        (cfg.check.kind != CheckKind::None).then(|| Self {
            kind: cfg.check.kind,
            addr: SocketAddr::new(cfg.replica_address, cfg.replica_port(slot)),
            stats: cfg
                .check
                .stats_base_port
                .map(|b| SocketAddr::new(cfg.replica_address, b + slot as u16)),
            secret: cfg.secret.clone(),
            timeout: Duration::from_millis(cfg.check.timeout_ms),
        })
    }

    /// Runs the check: the main one, then the stats endpoint when set (with
    /// `kind = "stats"` that is the only one).
    pub async fn run(self) -> CheckResult {
        let main = match self.kind {
            CheckKind::Tcp => tcp(self.addr, self.timeout).await,
            CheckKind::Mtproxy => mtproxy::check(self.addr, &self.secret, self.timeout).await,
            CheckKind::Stats | CheckKind::None => CheckResult::pass("", Duration::ZERO),
        };
        match self.stats {
            Some(s) if main.ok => {
                let r = stats(s, self.timeout).await;
                if r.ok && self.kind != CheckKind::Stats {
                    main
                } else {
                    r
                }
            }
            Some(s) if main.reason == reason::NO_ANSWER => {
                explain_silence(main, stats(s, self.timeout).await)
            }
            _ => main,
        }
    }
}

/// A probe that got no answer cannot tell a wrong secret from an upstream
/// the replica cannot reach: the official server and mtprotoproxy are both
/// silent on either. The replica's own stats can: none of its upstream
/// targets ready is the cause named (`stats: no ready upstream targets`);
/// some ready narrows the silence down in the info. Anything else from the
/// stats leaves the probe's result as it was.
fn explain_silence(probe: CheckResult, stats: CheckResult) -> CheckResult {
    let duration = probe.duration + stats.duration;
    let said = probe.info.unwrap_or_default();
    if stats.ok {
        CheckResult::fail(
            reason::NO_ANSWER,
            Some(format!(
                "{said}; its stats show ready upstream targets: wrong secret, or upstream slow"
            )),
            duration,
        )
    } else if stats.reason == reason::STATS_NOT_READY {
        CheckResult::fail(
            reason::STATS_NOT_READY,
            Some(format!("the MTProxy probe got no answer ({said})")),
            duration,
        )
    } else {
        CheckResult {
            info: Some(said).filter(|s| !s.is_empty()),
            duration,
            ..probe
        }
    }
}

/// `tcp`: connect and close.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> CheckResult {
    let t0 = Instant::now();
    match connect(addr, timeout).await {
        Ok(s) => {
            drop(s);
            CheckResult::pass(reason::L4_OK, t0.elapsed())
        }
        Err(r) => r,
    }
}

/// `stats`: GET /stats from an MTProxy HTTP stats endpoint and require
/// `total_ready_targets` > 0 (0 means no Telegram upstream is reachable).
pub async fn stats(addr: SocketAddr, timeout: Duration) -> CheckResult {
    let t0 = Instant::now();
    let body = tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.take(1 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await;
    let body = match body {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return CheckResult::io_fail(
                reason::STATS_UNREACHABLE,
                &e,
                os_error_text(&e),
                t0.elapsed(),
            );
        }
        Err(_) => {
            return CheckResult::fail(
                reason::STATS_UNREACHABLE,
                Some("timeout".into()),
                t0.elapsed(),
            );
        }
    };
    match ready_targets(&String::from_utf8_lossy(&body)) {
        Some(n) if n > 0 => CheckResult::pass(reason::STATS_OK, t0.elapsed()),
        Some(_) => CheckResult::fail(reason::STATS_NOT_READY, None, t0.elapsed()),
        None => CheckResult::fail(
            reason::STATS_UNREACHABLE,
            Some("no total_ready_targets in the reply".into()),
            t0.elapsed(),
        ),
    }
}

/// `total_ready_targets` from MTProxy's stats text (`key\tvalue` lines).
pub fn ready_targets(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split(['\t', ' ', ':']).filter(|s| !s.is_empty());
        (it.next()? == "total_ready_targets").then(|| it.next()?.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_targets() {
        let t = "HTTP/1.0 200 OK\r\n\r\nuptime\t10\ntotal_ready_targets\t3\nx\t1\n";
        assert_eq!(ready_targets(t), Some(3));
        assert_eq!(ready_targets("total_ready_targets\t0\n"), Some(0));
        assert_eq!(ready_targets("nothing\n"), None);
    }

    #[test]
    fn os_error_text_drops_the_errno() {
        let e = std::io::Error::from_raw_os_error(111);
        assert_eq!(os_error_text(&e), "Connection refused");
    }

    /// A replica that accepts and never answers (a wrong secret, or no
    /// upstream), and its stats endpoint reporting `ready` ready targets
    /// (`None`: no endpoint).
    async fn silent_replica(ready: Option<u32>) -> CheckSpec {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let st = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stats = st.local_addr().unwrap();
        match ready {
            Some(n) => {
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = st.accept().await {
                        let mut buf = [0u8; 512];
                        let _ = s.read(&mut buf).await;
                        let reply = format!("HTTP/1.0 200 OK\r\n\r\ntotal_ready_targets\t{n}\n");
                        let _ = s.write_all(reply.as_bytes()).await;
                    }
                });
            }
            None => drop(st),
        }
        CheckSpec {
            kind: CheckKind::Mtproxy,
            addr,
            stats: Some(stats),
            secret: "dd0123456789abcdef0123456789abcdef".into(),
            timeout: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn silence_with_no_ready_upstream_names_the_upstream() {
        let r = silent_replica(Some(0)).await.run().await;
        assert!(!r.ok);
        assert_eq!(r.reason, reason::STATS_NOT_READY, "{r:?}");
        assert!(
            r.info.as_deref().unwrap().contains("probe got no answer"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn silence_with_a_ready_upstream_stays_no_answer() {
        let r = silent_replica(Some(2)).await.run().await;
        assert!(!r.ok);
        assert_eq!(r.reason, reason::NO_ANSWER, "{r:?}");
        assert!(
            r.info
                .as_deref()
                .unwrap()
                .contains("stats show ready upstream targets: wrong secret"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn silence_with_unreachable_stats_stays_no_answer() {
        let r = silent_replica(None).await.run().await;
        assert_eq!(r.reason, reason::NO_ANSWER, "{r:?}");
        assert!(
            r.info.as_deref().unwrap().contains("no reply within"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn tcp_check_against_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let r = tcp(addr, Duration::from_secs(1)).await;
        assert!(r.ok, "{r:?}");
        drop(l);
        let r = tcp(addr, Duration::from_secs(1)).await;
        assert!(!r.ok);
        assert_eq!(r.reason, reason::L4_CON);
        assert_eq!(r.info.as_deref(), Some("Connection refused"));
    }
}
