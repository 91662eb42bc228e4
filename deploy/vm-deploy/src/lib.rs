//! `cargo xtask vm-deploy`, the acceptance run of deploy/: the deployment of deploy/ run for real, the way
//! `vagrant up` provisions it (deploy/Vagrantfile), in a Debian 12 guest
//! under QEMU, then checked from this machine:
//!
//! 1. the guest image (disk.rs), the official MTProxy server and its
//!    replica image (from the `Host`, xtask);
//! 2. the guest booted (guest.rs), and a stand-in for Telegram's middle
//!    proxies started in it;
//! 3. `ansible-playbook playbooks/deploy.yml` with the inventory's
//!    group_vars, as the Vagrantfile's provisioner runs it, plus the
//!    variables an offline host needs;
//! 4. the checks of the issue, each a step of the printed report: a
//!    Telethon client through the guest's port 443, the stats page, the
//!    unit, the journal, sock_ops on the replicas' cgroup, failover, the
//!    daily refresh under load, scaling 2→3→2, `mtlb link`, then the
//!    package's life (package.rs): upgrade, `apt remove` and reinstall,
//!    `apt purge`.
//!
//! The guest and the run's files are removed at the end, failed or not.

mod clients;
mod disk;
mod guest;
mod package;
mod stats;

use anyhow::{Context as _, bail};
use clients::{Load, Probe};
use guest::Guest;
use stats::{Stats, served_by, total, up};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

/// The playbook and the variables file, relative to deploy/: the
/// Vagrantfile's provisioner names the same two (tests/tests/deploy.rs
/// checks that it does).
pub const PLAYBOOK: &str = "playbooks/deploy.yml";
/// The daily refresh's play, relative to deploy/.
const REFRESH_PLAYBOOK: &str = "playbooks/refresh.yml";
pub const GROUP_VARS: &str = "inventory/group_vars/all.yml";

/// Where the middle-proxy stand-in listens in the guest.
const STANDIN_PORT: u16 = 8888;
/// Where the run's files go in the guest.
const GUEST_DIR: &str = "/var/lib/mtlb-vm-deploy";

/// One line of the report.
struct Step {
    name: String,
    ok: bool,
    secs: f64,
    detail: String,
}

#[derive(Default)]
struct Report {
    steps: Vec<Step>,
}

impl Report {
    /// Runs `f` as the step `name`, prints its line at once and keeps it for
    /// the summary. Returns `f`'s value (an error ends the run: later steps
    /// build on this one).
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> anyhow::Result<(T, String)>,
    ) -> anyhow::Result<T> {
        eprintln!("vm-deploy: {name} ...");
        let t0 = Instant::now();
        let r = f();
        let secs = t0.elapsed().as_secs_f64();
        let (ok, detail, value) = match r {
            Ok((v, d)) => (true, d, Some(v)),
            Err(e) => (false, format!("{e:#}"), None),
        };
        eprintln!(
            "vm-deploy: {} {name} ({secs:.1} s): {detail}",
            if ok { "PASS" } else { "FAIL" }
        );
        self.steps.push(Step {
            name: name.to_string(),
            ok,
            secs,
            detail: detail.clone(),
        });
        value.with_context(|| format!("step `{name}` failed"))
    }

    fn print(&self, total: Duration) {
        println!();
        println!("cargo xtask vm-deploy: report");
        for (i, s) in self.steps.iter().enumerate() {
            println!(
                "{:>2}. [{}] {} ({:.1} s)",
                i + 1,
                if s.ok { "PASS" } else { "FAIL" },
                s.name,
                s.secs
            );
            for line in s.detail.lines() {
                println!("       {line}");
            }
        }
        let passed = self.steps.iter().filter(|s| s.ok).count();
        println!(
            "{passed}/{} steps passed; total {:.0} s",
            self.steps.len(),
            total.as_secs_f64()
        );
    }
}

/// The run's files on this machine, removed when it ends.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What vm-deploy needs from the program that runs it (xtask): packages
/// installed on this machine, and the official server with its replica
/// image.
pub trait Host {
    /// Installs a Debian package on this machine; `why` says what for.
    fn apt_install(&self, pkg: &str, why: &str) -> anyhow::Result<()>;
    /// The official MTProxy server built from source, and the root file
    /// system tarball of the replica image holding it (for `docker
    /// import`).
    fn replica_image(&self) -> anyhow::Result<(PathBuf, PathBuf)>;
    /// mtlb's Debian package built from this tree (`cargo xtask deb`), as
    /// the workspace's version or as `version`.
    fn deb(&self, version: Option<&str>) -> anyhow::Result<PathBuf>;
}

