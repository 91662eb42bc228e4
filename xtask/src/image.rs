//! The replica image without any image registry: a Debian root file system
//! built by mmdebstrap from Debian's packages, with the official server
//! (built by `official::ensure`) at the path the `telegrammessenger/proxy`
//! image has it, as a tarball for `docker import`. The mtproxy role imports
//! it (`mtproxy_image_archive`); the Docker tests and `vm-deploy` use it.

use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Debian's packages the server links against, and curl for the role's
/// online mode (it fetches Telegram's proxy secret and config at start, as
/// the original image's start script does).
const PACKAGES: &str = "libssl3,zlib1g,ca-certificates,curl";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// Path of the tarball, built when missing or when the server binary
/// changed (a copy of the binary it holds is kept beside it to compare).
pub fn mtproxy_rootfs(root: &Path, official_bin: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/mtproxy-image");
    let tar = dir.join("rootfs.tar");
    let held = dir.join("mtproto-proxy");
    let key = dir.join("packages");
    let want = std::fs::read(official_bin)
        .with_context(|| format!("reading {}", official_bin.display()))?;
    let fresh = tar.exists()
        && std::fs::read(&held).ok().as_deref() == Some(&want[..])
        && std::fs::read_to_string(&key).ok().as_deref() == Some(PACKAGES);
    if fresh {
        return Ok(tar);
    }
    if which::which("mmdebstrap").is_err() {
        crate::prereqs::apt_install("mmdebstrap", "to build the replica image")?;
    }
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(&tar);
    std::fs::copy(official_bin, &held)?;
    eprintln!("xtask: building the replica image (mmdebstrap {SUITE}, about a minute)");
    let partial = dir.join("rootfs.tar.partial");
    let out = Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase", "--include", PACKAGES])
        // Documentation and translations are dead weight in a container.
        .args(["--dpkgopt=path-exclude=/usr/share/doc/*"])
        .args(["--dpkgopt=path-exclude=/usr/share/man/*"])
        .args(["--dpkgopt=path-exclude=/usr/share/locale/*"])
        .arg(format!(
            "--customize-hook=copy-in {} /usr/local/bin",
            held.display()
        ))
        // The role mounts or writes proxy-secret and proxy-multi.conf here.
        .arg("--customize-hook=mkdir -p \"$1/data\"")
        .arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*")
        // mmdebstrap picks the output format from the name's extension.
        .args(["--format=tar", SUITE])
        .arg(&partial)
        .arg(MIRROR)
        .output()
        .context("running mmdebstrap")?;
    if !out.status.success() {
        bail!(
            "mmdebstrap failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&partial, &tar)?;
    std::fs::write(&key, PACKAGES)?;
    Ok(tar)
}
