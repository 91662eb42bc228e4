//! `cargo xtask demo`: mtlb with two real MTProxy replicas, a fake Telegram
//! DC and a client load, in a network namespace of its own; a replica is
//! stopped and brought back while clients connect. Everything is removed at
//! the end.

use anyhow::{Context as _, bail};
use std::{
    io::{BufRead as _, BufReader},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

const SECRET: &str = "dd0123456789abcdef0123456789abcdef";

struct Demo {
    ns: String,
    children: Vec<(&'static str, Child)>,
    dir: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The agent first (SIGTERM: it detaches and removes its pins).
        for (name, c) in self.children.iter_mut().rev() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let sig = if *name == "mtlb" {
                nix::sys::signal::Signal::SIGTERM
            } else {
                nix::sys::signal::Signal::SIGKILL
            };
            let _ = nix::sys::signal::kill(pid, sig);
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        println!("demo: cleaned up (namespace {} deleted)", self.ns);
    }
}

impl Demo {
    fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Starts a Python fixture and waits for its `ready` line.
    fn fixture(
        &mut self,
        name: &'static str,
        python: &Path,
        script: &str,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let mut c = self.cmd(python);
        c.arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().with_context(|| format!("starting {name}"))?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line)? == 0 {
                bail!("{name} exited before it was ready");
            }
            if line.trim() == "ready" {
                break;
            }
        }
        std::thread::spawn(move || for _ in out.lines().map_while(Result::ok) {});
        self.children.push((name, child));
        Ok(())
    }

    fn kill(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| *n == name) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn status(&self, mtlb: &Path) {
        let out = self.cmd(mtlb).arg("status").output();
        if let Ok(o) = out {
            print!("{}", String::from_utf8_lossy(&o.stdout));
        }
    }
}

pub fn run(root: &Path, python: &Path) -> anyhow::Result<()> {
    let mtlb = root.join("target/release/mtlb");
    let fixtures = root.join("tests/fixtures/mtproxy");
    let ns = format!("mtlb-demo-{}", std::process::id());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("ip").args(["netns", "add", &ns]).status()?;
    if !status.success() {
        bail!("ip netns add {ns} failed");
    }
    let mut d = Demo {
        ns: ns.clone(),
        children: Vec::new(),
        dir: dir.clone(),
    };
    Command::new("ip")
        .args(["-n", &ns, "link", "set", "lo", "up"])
        .status()?;
    println!("demo: network namespace {ns}");

    let script = |s: &str| fixtures.join(s).to_string_lossy().into_owned();
    d.fixture("fake-dc", python, &script("fake_dc.py"), &["20443"])?;
    println!("demo: fake Telegram DC on 127.0.0.1:20443 (echoes frames)");
    let raw_secret = &SECRET[2..];
    for (name, port) in [("mtproxy1", "10000"), ("mtproxy2", "10001")] {
        d.fixture(
            name,
            python,
            &script("launcher.py"),
            &[port, raw_secret, "20443"],
        )?;
        println!("demo: MTProxy replica {name} (mtprotoproxy) on 127.0.0.1:{port}");
    }

    let cfg = dir.join("mtlb.toml");
    std::fs::write(
        &cfg,
        format!(
            "secret = \"{SECRET}\"\n[check]\nkind = \"mtproxy\"\ninter_ms = 500\nfastinter_ms = 250\ndowninter_ms = 500\n"
        ),
    )?;
    let mut agent = d.cmd(&mtlb);
    agent
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut agent = agent.spawn().context("starting mtlb")?;
    let (tx, rx) = mpsc::channel::<String>();
    let err = agent.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            println!("  mtlb | {line}");
            let _ = tx.send(line);
        }
    });
    d.children.push(("mtlb", agent));
    let wait = |needle: &str| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(_) => bail!("mtlb did not log {needle:?}"),
            }
        }
    };
    wait("backend mtp2 is UP")?;

    let link = d
        .cmd(&mtlb)
        .args(["link", "--server", "127.0.0.1", "--config"])
        .arg(&cfg)
        .output()?;
    println!("demo: the link users would get (with this host's address instead of 127.0.0.1):");
    print!("{}", String::from_utf8_lossy(&link.stdout));

    // Client load: connect, hold briefly, close; count failures.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}"))?;
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match TcpStream::connect("127.0.0.1:443") {
                    Ok(_s) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    println!("demo: client load running against 127.0.0.1:443");
    std::thread::sleep(Duration::from_secs(2));
    d.status(&mtlb);

    println!("demo: stopping mtproxy2 (as `docker stop mtproxy2`)");
    d.kill("mtproxy2");
    wait("backend mtp2 is DOWN")?;
    std::thread::sleep(Duration::from_secs(1));
    d.status(&mtlb);
    println!(
        "demo: {} connections so far, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    println!("demo: starting mtproxy2 again");
    d.fixture(
        "mtproxy2",
        python,
        &script("launcher.py"),
        &["10001", raw_secret, "20443"],
    )?;
    wait("backend mtp2 is UP")?;
    std::thread::sleep(Duration::from_secs(2));
    d.status(&mtlb);
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("demo: {ok} client connections, {failed} failed");
    drop(d);
    if failed > 0 {
        bail!("{failed} client connections failed");
    }
    Ok(())
}
