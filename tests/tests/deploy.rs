//! The deployment (deploy/): Ansible syntax and lint of both playbooks,
//! the mtlb role's config template for 2 and 3 replicas and for the
//! multi-host inventory checked by `mtlb check-config`, the BIRD role's
//! template parsed by `bird -p`, the systemd units, and `mtlb link`.
//! Offline; no VM is booted. The refresh program itself:
//! tests/tests/refresh.rs.

use mtlb_tests::{ansible_template, deploy_dir, venv_bin};
use std::{path::PathBuf, process::Command};

const PLAYBOOKS: [&str; 2] = ["playbooks/deploy.yml", "playbooks/refresh.yml"];

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn mtlb() -> Command {
    Command::new(std::env::var("MTLB_BIN").expect("MTLB_BIN"))
}

#[test]
fn playbook_syntax() {
    for inventory in ["inventory/hosts.ini", "inventory/multi-host.ini"] {
        for playbook in PLAYBOOKS {
            run(Command::new(venv_bin("ansible-playbook"))
                .current_dir(deploy_dir())
                .args(["--syntax-check", "-i", inventory, playbook]));
        }
    }
}

#[test]
fn ansible_lint_is_clean() {
    let bin = venv_bin("ansible-lint");
    // ansible-lint wants its environment's bin first in PATH.
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = run(Command::new(&bin)
        .current_dir(deploy_dir())
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .arg("--offline")
        .args(PLAYBOOKS));
    assert!(out.contains("0 failure(s), 0 warning(s)"), "{out}");
}

/// Renders the mtlb role's template with `extra` variables on top of the
/// inventory's and the role's defaults; returns the file's text after
/// `mtlb check-config` accepted it.
fn render(name: &str, extra: &[&str], with_group_vars: bool) -> String {
    let out = std::env::temp_dir().join(format!("mtlb-deploy-{}-{name}.toml", std::process::id()));
    let mut vars = vec!["@roles/mtlb/defaults/main.yml"];
    if with_group_vars {
        vars.push("@inventory/group_vars/all.yml");
    }
    vars.extend(extra);
    ansible_template("roles/mtlb/templates/mtlb.toml.j2", &out, &vars);
    let text = std::fs::read_to_string(&out).unwrap();
    let checked = run(mtlb().args(["check-config", "--config"]).arg(&out));
    assert!(checked.contains(": OK:"), "{checked}");
    let _ = std::fs::remove_file(out);
    text
}

#[test]
fn config_template_for_two_and_three_replicas() {
    let two = render("two", &[], true);
    assert!(two.contains("replicas = 2\n"), "{two}");
    assert!(two.contains("port = 443\n"), "{two}");
    assert!(two.contains("base_port = 10000\n"), "{two}");
    assert!(
        two.contains("secret = \"dd00000000000000000000000000000000\"\n"),
        "{two}"
    );
    assert!(two.contains("stats_port = 8404\n"), "{two}");
    assert!(two.contains("kind = \"mtproxy\"\n"), "{two}");
    // mtproto-proxy -u nobody binds its port as nobody.
    assert!(two.contains("replica_uids = [0, 65534]\n"), "{two}");
    let three = render("three", &["mtproxy_replicas=3"], true);
    assert!(three.contains("replicas = 3\n"), "{three}");
    // No VIPs, no announcing.
    assert!(!two.contains("[announce]"), "{two}");
}

/// The multi-host inventory's hosts: mtlb announces the VIP, into the
/// table the BIRD role learns.
#[test]
fn config_template_announces_the_fleets_vip() {
    let t = render(
        "anycast",
        &[
            "@inventory/group_vars/anycast.yml",
            "mtlb_announce_rise_ms=2000",
        ],
        true,
    );
    let announce = t.split_once("[announce]\n").map(|(_, a)| a);
    assert_eq!(
        announce,
        Some("vips = [\"192.0.2.80\"]\ntable = 4242\nrise_ms = 2000\n"),
        "{t}"
    );
}

/// Renders the BIRD role's template with its defaults and `extra`; returns
/// the text after `bird -p` parsed it.
fn render_bird(name: &str, extra: &[&str]) -> String {
    let dir = mtlb_tests::TempDir::new(&format!("bird-{name}"));
    let out = dir.path.join("bird.conf");
    let mut vars = vec!["@roles/bird/defaults/main.yml"];
    vars.extend(extra);
    ansible_template("roles/bird/templates/bird.conf.j2", &out, &vars);
    run(Command::new("bird").arg("-p").arg("-c").arg(&out));
    std::fs::read_to_string(&out).unwrap()
}

