//! The several-hosts lab: hosts announcing the service addresses (VIPs)
//! over BGP to an upstream router that spreads clients over them by ECMP.
//!
//! Namespaces of the lab's own ([`Netns::create`]): a router with a bridge
//! (`br0`, the LAN) that each host's veth plugs into, so that a host's link
//! going down leaves the router's interface up (BFD has to notice), and a
//! client on a link of its own behind the router. Addresses come from the
//! documentation prefixes only: the LAN is 192.0.2.0/26 and
//! 2001:db8:1::/64 (router .1 / ::1, host `i` .(10+i) / ::(0x10+i)), the
//! client net 192.0.2.64/26 and 2001:db8:2::/64 (router .65 / ::1, client
//! .66 / ::2), the VIPs [`VIP4`] and [`VIP6`], which [`Lab::new`] puts on
//! every host's lo (mtlb's agent adds them where missing).
//!
//! BIRD runs in every namespace but the client's, in the foreground as a
//! child of the test with its own control socket and pid file in the lab's
//! temp dir: the router with tests/fixtures/bird/router.conf (BGP with any
//! host of the LAN, BFD, `merge paths`), each host with the config the
//! deployment's BIRD role renders (deploy/roles/bird, rendered with the
//! test environment's Ansible). A host announces a VIP while a route for
//! it is in kernel table [`ANNOUNCE_TABLE`] of its namespace: mtlb's agent
//! writes it, or [`Lab::announce_by_hand`] does.
//!
//! Listeners on the VIPs are [`Replica`]s named `h<i>` (or starting with
//! it: [`Lab::host_of`] maps a greeting to its host), so a client knows
//! which host took it. [`Lab::cut_flows`] measures how many established
//! connections one host's withdrawal cuts.

use crate::*;
use std::{
    fmt,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
pub const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x80));
/// The kernel table a host's announced VIPs are routed in (mtlb's
/// `announce.table`, the role's `mtlb_announce_table`).
pub const ANNOUNCE_TABLE: u32 = 4242;
pub const ROUTER_AS: u32 = 64496;
pub const HOSTS_AS: u32 = 64511;
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);

/// The router's BIRD config.
pub fn router_conf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/bird/router.conf")
}

/// BFD's interval in the lab: 100 ms (a dead link noticed in 300 ms), times
/// [`time_scale`]: under emulation a late BFD packet must not drop a
/// session that is alive.
fn bfd_interval_ms() -> u32 {
    100 * time_scale()
}

/// The router's config with the lab's BFD interval, written into `dir`.
fn scaled_router_conf(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(router_conf()).unwrap();
    let from = "interval 100 ms;";
    assert!(text.contains(from), "router.conf sets BFD's interval");
    let dest = dir.join("router.conf");
    std::fs::write(
        &dest,
        text.replace(from, &format!("interval {} ms;", bfd_interval_ms())),
    )
    .unwrap();
    dest
}

/// The host routes in `netns`'s announce table (IPv4 and IPv6), sorted:
/// what its BIRD exports.
pub fn announce_routes(netns: &str) -> Vec<String> {
    announce_routes_in(netns, ANNOUNCE_TABLE)
}

/// The same in routing table `table`.
pub fn announce_routes_in(netns: &str, table: u32) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let o = Command::new("ip")
            .args(["-n", netns, "-j", family, "route", "show", "table"])
            .arg(table.to_string())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        // A table that never held a route does not exist yet.
        if err.contains("FIB table does not exist") {
            continue;
        }
        assert!(o.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        for r in v.as_array().into_iter().flatten() {
            out.push(r["dst"].as_str().unwrap_or_default().to_string());
        }
    }
    out.sort();
    out
}

/// `ip -n NS ARGS`, which must succeed; returns its stdout.
fn ip(ns: &Netns, args: &[&str]) -> String {
    sh(Command::new("ip").arg("-n").arg(&ns.name).args(args))
}

/// One BIRD, in the foreground, killed and reaped when dropped.
pub struct Bird {
    child: std::sync::Mutex<Option<Child>>,
    pub ctl: PathBuf,
    pub log: PathBuf,
    conf: PathBuf,
    pid_file: PathBuf,
}

