//! Clients on this machine that reach the guest's port 443 through QEMU's
//! forward. A TCP connect to a forwarded port always succeeds on this side
//! (QEMU accepts it before it tries the guest), so a client counts as
//! served only when it completed an MTProxy exchange: `probe.py` sends an
//! obfuscated2 (dd) handshake and one padded-intermediate frame and waits
//! for the reply frame (the middle-proxy stand-in's echo, relayed by the
//! replica); verdict `UP`. A client closed before it got a byte is a
//! refused one (what a guest port with no listener looks like through the
//! forward: QEMU accepts, the guest resets, QEMU closes); anything else is
//! a failed client.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

/// One client: when it ran and how it ended.
/// The JSON line probe.py and telethon_client.py end with (other fields
/// are shown as they are, not read).
#[derive(serde::Deserialize)]
struct Verdict {
    verdict: String,
    /// How the connection ended (`FIN`, `RST`, …), and bytes received.
    #[serde(default)]
    close: Option<String>,
    #[serde(default)]
    rx: Option<u64>,
}

impl Verdict {
    fn refused(&self) -> bool {
        self.verdict == "CONNECT_FAILED"
            || (self.rx == Some(0) && matches!(self.close.as_deref(), Some("FIN" | "RST")))
    }
}

pub struct Outcome {
    /// Wall clock, to compare with the guest's journal.
    pub start: SystemTime,
    pub end: SystemTime,
    pub ok: bool,
    /// Not served, and closed before the first byte (see the module's
    /// comment).
    pub refused: bool,
    /// probe.py's JSON line (or why there was none).
    pub detail: String,
}

/// Client exchanges in a loop, `workers` at a time, until [`Load::finish`].
pub struct Load {
    stop: Arc<AtomicBool>,
    /// Clients ended so far.
    done: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

pub struct Probe {
    pub python: PathBuf,
    pub fixtures: PathBuf,
    pub port: u16,
    pub secret: String,
}

impl Probe {
    /// One probe.py exchange with a 10 s deadline (software emulation makes
    /// the replica's handshake slow, not seconds slow).
    pub fn once(&self) -> Outcome {
        let start = SystemTime::now();
        let out = Command::new(&self.python)
            .arg(self.fixtures.join("probe.py"))
            .args(["127.0.0.1", &self.port.to_string(), &self.secret])
            .args(["--timeout", "10"])
            .current_dir(&self.fixtures)
            .output();
        let end = SystemTime::now();
        let (ok, refused, detail) = match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout);
                let line = text.lines().last().unwrap_or("").to_string();
                let v = serde_json::from_str::<Verdict>(&line).ok();
                let ok = v.as_ref().is_some_and(|v| v.verdict == "UP");
                let refused = !ok && v.as_ref().is_some_and(Verdict::refused);
                let detail = if line.is_empty() {
                    String::from_utf8_lossy(&o.stderr).trim().to_string()
                } else {
                    line
                };
                (ok, refused, detail)
            }
            Err(e) => (false, false, format!("probe.py: {e}")),
        };
        Outcome {
            start,
            end,
            ok,
            refused,
            detail,
        }
    }

    /// One Telethon exchange (the real client library's MTProxy transport,
    /// dd secret); its JSON line when the verdict is `UP`.
    pub fn telethon(&self, secret: &str) -> anyhow::Result<String> {
        let out = Command::new(&self.python)
            .arg(self.fixtures.join("telethon_client.py"))
            .args([&self.port.to_string(), secret, "--timeout", "20"])
            .current_dir(&self.fixtures)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("").to_string();
        let v: Verdict = serde_json::from_str(&line).map_err(|_| {
            anyhow::anyhow!(
                "telethon_client.py printed no result: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if v.verdict != "UP" {
            anyhow::bail!("Telethon client: {line}");
        }
        Ok(line)
    }
}

impl Load {
    /// `workers` loops of one client after another, `pause` between two.
    pub fn start(probe: Arc<Probe>, workers: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let workers = (0..workers)
            .map(|_| {
                let (stop, probe, count) = (stop.clone(), probe.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut done = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        done.push(probe.once());
                        count.fetch_add(1, Ordering::Relaxed);
                        // A steady trickle of new clients rather than a
                        // flood: the guest is emulated, and what the load
                        // takes from it the playbook runs without.
                        std::thread::sleep(pause);
                    }
                    done
                })
            })
            .collect();
        Load {
            stop,
            done: count,
            workers,
        }
    }

    /// Waits until `n` more clients have ended than when called; bounded
    /// by `timeout`.
    pub fn wait_more(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.done.load(Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + timeout;
        while self.done.load(Ordering::Relaxed) < target {
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "fewer than {n} clients ended within {} s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    }
}

/// "N clients, M failed" and the first failures' details.
pub fn summary(outcomes: &[Outcome]) -> (usize, usize, String) {
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let detail = failed
        .iter()
        .take(3)
        .map(|o| o.detail.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    (outcomes.len(), failed.len(), detail)
}

/// "N clients (…): S served, R refused, F failed otherwise".
pub fn counts(outcomes: &[Outcome]) -> String {
    let served = outcomes.iter().filter(|o| o.ok).count();
    let refused = outcomes.iter().filter(|o| o.refused).count();
    format!(
        "{} clients (complete MTProxy exchanges from this machine): {served} served, \
         {refused} refused, {} failed otherwise",
        outcomes.len(),
        outcomes.len() - served - refused
    )
}

/// The fixtures' directory.
pub fn fixtures(root: &Path) -> PathBuf {
    root.join("tests/fixtures/mtproxy")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> bool {
        serde_json::from_str::<Verdict>(line).unwrap().refused()
    }

    /// probe.py's lines: closed before the first byte is refused; a reply
    /// cut short, a silent peer or a served client is not.
    #[test]
    fn refused_is_closed_before_any_byte() {
        assert!(refused(
            r#"{"verdict": "CONNECT_FAILED", "error": "ConnectionRefusedError()"}"#
        ));
        assert!(refused(
            r#"{"verdict": "CLOSED_NO_DATA", "close": "FIN", "rx": 0}"#
        ));
        assert!(refused(
            r#"{"verdict": "CLOSED_NO_DATA", "close": "RST", "rx": 0}"#
        ));
        assert!(!refused(
            r#"{"verdict": "CLOSED_NO_DATA", "close": "FIN", "rx": 12}"#
        ));
        assert!(!refused(
            r#"{"verdict": "SILENT_TIMEOUT", "close": "TIMEOUT", "rx": 0}"#
        ));
        assert!(!refused(
            r#"{"verdict": "UP", "close": "open(we closed)", "rx": 40}"#
        ));
    }
}
