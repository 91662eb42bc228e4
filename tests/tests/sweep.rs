//! Nothing left behind: an agent whose network namespace is gone leaves
//! pins and programs on the host's root cgroup; the next agent anywhere
//! (or `mtlb remove --stale`) removes them, and leaves live namespaces'
//! pins alone. Run as root through `cargo xtask test`.

use mtlb_tests::*;
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// The program ids of the cgroup links pinned in `dir`.
fn cgroup_prog_ids(dir: &Path) -> Vec<u64> {
    ["link_sock_ops", "link_bind4", "link_bind6"]
        .iter()
        .map(|l| {
            let path = dir.join(l);
            bpftool_json(&["link", "show", "pinned", path.to_str().unwrap()])["prog_id"]
                .as_u64()
                .expect("prog_id")
        })
        .collect()
}

/// Program ids attached to the cgroup2 root.
fn attached_to_root() -> Vec<u64> {
    let root = mtlb::system::mounts::cgroup2_mount().expect("a cgroup2 mount");
    bpftool_json(&["cgroup", "show", root.to_str().unwrap()])
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// A namespace of its own, not held open by the test: `ip netns del` and
/// the death of its last process end it.
struct Transient {
    name: String,
    ino: u64,
}

impl Transient {
    fn new(tag: &str) -> Self {
        let name = format!("mtlb-sweep-{tag}-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        let ino = std::fs::metadata(format!("/run/netns/{name}"))
            .unwrap()
            .ino();
        Self { name, ino }
    }

    fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/mtlb/{}", self.ino))
    }

    /// An agent in it (through `ip netns exec`: the pins are the host's).
    fn agent(&self) -> Agent {
        let bin = std::env::var("MTLB_BIN").expect("MTLB_BIN");
        let state = std::env::temp_dir().join(format!("mtlb-state-{}", self.name));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, &bin, "run", "--state-dir"])
            .arg(&state);
        let a = Agent::command(cmd, self.pin_dir());
        a.wait_for("steering TCP port");
        a
    }

    /// Deletes it (once; again, as on drop after the test did, is a no-op).
    fn delete(&self) {
        if std::path::Path::new("/run/netns").join(&self.name).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

impl Drop for Transient {
    fn drop(&mut self) {
        self.delete();
        // Only a dead namespace's: once this one is gone its inode number
        // may name another test's namespace.
        let link = self.pin_dir().join("link_sk_lookup");
        if matches!(mtlb::kernel::sys::pinned_netns_link_ino(&link), Ok(0)) {
            let _ = mtlb::kernel::pins::remove(&self.pin_dir());
        }
    }
}

/// Waits until the namespace's sk_lookup link reports itself detached:
/// the kernel dismantles a deleted namespace asynchronously and has no
/// event to wait on.
fn wait_detached(dir: &Path) {
    let link = dir.join("link_sk_lookup");
    let deadline = Instant::now() + wait_limit();
    loop {
        let info = bpftool_json(&["link", "show", "pinned", link.to_str().unwrap()]);
        if info["netns_ino"].as_u64() == Some(0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace's link is still attached: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An agent in a new namespace `tag`, killed, its namespace deleted:
/// returns the namespace and the programs its pins held on the cgroups.
fn gone(tag: &str) -> (Transient, Vec<u64>) {
    let ns = Transient::new(tag);
    let mut agent = ns.agent();
    let ids = cgroup_prog_ids(&ns.pin_dir());
    let attached = attached_to_root();
    assert!(ids.iter().all(|id| attached.contains(id)), "{ids:?}");
    agent.kill9();
    ns.delete();
    wait_detached(&ns.pin_dir());
    (ns, ids)
}

fn assert_swept(ns: &Transient, ids: &[u64]) {
    assert!(!ns.pin_dir().exists());
    let attached = attached_to_root();
    assert!(
        ids.iter().all(|id| !attached.contains(id)),
        "still attached to the cgroup2 root: {ids:?} in {attached:?}"
    );
}

/// One test, in sequence: any agent sweeps every namespace that is gone,
/// so two tests in parallel would sweep each other's.
#[test]
fn sweep_removes_pins_and_programs_of_namespaces_that_are_gone() {
    // A live namespace whose agent died, keeping its pins: never touched.
    let live = Netns::create();
    let mut kept = live.agent(&[]);
    kept.kill9();

    // `mtlb remove --stale`, with no agent anywhere.
    let (first, ids) = gone("remove");
    let here = Netns::create();
    let (ok, out) = mtlb_cli(&here, &["remove", "--stale"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("detached; removed {}", first.pin_dir().display())),
        "{out}"
    );
    assert_swept(&first, &ids);
    assert!(live.pin_dir().join("link_sk_lookup").exists());

    // The next agent anywhere.
    let (second, ids) = gone("agent");
    let next = here.agent(&[]);
    next.wait_for(&format!(
        "removed the pins of a network namespace that is gone in {}",
        second.pin_dir().display()
    ));
    assert_swept(&second, &ids);
    assert!(live.pin_dir().join("link_sk_lookup").exists());
    assert!(!next.log().contains(&live.pin_dir().display().to_string()));
}