impl Bird {
    /// Starts BIRD with `conf` inside `ns`; its control socket, pid file
    /// and log go to `dir/<name>.*`. Returns once it answers on its socket.
    pub fn start(ns: &Netns, conf: PathBuf, dir: &std::path::Path, name: &str) -> Self {
        let b = Self {
            child: std::sync::Mutex::new(None),
            ctl: dir.join(format!("{name}.ctl")),
            log: dir.join(format!("{name}.log")),
            conf,
            pid_file: dir.join(format!("{name}.pid")),
        };
        b.restart(ns);
        b
    }

    /// Starts it again (after [`kill`](Self::kill)), same config.
    pub fn restart(&self, ns: &Netns) {
        let mut child = self.child.lock().unwrap();
        assert!(child.is_none(), "BIRD {} still runs", self.ctl.display());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.ctl)
            .arg("-P")
            .arg(&self.pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        ns.run_inside(&mut cmd);
        let child = child.insert(cmd.spawn().unwrap_or_else(|e| panic!("bird: {e}")));
        let deadline = Instant::now() + wait_limit();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("BIRD exited ({s}):\n{}", self.log_text());
            }
            if self
                .try_birdc(&["show", "status"])
                .is_some_and(|o| o.contains("Daemon is up"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "BIRD does not answer on {}:\n{}",
                self.ctl.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_birdc(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.ctl)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `birdc ARGS` against this BIRD; panics unless it answers.
    pub fn birdc(&self, args: &[&str]) -> String {
        self.try_birdc(args)
            .unwrap_or_else(|| panic!("birdc {args:?}: no answer\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reaped: its sessions end as the kernel closes its
    /// sockets; its routes stay where it wrote them.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.ctl);
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A host of the lab: its namespace, its LAN addresses, its BIRD.
pub struct LabHost {
    /// Declared before `ns`: BIRD goes before its namespace.
    pub bird: Bird,
    pub ns: Netns,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
}

impl LabHost {
    /// Its LAN address of `vip`'s family: the router's nexthop for it.
    pub fn addr_for(&self, vip: IpAddr) -> IpAddr {
        match vip {
            IpAddr::V4(_) => self.addr4.into(),
            IpAddr::V6(_) => self.addr6.into(),
        }
    }

    /// Runs `f` in a thread inside this host's namespace.
    pub fn inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        inside(&self.ns, f)
    }
}

/// Runs `f` in a thread inside `ns` (the caller's thread stays where it is).
pub fn inside<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// The router, its hosts and a client (see the module's doc).
pub struct Lab {
    /// Declared before the namespaces: the BIRDs go first.
    router_bird: Bird,
    hosts: Vec<LabHost>,
    router: Netns,
    client: Netns,
    pub dir: TempDir,
    /// The client's next source port ([`hold`](Self::hold)).
    next_port: std::sync::atomic::AtomicU32,
}

impl Lab {
    /// `hosts` hosts (1..=50), every BGP session established, no VIP
    /// announced yet.
    pub fn new(hosts: usize) -> Self {
        assert!((1..=50).contains(&hosts));
        let dir = TempDir::new("bgp");
        let router = Netns::create();
        let client = Netns::create();
        ip(&router, &["link", "add", "br0", "type", "bridge"]);
        ip(&router, &["link", "set", "br0", "up"]);
        ip(&router, &["addr", "add", "192.0.2.1/26", "dev", "br0"]);
        ip(
            &router,
            &["addr", "add", "2001:db8:1::1/64", "dev", "br0", "nodad"],
        );
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv6.conf.all.forwarding", "1");
        // ECMP hashes the ports too (policy 1): the lab's clients share
        // one address, which the default (addresses only) would send to
        // one host.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        router.sysctl("net.ipv6.fib_multipath_hash_policy", "1");

        ip(
            &router,
            &[
                "link",
                "add",
                "cl",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &client.name,
            ],
        );
        ip(&router, &["link", "set", "cl", "up"]);
        ip(&router, &["addr", "add", "192.0.2.65/26", "dev", "cl"]);
        ip(
            &router,
            &["addr", "add", "2001:db8:2::1/64", "dev", "cl", "nodad"],
        );
        ip(&client, &["link", "set", "eth0", "up"]);
        ip(&client, &["addr", "add", "192.0.2.66/26", "dev", "eth0"]);
        ip(
            &client,
            &["addr", "add", "2001:db8:2::2/64", "dev", "eth0", "nodad"],
        );
        ip(&client, &["route", "add", "default", "via", "192.0.2.65"]);
        ip(
            &client,
            &["-6", "route", "add", "default", "via", "2001:db8:2::1"],
        );

        let nets: Vec<(Netns, Ipv4Addr, Ipv6Addr)> = (0..hosts)
            .map(|i| {
                let ns = Netns::create();
                let a4 = Ipv4Addr::new(192, 0, 2, 10 + i as u8);
                let a6 = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10 + i as u16);
                let port = format!("h{i}");
                ip(
                    &router,
                    &[
                        "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                        &ns.name,
                    ],
                );
                ip(&router, &["link", "set", &port, "master", "br0"]);
                ip(&router, &["link", "set", &port, "up"]);
                // The LAN address and its routes come back after a link
                // down/up ([`Lab::link_up`]).
                ns.sysctl("net.ipv6.conf.all.keep_addr_on_down", "1");
                ip(&ns, &["link", "set", "eth0", "up"]);
                ip(&ns, &["addr", "add", &format!("{a4}/26"), "dev", "eth0"]);
                ip(
                    &ns,
                    &["addr", "add", &format!("{a6}/64"), "dev", "eth0", "nodad"],
                );
                Self::host_routes(&ns);
                for vip in [VIP4, VIP6] {
                    let len = if vip.is_ipv4() { 32 } else { 128 };
                    ip(&ns, &["addr", "add", &format!("{vip}/{len}"), "dev", "lo"]);
                }
                (ns, a4, a6)
            })
            .collect();

        // The hosts' configs, each rendered by the BIRD role's template.
        let confs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = nets
                .iter()
                .enumerate()
                .map(|(i, (_, a4, _))| {
                    let dest = dir.path.join(format!("h{i}.conf"));
                    s.spawn(move || {
                        render_host_conf(*a4, &dest);
                        dest
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });

        let router_bird = Bird::start(&router, scaled_router_conf(&dir.path), &dir.path, "router");
        let hosts = nets
            .into_iter()
            .zip(confs)
            .enumerate()
            .map(|(i, ((ns, addr4, addr6), conf))| LabHost {
                bird: Bird::start(&ns, conf, &dir.path, &format!("h{i}")),
                ns,
                addr4,
                addr6,
            })
            .collect();
        let lab = Self {
            router_bird,
            hosts,
            router,
            client,
            dir,
            next_port: 10000.into(),
        };
        lab.wait_sessions(lab.hosts() * 2);
        lab
    }

    /// A host's default routes through the router (a link down takes
    /// them away).
    fn host_routes(ns: &Netns) {
        ip(ns, &["route", "replace", "default", "via", "192.0.2.1"]);
        ip(
            ns,
            &["-6", "route", "replace", "default", "via", "2001:db8:1::1"],
        );
    }

    /// Both VIPs' nexthops at the router are those of `hosts`, within `limit`.
    pub fn routed_to(&self, hosts: &[usize], limit: Duration) -> Duration {
        [VIP4, VIP6]
            .map(|vip| self.wait_nexthops(vip, &self.addrs(vip, hosts.iter().copied()), limit))
            .into_iter()
            .max()
            .unwrap()
    }

    pub fn host(&self, i: usize) -> &LabHost {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    pub fn router(&self) -> &Netns {
        &self.router
    }

    pub fn router_bird(&self) -> &Bird {
        &self.router_bird
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Waits until the router has `n` BGP sessions established, each with
    /// its BFD session up (until BFD is up, a dead link is noticed only by
    /// BGP's hold timer).
    pub fn wait_sessions(&self, n: usize) {
        let deadline = Instant::now() + wait_limit();
        loop {
            let bgp = self.router_bird.birdc(&["show", "protocols"]);
            let bfd = self.router_bird.birdc(&["show", "bfd", "sessions"]);
            let bfd_up = bfd
                .lines()
                .filter(|l| l.split_whitespace().nth(2) == Some("Up"))
                .count();
            if bgp.matches("Established").count() == n && bfd_up == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} BGP sessions with BFD up not there within {:?}:\n{bgp}\n{bfd}\n{}",
                wait_limit(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every BIRD's log, for a failure's message.
    pub fn logs(&self) -> String {
        let mut s = format!("router's BIRD:\n{}", self.router_bird.log_text());
        for (i, h) in self.hosts.iter().enumerate() {
            s += &format!("host {i}'s BIRD:\n{}", h.bird.log_text());
        }
        s
    }

    /// What mtlb's agent does to announce: a route for each VIP in the
    /// announce table of host `i` (proto static: BIRD's `learn` skips
    /// routes of proto kernel and its own).
    pub fn announce_by_hand(&self, i: usize) {
        for vip in [VIP4, VIP6] {
            ip(
                &self.hosts[i].ns,
                &[
                    "route",
                    "replace",
                    &vip.to_string(),
                    "dev",
                    "lo",
                    "proto",
                    "static",
                    "table",
                    &ANNOUNCE_TABLE.to_string(),
                ],
            );
        }
    }

    /// ... and to withdraw: the routes deleted.
    pub fn withdraw_by_hand(&self, i: usize) {
        for vip in [VIP4, VIP6] {
            ip(
                &self.hosts[i].ns,
                &[
                    "route",
                    "del",
                    &vip.to_string(),
                    "table",
                    &ANNOUNCE_TABLE.to_string(),
                ],
            );
        }
    }

    /// The LAN addresses of hosts `which`, of `vip`'s family, sorted.
    pub fn addrs(&self, vip: IpAddr, which: impl IntoIterator<Item = usize>) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = which
            .into_iter()
            .map(|i| self.hosts[i].addr_for(vip))
            .collect();
        v.sort();
        v
    }

    /// The nexthops of the router's route to `vip` in its main table (as
    /// BIRD writes it), sorted; empty without a route.
    pub fn nexthops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let fam = if vip.is_ipv4() { "-4" } else { "-6" };
        let out = ip(
            &self.router,
            &[
                "-j",
                fam,
                "route",
                "show",
                "table",
                "main",
                "exact",
                &vip.to_string(),
            ],
        );
        let routes: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -j route show: {e}: {out}"));
        let mut v = Vec::new();
        for r in routes.as_array().unwrap() {
            let gws = match r.get("nexthops") {
                Some(n) => n.as_array().unwrap().iter().collect(),
                None => vec![r],
            };
            for g in gws {
                if let Some(a) = g.get("gateway").and_then(|a| a.as_str()) {
                    v.push(a.parse().unwrap());
                }
            }
        }
        v.sort();
        v
    }

    /// Polls the router's route to `vip` until its nexthops are `expected`
    /// (in any order), within `timeout`; returns how long that took.
    pub fn wait_nexthops(&self, vip: IpAddr, expected: &[IpAddr], timeout: Duration) -> Duration {
        let mut want = expected.to_vec();
        want.sort();
        let t0 = Instant::now();
        loop {
            let now = self.nexthops(vip);
            if now == want {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < timeout,
                "{vip}: nexthops {now:?}, not {want:?} within {timeout:?}\n{}",
                self.router_bird.birdc(&["show", "protocols"])
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Takes host `i`'s link down on the host's side: the router's port
    /// loses its carrier, its bridge stays up.
    pub fn link_down(&self, i: usize) {
        ip(&self.hosts[i].ns, &["link", "set", "eth0", "down"]);
    }

    pub fn link_up(&self, i: usize) {
        let ns = &self.hosts[i].ns;
        ip(ns, &["link", "set", "eth0", "up"]);
        Self::host_routes(ns);
    }

    /// Kills host `i`'s BIRD (SIGKILL).
    pub fn kill_bird(&self, i: usize) {
        self.hosts[i].bird.kill();
    }

    pub fn restart_bird(&self, i: usize) {
        let h = &self.hosts[i];
        h.bird.restart(&h.ns);
    }

    /// Listeners on both VIPs' port 443 in host `i`, named `h<i>`.
    pub fn listen(&self, i: usize) -> Vec<Replica> {
        let name = format!("h{i}");
        self.hosts[i].inside(|| {
            [VIP4, VIP6]
                .iter()
                .map(|v| Replica::start(&name, &SocketAddr::new(*v, 443).to_string()))
                .collect()
        })
    }

    /// The host a greeting names: `h<i>`, possibly followed by a
    /// non-digit and more (`h1-mtp2`).
    pub fn host_of(greeting: &str) -> Option<usize> {
        let rest = greeting.strip_prefix('h')?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }

    /// `n` connections from the client to `vip`:443, each greeted: the
    /// stream and the host that took it. Each from a source port of its
    /// own, never used before in this lab: a host may still hold a socket
    /// of an earlier connection whose flow moved to another host (its
    /// client's FIN went there), and a new flow with the same ports would
    /// meet it.
    pub fn hold(&self, vip: IpAddr, n: usize) -> Vec<(TcpStream, usize)> {
        let to = SocketAddr::new(vip, 443);
        let first = self
            .next_port
            .fetch_add(n as u32, std::sync::atomic::Ordering::Relaxed);
        assert!(first + n as u32 <= 65535, "the lab's source ports ran out");
        inside(&self.client, || {
            (first..first + n as u32)
                .map(|port| {
                    let from = SocketAddr::new(
                        if vip.is_ipv4() {
                            CLIENT4.into()
                        } else {
                            CLIENT6.into()
                        },
                        port as u16,
                    );
                    let sock = socket2::Socket::new(
                        socket2::Domain::for_address(to),
                        socket2::Type::STREAM,
                        None,
                    )
                    .unwrap();
                    sock.bind(&from.into())
                        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
                    sock.connect_timeout(&to.into(), scaled(Duration::from_secs(5)))
                        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
                    let s: TcpStream = sock.into();
                    let name = greeting(&s).unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
                    let host = Self::host_of(&name)
                        .unwrap_or_else(|| panic!("greeting {name:?} names no host"));
                    (s, host)
                })
                .collect()
        })
    }

    /// How many held connections a change of the announcing hosts cuts:
    /// holds `conns` connections from the client to `vip`:443 while hosts
    /// `from` announce it (and listen), makes the change (`change`, e.g.
    /// [`withdraw_by_hand`](Self::withdraw_by_hand) of a host, mtlb
    /// draining one, or a host announcing again), waits until the router's
    /// nexthops are those of hosts `to`, then sends a byte on each held
    /// connection and sees which are echoed and which are reset. `ecmp`
    /// says how the router spreads flows.
    pub fn cut_flows(
        &self,
        vip: IpAddr,
        ecmp: Ecmp,
        conns: usize,
        (from, to): (&[usize], &[usize]),
        change: impl FnOnce(),
    ) -> CutFlows {
        let before = self.addrs(vip, from.iter().copied());
        assert_eq!(
            self.nexthops(vip),
            before,
            "{vip}: not announced by {from:?}"
        );
        let group = match ecmp {
            Ecmp::Bird => None,
            Ecmp::Resilient { buckets } => Some(Resilient::new(
                &self.router,
                vip,
                &self.addrs(vip, 0..self.hosts()),
                &before,
                buckets,
            )),
        };
        let held = self.hold(vip, conns);
        let mut per_host = vec![0; self.hosts()];
        for (_, h) in &held {
            per_host[*h] += 1;
        }
        change();
        let after = self.addrs(vip, to.iter().copied());
        self.wait_nexthops(vip, &after, wait_limit());
        if let Some(g) = &group {
            g.set(&after);
        }
        // Every byte is sent before any answer is read: each connection's
        // answer (echo or reset) is on its way by the time it is read.
        let mut sent = Vec::with_capacity(held.len());
        for (s, _) in &held {
            sent.push((&*s).write_all(b"x").err());
        }
        let mut cut = CutFlows {
            ecmp,
            vip,
            from: from.to_vec(),
            to: to.to_vec(),
            per_host,
            kept_held: 0,
            kept_cut: 0,
            gone_held: 0,
            gone_cut: 0,
            silent: 0,
            new_per_host: vec![0; self.hosts()],
        };
        for ((s, host), sent) in held.iter().zip(sent) {
            let answer = sent.map_or_else(
                || {
                    s.set_read_timeout(Some(scaled(Duration::from_secs(2))))
                        .unwrap();
                    let mut b = [0u8; 1];
                    match (&*s).read(&mut b) {
                        Ok(1) if b[0] == b'x' => Ok(()),
                        Ok(n) => Err(std::io::Error::other(format!("read {n} bytes: {b:?}"))),
                        Err(e) => Err(e),
                    }
                },
                Err,
            );
            let (held_n, cut_n) = if to.contains(host) {
                (&mut cut.kept_held, &mut cut.kept_cut)
            } else {
                (&mut cut.gone_held, &mut cut.gone_cut)
            };
            *held_n += 1;
            match answer {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => *cut_n += 1,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    cut.silent += 1
                }
                Err(e) => panic!("probing a held connection: {e}"),
            }
        }
        drop(held);
        for (_, h) in self.hold(vip, conns / 4) {
            cut.new_per_host[h] += 1;
        }
        drop(group);
        cut
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // BIRDs first (fields drop in order too; this says it).
        self.router_bird.kill();
        for h in &self.hosts {
            h.bird.kill();
        }
    }
}

/// Renders the BIRD role's template for a lab host with router id `id`.
fn render_host_conf(id: Ipv4Addr, dest: &std::path::Path) {
    let vars = serde_json::json!({
        "mtlb_vips": [VIP4.to_string(), VIP6.to_string()],
        "mtlb_announce_table": ANNOUNCE_TABLE,
        "bird_router_id": id.to_string(),
        "bird_local_as": HOSTS_AS,
        "bird_neighbors": [
            {"address": ROUTER4.to_string(), "as": ROUTER_AS},
            {"address": ROUTER6.to_string(), "as": ROUTER_AS},
        ],
        "bird_log": "stderr all",
        "bird_bfd_interval_ms": bfd_interval_ms(),
    })
    .to_string();
    ansible_template(
        "roles/bird/templates/bird.conf.j2",
        dest,
        &["@roles/bird/defaults/main.yml", &vars],
    );
}

/// How the router spreads flows over the hosts' nexthops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecmp {
    /// The multipath route BIRD's kernel protocol writes (`merge paths`):
    /// Linux's hash-threshold ECMP.
    Bird,
    /// A resilient nexthop group (Linux 5.13+) of `buckets` buckets,
    /// programmed by hand after BIRD's route (BIRD does not write nexthop
    /// groups), in a table a rule sends the VIP to.
    Resilient { buckets: u16 },
}

/// What a change of the announcing hosts did to held connections.
#[derive(Debug)]
pub struct CutFlows {
    pub ecmp: Ecmp,
    pub vip: IpAddr,
    /// The hosts announcing before and after.
    pub from: Vec<usize>,
    pub to: Vec<usize>,
    /// Held connections per host, before.
    pub per_host: Vec<usize>,
    /// Held on hosts still announcing after, and how many of those were
    /// reset.
    pub kept_held: usize,
    pub kept_cut: usize,
    /// Held on hosts withdrawn, and how many of those were reset.
    pub gone_held: usize,
    pub gone_cut: usize,
    /// Neither echoed nor reset.
    pub silent: usize,
    /// Where new connections (a quarter as many) went after the change.
    pub new_per_host: Vec<usize>,
}

impl fmt::Display for CutFlows {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.ecmp {
            Ecmp::Bird => "ECMP as BIRD writes it (hash-threshold)".to_string(),
            Ecmp::Resilient { buckets } => format!("resilient group of {buckets} buckets"),
        };
        write!(
            f,
            "{mode}, {}, hosts {:?} -> {:?}, held {:?}: cut on hosts still announcing {}/{} \
             ({:.1}%), on hosts withdrawn {}/{}, unanswered {}; new ones after {:?}",
            self.vip,
            self.from,
            self.to,
            self.per_host,
            self.kept_cut,
            self.kept_held,
            100.0 * self.kept_cut as f64 / self.kept_held.max(1) as f64,
            self.gone_cut,
            self.gone_held,
            self.silent,
            self.new_per_host
        )
    }
}

/// A resilient nexthop group in the router carrying `vip`, ahead of the
/// main table (rule preference 100); removed when dropped.
struct Resilient<'a> {
    router: &'a Netns,
    vip: IpAddr,
    /// Nexthop ids: members `base + i` for host address `addrs[i]`, the
    /// group `base + 99`.
    base: u32,
    addrs: Vec<IpAddr>,
}

const RESILIENT_TABLE: &str = "4243";

impl<'a> Resilient<'a> {
    /// Nexthops for hosts `addrs`, the group of those at `members`.
    fn new(
        router: &'a Netns,
        vip: IpAddr,
        addrs: &[IpAddr],
        members: &[IpAddr],
        buckets: u16,
    ) -> Self {
        let base = if vip.is_ipv4() { 1000 } else { 2000 };
        let g = Self {
            router,
            vip,
            base,
            addrs: addrs.to_vec(),
        };
        for (i, a) in addrs.iter().enumerate() {
            ip(
                router,
                &[
                    "nexthop",
                    "add",
                    "id",
                    &(base + i as u32).to_string(),
                    "via",
                    &a.to_string(),
                    "dev",
                    "br0",
                ],
            );
        }
        ip(
            router,
            &[
                "nexthop",
                "add",
                "id",
                &(base + 99).to_string(),
                "group",
                &g.members(members),
                "type",
                "resilient",
                "buckets",
                &buckets.to_string(),
            ],
        );
        ip(
            router,
            &[
                "route",
                "add",
                &vip.to_string(),
                "nhid",
                &(base + 99).to_string(),
                "table",
                RESILIENT_TABLE,
            ],
        );
        ip(
            router,
            &[
                g.fam(),
                "rule",
                "add",
                "to",
                &vip.to_string(),
                "lookup",
                RESILIENT_TABLE,
                "pref",
                "100",
            ],
        );
        g
    }

    fn fam(&self) -> &'static str {
        if self.vip.is_ipv4() { "-4" } else { "-6" }
    }

    fn members(&self, addrs: &[IpAddr]) -> String {
        addrs
            .iter()
            .map(|a| {
                let i = self.addrs.iter().position(|x| x == a).expect("a member");
                (self.base + i as u32).to_string()
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The group's members become the hosts at `addrs`, as a router with
    /// resilient hashing does when a nexthop goes.
    fn set(&self, addrs: &[IpAddr]) {
        ip(
            self.router,
            &[
                "nexthop",
                "replace",
                "id",
                &(self.base + 99).to_string(),
                "group",
                &self.members(addrs),
                "type",
                "resilient",
            ],
        );
    }
}

impl Drop for Resilient<'_> {
    fn drop(&mut self) {
        let ns = &self.router.name;
        let _ = Command::new("ip")
            .args(["-n", ns, self.fam(), "rule", "del", "pref", "100"])
            .output();
        // The group (and the route through it) before its members.
        for id in [self.base + 99]
            .into_iter()
            .chain((0..self.addrs.len() as u32).map(|i| self.base + i))
        {
            let _ = Command::new("ip")
                .args(["-n", ns, "nexthop", "del", "id", &id.to_string()])
                .output();
        }
    }
}

/// A host of the lab running mtlb: two fake replicas on [::] (dual-stack,
/// named `h<i>-mtp<k>` so a client knows the host) and an agent announcing
/// both VIPs with short rise and fall.
pub struct MtlbHost {
    pub i: usize,
    pub file: String,
    pub agent: Agent,
    pub replicas: Vec<ReplicaProcess>,
}

/// rise_ms and fall_ms of the lab's agents.
pub const RISE_MS: u64 = 500;
pub const FALL_MS: u64 = 500;

pub fn lab_replicas(lab: &Lab, i: usize) -> Vec<ReplicaProcess> {
    (0..2)
        .map(|k| {
            ReplicaProcess::start(
                &lab.host(i).ns,
                &format!("h{i}-mtp{}", k + 1),
                &format!("[::]:{}", 10000 + k),
            )
        })
        .collect()
}

pub fn start_mtlb(lab: &Lab, i: usize) -> MtlbHost {
    let ns = &lab.host(i).ns;
    let file = Config::new()
        .fast_checks()
        .replicas(2)
        .set("replica_address", "::1")
        .vips(&[&VIP4.to_string(), &VIP6.to_string()])
        .announce("rise_ms", RISE_MS as i64)
        .announce("fall_ms", FALL_MS as i64)
        .write(ns);
    let replicas = lab_replicas(lab, i);
    let agent = ns.agent(&["--config", &file]);
    MtlbHost {
        i,
        file,
        agent,
        replicas,
    }
}

impl MtlbHost {
    /// `mtlb host VERB` on this host, which must succeed; its output.
    pub fn cli(&self, lab: &Lab, verb: &str) -> String {
        let (ok, out) = mtlb_cli(
            &lab.host(self.i).ns,
            &["host", verb, "--config", &self.file],
        );
        assert!(ok, "mtlb host {verb} on host {}: {out}", self.i);
        out
    }
}
