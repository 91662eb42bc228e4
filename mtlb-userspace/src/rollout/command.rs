//! The operator's restart command: `sh -c LINE`, bounded in time, its
//! output shown indented.

use super::{progress::Progress, signals::Signals};
use nix::{sys::signal::Signal, unistd::Pid};
use std::{process::ExitStatus, process::Stdio, time::Duration};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, BufReader},
    process::{Child, Command},
    time::timeout,
};

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(ExitStatus),
    /// Past its time; it was stopped.
    TimedOut,
    /// The rollout was interrupted by this signal; the command was
    /// stopped.
    Interrupted(&'static str),
}

/// How long the output of a command that has ended is still read: a
/// process it started in the background and that kept its output open
/// must not hold the rollout up.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(1);

/// How long a stopped command gets to end after SIGTERM, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs `line` through `sh -c` within `limit`, its output (stdout and
/// stderr) as indented lines of `progress`; a signal in `signals` stops
/// it.
pub async fn run(
    line: &str,
    limit: Duration,
    progress: &Progress,
    signals: &mut Signals,
) -> std::io::Result<Ended> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: a Ctrl-C on the terminal reaches the
        // rollout, which decides (a restart half done by an interrupted
        // `docker restart` client goes on in the daemon anyway), and a
        // command that is stopped is stopped with what it started.
        .process_group(0)
        .spawn()?;
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        readers.push(tokio::spawn(copy(o, progress.clone())));
    }
    if let Some(e) = child.stderr.take() {
        readers.push(tokio::spawn(copy(e, progress.clone())));
    }
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status?),
        _ = tokio::time::sleep(limit) => {
            stop(&mut child).await;
            Ended::TimedOut
        }
        sig = signals.recv() => {
            stop(&mut child).await;
            Ended::Interrupted(sig)
        }
    };
    for r in readers {
        let abort = r.abort_handle();
        if timeout(OUTPUT_AFTER_EXIT, r).await.is_err() {
            abort.abort();
        }
    }
    Ok(ended)
}

/// Copies `from` line by line to `progress`.
async fn copy(from: impl AsyncRead + Unpin, progress: Progress) {
    let mut r = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                progress.output(text.trim_end_matches(['\n', '\r']));
            }
        }
    }
}

/// SIGTERM to the command's process group, SIGKILL after [`STOP_GRACE`].
async fn stop(child: &mut Child) {
    let Some(pid) = child.id() else {
        // Already reaped.
        return;
    };
    let group = Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::killpg(group, Signal::SIGTERM);
    if timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    async fn run_for(line: &str, limit: Duration) -> Ended {
        let mut signals = Signals::install().unwrap();
        run(line, limit, &Progress::default(), &mut signals)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn exit_status_is_the_commands() {
        let Ended::Exited(s) = run_for("exit 3", Duration::from_secs(10)).await else {
            panic!("not exited");
        };
        assert_eq!(s.code(), Some(3));
    }

    #[tokio::test]
    async fn past_its_time_the_command_and_what_it_started_are_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let line = format!("sleep 30 & echo $! >'{}'; wait", pid.display());
        let t = Instant::now();
        assert_eq!(
            run_for(&line, Duration::from_millis(300)).await,
            Ended::TimedOut
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Its parent shell is gone, so it is reaped by init: gone, or a
        // zombie until then.
        let t = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "still runs: {stat}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_process_left_holding_the_output_does_not_hold_the_rollout() {
        let t = Instant::now();
        let ended = run_for("sleep 5 &", Duration::from_secs(10)).await;
        assert!(matches!(ended, Ended::Exited(s) if s.success()));
        assert!(
            t.elapsed() < OUTPUT_AFTER_EXIT + Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }
}
