//! `cargo xtask`: developer and operator entry points.
//!
//! * `cargo xtask run [-- ARGS]`: install prerequisites, build, run
//!   `mtlb run ARGS` (defaults: balanced port 443, replicas on
//!   127.0.0.1:10000 and :10001).
//! * `cargo xtask test`: install prerequisites, build, run the unit tests
//!   and the privileged integration tests. `--kernel 6.1|6.12` runs the
//!   integration tests on that Debian kernel in QEMU instead.
//! * `cargo xtask build`: install prerequisites and build.
//! * `cargo xtask demo`: a guided failover demo with real MTProxy replicas.
//! * `cargo xtask bench [--only PHASES] [--report-only]`: mtlb against
//!   direct connections, HAProxy, nginx `stream` and IPVS (the mtlb-bench
//!   crate, bench/); writes BENCHMARKS.md and its record bench/last-run.json.
//! * `cargo xtask deb [--check]`: the Debian package
//!   target/debian/mtlb_<version>_amd64.deb (docs/releasing.md).
//! * `cargo xtask vm-deploy`: deploy/ for real in a Debian 12 guest under
//!   QEMU, checked from this machine; prints a report (the mtlb-vm-deploy
//!   crate, deploy/vm-deploy/).

mod deb;
mod demo;
mod image;
mod official;
mod prereqs;
mod vm;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mtlb_bench as bench;
use std::{
    path::{Path, PathBuf},
    process::Command,
};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything (release) and run `mtlb run` with the given
    /// arguments (after `--`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the privileged integration tests
    /// (root; each in its own network namespace).
    Test {
        /// One suite (a file name in tests/tests/, e.g. `health`), or else
        /// the integration tests whose name contains this.
        filter: Option<String>,
        /// Run the integration tests on this kernel, booted in QEMU with
        /// virtme-ng: `6.1` (Debian 12), `6.12` (Debian 13 / 12 backports),
        /// or `host` (this machine's, the default).
        #[arg(long, default_value = "host")]
        kernel: String,
        /// Leave out this suite (a file name in tests/tests/); repeatable.
        #[arg(long, value_name = "SUITE")]
        skip: Vec<String>,
    },
    /// Install prerequisites and build (release).
    Build,
    /// Build the Debian package target/debian/mtlb_<version>_amd64.deb
    /// (cargo-deb; man pages and completions from the release binary).
    Deb {
        /// Then check it as `cargo xtask test` does: its files, lintian,
        /// the man page, the bash completion.
        #[arg(long)]
        check: bool,
    },
    /// Boot a Debian 12 guest in QEMU (software emulation), provision it
    /// with deploy/playbooks/deploy.yml as `vagrant up` does, and check the
    /// deployment from this machine: clients through its port 443, the
    /// stats page, the unit and its journal, failover, scaling 2→3→2,
    /// `mtlb link`. Prints a step-by-step report; removes the guest.
    VmDeploy,
    /// A guided demo in a network namespace of its own: two real MTProxy
    /// replicas, a fake Telegram DC, mtlb, client load, a replica stopped
    /// and brought back. Cleans everything up.
    Demo,
    /// Benchmark mtlb against direct connections, HAProxy, nginx `stream`
    /// and IPVS (one run, interleaved, same backends); writes BENCHMARKS.md,
    /// target/bench.json and bench/last-run.json. Not a test. MTLB_BENCH_REPLICA_CGROUP=0 leaves
    /// `replica_cgroup` out of mtlb's config.
    Bench {
        /// Run only these phases (comma-separated: rounds, failover,
        /// profile, micro, held, steering, stop); writes target/bench-partial.json and
        /// target/BENCHMARKS-partial.md instead, except for every phase but stop,
        /// which is a full run that keeps the committed stop phase.
        #[arg(long)]
        only: Option<String>,
        /// With `--only stop`: put the stop phase's figures into
        /// bench/last-run.json and BENCHMARKS.md, keeping the other
        /// phases' (the figures measured with another mtlb binary before
        /// stay beside them).
        #[arg(long)]
        merge: bool,
        /// Measure nothing: write BENCHMARKS.md again from target/bench.json
        /// if present, else from the committed bench/last-run.json (e.g.
        /// after filling in the reasons of missed targets there).
        #[arg(long)]
        report_only: bool,
    },
    /// Builds the replica image's root file system (Debian's packages and
    /// the official server BINARY) for `docker import`; prints its path.
    MtproxyImage {
        /// the official server (`mtproto-proxy`) to put in the image
        #[arg(long)]
        binary: PathBuf,
    },
    /// A backend process of the benchmark (internal).
    #[command(hide = true)]
    BenchBackend {
        #[arg(long)]
        port: u16,
        /// cgroup2 directory to join before listening.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Processes sharing the listening socket.
        #[arg(long, default_value_t = 1)]
        workers: u32,
    },
    /// A process of the benchmark holding connections open (internal).
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        per_sec: f64,
        #[arg(long)]
        secs: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Run { args } => {
            prereqs::ensure()?;
            cargo(&["build", "--release", "-p", "mtlb-userspace"])?;
            let bin = root.join("target/release/mtlb");
            exec(&bin, std::iter::once("run".to_string()).chain(args))
        }
        Cmd::Test { skip, .. } if skip.iter().any(|s| !is_suite(&root, s)) => {
            let bad: Vec<_> = skip
                .iter()
                .filter(|s| !is_suite(&root, s))
                .cloned()
                .collect();
            anyhow::bail!(
                "--skip {}: not a suite (a file name in tests/tests/, without .rs)",
                bad.join(", ")
            )
        }
        Cmd::Test {
            filter,
            kernel,
            skip,
        } if kernel != "host" => {
            prereqs::ensure()?;
            prereqs::ensure_test_tools()?;
            cargo(&["build", "-p", "mtlb-userspace"])?;
            let python = prereqs::ensure_python_env(&root.join("target"))?;
            let official = official::ensure(&root)?;
            vm::run(
                &root,
                &python,
                official.as_deref(),
                &kernel,
                filter.as_deref(),
                &skip,
            )
        }
        Cmd::Test { filter, skip, .. } => {
            prereqs::ensure()?;
            prereqs::ensure_test_tools()?;
            cargo(&["build", "-p", "mtlb-userspace"])?;
            cargo(&[
                "test",
                "-p",
                "mtlb-common",
                "-p",
                "mtlb-userspace",
                "-p",
                "xtask",
                "-p",
                "mtlb-bench",
                "-p",
                "mtlb-vm-deploy",
            ])?;
            // The agent's modules stay free of circles (issue 19).
            run(Command::new("python3").args(["tools/modcycles.py", "mtlb-userspace/src"]))?;
            prereqs::ensure_deb_tools()?;
            let package = deb::build(&root)?;
            deb::check(&root, &package)?;
            let python = prereqs::ensure_python_env(&root.join("target"))?;
            let bin = root.join("target/debug/mtlb");
            let mut cmd = Command::new("cargo");
            cmd.args(["test", "-p", "mtlb-tests"]);
            match filter.as_deref().filter(|f| is_suite(&root, f)) {
                Some(suite) => cmd.args(["--test", suite]),
                None if skip.is_empty() => cmd.arg("--").args(filter),
                None => {
                    // The helpers' own unit tests, then each suite kept.
                    cmd.arg("--lib");
                    for suite in suites(&root)? {
                        if skip.contains(&suite) {
                            eprintln!("xtask: {suite} left out (--skip)");
                        } else {
                            cmd.args(["--test", &suite]);
                        }
                    }
                    cmd.arg("--").args(filter)
                }
            };
            cmd.env("MTLB_BIN", &bin).env("MTLB_PYTHON", &python);
            // Unset, the official MTProxy tests skip (and say why).
            if let Some(official) = official::ensure(&root)? {
                // The Docker tests' replica image holds that server.
                let rootfs = image::mtproxy_rootfs(&root, &official)?;
                cmd.env("MTLB_OFFICIAL_MTPROXY", official)
                    .env("MTLB_MTPROXY_ROOTFS", rootfs);
            }
            run(&mut cmd)
        }
        Cmd::Demo => {
            prereqs::ensure()?;
            let python = prereqs::ensure_python_env(&root.join("target"))?;
            cargo(&["build", "--release", "-p", "mtlb-userspace"])?;
            demo::run(&root, &python)
        }
        Cmd::Bench {
            report_only: true, ..
        } => bench::report_only(&root),
        Cmd::Bench { only, merge, .. } => {
            prereqs::ensure()?;
            prereqs::ensure_bench_tools()?;
            cargo(&["build", "--release", "-p", "mtlb-userspace"])?;
            // The stop phase's replicas: the official server in its
            // image, and the Python of the middle-proxy stand-in.
            let stop_peers = || {
                let official = official::ensure(&root)?
                    .context("no official MTProxy source (../shared/peers or MTLB_PEERS)")?;
                Ok(bench::stop::Peers {
                    rootfs: image::mtproxy_rootfs(&root, &official)?,
                    python: prereqs::ensure_python_env(&root.join("target"))?,
                    fixtures: root.join("tests/fixtures/mtproxy"),
                })
            };
            bench::run(&root, only.as_deref(), merge, &stop_peers)
        }
        Cmd::BenchBackend {
            port,
            cgroup,
            workers,
        } => bench::backend::serve(port, cgroup.as_deref(), workers),
        Cmd::BenchHold {
            target,
            count,
            per_sec,
            secs,
        } => bench::hold_main(target, count, per_sec, secs),
        Cmd::MtproxyImage { binary } => {
            let tar = image::mtproxy_rootfs(&root, &binary)?;
            println!("{}", tar.display());
            Ok(())
        }
        Cmd::VmDeploy => {
            prereqs::ensure()?;
            cargo(&["build", "--release", "-p", "mtlb-userspace"])?;
            let python = prereqs::ensure_python_env(&root.join("target"))?;
            mtlb_vm_deploy::run(&root, &python, &VmDeployHost { root: &root })
        }
        Cmd::Deb { check } => {
            prereqs::ensure()?;
            // The agent's modules stay free of circles (issue 19).
            run(Command::new("python3").args(["tools/modcycles.py", "mtlb-userspace/src"]))?;
            prereqs::ensure_deb_tools()?;
            let package = deb::build(&root)?;
            if check {
                deb::check(&root, &package)?;
            }
            println!("{}", package.display());
            Ok(())
        }
        Cmd::Build => {
            prereqs::ensure()?;
            cargo(&["build", "--release", "-p", "mtlb-userspace"])
        }
    }
}

