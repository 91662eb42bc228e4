//! `cargo xtask test --kernel 6.1|6.12|host [FILTER]`: the privileged suite
//! on a Debian kernel, booted with virtme-ng (QEMU) over this machine's root
//! file system. Installs what it needs: qemu-system-x86, kmod and busybox
//! from apt, the newest Debian kernel package of the series (extracted under
//! target/kernels, its modules copied to /lib/modules, where virtme-ng looks
//! for them), virtme-ng from PyPI into the xtask's Python environment.

use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

/// virtme-ng, pinned.
const VNG: &str = "virtme-ng==1.42";

/// A kernel series and the Debian package names that carry it.
struct Series {
    name: &'static str,
    /// `apt-cache search --names-only` pattern.
    pattern: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    },
    Series {
        name: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$",
    },
];

/// Runs the integration tests (built already) inside `kernel`.
pub fn run(
    root: &Path,
    python: &Path,
    official: Option<&Path>,
    kernel: &str,
    filter: Option<&str>,
    skip: &[String],
) -> anyhow::Result<()> {
    let series = SERIES.iter().find(|s| s.name == kernel).with_context(|| {
        format!(
            "--kernel {kernel}: use host, {}",
            SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        )
    })?;
    ensure_tools(python)?;
    let vmlinuz = ensure_kernel(root, series)?;
    // A suite's name runs that whole test binary.
    let suite = filter.filter(|f| crate::is_suite(root, f));
    let tests = test_binaries(root, suite, skip)?;
    let filter = if suite.is_some() { None } else { filter };
    let script = write_script(root, python, official, &tests, filter)?;
    let vng = python.with_file_name("vng");
    let kvm = kvm_works(&vng, &vmlinuz);
    eprintln!(
        "xtask: booting {} with {}",
        vmlinuz.display(),
        if kvm {
            "KVM"
        } else {
            "software emulation (KVM is not usable here)"
        }
    );
    let t0 = Instant::now();
    let mut cmd = Command::new(&vng);
    if !kvm {
        cmd.arg("--disable-kvm");
    }
    cmd.arg("-r")
        .arg(&vmlinuz)
        .args(["--memory", "8G", "--cpus", "2", "--verbose"])
        .arg("--rwdir")
        .arg(root.join("target"))
        .arg("--exec")
        .arg(&script)
        // virtme-ng runs its helpers from the same environment.
        .env("PATH", path_with(python.parent().expect("venv bin")));
    // The guest's console, as it comes (QEMU writes it to stdout or
    // stderr, depending), the kernel's own lines (time stamped) left out.
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(r)) {
                let Ok(line) = line else { continue };
                if tx.send(line).is_err() {
                    return;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let mut text = String::new();
    for line in rx {
        if !line.starts_with('[') {
            println!("{line}");
        }
        text.push_str(&line);
        text.push('\n');
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait()?;
    eprintln!(
        "xtask: the {} suite took {:.0} s in the VM",
        series.name,
        t0.elapsed().as_secs_f64()
    );
    // The serial console ends lines with CR LF.
    match text
        .lines()
        .find_map(|l| l.trim_end().strip_prefix("mtlb-vm: exit "))
    {
        Some("0") => Ok(()),
        Some(code) => bail!("tests failed inside the {} VM (exit {code})", series.name),
        None => bail!("the {} VM did not report (status {status})", series.name),
    }
}

fn path_with(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn ensure_tools(python: &Path) -> anyhow::Result<()> {
    for (pkg, file) in [
        ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
        ("kmod", "/usr/sbin/depmod"),
        ("busybox-static", "/bin/busybox"),
    ] {
        if !Path::new(file).exists() {
            crate::prereqs::apt_install(pkg, "to boot test kernels")?;
        }
    }
    if !python.with_file_name("vng").exists() {
        eprintln!("xtask: installing {VNG} (PyPI, to boot test kernels)");
        crate::prereqs::pip_install(python, &[VNG])?;
    }
    Ok(())
}

/// The newest package of the series: downloaded and extracted once under
/// target/kernels/<package>, its modules copied to /lib/modules. Returns
/// its vmlinuz.
fn ensure_kernel(root: &Path, s: &Series) -> anyhow::Result<PathBuf> {
    let search = || -> anyhow::Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", s.pattern])
            .output()?;
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        names.sort_by_key(|n| version_key(n));
        Ok(names.pop())
    };
    let pkg = match search()? {
        Some(p) => p,
        None => {
            crate::prereqs::apt_update()?;
            search()?.with_context(|| {
                format!(
                    "no Debian package for kernel {} ({}) in the package lists",
                    s.name, s.pattern
                )
            })?
        }
    };
    let dir = root.join("target/kernels").join(&pkg);
    if !dir.join("boot").exists() {
        eprintln!("xtask: installing kernel {pkg} (apt, extracted under target/kernels)");
        std::fs::create_dir_all(root.join("target/kernels"))?;
        let dl = root.join("target/kernels");
        let status = Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(&dl)
            .status()?;
        if !status.success() {
            bail!("apt-get download {pkg} failed: {status}");
        }
        let deb = std::fs::read_dir(&dl)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("{pkg}: downloaded .deb not found"))?;
        let tmp = dir.with_extension("part");
        let _ = std::fs::remove_dir_all(&tmp);
        let status = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(&tmp)
            .status()?;
        if !status.success() {
            bail!("dpkg -x {} failed: {status}", deb.display());
        }
        std::fs::rename(&tmp, &dir)?;
        let _ = std::fs::remove_file(&deb);
    }
    let boot = dir.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("named vmlinuz-<release>")
        .to_string();
    // virtme-ng loads modules (virtio, 9p, overlay) from the root file
    // system it shares with the guest.
    let mods = Path::new("/lib/modules").join(&release);
    if !mods.exists() {
        std::fs::create_dir_all("/lib/modules")?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(dir.join("lib/modules").join(&release))
            .arg(&mods)
            .status()?;
        if !status.success() {
            bail!("copying modules to {} failed", mods.display());
        }
    }
    Ok(vmlinuz)
}

/// Sorts package names by the numbers in them (6.1.0-9 before 6.1.0-57).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Test files that exercise no kernel-specific behaviour beyond what every
/// other suite does (the agent is started and scraped the same way), but
/// drive a browser or a TSDB that software emulation makes ten to a
/// hundred times slower: they run in the host suite (`cargo xtask test`),
/// which CI runs first.
const HOST_ONLY: &[(&str, &str)] = &[
    (
        "stats_page",
        "headless Chromium renders pages far past the time limits under software emulation",
    ),
    (
        "prometheus",
        "a Prometheus server and promtool, no kernel feature of their own",
    ),
    (
        "deploy",
        "Ansible syntax, lint and templates, the unit file and `mtlb link`: no kernel feature; \
         ansible-lint alone takes minutes under software emulation",
    ),
    (
        "refresh",
        "the proxy-config refresh program against a file server: Python and files, no kernel \
         feature",
    ),
    ("docs", "links and anchors in the documentation"),
    (
        "ecmp",
        "BIRD and the router's ECMP in the several-hosts lab: Linux routing figures, no mtlb \
         kernel feature (the anycast suite runs mtlb in that lab in the VM); minutes under \
         software emulation",
    ),
    (
        "docker",
        "a Docker engine and image import; the official servers it runs are tested in the VM by \
         the official_mtproxy suite, and `cargo xtask vm-deploy` runs Docker on Debian 12's kernel",
    ),
];

/// The integration test executables, built.
fn test_binaries(root: &Path, only: Option<&str>, skip: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("cargo")
        .args([
            "test",
            "-p",
            "mtlb-tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["kind"] == serde_json::json!(["test"])
            && let Some(exe) = v["executable"].as_str()
        {
            let name = v["target"]["name"].as_str().unwrap_or_default();
            if only.is_some_and(|o| o != name) {
                continue;
            }
            if skip.iter().any(|s| s == name) {
                eprintln!("xtask: {name} left out (--skip)");
                continue;
            }
            if let Some(why) = HOST_ONLY.iter().find(|(n, _)| *n == name).map(|(_, w)| w) {
                eprintln!("xtask: {name} runs on the host suite only: {why}");
                continue;
            }
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.is_empty() {
        bail!("no test executables found");
    }
    Ok(bins)
}

/// The script the guest runs: the host's environment as the tests expect it
/// (bpffs, /run/netns, a writable HOME, enough open files), each test
/// binary in turn, and one line with the overall exit status.
fn write_script(
    root: &Path,
    python: &Path,
    official: Option<&Path>,
    tests: &[PathBuf],
    filter: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/vm");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("run-tests.sh");
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut text = String::from("#!/bin/bash\n# Written by cargo xtask test --kernel.\n");
    text.push_str("mount -t bpf bpf /sys/fs/bpf 2>/dev/null\n");
    // Temporary files and HOME on the guest's own tmpfs (/run): the tests
    // put unix sockets in them, which the host's file system shared over 9p
    // cannot hold, and the checkout itself may live under /tmp.
    text.push_str("mkdir -p /run/netns /run/mtlb-vm/tmp /run/mtlb-vm/home/.ansible/tmp\n");
    text.push_str("export TMPDIR=/run/mtlb-vm/tmp HOME=/run/mtlb-vm/home\n");
    // Ansible takes its temporary directories from the password database's
    // home (read-only here) unless told.
    text.push_str(
        "export ANSIBLE_REMOTE_TMP=/run/mtlb-vm/home/.ansible/tmp ANSIBLE_LOCAL_TEMP=/run/mtlb-vm/home/.ansible/tmp\n",
    );
    // The failover tests hold hundreds of connections per process.
    text.push_str("ulimit -n 65536\n");
    text.push_str(&format!(
        "export MTLB_BIN={} MTLB_PYTHON={} MTLB_TEST_TIME_SCALE={}\n",
        quote(&root.join("target/debug/mtlb").to_string_lossy()),
        quote(&python.to_string_lossy()),
        TIME_SCALE
    ));
    // The guest sees the host's files (target/ is shared read-write), so
    // the binary built on the host runs there as is.
    if let Some(official) = official {
        text.push_str(&format!(
            "export MTLB_OFFICIAL_MTPROXY={}\n",
            quote(&official.to_string_lossy())
        ));
    }
    text.push_str("echo \"mtlb-vm: kernel $(uname -r)\"\n");
    text.push_str(&format!(
        "cd {}\n",
        quote(&root.join("tests").to_string_lossy())
    ));
    text.push_str("status=0\n");
    // The agents' own lines are left out unless MTLB_VM_AGENT_LOG is set
    // (to see why a test failed in the guest).
    let keep = if std::env::var_os("MTLB_VM_AGENT_LOG").is_some() {
        "cat"
    } else {
        "grep -av '^\\[agent\\]'"
    };
    for t in tests {
        text.push_str(&format!(
            "{} {} 2>&1 | {keep}\n[ \"${{PIPESTATUS[0]}}\" = 0 ] || status=1\n",
            quote(&t.to_string_lossy()),
            filter.map(quote).unwrap_or_default()
        ));
    }
    text.push_str("echo \"mtlb-vm: exit $status\"\n");
    std::fs::write(&path, text)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// How much slower the tests may run in the guest (software emulation).
const TIME_SCALE: u32 = 10;

/// Whether a KVM guest boots here: a trivial boot with a deadline (KVM
/// guests fail or hang on some hosts).
fn kvm_works(vng: &Path, vmlinuz: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    use std::os::unix::process::CommandExt as _;
    // Its own process group: vng starts QEMU through other processes, and a
    // hung guest must go with all of them.
    let mut child = match Command::new(vng)
        .arg("-r")
        .arg(vmlinuz)
        .args(["--memory", "1G", "--exec", "echo mtlb-kvm-ok"])
        .env("PATH", path_with(vng.parent().expect("venv bin")))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return false,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                let mut out = String::new();
                if let Some(mut o) = child.stdout.take() {
                    let _ = std::io::Read::read_to_string(&mut o, &mut out);
                }
                return out.contains("mtlb-kvm-ok");
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                // SAFETY: signals the group this function created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return false;
            }
        }
    }
}
