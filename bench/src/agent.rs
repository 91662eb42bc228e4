//! The mtlb agent under test: started with a config file of the bench's
//! (`keep_pins = false`, so stopping it detaches everything; its own
//! control_dir; optionally `replica_cgroup`), waited for until every
//! replica is UP, stopped with SIGTERM.

use anyhow::{Context as _, bail};
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The agent's stats/metrics address (config.rs: stats_address 127.0.0.1,
/// stats_port 8404 by default; the bench keeps the defaults).
pub const STATS: &str = "127.0.0.1:8404";

pub struct Agent {
    child: Option<Child>,
    pub pid: u32,
    pub pin_dir: PathBuf,
    pub control_dir: PathBuf,
    pub replicas: u16,
}

pub struct AgentOpts<'a> {
    pub mtlb: &'a Path,
    pub ns: &'a str,
    pub dir: &'a Path,
    pub replicas: u16,
    /// `replica_cgroup`, relative to the cgroup2 mount; None leaves the key
    /// out (mtlb before the key exists rejects it).
    pub replica_cgroup: Option<&'a str>,
    /// More of the config file (top-level keys, then tables).
    pub extra: &'a str,
}

impl Agent {
    pub fn start(o: &AgentOpts) -> anyhow::Result<Agent> {
        let control_dir = o.dir.join("ctl");
        std::fs::create_dir_all(&control_dir)?;
        let cfg = o.dir.join("mtlb.toml");
        let mut text = format!(
            "keep_pins = false\ncontrol_dir = \"{}\"\n",
            control_dir.display()
        );
        if let Some(cg) = o.replica_cgroup {
            text.push_str(&format!("replica_cgroup = \"{cg}\"\n"));
        }
        text.push_str(o.extra);
        std::fs::write(&cfg, text)?;
        let state = o.dir.join("state");
        std::fs::create_dir_all(&state)?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", o.ns])
            .arg(o.mtlb)
            .args(["run", "--replicas", &o.replicas.to_string(), "--state-dir"])
            .arg(&state)
            .arg("--config")
            .arg(&cfg)
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        super::die_with_parent(&mut c);
        let mut child = c.spawn().context("starting mtlb")?;
        let pid = child.id();
        let mut err = BufReader::new(child.stderr.take().expect("piped"));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(o.dir.join("agent.log"))?;
        let mut line = String::new();
        let pin_dir = loop {
            line.clear();
            if err.read_line(&mut line)? == 0 {
                let _ = child.wait();
                bail!(
                    "mtlb exited while starting (log: {})",
                    o.dir.join("agent.log").display()
                );
            }
            let _ = log.write_all(line.as_bytes());
            if line.contains("steering TCP port") {
                let p = line
                    .split_once("pins in ")
                    .map(|x| x.1.trim().to_string())
                    .unwrap_or_default();
                break PathBuf::from(p);
            }
        };
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                let _ = writeln!(log, "{l}");
            }
        });
        let agent = Agent {
            child: Some(child),
            pid,
            pin_dir,
            control_dir,
            replicas: o.replicas,
        };
        agent.wait_up(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Waits until /metrics says every replica is up.
    pub fn wait_up(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let addr: SocketAddr = STATS.parse()?;
        loop {
            if let Some(m) = super::load::http_get(addr, "/metrics") {
                let up = m
                    .lines()
                    .filter(|l| l.starts_with("mtlb_backend_up{") && l.trim_end().ends_with(" 1"))
                    .count();
                if up >= self.replicas as usize {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("not every replica came up within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The control socket `<control_dir>/<netns inode>.sock`.
    pub fn control_socket(&self) -> Option<PathBuf> {
        std::fs::read_dir(&self.control_dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "sock"))
    }

    pub fn cpu(&self) -> f64 {
        super::stats::proc_cpu(self.pid)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            super::anchors::terminate(&mut c, Some(Duration::from_secs(10)));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One control request (a JSON line) and its answer line: the time in ms,
/// or None.
pub fn control_ms(sock: &Path, request: &str) -> Option<f64> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    s.write_all(b"\n").ok()?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).ok()?;
    answer
        .contains("\"ok\":true")
        .then(|| t.elapsed().as_secs_f64() * 1e3)
}