/// BIRD on the multi-host inventory's hosts: the VIP learned from mtlb's
/// table and exported alone, BFD under a second; an IPv6 VIP and router
/// get a session of their own. What BIRD does with it: tests/tests/anycast.rs.
#[test]
fn bird_template_exports_only_the_vips() {
    let fleet = render_bird(
        "fleet",
        &[
            "@inventory/group_vars/anycast.yml",
            // A fact on a real host.
            "bird_router_id=203.0.113.10",
        ],
    );
    for line in [
        "router id 203.0.113.10;",
        "  if net ~ [ 192.0.2.80/32 ] then accept;",
        "  kernel table 4242;",
        "    interval 100 ms;",
        "    multiplier 3;",
        "  local as 64511;",
        "  bfd on;",
        "  neighbor 203.0.113.1 as 64496;",
        "    export filter mtlb_vips4;",
    ] {
        assert!(fleet.lines().any(|l| l == line), "no {line:?}:\n{fleet}");
    }
    assert!(!fleet.contains("ipv6"), "{fleet}");
    let both = render_bird(
        "both",
        &[
            "@inventory/group_vars/anycast.yml",
            r#"{"mtlb_vips": ["192.0.2.80", "2001:db8:ff::80"], "bird_router_id": "203.0.113.10",
                "bird_neighbors": [{"address": "203.0.113.1", "as": 64496},
                                   {"address": "2001:db8:113::1", "as": 64496, "name": "up6"}]}"#,
        ],
    );
    for line in [
        "  if net ~ [ 2001:db8:ff::80/128 ] then accept;",
        "protocol kernel mtlb_announce6 {",
        "protocol bgp up6 from mtlb_upstream {",
        "  neighbor 2001:db8:113::1 as 64496;",
        "    export filter mtlb_vips6;",
    ] {
        assert!(both.lines().any(|l| l == line), "no {line:?}:\n{both}");
    }
    // Only VIPs: every export is one of the VIP filters, and those accept
    // nothing else.
    let exports: Vec<&str> = both.lines().filter(|l| l.contains("export ")).collect();
    assert_eq!(
        exports,
        [
            "    export none;",
            "    export none;",
            "    export filter mtlb_vips4;",
            "    export filter mtlb_vips6;"
        ],
        "{both}"
    );
}

#[test]
fn original_haproxy_variable_names_still_work() {
    let t = render(
        "legacy",
        // An old inventory: the original variables only.
        &[
            "haproxy_port=8443",
            "haproxy_stats_port=9404",
            "haproxy_balance_algorithm=leastconn",
            "mtproxy_replicas=2",
            "mtproxy_secret=dd00000000000000000000000000000000",
            "mtproxy_base_port=10000",
            "mtproxy_stats_base_port=11000",
        ],
        false,
    );
    assert!(t.contains("port = 8443\n"), "{t}");
    assert!(t.contains("stats_port = 9404\n"), "{t}");
    assert!(t.contains("algorithm = \"leastconn\"\n"), "{t}");
}

/// `systemd-analyze verify` of `units` (files in one directory), failing
/// on any line about them; skipped, with the reason printed, where
/// systemd-analyze is missing.
fn verify_units(units: &[PathBuf]) {
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: systemd-analyze verify: systemd-analyze is not installed");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    // Lines about other units of this machine are not ours.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| {
            units
                .iter()
                .any(|u| l.contains(u.file_name().unwrap().to_str().unwrap()))
        })
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(deploy_dir().join("roles/mtlb/files/mtlb.service")).unwrap();
    let bin = std::env::var("MTLB_BIN").unwrap();
    assert!(unit.contains("Restart=always") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(unit.contains("Type=notify"));
    // systemd-analyze checks that the binaries exist: point at this build.
    let dir = mtlb_tests::TempDir::new("unit");
    let path = dir.path.join("mtlb.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/mtlb", &bin)).unwrap();
    verify_units(&[path]);
}

