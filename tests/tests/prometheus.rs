//! Prometheus for real: Debian's `prometheus` (installed by `cargo xtask
//! test`) scrapes a running agent, with mtlb's alert rules loaded, inside
//! the test's namespace; every expression of `dashboards/mtlb.json` is
//! evaluated through its HTTP API; `promtool` checks `/metrics` and the
//! rules, and runs the rules' unit tests. A missing prometheus or promtool
//! fails these tests: the xtask installs them.

use mtlb_tests::*;
use serde_json::Value;
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const A: &str = "127.0.0.1:10000";
const B: &str = "127.0.0.1:10001";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rules_file() -> PathBuf {
    repo().join("deploy/roles/prometheus_rules/files/mtlb.rules.yml")
}

/// `tool ARGS`, which must exist: the xtask installs Debian's prometheus.
fn tool(name: &str) -> Command {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` installs Debian's prometheus package (apt-get install prometheus)",
        path.display()
    );
    Command::new(path)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = tool("promtool");
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut si = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            si.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The rules check and their unit tests: series that fire each alert and
/// series that do not (tests/prometheus/mtlb.rules.test.yml).
#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = rules_file();
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    let alerts = std::fs::read_to_string(&rules)
        .unwrap()
        .matches("- alert: ")
        .count();
    assert!(
        out.contains(&format!("SUCCESS: {alerts} rules found")),
        "{out}"
    );
    let tests = repo().join("tests/prometheus/mtlb.rules.test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    // Every alert is exercised: fired somewhere and silent somewhere.
    let text = std::fs::read_to_string(&tests).unwrap();
    for name in std::fs::read_to_string(&rules)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let silent = format!("alertname: {name}, exp_alerts: []");
        let fires = format!("alertname: {name}\n        exp_alerts:\n          - exp_labels");
        assert!(text.contains(&silent), "no test where {name} stays silent");
        assert!(text.contains(&fires), "no test where {name} fires");
    }
}

/// A Prometheus server inside the test's namespace, scraping the agent at
/// 127.0.0.1:8404 every second with mtlb's rules; killed and its storage
/// removed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Prometheus {
    fn start(ns: &Netns) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.path.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: mtlb\n    static_configs:\n      - targets: ['127.0.0.1:8404']\n",
                rules_file().canonicalize().unwrap().display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = tool("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        ns.run_inside(&mut cmd);
        let child = cmd.spawn().expect("starting prometheus");
        let p = Self {
            child,
            addr,
            _dir: dir,
        };
        p.wait("ready", || {
            std::net::TcpStream::connect(&p.addr).is_ok() && p.get("/-/ready").code == 200
        });
        p
    }

    fn get(&self, path: &str) -> HttpResponse {
        http_request(&self.addr, path, &[])
    }

    /// An API call: its `data`, after checking `status` is success.
    fn api(&self, path: &str) -> Value {
        let r = self.get(path);
        let v: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {} {}", r.head, r.body));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }

    /// An instant query: its result vector (status success asserted).
    fn query(&self, expr: &str) -> Vec<Value> {
        let d = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        d["result"].as_array().cloned().unwrap_or_default()
    }

    /// Polls `cond` until it holds, within wait_limit().
    fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + wait_limit();
        while !cond() {
            assert!(Instant::now() < deadline, "prometheus: not {what} in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PromQL a Grafana expression becomes on this one host: variables
/// replaced with concrete values.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", "127.0.0.1:8404")
        .replace("$backend", "mtp1|mtp2")
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_query_returns_series() {
    let ns = Netns::new();
    let _a = Replica::start("mtp1", A);
    let mut b = Replica::start("mtp2", B);
    let agent = ns.agent(&[]);
    agent.wait_state("mtp2", State::Up);
    let held: Vec<_> = (0..4).map(|_| connect(BALANCED).unwrap()).collect();

    // What promtool reads: the text format, clean.
    let text = http_request("127.0.0.1:8404", "/metrics", &[]);
    assert_eq!(text.code, 200);
    assert!(
        text.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{}",
        text.head
    );
    let (ok, out) = promtool(&["check", "metrics"], Some(&text.body));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );
    // What Prometheus asks for: OpenMetrics.
    let om = http_request(
        "127.0.0.1:8404",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
    );
    assert!(
        om.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{}",
        om.head
    );
    assert!(om.body.ends_with("# EOF\n"));

    let prom = Prometheus::start(&ns);
    prom.wait("scraping the agent", || {
        let t = prom.api("/api/v1/targets");
        t["activeTargets"]
            .as_array()
            .and_then(|a| a.first())
            .is_some_and(|t| t["health"] == "up" && t["lastError"] == "")
    });
    let up = prom.query("up{job=\"mtlb\"}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1");
    assert_eq!(
        prom.query("mtlb_backend_active_connections{backend=~\"mtp1|mtp2\"}")
            .iter()
            .map(|r| r["value"][1].as_str().unwrap().parse::<u64>().unwrap())
            .sum::<u64>(),
        4
    );

    // Every panel's expression, and the variables' label queries.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dashboards/mtlb.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(concrete(t["expr"].as_str().unwrap()));
        }
    }
    assert!(exprs.len() >= 15, "{exprs:?}");
    for e in &exprs {
        // rate() and increase() need two scrapes in their range: wait for
        // series, every answer a success.
        prom.wait(&format!("returning series for {e}"), || {
            !prom.query(e).is_empty()
        });
    }
    let mut variables = 0;
    for v in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["definition"].as_str() else {
            continue;
        };
        // label_values(SELECTOR, LABEL): Grafana's, through the labels API.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("unexpected variable query {q}"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let values = prom.api(&format!(
            "/api/v1/label/{}/values?match[]={}",
            label.trim(),
            urlencode(&concrete(selector.trim()))
        ));
        let values: Vec<&str> = values
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want: &[&str] = match label.trim() {
            "instance" => &["127.0.0.1:8404"],
            "backend" => &["mtp1", "mtp2"],
            other => panic!("variable over {other}"),
        };
        assert_eq!(values, want, "{q}");
        variables += 1;
    }
    assert_eq!(variables, 2);

    // The rules load and evaluate without error on real series.
    let alerts = std::fs::read_to_string(rules_file())
        .unwrap()
        .matches("- alert: ")
        .count();
    prom.wait("evaluating every rule", || {
        let groups = prom.api("/api/v1/rules");
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        for r in &rules {
            assert_ne!(r["health"], "err", "{r}");
        }
        rules.len() == alerts && rules.iter().all(|r| r["health"] == "ok")
    });
    // Healthy: nothing pending or firing but the absent-target rule's
    // silence (it has no series).
    let firing = prom.api("/api/v1/alerts");
    assert_eq!(firing["alerts"], serde_json::json!([]), "{firing}");

    // mtp2 goes: its DOWN alert is pending (it fires after 1m).
    b.stop_listening();
    agent.wait_state("mtp2", State::Down);
    prom.wait("MtlbBackendDown pending for mtp2", || {
        prom.api("/api/v1/alerts")["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == "MtlbBackendDown"
                    && a["labels"]["backend"] == "mtp2"
                    && a["state"] == "pending"
            })
    });
    drop(held);
}
