//! `cargo xtask deb`: the Debian package, built by cargo-deb from
//! mtlb-userspace's `[package.metadata.deb]`, and [`check`] of what it
//! holds (also run by `cargo xtask test`).
//!
//! The man pages and completions come from the release binary itself
//! (`mtlb generate`, hidden): xtask does not link mtlb-userspace, whose
//! build needs the bpf-linker xtask installs.

use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Where the package puts the binary; the unit's ExecStart must say so.
const PACKAGE_BIN: &str = "/usr/sbin/mtlb";
/// Where the Ansible role's binary mode copies it, as the shared unit says.
const ROLE_BIN: &str = "/usr/local/bin/mtlb";

/// Files every package must hold (as `dpkg-deb -c` prints them, without
/// the leading `.`), besides each docs/*.md of the tree.
const REQUIRED: &[&str] = &[
    "/usr/sbin/mtlb",
    "/usr/lib/systemd/system/mtlb.service",
    "/etc/mtlb/mtlb.toml",
    "/usr/share/man/man8/mtlb.8.gz",
    "/usr/share/man/man8/mtlb-run.8.gz",
    "/usr/share/man/man8/mtlb-backend.8.gz",
    "/usr/share/man/man8/mtlb-status.8.gz",
    "/usr/share/man/man8/mtlb-rollout.8.gz",
    "/usr/share/man/man8/mtlb-remove.8.gz",
    "/usr/share/man/man8/mtlb-host.8.gz",
    "/usr/share/bash-completion/completions/mtlb",
    "/usr/share/zsh/vendor-completions/_mtlb",
    "/usr/share/fish/vendor_completions.d/mtlb.fish",
    "/usr/share/doc/mtlb/README.md",
    "/usr/share/doc/mtlb/CHANGELOG.md",
    "/usr/share/doc/mtlb/changelog.gz",
    "/usr/share/doc/mtlb/copyright",
    "/usr/share/mtlb/prometheus/mtlb.rules.yml",
    "/usr/share/mtlb/grafana/mtlb.json",
    "/usr/share/lintian/overrides/mtlb",
];

/// Builds target/debian/mtlb_<version>_amd64.deb; returns its path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    build_as(root, env!("CARGO_PKG_VERSION"))
}

/// Builds the package of this tree as `version` (the workspace's, or a
/// later one: vm-deploy upgrades the first to a second of the same code).
pub fn build_as(root: &Path, version: &str) -> anyhow::Result<PathBuf> {
    crate::cargo(&["build", "--release", "-p", "mtlb-userspace"])?;
    let assets = root.join("target/release/deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let bin = root.join("target/release/mtlb");
    for (what, dir) in [("man", "man"), ("completions", "completions")] {
        crate::prereqs::quiet(
            Command::new(&bin)
                .args(["generate", what])
                .arg(assets.join(dir)),
        )?;
    }
    // cargo-deb compresses man pages only outside the target directory;
    // -n: no name or time stamp in the header, so builds are reproducible.
    for page in std::fs::read_dir(assets.join("man"))? {
        crate::prereqs::quiet(
            Command::new("gzip")
                .args(["-9n", "--force"])
                .arg(page?.path()),
        )?;
    }
    changelog(root, &assets, version)?;
    // One unit for both installs: the role's file, with the package's
    // binary path (a package must not ship under /usr/local).
    let unit = std::fs::read_to_string(root.join("deploy/roles/mtlb/files/mtlb.service"))?;
    if !unit.contains(ROLE_BIN) {
        bail!(
            "deploy/roles/mtlb/files/mtlb.service no longer names {ROLE_BIN}: update xtask/src/deb.rs"
        );
    }
    std::fs::create_dir_all(assets.join("unit"))?;
    // The package installs the man pages the unit can point at.
    let unit = unit.replace(ROLE_BIN, PACKAGE_BIN).replacen(
        "\n[Service]",
        "Documentation=man:mtlb(8) man:mtlb-run(8)\n\n[Service]",
        1,
    );
    std::fs::write(assets.join("unit/mtlb.service"), unit)?;

    let out_dir = root.join("target/debian");
    let deb = out_dir.join(format!("mtlb_{version}_amd64.deb"));
    let _ = std::fs::remove_file(&deb);
    crate::run(
        Command::new("cargo")
            .args(["deb", "-p", "mtlb-userspace", "--no-build"])
            .args(["--deb-version", version, "--output"])
            .arg(&out_dir),
    )?;
    if !deb.exists() {
        bail!("cargo deb did not write {}", deb.display());
    }
    Ok(deb)
}

/// The Debian changelog lintian asks of a native package
/// (usr/share/doc/mtlb/changelog.gz): one entry for this version pointing
/// at CHANGELOG.md, the one kept by hand. Dated by the last commit, so a
/// rebuild of the same commit gives the same file.
fn changelog(root: &Path, assets: &Path, version: &str) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(root.join("mtlb-userspace/Cargo.toml"))?;
    let maintainer = manifest
        .lines()
        .find_map(|l| l.strip_prefix("maintainer = "))
        .map(|m| m.trim_matches('"'))
        .context("no maintainer in mtlb-userspace/Cargo.toml [package.metadata.deb]")?;
    let date = output(Command::new("git").args(["log", "-1", "--format=%aD"]))?;
    let text = format!(
        "mtlb ({version}) unstable; urgency=medium\n\n  \
         * mtlb {version}: see /usr/share/doc/mtlb/CHANGELOG.md for the changes.\n\n \
         -- {maintainer}  {}\n",
        date.trim()
    );
    let path = assets.join("changelog");
    std::fs::write(&path, text)?;
    crate::prereqs::quiet(Command::new("gzip").args(["-9n", "--force"]).arg(&path))
}

