//! The Debian 12 guest of `cargo xtask vm-deploy`: a root file system built
//! by mmdebstrap from Debian's packages, packed into an ext4 image with
//! `mkfs.ext4 -d` (no loop mount), and the kernel and initrd taken out of it
//! so QEMU boots them directly (no boot loader, no partition table).
//!
//! The guest has no internet: everything the playbook installs (the common
//! role's docker.io, bpftool, iproute2, curl) and everything Ansible needs
//! on the managed host (python3, python3-apt for the apt module, sudo) is
//! in the image already. A `vagrant` user with passwordless sudo and an ssh
//! key of ours stands in for the Vagrant box's.
//!
//! Cached under target/vm-deploy/image and rebuilt only when the recipe
//! below changes (the recipe text is the cache key).

use anyhow::{Context as _, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

/// Packages on top of mmdebstrap's `apt` variant (Essential + apt).
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    // Virtio drivers as modules in the initrd; smaller than the generic
    // kernel's module set, which is most of an emulated boot's time.
    "linux-image-cloud-amd64",
    // The common role's packages (deploy/roles/common/tasks/main.yml).
    "docker.io",
    "bpftool",
    "iproute2",
    "curl",
    // Ansible on the managed host: its modules run in python3; the apt
    // module needs python3-apt (and would fetch it online otherwise).
    "python3",
    "python3-apt",
    "sudo",
    // The middle-proxy stand-in (tests/fixtures/mtproxy/middle_proxy.py),
    // which runs in the guest: its AES.
    "python3-cryptography",
    "ca-certificates",
    // Debian's kernel enables AppArmor, and dockerd then refuses to start
    // containers without apparmor_parser (Debian hosts, Vagrant's box
    // among them, have it).
    "apparmor",
];

/// Guest disk size (sparse; the root file system is about 0.6 GB).
const DISK_SIZE: &str = "4G";

/// The built image.
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The private key of the guest's `vagrant` user.
    pub key: PathBuf,
}

/// The image, built now if it is missing or its recipe changed.
pub fn ensure(root: &Path, host: &dyn crate::Host) -> anyhow::Result<Image> {
    let dir = root.join("target/vm-deploy/image");
    let image = Image {
        disk: dir.join("disk.raw"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        key: dir.join("id_ed25519"),
    };
    let stamp = dir.join("recipe");
    let recipe = recipe_text(&image.key);
    if image.disk.exists()
        && image.kernel.exists()
        && image.initrd.exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == recipe)
    {
        return Ok(image);
    }
    for (pkg, file) in [
        ("mmdebstrap", "/usr/bin/mmdebstrap"),
        ("e2fsprogs", "/usr/sbin/mkfs.ext4"),
        ("openssh-client", "/usr/bin/ssh-keygen"),
    ] {
        if !Path::new(file).exists() {
            host.apt_install(pkg, "to build the vm-deploy guest image")?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let t0 = Instant::now();
    eprintln!(
        "vm-deploy: building the Debian 12 guest image (mmdebstrap, {} packages) in {}",
        PACKAGES.len(),
        dir.display()
    );
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "mtlb-vm-deploy",
            "-f",
        ])
        .arg(&image.key))?;
    let rootfs = dir.join("rootfs");
    let log = dir.join("mmdebstrap.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(mmdebstrap_args(&image.key))
        .arg("bookworm")
        .arg(&rootfs)
        .stdout(out.try_clone()?)
        .stderr(out);
    let status = cmd.status().context("running mmdebstrap")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status}); see {}", log.display());
    }
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(&boot)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    std::fs::copy(find("vmlinuz-")?, &image.kernel)?;
    std::fs::copy(find("initrd.img-")?, &image.initrd)?;
    // mkfs.ext4 -d copies the tree with its owners and modes as root.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "mtlb-root", "-d"])
        .arg(&rootfs)
        .arg(&image.disk)
        .arg(DISK_SIZE))?;
    std::fs::remove_dir_all(&rootfs)?;
    std::fs::write(&stamp, recipe)?;
    eprintln!(
        "vm-deploy: guest image built in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(image)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Everything that decides the image's content, as one text.
fn recipe_text(key: &Path) -> String {
    mmdebstrap_args(key).join("\n") + "\nsize " + DISK_SIZE + "\n"
}

fn mmdebstrap_args(key: &Path) -> Vec<String> {
    let pubkey = format!("{}.pub", key.display());
    let mut args = vec![
        "--mode=root".to_string(),
        "--variant=apt".to_string(),
        format!("--include={}", PACKAGES.join(",")),
    ];
    // Documentation and translations: a tenth of the image, never read.
    for p in [
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/locale/*",
    ] {
        args.push(format!("--dpkg=path-exclude={p}"));
    }
    args.push("--dpkg=path-include=/usr/share/doc/*/copyright".into());
    // Hooks run on this machine with the root file system's path as $1.
    let hooks = [
        r#"echo mtlb > "$1/etc/hostname""#.to_string(),
        r#"printf '127.0.0.1 localhost\n127.0.1.1 mtlb\n' > "$1/etc/hosts""#.into(),
        // QEMU's user network: DHCP from 10.0.2.2, its DNS at 10.0.2.3
        // (which answers nothing useful: the guest is offline).
        r#"printf '[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n' > "$1/etc/systemd/network/10-qemu.network""#.into(),
        r#"chroot "$1" systemctl enable systemd-networkd"#.into(),
        r#"echo 'nameserver 10.0.2.3' > "$1/etc/resolv.conf""#.into(),
        r#"echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$1/etc/fstab""#.into(),
        // As Vagrant's boxes have it: user vagrant, passwordless sudo,
        // logged in with a key.
        r#"chroot "$1" useradd -m -s /bin/bash -G sudo vagrant"#.into(),
        r#"echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$1/etc/sudoers.d/vagrant""#.into(),
        format!(
            r#"install -d -m 700 "$1/home/vagrant/.ssh" && install -m 600 '{pubkey}' "$1/home/vagrant/.ssh/authorized_keys" && chroot "$1" chown -R vagrant:vagrant /home/vagrant/.ssh"#
        ),
    ];
    for h in hooks {
        args.push(format!("--customize-hook={h}"));
    }
    args
}
