//! The official C MTProxy server (github.com/TelegramMessenger/MTProxy) as
//! a test peer. No package registry carries it: its source tarball sits
//! with the project's other real peers (`<workspace>/../shared/peers/`, or
//! the directory `MTLB_PEERS` names). It is built once into
//! `target/official-mtproxy/mtproto-proxy` and reused while that file
//! exists.

use anyhow::Context as _;
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The tarball: the server's last commit (2019-10-03), the one the
/// `telegrammessenger/proxy` Docker image runs.
pub const TARBALL: &str = "MTProxy-dc0c7f3.tar.gz";
const COMMIT: &str = "dc0c7f3de40530053189c572936ae4fd1567269b";

/// Debian packages the build needs, and a file each provides.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("build-essential", "/usr/bin/make"),
    ("build-essential", "/usr/bin/gcc"),
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
];

/// Where the peers' tarballs are looked for.
pub fn peers_dir(root: &Path) -> PathBuf {
    std::env::var_os("MTLB_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/peers"))
}

/// The built server, building it first when it is missing. `None` (with
/// the reason printed) when the tarball is not there, as in a clone without
/// the shared peers: the tests that need the server then skip.
pub fn ensure(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let dir = root.join("target/official-mtproxy");
    let bin = dir.join("mtproto-proxy");
    if bin.exists() {
        return Ok(Some(bin));
    }
    let tarball = peers_dir(root).join(TARBALL);
    if !tarball.exists() {
        eprintln!(
            "xtask: no {} (set MTLB_PEERS to its directory): the official MTProxy tests will skip",
            tarball.display()
        );
        return Ok(None);
    }
    let mut missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    missing.dedup();
    for pkg in missing {
        crate::prereqs::apt_install(pkg, "to build the official MTProxy test peer")?;
    }
    eprintln!(
        "xtask: building the official MTProxy from {}",
        tarball.display()
    );
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    crate::prereqs::quiet(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&src),
    )?;
    let tree = src.join("MTProxy");
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::prereqs::quiet(
        Command::new("make")
            .arg(format!("-j{jobs}"))
            // GCC 10 and later default to -fno-common, and the server
            // defines the same globals in several files: without this the
            // link fails with "multiple definition of ...".
            .arg("CC=gcc -fcommon")
            // The Makefile asks git for the commit, which outside a clone
            // of MTProxy would name ours.
            .arg(format!("COMMIT={COMMIT}"))
            .current_dir(&tree),
    )?;
    // Renamed into place, so that an interrupted build never leaves a
    // binary that a later run would take as built.
    let tmp = dir.join("mtproto-proxy.tmp");
    std::fs::copy(tree.join("objs/bin/mtproto-proxy"), &tmp)
        .context("copying objs/bin/mtproto-proxy")?;
    std::fs::rename(&tmp, &bin)?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(Some(bin))
}
