//! The other balancers, on the same backends (127.0.0.1:10000 and :10001):
//! * HAProxy (Debian), `mode tcp`, `balance leastconn`, checks
//!   `inter 2s rise 2 fall 3` as in the original deployment, on :8443;
//! * nginx `stream` (Debian nginx + libnginx-mod-stream), `least_conn`,
//!   on :8444, in the foreground with its own config, pid and logs;
//! * IPVS (`ipvsadm`), `-s lc`, virtual service 127.0.0.1:8445 with the
//!   two local real servers (masquerading; local real servers are
//!   delivered locally).

use anyhow::{Context as _, bail};
use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const HAPROXY: &str = "127.0.0.1:8443";
pub const NGINX: &str = "127.0.0.1:8444";
pub const IPVS: &str = "127.0.0.1:8445";

/// A balancer process (and its children), stopped on drop.
pub struct Proc {
    child: Option<Child>,
    pub pid: u32,
    /// SIGTERM for a graceful stop first (nginx's master then stops its
    /// workers).
    term_first: bool,
}

impl Proc {
    /// CPU seconds of the process and its direct children.
    pub fn cpu(&self) -> f64 {
        super::stats::tree_cpu(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, self.term_first.then_some(Duration::from_secs(5)));
        }
    }
}

/// Ends `c`: SIGTERM and up to `grace` for it to exit (when given), then
/// SIGKILL, and reaps it.
pub(super) fn terminate(c: &mut std::process::Child, grace: Option<Duration>) {
    if let Some(grace) = grace {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn wait_listening(addr: &str, what: &str) -> anyhow::Result<()> {
    let a: SocketAddr = addr.parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn start_haproxy(ns: &str, dir: &Path) -> anyhow::Result<Proc> {
    let cfg = format!(
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend mtp\n  bind {HAPROXY}\n  default_backend mtproxy\n\
         backend mtproxy\n  balance leastconn\n  server mtp1 127.0.0.1:10000 check inter 2s rise 2 fall 3\n  server mtp2 127.0.0.1:10001 check inter 2s rise 2 fall 3\n"
    );
    run_haproxy(ns, dir, "haproxy.cfg", &cfg, HAPROXY)
}

/// HAProxy in `ns` with config `text` (written to `dir/file`), once it
/// listens on `addr`.
pub fn run_haproxy(
    ns: &str,
    dir: &Path,
    file: &str,
    text: &str,
    addr: &str,
) -> anyhow::Result<Proc> {
    let cfg = dir.join(file);
    std::fs::write(&cfg, text)?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "haproxy", "-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::die_with_parent(&mut c);
    let child = c.spawn().context("starting haproxy")?;
    let p = Proc {
        pid: child.id(),
        child: Some(child),
        term_first: false,
    };
    wait_listening(addr, "haproxy")?;
    Ok(p)
}

pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub fn start_nginx(ns: &str, dir: &Path) -> anyhow::Result<Proc> {
    let ndir = dir.join("nginx");
    std::fs::create_dir_all(&ndir)?;
    let cfg = ndir.join("nginx.conf");
    std::fs::write(
        &cfg,
        format!(
            "load_module {NGINX_STREAM_MODULE};\n\
             daemon off;\nmaster_process on;\nworker_processes auto;\nworker_rlimit_nofile 16384;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8000; }}\n\
             stream {{\n  upstream mtproxy {{\n    least_conn;\n    server 127.0.0.1:10000;\n    server 127.0.0.1:10001;\n  }}\n\
             \x20 server {{\n    listen {NGINX} backlog=4096;\n    proxy_pass mtproxy;\n    proxy_connect_timeout 2s;\n  }}\n}}\n",
            d = ndir.display()
        ),
    )?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "nginx", "-p"])
        .arg(&ndir)
        .arg("-e")
        .arg(ndir.join("error.log"))
        .arg("-c")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::die_with_parent(&mut c);
    let child = c.spawn().context("starting nginx")?;
    let p = Proc {
        pid: child.id(),
        child: Some(child),
        term_first: true,
    };
    wait_listening(NGINX, "nginx").with_context(|| {
        format!(
            "nginx error log: {}",
            std::fs::read_to_string(ndir.join("error.log")).unwrap_or_default()
        )
    })?;
    Ok(p)
}

/// The IPVS virtual service, removed on drop.
pub struct Ipvs {
    ns: String,
}

impl Ipvs {
    /// Sets up the service in `ns`, or says exactly why it cannot run.
    pub fn start(ns: &str) -> Result<Ipvs, String> {
        let ipvsadm = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ipvsadm"])
                .args(args)
                .output()
                .map_err(|e| format!("running ipvsadm: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`ipvsadm {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                ))
            }
        };
        // sysctls of the namespace; only there once ip_vs is.
        let _ = std::fs::write("/proc/sys/net/ipv4/vs/conntrack", "1");
        if let Err(e) = ipvsadm(&["-A", "-t", IPVS, "-s", "lc"]) {
            return Err(format!("{e}{}", kernel_ipvs_note()));
        }
        let ipvs = Ipvs { ns: ns.to_string() };
        for rs in ["127.0.0.1:10000", "127.0.0.1:10001"] {
            ipvsadm(&["-a", "-t", IPVS, "-r", rs, "-m"])?;
        }
        // A first request proves the path works.
        let a: SocketAddr = IPVS.parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(3);
        while !super::load::request(a) {
            if Instant::now() > deadline {
                return Err(
                    "IPVS service set up, but requests to it fail on loopback in this namespace"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(ipvs)
    }
}

impl Drop for Ipvs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "ipvsadm", "-C"])
            .output();
    }
}

/// Why the kernel has no IPVS, from /proc/config.gz when it says.
fn kernel_ipvs_note() -> String {
    let cfg = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_(IP_VS|MODULES)[ =]'",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let mut notes = Vec::new();
    if cfg.contains("# CONFIG_IP_VS is not set") {
        notes
            .push("this kernel is built without IPVS (CONFIG_IP_VS is not set in /proc/config.gz)");
    }
    if cfg.contains("# CONFIG_MODULES is not set") {
        notes.push(
            "and without module support (CONFIG_MODULES is not set), so ip_vs cannot be loaded",
        );
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join(" "))
    }
}
