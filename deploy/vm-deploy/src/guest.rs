//! The running guest: QEMU under software emulation (KVM guests fail or
//! hang on this machine kind), user networking with its forwards bound to
//! 127.0.0.1 only, and ssh into it as `vagrant`. Dropping a [`Guest`] kills
//! QEMU; the disk is opened with `-snapshot`, so the cached image is never
//! written and a run leaves nothing in it.

use super::disk::Image;
use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

pub const MEMORY_MB: u32 = 2048;
pub const CPUS: u32 = 2;

pub struct Guest {
    child: Child,
    /// Host port forwarded to the guest's ssh (22).
    pub ssh_port: u16,
    /// Host port forwarded to the guest's balanced port (443).
    pub https_port: u16,
    key: PathBuf,
    pub console: PathBuf,
}

/// A port free on 127.0.0.1 now (QEMU binds it a moment later; it fails to
/// start if someone took it in between, which [`Guest::wait_ssh`] reports).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Guest {
    pub fn boot(image: &Image, run_dir: &Path, host: &dyn crate::Host) -> anyhow::Result<Guest> {
        if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
            host.apt_install("qemu-system-x86", "to boot the vm-deploy guest")?;
        }
        let ssh_port = free_port()?;
        let https_port = free_port()?;
        let console = run_dir.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-cpu", "max"])
            .args(["-smp", &CPUS.to_string(), "-m", &MEMORY_MB.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", "root=/dev/vda rw console=ttyS0 quiet"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", image.disk.display()))
            .arg("-snapshot")
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{https_port}-:443"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(run_dir.join("qemu.log"))?)
            .stderr(std::fs::File::create(run_dir.join("qemu.err"))?);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(Guest {
            child,
            ssh_port,
            https_port,
            key: image.key.clone(),
            console,
        })
    }

    /// Waits until `ssh vagrant@guest true` succeeds; bounded.
    pub fn wait_ssh(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({status}) before ssh answered; console:\n{}",
                    self.console_tail()
                );
            }
            if self.ssh("true").is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no ssh into the guest within {} s; console:\n{}",
                    timeout.as_secs(),
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// ssh's options for this guest (also given to Ansible): our key, no
    /// host key bookkeeping (each image has new host keys; the port is
    /// loopback-only and ours).
    pub fn ssh_options(&self) -> Vec<String> {
        [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn key(&self) -> &Path {
        &self.key
    }

    /// Runs `script` in the guest's shell as `vagrant`; its output, whatever
    /// the exit status.
    pub fn ssh(&self, script: &str) -> anyhow::Result<Output> {
        Command::new("ssh")
            .args(self.ssh_options())
            .arg("-i")
            .arg(&self.key)
            .arg("-p")
            .arg(self.ssh_port.to_string())
            .arg("vagrant@127.0.0.1")
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .context("running ssh")
    }

    /// Copies `files` into the guest's directory `dir` (scp).
    pub fn put(&self, files: &[&Path], dir: &str) -> anyhow::Result<()> {
        let out = Command::new("scp")
            .args(self.ssh_options())
            .arg("-i")
            .arg(&self.key)
            .arg("-P")
            .arg(self.ssh_port.to_string())
            .args(files)
            .arg(format!("vagrant@127.0.0.1:{dir}/"))
            .stdin(Stdio::null())
            .output()
            .context("running scp")?;
        if !out.status.success() {
            bail!(
                "scp to the guest failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `script` in the guest; its stdout, or an error with its output
    /// when it fails.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let out = self.ssh(script)?;
        if !out.status.success() {
            bail!(
                "in the guest: `{script}` failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // Nothing in the guest needs to survive: its disk writes go to
        // QEMU's snapshot file, which goes with the process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
