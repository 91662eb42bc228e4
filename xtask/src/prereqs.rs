//! Installs what a fresh machine lacks for building and running mtlb.
//! Idempotent: when everything is there it installs and prints nothing.

use anyhow::{Context as _, bail};
use std::{path::PathBuf, process::Command};

/// Debian packages and a file each provides, to check for.
const RUNTIME_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/sbin/ip"),
    // The tests drop packets in their namespaces with nft.
    ("nftables", "/usr/sbin/nft"),
    // The deployment tests verify the unit file.
    ("systemd", "/usr/bin/systemd-analyze"),
];
/// Needed only to build bpf-linker.
const LINKER_BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!(
            "mtlb needs root (it loads BPF programs, and the tests create network namespaces); run as root"
        );
    }
    let mut apt = Apt::default();
    for (pkg, file) in RUNTIME_PACKAGES {
        if !std::path::Path::new(file).exists() {
            apt.install(pkg, "runtime tool")?;
        }
    }
    ensure_nightly_rust_src()?;
    if bpf_linker().is_none() {
        for pkg in LINKER_BUILD_PACKAGES {
            if !dpkg_installed(pkg) {
                apt.install(pkg, "to build bpf-linker")?;
            }
        }
        say(&format!(
            "bpf-linker {BPF_LINKER_VERSION} (cargo install, LLVM 22)"
        ));
        let status = Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .status()
            .context("cargo install bpf-linker")?;
        if !status.success() {
            bail!("cargo install bpf-linker failed: {status}");
        }
    }
    ensure_bpffs()?;
    Ok(())
}

