//! The deployment's files (deploy/) and the Ansible of the test Python
//! environment, run offline against this machine.

use crate::*;
use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A tool of the Python environment (ansible-playbook, ansible-lint).
pub fn venv_bin(tool: &str) -> PathBuf {
    PathBuf::from(python()).parent().unwrap().join(tool)
}

/// Renders `src` (a path under deploy/) to `dest` with Ansible's own
/// template module, the `-e` arguments `vars` (`@file` relative to
/// deploy/, or `key=value`) applied in order.
pub fn ansible_template(src: &str, dest: &Path, vars: &[&str]) {
    let mut cmd = Command::new(venv_bin("ansible"));
    cmd.current_dir(deploy_dir())
        .env("ANSIBLE_LOCALHOST_WARNING", "false")
        .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "false")
        .args(["localhost", "-c", "local", "-i", "localhost,"])
        .args(["-m", "ansible.builtin.template"])
        .arg("-a")
        .arg(format!("src={src} dest={}", dest.display()))
        // The module runs with this environment's Python, not whatever
        // interpreter discovery would pick.
        .arg("-e")
        .arg(format!("ansible_python_interpreter={}", python()));
    for v in vars {
        cmd.args(["-e", v]);
    }
    sh(&mut cmd);
}