/// Checks the package: the files it must hold, the conffile and the
/// enabled unit, lintian without errors or unexplained warnings, the man
/// page renders, the bash completion loads, and the packaged binary accepts
/// the packaged config.
pub fn check(root: &Path, deb: &Path) -> anyhow::Result<()> {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let mut want: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    for md in docs_md(root)? {
        want.push(format!("/usr/share/doc/mtlb/docs/{md}"));
    }
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| !files.contains(&w.as_str()))
        .collect();
    if !missing.is_empty() {
        bail!("{} lacks {missing:?}; it holds:\n{listing}", deb.display());
    }

    let tmp = TempDir::new("mtlb-deb-check")?;
    let control = tmp.0.join("DEBIAN");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control))?;
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    if !conffiles.lines().any(|l| l == "/etc/mtlb/mtlb.toml") {
        bail!("/etc/mtlb/mtlb.toml is not a conffile (conffiles: {conffiles:?})");
    }
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    if !postinst.contains("deb-systemd-helper enable mtlb.service") {
        bail!("postinst does not enable mtlb.service:\n{postinst}");
    }

    let lintian = Command::new("lintian")
        .args(["--info", "--display-info"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&lintian.stdout),
        String::from_utf8_lossy(&lintian.stderr)
    );
    // Errors fail; so do warnings not explained in the package's lintian
    // overrides (mtlb-userspace/debian/lintian-overrides), which show as
    // "O:" instead.
    let errors: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    if !errors.is_empty() {
        bail!(
            "lintian reports errors or unexplained warnings:\n{}",
            errors.join("\n")
        );
    }
    // lintian exits non-zero for errors only; anything else is a failure
    // to run it.
    if !lintian.status.success() {
        bail!("lintian failed: {}\n{report}", lintian.status);
    }

    let tree = tmp.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    let page = output(
        Command::new("man")
            .arg("-l")
            .arg(tree.join("usr/share/man/man8/mtlb.8.gz"))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"),
    )?;
    if !page.contains("mtlb-run(8)") {
        bail!("man -l mtlb.8.gz does not render its commands:\n{page}");
    }
    let completion = tree.join("usr/share/bash-completion/completions/mtlb");
    let complete = output(Command::new("bash").arg("-c").arg(format!(
        "source '{}' && complete -p mtlb",
        completion.display()
    )))?;
    if !complete.contains("mtlb") {
        bail!("bash completion does not register for mtlb: {complete}");
    }
    let unit = std::fs::read_to_string(tree.join("usr/lib/systemd/system/mtlb.service"))?;
    if unit.contains(ROLE_BIN) || !unit.contains(&format!("ExecStart={PACKAGE_BIN} run")) {
        bail!("the packaged unit does not run {PACKAGE_BIN}:\n{unit}");
    }
    let checked = output(
        Command::new(tree.join("usr/sbin/mtlb"))
            .args(["check-config", "--config"])
            .arg(tree.join("etc/mtlb/mtlb.toml")),
    )?;
    if !checked.contains(": OK:") {
        bail!("the packaged mtlb.toml: {checked}");
    }
    println!(
        "{}: {} files, conffile, unit enabled, lintian clean, man page, bash completion, config OK",
        deb.display(),
        files.len()
    );
    Ok(())
}

/// docs/*.md of the tree: the package carries each (by glob).
fn docs_md(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(root.join("docs"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            names.push(name);
        }
    }
    Ok(names)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    output(cmd).map(drop)
}

/// stdout and stderr of a command that must succeed.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{cmd:?} failed: {}\n{text}", out.status);
    }
    Ok(text)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