fn say(what: &str) {
    eprintln!("xtask: installing {what}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, pkg: &str, why: &str) -> anyhow::Result<()> {
        say(&format!("{pkg} ({why}, apt)"));
        if !self.updated {
            quiet(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        quiet(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }
}

/// Installs one Debian package (apt-get update first).
pub fn apt_install(pkg: &str, why: &str) -> anyhow::Result<()> {
    Apt::default().install(pkg, why)
}

/// Refreshes the package lists.
pub fn apt_update() -> anyhow::Result<()> {
    quiet(Command::new("apt-get").args(["update", "-q"]))
}

/// Runs a command with its output hidden unless it fails.
pub fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("Rust nightly toolchain (rustup; eBPF builds need it)");
        quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        say("rust-src for nightly (rustup; -Z build-std for the bpfel target)");
        quiet(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bpf_linker() -> Option<PathBuf> {
    cargo_bin("bpf-linker")
}

/// A tool `cargo install` put in PATH or in $CARGO_HOME/bin.
fn cargo_bin(name: &str) -> Option<PathBuf> {
    which::which(name).ok().or_else(|| {
        let p = PathBuf::from(std::env::var_os("CARGO_HOME").unwrap_or_else(|| {
            std::path::Path::new(&std::env::var_os("HOME").unwrap_or_default())
                .join(".cargo")
                .into_os_string()
        }))
        .join("bin")
        .join(name);
        p.exists().then_some(p)
    })
}

/// bpffs at /sys/fs/bpf, where the agent pins by default and where the
/// tests and `bpftool map dump pinned` look.
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&"/sys/fs/bpf") && l.contains(" - bpf ")
    });
    if !mounted {
        say("bpffs mount at /sys/fs/bpf");
        quiet(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// Python packages of the tests: a real MTProxy server and a real Telegram
/// client, `cryptography` for the fixtures' AES, and Ansible for the
/// deployment checks.
const PYTHON_REQUIREMENTS: &[&str] = &[
    "mtprotoproxy==1.0.6",
    "telethon==1.45.0",
    "cryptography",
    "pycryptodome",
    // The deployment tests: ansible-playbook --syntax-check, template.
    "ansible-core>=2.17,<2.19",
    "ansible-lint",
];

/// A virtual environment under target/ with the Python test peers; made
/// once, reused while its requirement list is unchanged. Returns its
/// python.
pub fn ensure_python_env(target: &std::path::Path) -> anyhow::Result<PathBuf> {
    let venv = target.join("pyenv");
    let python = venv.join("bin/python3");
    let marker = venv.join(".mtlb-requirements");
    let want = PYTHON_REQUIREMENTS.join("\n");
    if python.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == want) {
        return Ok(python);
    }
    say(&format!(
        "Python test peers ({}) in {}",
        PYTHON_REQUIREMENTS.join(", "),
        venv.display()
    ));
    if Command::new("python3")
        .args(["-m", "venv", "--help"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        Apt::default().install("python3-venv", "for the test peers' virtual environment")?;
    }
    let _ = std::fs::remove_dir_all(&venv);
    quiet(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    pip_install(&python, PYTHON_REQUIREMENTS)?;
    std::fs::write(&marker, want)?;
    Ok(python)
}

/// Installs `packages` from PyPI into the environment of `python`.
pub fn pip_install(python: &std::path::Path, packages: &[&str]) -> anyhow::Result<()> {
    quiet(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(packages),
    )
}

/// Debian packages only the tests use, and a file each provides: a real
/// Prometheus (and promtool) scrapes an agent and unit-tests the alert
/// rules; headless Chromium renders the stats page; a Docker engine runs
/// official replicas as the seed does (the `docker` client alone is not
/// enough: dockerd, containerd and runc come with docker.io); BIRD 2 is
/// the routing daemon of the several-hosts lab (tests/src/bgp.rs).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("docker.io", "/usr/sbin/dockerd"),
    ("docker.io", "/usr/bin/containerd"),
    ("prometheus", "/usr/bin/promtool"),
    ("prometheus", "/usr/bin/prometheus"),
    ("chromium", "/usr/bin/chromium"),
    ("bird2", "/usr/sbin/bird"),
    ("bird2", "/usr/sbin/birdc"),
];

/// What `cargo xtask test` needs beyond [`ensure`].
pub fn ensure_test_tools() -> anyhow::Result<()> {
    let mut apt = Apt::default();
    let mut done = Vec::new();
    for (pkg, file) in TEST_PACKAGES {
        if !std::path::Path::new(file).exists() && !done.contains(pkg) {
            apt.install(pkg, "the tests use it")?;
            done.push(*pkg);
        }
    }
    Ok(())
}

const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages `cargo xtask deb` checks the package with, and a file
/// each provides.
const DEB_PACKAGES: &[(&str, &str)] = &[
    ("lintian", "/usr/bin/lintian"),
    // `man -l` renders the generated page.
    ("man-db", "/usr/bin/man"),
];

/// What `cargo xtask deb` needs beyond [`ensure`]: cargo-deb, which builds
/// the package, and the tools its check runs.
pub fn ensure_deb_tools() -> anyhow::Result<()> {
    let mut apt = Apt::default();
    for (pkg, file) in DEB_PACKAGES {
        if !std::path::Path::new(file).exists() {
            apt.install(pkg, "cargo xtask deb checks the package with it")?;
        }
    }
    if cargo_bin("cargo-deb").is_none() {
        say(&format!("cargo-deb {CARGO_DEB_VERSION} (cargo install)"));
        quiet(Command::new("cargo").args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    Ok(())
}

/// What `cargo xtask bench` runs besides mtlb, and a file each provides.
const BENCH_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "haproxy",
        "/usr/sbin/haproxy",
        "the benchmark compares against it",
    ),
    (
        "nginx",
        "/usr/sbin/nginx",
        "the benchmark compares against its stream module",
    ),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "nginx's stream (TCP) proxy, for the benchmark",
    ),
    (
        "ipvsadm",
        "/usr/sbin/ipvsadm",
        "the benchmark compares against IPVS",
    ),
    ("linux-perf", "/usr/bin/perf", "the benchmark's profile"),
    (
        "docker.io",
        "/usr/sbin/dockerd",
        "the benchmark's stop phase runs the replicas in Docker, as the seed does",
    ),
];

/// The benchmark's other balancers and tools (Debian packages).
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    let mut apt = Apt::default();
    for (pkg, file, why) in BENCH_PACKAGES {
        if !std::path::Path::new(file).exists() {
            apt.install(pkg, why)?;
        }
    }
    Ok(())
}