pub fn run(root: &Path, python: &Path, host: &dyn Host) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut report = Report::default();
    let result = steps(root, python, host, &mut report);
    report.print(t0.elapsed());
    result
}

/// The guest and what the checks use, once it is provisioned.
struct Deployed {
    vm: Guest,
    vars: GroupVars,
    probe: Arc<Probe>,
    stats: Stats,
    ansible: Ansible,
    /// The same code packaged as a later version, for the upgrade.
    upgrade: package::Deb,
}

/// A check of the deployed guest: its report line's name and the check.
/// A failed check does not stop the others.
type Check = (&'static str, fn(&Deployed) -> anyhow::Result<String>);

const CHECKS: &[Check] = &[
    (
        "Telethon client through the guest's port 443, served by an official replica",
        check_client,
    ),
    ("systemctl is-active mtlb", check_unit),
    ("journalctl -u mtlb: health lines", check_journal),
    (
        "sock_ops on the replicas' cgroup (mtproxy.slice), not the root",
        check_cgroup,
    ),
    (
        "failover: docker stop mtproxy2 under client load",
        check_failover,
    ),
    ("docker start mtproxy2: mtp2 UP again", check_restart),
    (
        "daily refresh: playbooks/refresh.yml, a changed proxy-multi.conf, under client load",
        check_refresh,
    ),
    (
        "scale 2→3: playbook with mtproxy_replicas=3 under client load",
        check_scale_up,
    ),
    (
        "scale 3→2: playbook with mtproxy_replicas=2 under client load",
        check_scale_down,
    ),
    ("mtlb link, used by a client", check_link),
    (
        "upgrade: the role installs a later package under client load",
        package::check_upgrade,
    ),
    (
        "apt remove mtlb under client load, then the role reinstalls it",
        package::check_remove,
    ),
    // Last: nothing of mtlb is left after it.
    ("apt purge mtlb under client load", package::check_purge),
];

fn steps(root: &Path, python: &Path, host: &dyn Host, report: &mut Report) -> anyhow::Result<()> {
    let deploy = root.join("deploy");
    let vars = GroupVars::read(&deploy.join(GROUP_VARS))?;
    let image = report.step("guest image: Debian 12 from Debian's packages", || {
        guest_image(root, host)
    })?;
    let archive = report.step("replica image: official MTProxy server", || {
        replica_image(host)
    })?;

    let run_dir = RunDir(root.join("target/vm-deploy/run"));
    let _ = std::fs::remove_dir_all(&run_dir.0);
    std::fs::create_dir_all(&run_dir.0)?;
    let files = write_run_files(&run_dir.0, &archive)?;
    let (first, upgrade) = report.step(
        "packages: cargo xtask deb, and the same code as a later version",
        || package::build(host, &run_dir.0),
    )?;

    let vm = report.step(
        &format!(
            "boot: QEMU, software emulation, {} vCPUs, {} MB, until ssh answers",
            guest::CPUS,
            guest::MEMORY_MB
        ),
        || boot(&image, &run_dir.0, host),
    )?;
    // The guard goes with `vm` (declared after run_dir: dropped first).

    report.step("middle-proxy stand-in in the guest", || {
        start_standin(&vm, root, &files)?;
        Ok((
            (),
            format!(
                "tests/fixtures/mtproxy/middle_proxy.py on 127.0.0.1:{STANDIN_PORT} in the guest, keyed with the run's proxy-secret"
            ),
        ))
    })?;

    let ansible = Ansible {
        bin: python.with_file_name("ansible-playbook"),
        deploy: deploy.clone(),
        inventory: write_inventory(&run_dir.0, &vm)?,
        offline: files.offline_vars.clone(),
        logs: run_dir.0.clone(),
        deb: first.path.clone(),
    };
    report.step(
        &format!(
            "ansible-playbook playbooks/deploy.yml (mtproxy_replicas=2, mtlb_deb_src={})",
            first.file_name()
        ),
        || Ok(((), ansible.run(2, "first")?)),
    )?;

    let d = Deployed {
        probe: Arc::new(Probe {
            python: python.to_path_buf(),
            fixtures: clients::fixtures(root),
            port: vm.https_port,
            secret: vars.secret.clone(),
        }),
        stats: Stats {
            port: vars.stats_port,
        },
        vm,
        vars,
        ansible,
        upgrade,
    };
    report.step(
        "stats page (over ssh, it is on loopback): mtp1 and mtp2 UP",
        || Ok(((), stats_page(&d)?)),
    )?;

    let failed: Vec<&str> = CHECKS
        .iter()
        .filter(|(name, check)| report.step(name, || check(&d).map(|v| ((), v))).is_err())
        .map(|(name, _)| *name)
        .collect();
    drop(d);
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

fn guest_image(root: &Path, host: &dyn Host) -> anyhow::Result<(disk::Image, String)> {
    let cached = root.join("target/vm-deploy/image/recipe").exists();
    let t0 = Instant::now();
    let image = disk::ensure(root, host)?;
    let size = std::fs::metadata(&image.disk)?.len();
    let used = used_bytes(&image.disk);
    let d = format!(
        "{} ({:.1} GB disk, {:.0} MB used), kernel {}{}",
        image.disk.display(),
        size as f64 / 1e9,
        used as f64 / 1e6,
        image.kernel.display(),
        if cached && t0.elapsed() < Duration::from_secs(5) {
            ", cached".to_string()
        } else {
            format!(", built in {:.0} s", t0.elapsed().as_secs_f64())
        }
    );
    Ok((image, d))
}

fn replica_image(host: &dyn Host) -> anyhow::Result<(PathBuf, String)> {
    let (bin, archive) = host.replica_image()?;
    let d = format!(
        "{} built from the official source; rootfs tarball {} ({:.0} MB) for `docker import`",
        bin.display(),
        archive.display(),
        std::fs::metadata(&archive)?.len() as f64 / 1e6
    );
    Ok((archive, d))
}

fn boot(image: &disk::Image, run_dir: &Path, host: &dyn Host) -> anyhow::Result<(Guest, String)> {
    let mut vm = Guest::boot(image, run_dir, host)?;
    vm.wait_ssh(Duration::from_secs(600))?;
    let kernel = vm.sh("uname -r")?;
    let d = format!(
        "ssh on 127.0.0.1:{}, guest port 443 on 127.0.0.1:{}; kernel {}; systemd {}",
        vm.ssh_port,
        vm.https_port,
        kernel.trim(),
        vm.sh("systemctl --version | head -1")?.trim()
    );
    Ok((vm, d))
}

fn stats_page(d: &Deployed) -> anyhow::Result<String> {
    let rows = d.stats.wait(&d.vm, Duration::from_secs(180), |r| {
        up(r, "mtp1") && up(r, "mtp2")
    })?;
    let page = d.vm.sh(&format!(
        "curl -fsS http://127.0.0.1:{}/stats",
        d.stats.port
    ))?;
    if !(page.contains("mtp1") && page.contains("mtp2")) {
        bail!("the HTML page does not name mtp1 and mtp2");
    }
    Ok(Stats::show(&rows))
}

fn check_client(d: &Deployed) -> anyhow::Result<String> {
    let before = d.stats.rows(&d.vm)?;
    let line = d.probe.telethon(&d.vars.secret)?;
    let after = d.stats.rows(&d.vm)?;
    let served = served_by(&before, &after).context("no replica's connection count grew")?;
    let image = d.vm.sh(&format!(
        "sudo docker inspect -f '{{{{.Config.Image}}}}' mtproxy{}",
        &served[3..]
    ))?;
    let comm =
        d.vm.sh("ps -eo comm= | grep -c '^mtproto-proxy$' || true")?;
    Ok(format!(
        "{line}\nserved by {served} (container image {}; {} mtproto-proxy processes in the guest)",
        image.trim(),
        comm.trim()
    ))
}

fn check_unit(d: &Deployed) -> anyhow::Result<String> {
    let out = d.vm.ssh("systemctl is-active mtlb")?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if s != "active" {
        bail!("{s}");
    }
    Ok(s)
}

fn check_journal(d: &Deployed) -> anyhow::Result<String> {
    let lines = health_lines(&d.vm)?;
    for b in ["mtp1", "mtp2"] {
        if !lines.contains(&format!("backend {b} is UP")) {
            bail!("no `backend {b} is UP` line:\n{lines}");
        }
    }
    Ok(lines)
}

fn check_failover(d: &Deployed) -> anyhow::Result<String> {
    let vm = &d.vm;
    // Failover happens in an instant: a denser load around it.
    let load = Load::start(d.probe.clone(), 2, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(8));
    let before = clock_offset(vm)?;
    let t_stop = Instant::now();
    vm.sh("sudo docker stop mtproxy2")?;
    let stop_secs = t_stop.elapsed().as_secs_f64();
    // The reading with the shorter round trip.
    let later = clock_offset(vm)?;
    let offset = if later.1 < before.1 { later } else { before };
    std::thread::sleep(Duration::from_secs(10));
    let outcomes = load.finish();
    let rows = d.stats.wait(vm, Duration::from_secs(60), |r| {
        up(r, "mtp1") && !up(r, "mtp2")
    })?;
    // The instant mtproxy2's process died: its listener closed with
    // it, and the agent logged it at once (`no listener registered`).
    let down = vm.sh(
        "sudo journalctl -u mtlb --no-pager -o short-unix | grep 'backend mtp2 is DOWN' | tail -1",
    )?;
    let died: f64 = down
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .context("no `backend mtp2 is DOWN` line in the journal")?;
    let died = died - offset.0;
    // Clients whose exchange spans that instant were served by
    // mtproxy2 or by mtproxy1: a failed one among them was cut by
    // the process's death (its connection was mtproxy2's; no
    // balancer moves an established connection). Any other failure
    // is a failed failover.
    let tol = offset.1 + 0.5;
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let spans = |o: &clients::Outcome| secs(o.start) <= died + tol && secs(o.end) >= died - tol;
    let (n, failed, why) = clients::summary(&outcomes);
    let cut = outcomes.iter().filter(|o| !o.ok && spans(o)).count();
    let after = outcomes
        .iter()
        .filter(|o| secs(o.start) > died + tol)
        .count();
    let text = format!(
        "{n} clients (complete MTProxy exchanges from this machine): {} failed; \
         {cut} cut by the stop (in flight within ±{tol:.1} s of the instant \
         mtproxy2's listener closed: the server's own shutdown window, README \
         \"Failover\"); {after} started after that instant; \
         `docker stop` over ssh took {stop_secs:.1} s{}\n{}\n{}",
        failed - cut,
        if failed > 0 {
            format!("\nnot served: {why}")
        } else {
            String::new()
        },
        Stats::show(&rows),
        down.split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if failed > cut || cut > 2 {
        bail!(text);
    }
    Ok(text)
}

/// The role's slice is mtlb's replica_cgroup: the agent's own report (`mtlb
/// status`, from the pinned link) and bpftool both put sock_ops on it, and
/// nothing of mtlb but the bind hooks on the cgroup2 root.
fn check_cgroup(d: &Deployed) -> anyhow::Result<String> {
    let slice = &d.vars.cgroup_slice;
    let status = d.vm.sh("sudo /usr/sbin/mtlb status")?;
    let owners = status
        .lines()
        .find(|l| l.starts_with("replica ports:"))
        .with_context(|| format!("no `replica ports:` line in mtlb status:\n{status}"))?;
    if !owners.contains(&format!("in cgroup /{slice} (id "))
        || !owners.contains(&format!("; sock_ops on cgroup /{slice} (id "))
    {
        bail!("mtlb status: {owners}");
    }
    let on_slice =
        d.vm.sh(&format!("sudo bpftool cgroup show /sys/fs/cgroup/{slice}"))?;
    let on_root = d.vm.sh("sudo bpftool cgroup show /sys/fs/cgroup")?;
    if !on_slice
        .lines()
        .any(|l| l.contains("sock_ops") && l.contains("mtlb_sockops"))
    {
        bail!("bpftool: no mtlb_sockops on /sys/fs/cgroup/{slice}:\n{on_slice}");
    }
    if on_root.lines().any(|l| l.contains("sock_ops")) {
        bail!("bpftool: sock_ops on the cgroup2 root:\n{on_root}");
    }
    let containers = d.vm.sh(
        "for c in $(sudo docker ps --format '{{.Names}}' | sort); do \
         echo \"$c $(sudo cat /proc/$(sudo docker inspect -f '{{.State.Pid}}' $c)/cgroup)\"; done",
    )?;
    if containers
        .lines()
        .any(|l| !l.contains(&format!(" 0::/{slice}/docker-")))
    {
        bail!("a replica outside /{slice}:\n{containers}");
    }
    Ok(format!(
        "{owners}\nbpftool cgroup show /sys/fs/cgroup/{slice}:\n{}\nbpftool cgroup show /sys/fs/cgroup (the root):\n{}\n{}",
        on_slice.trim_end(),
        on_root.trim_end(),
        containers.trim_end()
    ))
}

/// Where the refresh's HTTP server listens in the guest.
const REFRESH_HTTP_PORT: u16 = 8889;

/// The daily refresh (what the host's timer runs) as the play runs it, with
/// the two files served from an HTTP server in the guest instead of
/// core.telegram.org: proxy-secret as deployed, proxy-multi.conf with one
/// change. mtproxy-refresh replaces the config and `mtlb rollout` restarts
/// the replicas one at a time, drained first: no new client may fail, and
/// each replica restarts once.
fn check_refresh(d: &Deployed) -> anyhow::Result<String> {
    let vm = &d.vm;
    let www = format!("{GUEST_DIR}/www");
    vm.sh(&format!(
        "mkdir -p {www} && sudo cat /etc/mtproxy/proxy-secret > {www}/proxy-secret && \
         sudo cat /etc/mtproxy/proxy-multi.conf > {www}/proxy-multi.conf && \
         echo '# refreshed by cargo xtask vm-deploy' >> {www}/proxy-multi.conf && \
         (sudo systemctl stop mtlb-refresh-http 2>/dev/null; true) && \
         sudo systemd-run --unit=mtlb-refresh-http /usr/bin/python3 -m http.server \
         {REFRESH_HTTP_PORT} --bind 127.0.0.1 --directory {www}"
    ))?;
    let url = |f: &str| format!("http://127.0.0.1:{REFRESH_HTTP_PORT}/{f}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm
        .ssh(&format!("curl -fsS -o /dev/null {}", url("proxy-secret")))?
        .status
        .success()
    {
        if Instant::now() > deadline {
            bail!("the refresh's HTTP server did not answer within 60 s");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let started = |c: &str| {
        vm.sh(&format!(
            "sudo docker inspect -f '{{{{.State.StartedAt}}}}' {c}"
        ))
        .map(|s| s.trim().to_string())
    };
    let names = ["mtproxy1", "mtproxy2"];
    let before = names
        .iter()
        .map(|c| started(c))
        .collect::<Result<Vec<_>, _>>()?;
    let since = vm.sh("date +%s")?.trim().to_string();
    let extra = serde_json::json!({
        "mtproxy_replicas": 2,
        "mtlb_deb_src": d.ansible.deb,
        // This host fetches its files now (the play refuses pinned ones),
        // from the guest's server; the daily timer stays off.
        "mtproxy_proxy_secret_src": "",
        "mtproxy_proxy_config_src": "",
        "mtproxy_config_url": url("proxy-multi.conf"),
        "mtproxy_secret_url": url("proxy-secret"),
        "mtproxy_refresh_timer": false,
    });
    // Two clients at a time for the whole play (a minute or more): each
    // replica is out of rotation while the other takes every new client.
    let load = Load::start(d.probe.clone(), 2, Duration::from_millis(250));
    std::thread::sleep(Duration::from_secs(5));
    let recap = d.ansible.play(REFRESH_PLAYBOOK, "refresh", &extra);
    std::thread::sleep(Duration::from_secs(5));
    let outcomes = load.finish();
    let recap = recap?;
    let after = names
        .iter()
        .map(|c| started(c))
        .collect::<Result<Vec<_>, _>>()?;
    let restarts = vm.sh(&format!(
        "sudo docker events --since {since} --until $(date +%s) --filter event=restart \
         --format '{{{{.Actor.Attributes.name}}}}' | sort | uniq -c"
    ))?;
    let said = vm.sh(
        "sudo grep -h . /var/lib/prometheus/node-exporter/mtlb_refresh.prom 2>/dev/null | grep -v '^#' || true",
    )?;
    let rows = d.stats.wait(vm, Duration::from_secs(120), |r| {
        up(r, "mtp1") && up(r, "mtp2")
    })?;
    let mut text = format!(
        "{}\n{recap}\nrestarts (docker events): {}\n{}\n{}",
        clients::counts(&outcomes),
        restarts.split_whitespace().collect::<Vec<_>>().join(" "),
        said.trim_end(),
        Stats::show(&rows)
    );
    let (_, failed, why) = clients::summary(&outcomes);
    if failed > 0 {
        text.push_str(&format!("\nnot served: {why}"));
        bail!(text);
    }
    for (i, c) in names.iter().enumerate() {
        if before[i] == after[i] {
            bail!("{c} was not restarted\n{text}");
        }
        let once = restarts
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["1", *c]);
        if !once {
            bail!("{c} was not restarted exactly once\n{text}");
        }
    }
    Ok(text)
}

fn check_restart(d: &Deployed) -> anyhow::Result<String> {
    d.vm.sh("sudo docker start mtproxy2")?;
    let rows = d
        .stats
        .wait(&d.vm, Duration::from_secs(120), |r| up(r, "mtp2"))?;
    Ok(Stats::show(&rows))
}

fn check_scale_up(d: &Deployed) -> anyhow::Result<String> {
    let (outcomes, done) = under_light_load(&d.probe, || {
        let recap = d.ansible.run(3, "scale-up")?;
        let rows = d.stats.wait(&d.vm, Duration::from_secs(180), |r| {
            ["mtp1", "mtp2", "mtp3"].iter().all(|b| up(r, b))
        })?;
        // The new replica takes clients: the load's next ones (one
        // at a time, so least connections is a tie broken at
        // random) reach it.
        let before = total(&rows, "mtp3");
        let rows = d
            .stats
            .wait(&d.vm, Duration::from_secs(120), |r| {
                total(r, "mtp3") > before
            })
            .context("mtp3 is UP but took no client")?;
        anyhow::Ok((recap, rows))
    });
    let (recap, rows) = done?;
    clients_verdict(&outcomes, format!("{recap}\n{}", Stats::show(&rows)))
}

fn check_scale_down(d: &Deployed) -> anyhow::Result<String> {
    let (outcomes, recap) = under_light_load(&d.probe, || d.ansible.run(2, "scale-down"));
    let recap = recap?;
    let rows = d.stats.rows(&d.vm)?;
    if rows.iter().any(|r| r.name == "mtp3") {
        bail!("mtp3 still on the stats page:\n{}", Stats::show(&rows));
    }
    let containers = d.vm.sh("sudo docker ps -a --format '{{.Names}}' | sort")?;
    if containers.lines().any(|l| l == "mtproxy3") {
        bail!("container mtproxy3 still there");
    }
    clients_verdict(
        &outcomes,
        format!(
            "{recap}\n{}\ncontainers: {}",
            Stats::show(&rows),
            containers.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
    )
}

fn check_link(d: &Deployed) -> anyhow::Result<String> {
    // The package's /usr/sbin is not in a user's PATH on Debian.
    let out = d.vm.sh("/usr/sbin/mtlb link")?;
    let link = out
        .lines()
        .find(|l| l.starts_with("tg://proxy?"))
        .context("no tg:// link")?;
    let param = |k: &str| {
        link.split(['?', '&'])
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .with_context(|| format!("no {k} in {link}"))
    };
    let (server, port, secret) = (param("server")?, param("port")?, param("secret")?);
    let addr =
        d.vm.sh("ip -4 -o route get 1.1.1.1 | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p'")?;
    if server != addr.trim() {
        bail!(
            "link's server {server} is not the guest's address {}",
            addr.trim()
        );
    }
    if port != "443" {
        bail!("link's port {port} is not 443");
    }
    // This machine reaches the guest's port 443 only through the
    // forward: the client takes the link's secret and port from it.
    let line = d.probe.telethon(&secret)?;
    Ok(format!(
        "{}Telethon with the link's secret, to the link's port 443 (via the forward): {line}",
        out
    ))
}

/// The guest's wall clock minus ours, in seconds, and how uncertain that
/// is (half the ssh round trip): the guest's clock under emulation drifts.
fn clock_offset(vm: &Guest) -> anyhow::Result<(f64, f64)> {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let t0 = now();
    let guest: f64 = vm.sh("date +%s.%N")?.trim().parse()?;
    let t1 = now();
    Ok((guest - (t0 + t1) / 2.0, (t1 - t0) / 2.0))
}

/// Runs `f` under a light client load (one client at a time, every half
/// second): a playbook run takes minutes. The clients' outcomes and what
/// `f` returned.
fn under_light_load<T>(probe: &Arc<Probe>, f: impl FnOnce() -> T) -> (Vec<clients::Outcome>, T) {
    let load = Load::start(probe.clone(), 1, Duration::from_millis(500));
    let out = f();
    (load.finish(), out)
}

/// Passes when every client completed its exchange.
fn clients_verdict(outcomes: &[clients::Outcome], rest: String) -> anyhow::Result<String> {
    let (_, failed, why) = clients::summary(outcomes);
    let d = format!(
        "{}{}\n{rest}",
        clients::counts(outcomes),
        if failed > 0 {
            format!(": {why}")
        } else {
            String::new()
        }
    );
    if failed > 0 {
        bail!(d);
    }
    Ok(d)
}

/// The agent's health events from the journal (`backend mtpN is UP|DOWN`).
fn health_lines(vm: &Guest) -> anyhow::Result<String> {
    let out = vm.sh(
        "sudo journalctl -u mtlb --no-pager -o cat | grep -E 'backend mtp[0-9]+ is (UP|DOWN)' || true",
    )?;
    Ok(out.trim_end().to_string())
}

/// The variables of deploy/inventory/group_vars/all.yml this run reads.
struct GroupVars {
    secret: String,
    /// The replicas' slice: mtlb's replica_cgroup.
    cgroup_slice: String,
    stats_port: u16,
    /// mtproxyN listens on base_port + N - 1.
    base_port: u16,
}

impl GroupVars {
    fn read(path: &Path) -> anyhow::Result<GroupVars> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .map(|v| v.trim().trim_matches('"').to_string())
                .with_context(|| format!("{k} not in {}", path.display()))
        };
        Ok(GroupVars {
            secret: get("mtproxy_secret")?,
            cgroup_slice: get("mtproxy_cgroup_slice")?,
            stats_port: get("mtlb_stats_port")?.parse()?,
            base_port: get("mtproxy_base_port")?.parse()?,
        })
    }
}

struct RunFiles {
    proxy_secret: PathBuf,
    offline_vars: PathBuf,
}

/// Telegram's proxy secret (random, as Telegram's is to us), a middle-proxy
/// list naming the stand-in for every DC, and the variables of an offline
/// host.
fn write_run_files(dir: &Path, archive: &Path) -> anyhow::Result<RunFiles> {
    let mut secret = [0u8; 128];
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
    let proxy_secret = dir.join("proxy-secret");
    std::fs::write(&proxy_secret, secret)?;
    let config = dir.join("proxy-multi.conf");
    let mut conf = String::from("# cargo xtask vm-deploy: every DC at the stand-in\ndefault 2;\n");
    for dc in 1..=5 {
        conf.push_str(&format!("proxy_for {dc} 127.0.0.1:{STANDIN_PORT};\n"));
        conf.push_str(&format!("proxy_for -{dc} 127.0.0.1:{STANDIN_PORT};\n"));
    }
    std::fs::write(&config, conf)?;
    let offline_vars = dir.join("offline.json");
    std::fs::write(
        &offline_vars,
        serde_json::to_string_pretty(&serde_json::json!({
            // The guest has no mirror; the packages are in its image.
            "common_apt_update_cache": false,
            // No registry either: the image comes from the controller.
            "mtproxy_image": "mtproxy-official:dc0c7f3",
            "mtproxy_image_archive": archive,
            // Nor core.telegram.org: the stand-in's secret and address.
            "mtproxy_proxy_secret_src": proxy_secret,
            "mtproxy_proxy_config_src": config,
        }))?,
    )?;
    Ok(RunFiles {
        proxy_secret,
        offline_vars,
    })
}

/// The stand-in runs in the guest, not on this machine: the RPC keys
/// of the official server's middle-proxy connections are derived from both
/// ends' addresses and ports as each end sees them, and QEMU's user
/// network rewrites both (10.0.2.15:p in the guest is 127.0.0.1:q here).
fn start_standin(vm: &Guest, root: &Path, files: &RunFiles) -> anyhow::Result<()> {
    vm.sh(&format!(
        "sudo install -d -m 755 {GUEST_DIR} && sudo chown vagrant {GUEST_DIR}"
    ))?;
    let fixtures = clients::fixtures(root);
    vm.put(
        &[&fixtures.join("middle_proxy.py"), &files.proxy_secret],
        GUEST_DIR,
    )?;
    vm.sh(&format!(
        "sudo systemd-run --unit=mtlb-middle-proxy --property=Restart=always \
         /usr/bin/python3 {GUEST_DIR}/middle_proxy.py {STANDIN_PORT} {GUEST_DIR}/proxy-secret --lifetime 86400"
    ))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = vm.ssh(&format!(
            "ss -Hltn 'sport = :{STANDIN_PORT}' | grep -q LISTEN"
        ))?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the stand-in did not listen within 60 s:\n{}",
                vm.sh("sudo journalctl -u mtlb-middle-proxy --no-pager | tail -20")?
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The run's inventory: the guest in group `mtproxy` (and none in
/// `prometheus`), as the Vagrantfile's provisioner groups it.
fn write_inventory(dir: &Path, vm: &Guest) -> anyhow::Result<PathBuf> {
    let path = dir.join("hosts.ini");
    std::fs::write(
        &path,
        format!(
            "# Written by cargo xtask vm-deploy for this run.\n[mtproxy]\n\
             mtlb ansible_host=127.0.0.1 ansible_port={} ansible_user=vagrant \
             ansible_ssh_private_key_file={} ansible_python_interpreter=/usr/bin/python3 \
             ansible_ssh_common_args='{}'\n\n[prometheus]\n",
            vm.ssh_port,
            vm.key().display(),
            vm.ssh_options().join(" ")
        ),
    )?;
    Ok(path)
}

struct Ansible {
    bin: PathBuf,
    deploy: PathBuf,
    inventory: PathBuf,
    offline: PathBuf,
    logs: PathBuf,
    /// The package the role installs (`mtlb_deb_src`).
    deb: PathBuf,
}

impl Ansible {
    /// ansible-playbook as the Vagrantfile's provisioner runs it (the
    /// playbook, deploy/ansible.cfg, the group_vars file as extra
    /// variables), with this run's inventory, the offline variables and
    /// the replica count. Its PLAY RECAP line, or its log's tail.
    fn run(&self, replicas: u32, name: &str) -> anyhow::Result<String> {
        self.run_deb(replicas, name, &self.deb)
    }

    /// [`Ansible::run`] with the package `deb`.
    fn run_deb(&self, replicas: u32, name: &str, deb: &Path) -> anyhow::Result<String> {
        let extra = serde_json::json!({"mtproxy_replicas": replicas, "mtlb_deb_src": deb});
        self.play(PLAYBOOK, name, &extra)
    }

    /// `playbook` as [`Ansible::run`] runs deploy.yml, with `extra`
    /// variables last (over the offline ones).
    fn play(
        &self,
        playbook: &str,
        name: &str,
        extra: &serde_json::Value,
    ) -> anyhow::Result<String> {
        let log = self.logs.join(format!("ansible-{name}.log"));
        let out = std::fs::File::create(&log)?;
        let t0 = Instant::now();
        let status = Command::new(&self.bin)
            .current_dir(&self.deploy)
            .env("ANSIBLE_CONFIG", self.deploy.join("ansible.cfg"))
            .env("ANSIBLE_NOCOLOR", "1")
            // The emulated guest can take longer than ansible's default 10 s
            // to answer sudo's prompt when the host is busy; a real host
            // keeps the operator's ansible.cfg value.
            .env("ANSIBLE_TIMEOUT", "120")
            .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
            // ansible-playbook finds ansible's other programs in PATH.
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.bin.parent().expect("venv bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .arg("-i")
            .arg(&self.inventory)
            .arg(playbook)
            .arg("-e")
            .arg(format!("@{GROUP_VARS}"))
            .arg("-e")
            .arg(format!("@{}", self.offline.display()))
            .arg("-e")
            .arg(extra.to_string())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .context("running ansible-playbook")?;
        let text = std::fs::read_to_string(&log)?;
        let recap = text
            .lines()
            .skip_while(|l| !l.starts_with("PLAY RECAP"))
            .skip(1)
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !status.success() {
            let lines: Vec<&str> = text.lines().collect();
            bail!(
                "ansible-playbook failed ({status}); its output's end:\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
        Ok(format!(
            "{:.0} s; recap: {recap}",
            t0.elapsed().as_secs_f64()
        ))
    }
}

/// Blocks a sparse file really holds.
fn used_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
