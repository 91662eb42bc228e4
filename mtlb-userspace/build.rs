//! Builds the kernel programs (the `mtlb` binary of mtlb-ebpf) for the BPF
//! target and copies the object to `OUT_DIR/mtlb`, which
//! `kernel/loader.rs` embeds.
//!
//! The inner cargo runs as `aya_build::build_ebpf` 0.2 runs it (same
//! toolchain, target, flags, environment and target directory), but its
//! output is not relayed line by line: cargo shows every `cargo:warning=`
//! of a build script as a warning, and the inner build's progress lines
//! are not warnings. Its whole output goes to `OUT_DIR/ebpf-build.log`;
//! only what the compiler reports as a warning is relayed, and a failed
//! build prints the compiler's messages and cargo's errors on stderr, which
//! cargo shows in full.

use anyhow::{Context as _, anyhow, bail};
use cargo_metadata::{Artifact, CompilerMessage, Message, diagnostic::DiagnosticLevel};
use std::{
    env,
    ffi::OsString,
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
};

/// The kernel programs' package and the binary target it builds.
const PACKAGE: &str = "mtlb-ebpf";
const BINARY: &str = "mtlb";
/// The eBPF build needs nightly (`-Z build-std=core`, core_intrinsics).
const TOOLCHAIN: &str = "nightly";

fn main() {
    // Printed with its causes and no backtrace: the eBPF build's own
    // output, above it, says what went wrong.
    if let Err(e) = build() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    // The build-dependency on mtlb-ebpf only covers its library target;
    // this covers the programs (the binary target) too. Relative to this
    // package, so that a target directory copied from another checkout
    // (or shared with one) watches this checkout's sources, not those it
    // was built from.
    println!("cargo:rerun-if-changed=../{PACKAGE}");
    // The programs are built from mtlb-common too.
    println!("cargo:rerun-if-changed=../mtlb-common");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")
        .context("CARGO_CFG_TARGET_ENDIAN")?
        .as_str()
    {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported endian={other}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };

    let mut cargo = toolchain_command("cargo");
    cargo.args([
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--message-format=json",
        "--release",
    ]);
    cargo.args(["--target", target]);
    if build_std(toolchain_command("rustc"))? {
        cargo.args(["-Z", "build-std=core"]);
    }
    let mut rustflags = OsString::new();
    for (i, flag) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    cargo.env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer build's compiler would be used otherwise, not the nightly.
    cargo
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    // A target directory of its own: cargo would wait on its own lock
    // (rust-lang/cargo#6412). Kept apart from OUT_DIR/mtlb, the copy.
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    cargo.arg("--target-dir").arg(&target_dir);

    let log_path = out_dir.join("ebpf-build.log");
    let object = run(cargo, &log_path)?;
    fs::copy(&object, out_dir.join(BINARY))
        .with_context(|| format!("copying {} to {}", object.display(), out_dir.display()))?;
    Ok(())
}

/// `program` from the nightly toolchain when rustup is there, else from
/// the current one.
fn toolchain_command(program: &str) -> Command {
    match which::which("rustup") {
        Ok(rustup) => {
            let mut cmd = Command::new(rustup);
            cmd.args(["run", TOOLCHAIN, program]);
            cmd
        }
        Err(_) => Command::new(program),
    }
}

/// Whether core must be built from source (`-Z build-std`): as aya-build
/// decides it, by RUSTC_BOOTSTRAP if set, else by the compiler's channel.
fn build_std(rustc: Command) -> anyhow::Result<bool> {
    println!("cargo:rerun-if-env-changed=RUSTC_BOOTSTRAP");
    let channel = rustc_version::VersionMeta::for_command(rustc)
        .context("asking the eBPF toolchain's rustc for its version")?
        .channel;
    Ok(match env::var_os("RUSTC_BOOTSTRAP") {
        Some(v) if v == "1" || v == PACKAGE => true,
        Some(v) if v == "-1" => false,
        _ => channel == rustc_version::Channel::Nightly,
    })
}

/// What the inner build said, from either pipe.
enum Output {
    /// The object built.
    Object(PathBuf),
    /// A compiler message, rendered as rustc prints it.
    Compiler { warning: bool, rendered: String },
    /// A line of progress or of cargo's own errors.
    Text(String),
}

/// Runs the inner build with its output in `log_path`, and returns the
/// object it built. Compiler warnings are relayed to cargo as warnings; on
/// failure everything but the progress lines goes to stderr.
fn run(mut cargo: Command, log_path: &Path) -> anyhow::Result<PathBuf> {
    let mut log =
        File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "{cargo:?}")?;
    let mut child = cargo
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cargo:?}"))?;
    // Both pipes are read at once (neither may fill up while the other is
    // read), into one channel, so the log keeps the order cargo wrote in.
    let (tx, rx) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let to_out = tx.clone();
    let stdout = thread::spawn(move || -> anyhow::Result<()> {
        for message in Message::parse_stream(stdout) {
            let out = match message.context("reading the eBPF build's JSON messages")? {
                Message::CompilerArtifact(Artifact {
                    executable: Some(exe),
                    target,
                    ..
                }) if target.name == BINARY => Output::Object(exe.into_std_path_buf()),
                Message::CompilerMessage(CompilerMessage { message, .. }) => Output::Compiler {
                    warning: message.level == DiagnosticLevel::Warning,
                    rendered: message.rendered.unwrap_or(message.message),
                },
                Message::TextLine(line) => Output::Text(line),
                _ => continue,
            };
            if to_out.send(out).is_err() {
                break;
            }
        }
        Ok(())
    });
    let stderr = BufReader::new(child.stderr.take().context("stderr")?);
    let stderr = thread::spawn(move || -> anyhow::Result<()> {
        for line in stderr.lines() {
            let line = line.context("reading the eBPF build's stderr")?;
            if tx.send(Output::Text(line)).is_err() {
                break;
            }
        }
        Ok(())
    });

    let mut object = None;
    // What a failure shows: compiler messages and cargo's own lines.
    let mut shown = Vec::new();
    for out in rx {
        match out {
            Output::Object(path) => object = Some(path),
            Output::Compiler { warning, rendered } => {
                if warning {
                    for line in rendered.trim_end().lines() {
                        println!("cargo:warning={line}");
                    }
                }
                write!(log, "{rendered}")?;
                shown.push(rendered);
            }
            Output::Text(line) => {
                writeln!(log, "{line}")?;
                let t = line.trim_start();
                if !(t.starts_with("Compiling ") || t.starts_with("Finished ")) {
                    shown.push(line + "\n");
                }
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {cargo:?}"))?;
    for reader in [stdout, stderr] {
        reader
            .join()
            .map_err(|_| anyhow!("a thread reading the eBPF build panicked"))??;
    }
    if !status.success() {
        for m in &shown {
            eprint!("{m}");
        }
        bail!(
            "building the eBPF programs failed ({status}); the whole output is in {}",
            log_path.display()
        );
    }
    object.with_context(|| {
        format!(
            "the eBPF build made no {BINARY} binary; see {}",
            log_path.display()
        )
    })
}
