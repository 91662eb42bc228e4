//! mtproxy-refresh (deploy/roles/mtproxy/files/mtproxy-refresh), the daily
//! refresh of Telegram's proxy-secret and proxy-multi.conf, against an HTTP
//! server on the loopback of the test's own network namespace (nothing
//! leaves it), with the settings file the mtproxy role renders. `mtlb` is a
//! recorder first on PATH that logs its arguments: the rollout verb is
//! tested with the agent; here, whether and how the refresh calls it.

use mtlb_tests::*;
use std::{
    io::Read as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

const SECRET: &str = "proxy-secret";
const CONFIG: &str = "proxy-multi.conf";
/// The role's default rollout, as the recorder logs it.
const ROLLOUT: &str = "[rollout][--exec][docker restart mtproxy{n}][--grace][5s]";
const SUCCESS: &str = "mtlb_refresh_last_success_timestamp_seconds";
const CHANGE: &str = "mtlb_refresh_last_change_timestamp_seconds";
const FAILURE: &str = "mtlb_refresh_last_failure_timestamp_seconds";

fn program() -> PathBuf {
    deploy_dir().join("roles/mtproxy/files/mtproxy-refresh")
}

/// A proxy-multi.conf shaped like getProxyConfig's answer; `extra` adds
/// a DC (a change).
fn config(extra: bool) -> Vec<u8> {
    let mut text = String::from(
        "# force_probability 10 10\ndefault 2;\n\
         proxy_for 1 149.154.175.50:8888;\nproxy_for -1 149.154.175.50:8888;\n\
         proxy_for 2 149.154.161.144:8888;\nproxy_for -2 149.154.162.38:8888;\n\
         proxy_for 4 91.108.4.195:8888;\nproxy_for -4 149.154.165.109:8888;\n",
    );
    if extra {
        text.push_str("proxy_for 203 91.105.192.100:8888;\n");
    }
    text.into_bytes()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One host: its replicas' directory (etc/), the served files, the
/// recorder, the role's settings pointing at all of them.
struct Host {
    dir: TempDir,
    server: PyProcess,
    port: u16,
    settings: PathBuf,
    ns: Netns,
}

impl Host {
    fn new() -> Self {
        let ns = Netns::new();
        let dir = TempDir::new("refresh");
        let served = dir.path.join("served");
        std::fs::create_dir(&served).unwrap();
        let port = free_port();
        let server = PyProcess::start(
            &ns,
            "file_server.py",
            &[&port.to_string(), served.to_str().unwrap()],
        );
        let bin = dir.path.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let recorder = bin.join("mtlb");
        std::fs::write(
            &recorder,
            format!(
                "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done >> {log}\n\
                 echo >> {log}\nexit \"$(cat {status} 2>/dev/null || echo 0)\"\n",
                log = dir.path.join("mtlb.log").display(),
                status = dir.path.join("mtlb.status").display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&recorder, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The settings as the role writes them, for this test's server and
        // directories.
        let settings = dir.path.join("settings.json");
        let url = |name: &str| format!("http://127.0.0.1:{port}/{name}");
        ansible_template(
            "roles/mtproxy/templates/mtproxy-refresh.json.j2",
            &settings,
            &[
                "@roles/mtproxy/defaults/main.yml",
                &format!("mtproxy_config_url={}", url("getProxyConfig")),
                &format!("mtproxy_secret_url={}", url("getProxySecret")),
                &format!("mtproxy_config_dir={}", dir.path.join("etc").display()),
                &format!(
                    "mtproxy_refresh_textfile_dir={}",
                    dir.path.join("textfile").display()
                ),
            ],
        );
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&settings).unwrap()).unwrap();
        json["state_dir"] = dir.path.join("state").to_str().unwrap().into();
        std::fs::write(&settings, json.to_string()).unwrap();
        Self {
            dir,
            server,
            port,
            settings,
            ns,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// What the server answers: the bytes, or a 404 for None.
    fn serve(&self, secret: Option<&[u8]>, config: Option<&[u8]>) {
        for (name, data) in [("getProxySecret", secret), ("getProxyConfig", config)] {
            let path = self.dir.path.join("served").join(name);
            match data {
                Some(d) => std::fs::write(path, d).unwrap(),
                None => {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path.join("etc").join(name)
    }

    /// The host's files before the refresh, as an earlier one left them.
    fn place(&self, secret: &[u8], config: &[u8]) {
        std::fs::create_dir_all(self.dir.path.join("etc")).unwrap();
        std::fs::write(self.path(SECRET), secret).unwrap();
        std::fs::write(self.path(CONFIG), config).unwrap();
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The names in the replicas' directory, sorted.
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Runs mtproxy-refresh in the namespace: (success, stdout). Nothing
    /// may go to stderr (a Python traceback would).
    fn run(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(python());
        cmd.arg(program())
            .arg("--settings")
            .arg(&self.settings)
            .args(args)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.dir.path.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        for proxy in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
            cmd.env_remove(proxy);
        }
        self.ns.run_inside(&mut cmd);
        let (status, out, err) = run_bounded(&mut cmd, scaled(Duration::from_secs(60)));
        let out = String::from_utf8(out).unwrap();
        assert!(
            err.is_empty(),
            "mtproxy-refresh wrote to stderr:\n{err}\n{out}"
        );
        (status.success(), out)
    }

    /// Runs it and returns its stdout and the time span it ran in.
    fn run_timed(&self, args: &[&str]) -> (bool, String, (f64, f64)) {
        let t0 = unix_now().floor();
        let (ok, out) = self.run(args);
        (ok, out, (t0, unix_now().ceil()))
    }

    /// The recorder's calls, one line each.
    fn rollouts(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path.join("mtlb.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Makes the recorder exit with `status` from now on.
    fn rollout_exits(&self, status: i32) {
        std::fs::write(self.dir.path.join("mtlb.status"), status.to_string()).unwrap();
    }

    /// A timestamp of the textfile collector's file.
    fn stamp(&self, name: &str) -> f64 {
        let path = self.dir.path.join("textfile/mtlb_refresh.prom");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        metric(&text, name).unwrap_or_else(|| panic!("{name} not in\n{text}"))
    }
}

fn within(v: f64, (t0, t1): (f64, f64)) -> bool {
    t0 <= v && v <= t1
}

/// Both files differ from the host's: both are replaced (the old ones kept
/// as .prev), the replicas restarted once, the stamps set; then only the
/// config changes: only it is replaced, one more rollout.
#[test]
fn changed_files_are_replaced_and_the_replicas_restarted_once() {
    let host = Host::new();
    let (old_secret, new_secret) = (random_bytes(128), random_bytes(128));
    host.place(&old_secret, &config(false));
    host.serve(Some(&new_secret), Some(&config(true)));

    let (ok, out, span) = host.run_timed(&[]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with(&format!(
            "changed: {SECRET}, {CONFIG}; rolling restart: mtlb rollout --exec 'docker restart mtproxy{{n}}' --grace 5s\n"
        )),
        "{out}"
    );
    assert!(
        out.ends_with("rolling restart done: every replica runs with the current files\n"),
        "{out}"
    );
    assert_eq!(host.read(SECRET), new_secret);
    assert_eq!(host.read(CONFIG), config(true));
    assert_eq!(host.read(&format!("{SECRET}.prev")), old_secret);
    assert_eq!(host.read(&format!("{CONFIG}.prev")), config(false));
    // Read by mtproto-proxy as root, before it drops to nobody.
    for name in [SECRET, CONFIG] {
        let mode = std::fs::metadata(host.path(name)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    // No staging left behind.
    assert_eq!(
        host.listing(),
        [CONFIG, "proxy-multi.conf.prev", SECRET, "proxy-secret.prev"]
    );
    assert_eq!(host.rollouts(), [ROLLOUT]);
    let lines = host.server.lines();
    for path in ["/getProxySecret", "/getProxyConfig"] {
        assert!(lines.contains(&format!("GET {path} 200")), "{lines:?}");
    }
    assert!(within(host.stamp(SUCCESS), span) && within(host.stamp(CHANGE), span));
    assert_eq!(host.stamp(FAILURE), 0.0);

    // Telegram changes the list again; the secret stays.
    host.serve(Some(&new_secret), Some(&config(false)));
    let (ok, out, span) = host.run_timed(&[]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with(&format!("changed: {CONFIG}; rolling restart: ")),
        "{out}"
    );
    assert_eq!(host.read(CONFIG), config(false));
    assert_eq!(host.read(&format!("{CONFIG}.prev")), config(true));
    // The secret's .prev is still the one before the first change.
    assert_eq!(host.read(&format!("{SECRET}.prev")), old_secret);
    assert_eq!(host.rollouts(), [ROLLOUT, ROLLOUT]);
    assert!(within(host.stamp(CHANGE), span));
}

/// The served files are the host's: nothing is written, nothing restarts;
/// the success is stamped, the change is not.
#[test]
fn unchanged_files_restart_nothing() {
    let host = Host::new();
    let secret = random_bytes(128);
    host.place(&secret, &config(false));
    host.serve(Some(&secret), Some(&config(false)));
    let inodes: Vec<u64> = [SECRET, CONFIG]
        .iter()
        .map(|n| std::fs::metadata(host.path(n)).unwrap().ino())
        .collect();

    for _ in 0..2 {
        let (ok, out, span) = host.run_timed(&[]);
        assert!(ok, "{out}");
        assert_eq!(
            out,
            format!(
                "unchanged: {SECRET} 128 bytes; {CONFIG} middle proxies: 6 (6 DCs), default DC 2\n"
            )
        );
        assert!(within(host.stamp(SUCCESS), span));
        assert_eq!(host.stamp(CHANGE), 0.0);
    }
    assert!(host.rollouts().is_empty(), "{:?}", host.rollouts());
    assert_eq!(host.listing(), [CONFIG, SECRET]);
    let after: Vec<u64> = [SECRET, CONFIG]
        .iter()
        .map(|n| std::fs::metadata(host.path(n)).unwrap().ino())
        .collect();
    assert_eq!(inodes, after, "a file was replaced");
}

/// A download that fails or a file the server would not take: the run
/// fails with the reason, the host's files stay as they were (both, even
/// when the other one changed), nothing restarts, the failure is stamped
/// and the success is not.
#[test]
fn a_broken_download_changes_nothing() {
    let host = Host::new();
    let (old_secret, new_secret) = (random_bytes(128), random_bytes(128));
    host.place(&old_secret, &config(false));
    let html =
        b"<!DOCTYPE html><html><body>Service unavailable, try again later.......</body></html>\n";
    let (secret_url, config_url) = (host.url("getProxySecret"), host.url("getProxyConfig"));
    // (what, served secret, served config (None: 404), the line it prints)
    type Case = (&'static str, Option<Vec<u8>>, Option<Vec<u8>>, String);
    let cases: Vec<Case> = vec![
        (
            "empty secret",
            Some(vec![]),
            Some(config(true)),
            format!("failed: {SECRET} from {secret_url} is not valid: empty"),
        ),
        (
            "short secret",
            Some(random_bytes(16)),
            Some(config(true)),
            format!(
                "failed: {SECRET} from {secret_url} is not valid: 16 bytes; the server takes 32..256"
            ),
        ),
        (
            "an error page as the secret",
            Some(html.to_vec()),
            Some(config(true)),
            format!("failed: {SECRET} from {secret_url} is not valid: an HTML page, not a secret"),
        ),
        (
            "empty config",
            Some(new_secret.clone()),
            Some(vec![]),
            format!("failed: {CONFIG} from {config_url} is not valid: empty"),
        ),
        (
            "an error page as the config",
            Some(new_secret.clone()),
            Some(html.to_vec()),
            format!(
                "failed: {CONFIG} from {config_url} is not valid: line 1: expected \
                 'proxy_for <dc> <host>:<port>;' or 'default <dc>;', not '<!DOCTYPE html><html><body>Service unava...'"
            ),
        ),
        (
            "a config cut short",
            Some(new_secret.clone()),
            // The last statement without its ';'.
            Some(config(true)[..config(true).len() - 2].to_vec()),
            format!(
                "failed: {CONFIG} from {config_url} is not valid: line 9: ';' missing after 'proxy_for 203 91.105.192.100:8888'"
            ),
        ),
        (
            "secret 404",
            None,
            Some(config(true)),
            format!("failed: download {secret_url}: HTTP 404 File not found"),
        ),
        (
            "config 404",
            Some(new_secret.clone()),
            None,
            format!("failed: download {config_url}: HTTP 404 File not found"),
        ),
    ];
    for (what, secret, conf, message) in cases {
        host.serve(secret.as_deref(), conf.as_deref());
        let (ok, out, span) = host.run_timed(&[]);
        assert!(!ok, "{what}: succeeded:\n{out}");
        assert_eq!(out, format!("{message}\n"), "{what}");
        assert_eq!(host.read(SECRET), old_secret, "{what}");
        assert_eq!(host.read(CONFIG), config(false), "{what}");
        assert_eq!(host.listing(), [CONFIG, SECRET], "{what}");
        assert!(host.rollouts().is_empty(), "{what}: {:?}", host.rollouts());
        assert!(within(host.stamp(FAILURE), span), "{what}");
        assert_eq!(host.stamp(SUCCESS), 0.0, "{what}");
        assert_eq!(host.stamp(CHANGE), 0.0, "{what}");
    }
    // Nothing was reached but this test's server.
    let lines = host.server.lines();
    assert!(lines.iter().all(|l| l.contains(" /getProxy")), "{lines:?}");
}

/// The files changed and `mtlb rollout` failed: the new files stay, the
/// run fails, and the next run restarts the replicas although nothing
/// changed since; the one after restarts nothing.
#[test]
fn a_failed_rolling_restart_is_owed_to_the_next_run() {
    let host = Host::new();
    let secret = random_bytes(128);
    host.place(&secret, &config(false));
    host.serve(Some(&secret), Some(&config(true)));
    host.rollout_exits(3);

    let (ok, out, span) = host.run_timed(&[]);
    assert!(!ok, "{out}");
    assert!(
        out.ends_with(
            "failed: rolling restart: mtlb rollout --exec 'docker restart mtproxy{n}' --grace 5s \
             exited with status 3; the new files are in place, the next run restarts the replicas again\n"
        ),
        "{out}"
    );
    assert_eq!(host.read(CONFIG), config(true));
    assert_eq!(host.rollouts(), [ROLLOUT]);
    assert!(within(host.stamp(CHANGE), span) && within(host.stamp(FAILURE), span));
    assert_eq!(host.stamp(SUCCESS), 0.0);

    host.rollout_exits(0);
    let (ok, out) = host.run(&[]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with("unchanged; rolling restart owed by a failed run: mtlb rollout "),
        "{out}"
    );
    assert_eq!(host.rollouts(), [ROLLOUT, ROLLOUT]);
    let (ok, out) = host.run(&[]);
    assert!(ok && out.starts_with("unchanged: "), "{out}");
    assert_eq!(host.rollouts().len(), 2);
}

/// The deploy's first fetch (`--no-rollout`): no directory yet, both files
/// put in place, no replica to restart.
#[test]
fn the_first_fetch_restarts_nothing() {
    let host = Host::new();
    let secret = random_bytes(128);
    host.serve(Some(&secret), Some(&config(false)));
    let (ok, out, span) = host.run_timed(&["--no-rollout"]);
    assert!(ok, "{out}");
    assert_eq!(
        out,
        format!(
            "changed: {SECRET}, {CONFIG}; replicas not restarted (--no-rollout): they read the files when they start\n"
        )
    );
    assert_eq!(host.read(SECRET), secret);
    assert_eq!(host.read(CONFIG), config(false));
    assert_eq!(host.listing(), [CONFIG, SECRET]);
    assert!(host.rollouts().is_empty());
    assert!(within(host.stamp(SUCCESS), span) && within(host.stamp(CHANGE), span));
}

/// The checks read proxy-multi.conf as mtproto-proxy's parser does and
/// take the secret lengths it takes (`--check-config`, `--check-secret`).
#[test]
fn the_checks_take_what_the_server_takes() {
    let dir = TempDir::new("refresh-check");
    let check = |flag: &str, data: &[u8]| {
        let path = dir.path.join("file");
        std::fs::write(&path, data).unwrap();
        let mut cmd = Command::new(python());
        cmd.arg(program()).arg(flag).arg(&path);
        let (status, out, err) = run_bounded(&mut cmd, scaled(Duration::from_secs(30)));
        assert!(err.is_empty(), "{err}");
        let out = String::from_utf8(out).unwrap();
        let prefix = format!("{}: ", path.display());
        let line = out.trim_end().replace(&prefix, "");
        (status.success(), line)
    };
    for (conf, want) in [
        (
            &b"default 2;\nproxy_for 2 [2001:b28:f23d:f001::a]:8888;\nproxy 1.2.3.4 : 80;\n"[..],
            "OK: middle proxies: 2 (2 DCs), default DC 2",
        ),
        (
            b"timeout 500; min_connections 2; max_connections 8;\nproxy_for 2 mp.example.net:8888;",
            "OK: middle proxies: 1 (1 DCs)",
        ),
        (
            b"proxy_for 1 1.2.3.4:1;\nproxy_for 2 1.2.3.4:1;\nproxy_for 1 1.2.3.5:1;\n",
            "failed: line 3: middle proxies of DC 1 are not one after another",
        ),
        (
            b"default 2;\n",
            "failed: no middle proxy (no 'proxy_for <dc> <host>:<port>;' line)",
        ),
        (
            b"proxy_for 2 1.2.3.4:65536;\n",
            "failed: line 1: port '65536' is not 1..65535",
        ),
        (
            b"proxy_for 40000 1.2.3.4:1;\n",
            "failed: line 1: DC '40000' is not an integer in -32768..32767",
        ),
        (
            b"proxy_for 2 1.2.3.4;\n",
            "failed: line 1: '1.2.3.4' is not <host>:<port>",
        ),
        (
            b"proxy_for 2 1.2.3.4:1;;\n",
            "failed: line 1: empty statement",
        ),
        (
            b"timeout 5;\nproxy_for 2 1.2.3.4:1;\n",
            "failed: line 1: timeout (ms) '5' is not an integer in 10..30000",
        ),
        (
            "proxy_for 2 1.2.3.4:1; # caf\u{e9}\n".as_bytes(),
            "failed: not text: byte 28 is not ASCII",
        ),
    ] {
        assert_eq!(
            check("--check-config", conf),
            (want.starts_with("OK"), want.to_string()),
            "{}",
            String::from_utf8_lossy(conf)
        );
    }
    for (len, ok) in [(31, false), (32, true), (256, true), (257, false)] {
        let (got, line) = check("--check-secret", &random_bytes(len));
        assert_eq!(got, ok, "{len} bytes: {line}");
    }
}