/// What vm-deploy takes from xtask: Debian packages installed here, the
/// official server's replica image, and mtlb's own package.
struct VmDeployHost<'a> {
    root: &'a Path,
}

impl mtlb_vm_deploy::Host for VmDeployHost<'_> {
    fn apt_install(&self, pkg: &str, why: &str) -> anyhow::Result<()> {
        prereqs::apt_install(pkg, why)
    }

    fn replica_image(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let bin = official::ensure(self.root)?.context(
            "the official MTProxy source is missing (see xtask/src/official.rs: MTLB_PEERS)",
        )?;
        let archive = image::mtproxy_rootfs(self.root, &bin)?;
        Ok((bin, archive))
    }

    fn deb(&self, version: Option<&str>) -> anyhow::Result<PathBuf> {
        prereqs::ensure_deb_tools()?;
        match version {
            None => deb::build(self.root),
            Some(v) => deb::build_as(self.root, v),
        }
    }
}

/// Whether `filter` names an integration test file (tests/tests/NAME.rs):
/// then `cargo xtask test NAME` runs that whole suite, not the tests whose
/// names contain NAME.
pub fn is_suite(root: &Path, filter: &str) -> bool {
    !filter.contains(['/', '.'])
        && root
            .join("tests/tests")
            .join(format!("{filter}.rs"))
            .is_file()
}

/// The integration test suites: the file names in tests/tests/.
fn suites(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("tests/tests"))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_owned())
        })
        .collect();
    names.sort();
    Ok(names)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("cargo").args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Replaces this process with `bin`, so signals (Ctrl-C) reach the agent
/// directly.
fn exec(bin: &Path, args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let err = Command::new(bin).args(args).exec();
    Err(err).with_context(|| format!("exec {}", bin.display()))
}