/// The refresh's service and timer as the mtproxy role installs them: the
/// timer from its template, with the role's defaults and with a schedule
/// of the inventory's.
#[test]
fn refresh_units_verify() {
    let roles = deploy_dir().join("roles/mtproxy");
    let unit = std::fs::read_to_string(roles.join("files/mtproxy-refresh.service")).unwrap();
    assert!(unit.contains("Type=oneshot"), "{unit}");
    // JSON: a key=value argument ends at a space.
    let inventory = [
        r#"{"mtproxy_refresh_on_calendar": "*-*-* 04:30:00"}"#,
        "mtproxy_refresh_randomized_delay=20min",
    ];
    for (extra, calendar, delay) in [
        (&[][..], "daily", "1h"),
        (&inventory[..], "*-*-* 04:30:00", "20min"),
    ] {
        let dir = mtlb_tests::TempDir::new("refresh-units");
        let service = dir.path.join("mtproxy-refresh.service");
        // systemd-analyze checks that ExecStart exists: the role's copy.
        let program = roles.join("files/mtproxy-refresh").canonicalize().unwrap();
        std::fs::write(
            &service,
            unit.replace("/usr/local/sbin/mtproxy-refresh", program.to_str().unwrap()),
        )
        .unwrap();
        let timer = dir.path.join("mtproxy-refresh.timer");
        let mut vars = vec!["@roles/mtproxy/defaults/main.yml"];
        vars.extend(extra);
        ansible_template(
            "roles/mtproxy/templates/mtproxy-refresh.timer.j2",
            &timer,
            &vars,
        );
        let text = std::fs::read_to_string(&timer).unwrap();
        for line in ["Persistent=true", "WantedBy=timers.target"] {
            assert!(text.lines().any(|l| l == line), "{text}");
        }
        assert!(
            text.contains(&format!("\nOnCalendar={calendar}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("\nRandomizedDelaySec={delay}\n")),
            "{text}"
        );
        verify_units(&[timer, service]);
    }
}

#[test]
fn link_output() {
    let dir = std::env::temp_dir().join(format!("mtlb-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = mtlb_tests::Config::new()
        .port(443)
        .secret("dd0123456789abcdef0123456789abcdef")
        .write_to(&dir.join("mtlb.toml"));
    let out = run(mtlb()
        .args(["link", "--server", "203.0.113.5", "--config"])
        .arg(&cfg));
    assert_eq!(
        out,
        "tg://proxy?server=203.0.113.5&port=443&secret=dd0123456789abcdef0123456789abcdef\n\
         https://t.me/proxy?server=203.0.113.5&port=443&secret=dd0123456789abcdef0123456789abcdef\n"
    );
    let bad = mtlb()
        .args(["link", "--server", "a&b", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the prometheus_rules role on this machine (connection local) with
/// `extra` variables; returns ansible-playbook's output.
fn rules_role(dir: &std::path::Path, extra: &[String]) -> String {
    let play = dir.join("play.yml");
    std::fs::write(
        &play,
        "- name: Alert rules\n  hosts: localhost\n  gather_facts: false\n  roles:\n    - prometheus_rules\n",
    )
    .unwrap();
    let mut cmd = Command::new(venv_bin("ansible-playbook"));
    cmd.env("ANSIBLE_ROLES_PATH", deploy_dir().join("roles"))
        .env("ANSIBLE_LOCALHOST_WARNING", "false")
        .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "false")
        .env("NO_COLOR", "1")
        .args(["-i", "localhost,", "-c", "local"])
        .arg(&play)
        .arg("-e")
        .arg(format!(
            "ansible_python_interpreter={}",
            mtlb_tests::python()
        ))
        // No Prometheus service to reload here.
        .args(["-e", "prometheus_rules_service="]);
    for e in extra {
        cmd.args(["-e", e]);
    }
    run(&mut cmd)
}

/// The role installs the rules file (checked by promtool) where
/// `prometheus_rules_dir` says, and nothing when it is unset.
#[test]
fn alert_rules_role_installs_the_rules_where_prometheus_reads_them() {
    let dir = mtlb_tests::TempDir::new("rules-role");
    let rules = dir.path.join("etc/prometheus/rules");
    let out = rules_role(&dir.path, &[]);
    assert!(out.contains("prometheus_rules_dir is not set"), "{out}");
    assert!(!rules.exists());
    let out = rules_role(
        &dir.path,
        &[format!("prometheus_rules_dir={}", rules.display())],
    );
    assert!(out.contains("failed=0"), "{out}");
    assert_eq!(
        std::fs::read(rules.join("mtlb.rules.yml")).unwrap(),
        std::fs::read(deploy_dir().join("roles/prometheus_rules/files/mtlb.rules.yml")).unwrap()
    );
    // Again: nothing changes.
    let out = rules_role(
        &dir.path,
        &[format!("prometheus_rules_dir={}", rules.display())],
    );
    assert!(out.contains("changed=0"), "{out}");
}

/// `cargo xtask vm-deploy` provisions its guest the way the Vagrantfile's
/// ansible provisioner does: same playbook, same group, same variables
/// file (it runs for real only by hand: it boots a VM for many minutes).
#[test]
fn vagrant_provisioner_matches_vm_deploy() {
    let vagrantfile = std::fs::read_to_string(deploy_dir().join("Vagrantfile")).unwrap();
    let xtask = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/vm-deploy/src/lib.rs"),
    )
    .unwrap();
    let konst = |name: &str| {
        xtask
            .lines()
            .find_map(|l| l.strip_prefix(&format!("pub const {name}: &str = \"")))
            .and_then(|v| v.strip_suffix("\";"))
            .unwrap_or_else(|| panic!("{name} not in deploy/vm-deploy/src/lib.rs"))
            .to_string()
    };
    let (playbook, vars) = (konst("PLAYBOOK"), konst("GROUP_VARS"));
    assert!(deploy_dir().join(&playbook).exists() && deploy_dir().join(&vars).exists());
    for line in [
        format!("ansible.playbook = \"{playbook}\""),
        "ansible.config_file = \"ansible.cfg\"".to_string(),
        "ansible.groups = { \"mtproxy\" => [\"default\"] }".to_string(),
        format!("ansible.extra_vars = \"{vars}\""),
    ] {
        assert!(
            vagrantfile.lines().any(|l| l.trim() == line),
            "Vagrantfile lacks `{line}`"
        );
    }
    assert!(
        xtask.contains("[mtproxy]\\n"),
        "vm-deploy's inventory group"
    );
}
