//! The stats page in a real browser: Debian's headless Chromium (installed
//! by `cargo xtask test`) loads `/stats` inside the test's namespace; the
//! DOM it dumps is checked (rows, states, totals, sparklines) and a
//! screenshot kept under target/ (`target/stats.png` is the README's
//! `docs/stats.png`). A missing Chromium fails these tests.

use mtlb_tests::*;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

const STATS: &str = "http://127.0.0.1:8404/stats";

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// `chromium --headless ARGS URL` inside `ns`, as root (hence no
/// sandbox), with a profile of its own; returns its stdout.
fn chromium(ns: &Netns, args: &[&str]) -> Vec<u8> {
    let bin = Path::new("/usr/bin/chromium");
    assert!(
        bin.exists(),
        "{} is missing: `cargo xtask test` installs Debian's chromium package (apt-get install chromium)",
        bin.display()
    );
    let profile = TempDir::new("chromium");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path.display()))
    .args(args)
    .env("HOME", &profile.path);
    ns.run_inside(&mut cmd);
    let (status, out, err) = run_bounded(&mut cmd, 4 * wait_limit());
    assert!(status.success(), "chromium {args:?}: {status}\n{err}");
    out
}

/// The DOM Chromium built from `/stats`.
fn dom(ns: &Netns) -> String {
    String::from_utf8(chromium(ns, &["--dump-dom", STATS])).unwrap()
}

/// A screenshot of `/stats` at `target/NAME`, checked to be a PNG.
fn screenshot(ns: &Netns, name: &str, size: &str) -> PathBuf {
    let path = target_dir().join(name);
    let _ = std::fs::remove_file(&path);
    chromium(
        ns,
        &[
            &format!("--screenshot={}", path.display()),
            &format!("--window-size={size}"),
            STATS,
        ],
    );
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "{} bytes: an empty page?", png.len());
    eprintln!("screenshot: {}", path.display());
    path
}

/// The `<tr …>` element of replica `name` in `html`, up to its `</tr>`.
fn row<'a>(html: &'a str, name: &str) -> &'a str {
    let start = html
        .find(&format!("id=\"{name}\""))
        .and_then(|i| html[..i].rfind("<tr "))
        .unwrap_or_else(|| panic!("no row for {name} in\n{html}"));
    let end = start + html[start..].find("</tr>").unwrap();
    &html[start..end]
}

/// The value of `attr="…"` in `element`.
fn attr<'a>(element: &'a str, attr: &str) -> &'a str {
    let key = format!("{attr}=\"");
    let i = element
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} in {element}"))
        + key.len();
    &element[i..i + element[i..].find('"').unwrap()]
}

/// Polls /stats until `pred` holds on it, within wait_limit().
fn stats_until(what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + wait_limit();
    loop {
        let (code, html) = http_get("/stats");
        assert_eq!(code, 200);
        if pred(&html) {
            return html;
        }
        assert!(Instant::now() < deadline, "{what}: /stats stayed\n{html}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many samples the sparkline of `name`'s row (or the totals row,
/// `"total"`) draws.
fn samples(html: &str, name: &str) -> usize {
    let r = if name == "total" {
        let i = html.find("<tfoot>").expect("totals row");
        &html[i..]
    } else {
        row(html, name)
    };
    attr(r, "data-samples").parse().unwrap()
}

#[test]
fn stats_page_in_chromium() {
    let ns = Netns::new();
    let _r: Vec<Replica> = (0..3)
        .map(|i| {
            Replica::start(
                &format!("mtp{}", i + 1),
                &format!("127.0.0.1:{}", 10000 + i),
            )
        })
        .collect();
    // Four replicas, mtp4 never listening; samples every 200 ms so the
    // sparklines have a shape within seconds (scaled on a slower machine:
    // the 60 samples' window must outlast the test's steps and Chromium).
    let cfg = Config::new()
        .replicas(4)
        .set("stats_sample_ms", i64::from(200 * time_scale()))
        .write(&ns);
    let agent = ns.agent(&["--config", &cfg]);
    for i in 1..=3 {
        agent.wait_state(&format!("mtp{i}"), State::Up);
    }
    // Connections arrive in steps, a few samples apart: 9 over 3 steps,
    // then mtp3 drains and 3 leave.
    let mut held = Vec::new();
    for _ in 0..3 {
        let before = samples(&http_get("/stats").1, "total");
        held.extend((0..3).map(|_| connect(BALANCED).unwrap()));
        stats_until("two more samples", |h| samples(h, "total") >= before + 2);
    }
    let (ok, out) = mtlb_cli(&ns, &["backend", "mtp3", "drain"]);
    assert!(ok, "{out}");
    held.truncate(6);
    let page = stats_until("the ring holding 20 samples", |h| samples(h, "total") >= 20);
    // The sparkline drew the steps: its maximum is the 9 held at once.
    let foot = &page[page.find("<tfoot>").expect("totals row")..];
    assert_eq!(attr(foot, "data-max"), "9", "{foot}");
    let (_, metrics) = http_get("/metrics");

    let html = dom(&ns);
    // Chromium parsed the page we meant: one row per replica, each with
    // its state, its active count as /metrics says, and a sparkline.
    for (name, class, state) in [
        ("mtp1", "UP", "UP"),
        ("mtp2", "UP", "UP"),
        ("mtp3", "DRAIN", "DRAIN"),
        ("mtp4", "DOWN", "DOWN"),
    ] {
        let r = row(&html, name);
        assert_eq!(attr(r, "class"), class, "{r}");
        assert!(
            r.contains(&format!("<td class=\"state\">{state}</td>")),
            "{r}"
        );
        let active = metric(
            &metrics,
            &format!("mtlb_backend_active_connections{{backend=\"{name}\"}}"),
        )
        .unwrap();
        let shown: f64 = attr(r, "data-active").parse().unwrap();
        assert_eq!(shown, active, "{name}: page and /metrics");
        assert!(r.contains("<svg class=\"spark\""), "{r}");
        assert!(r.contains("<polyline points=\""), "{r}");
        assert!(r.contains(" ago"), "last change: {r}");
    }
    assert_eq!(html.matches("<tbody>").count(), 1);
    assert_eq!(
        html.matches("<tr class=").count(),
        5,
        "4 rows and the totals"
    );
    let total = &html[html.find("<tfoot>").expect("totals row")..];
    assert!(
        total.contains("4 replicas") && total.contains(">2 UP<"),
        "{total}"
    );
    assert_eq!(attr(total, "data-active"), "6", "{total}");
    // The same in the browser, unless the peak has left the window by
    // the time a slow machine's Chromium read the page.
    let max: u32 = attr(total, "data-max").parse().unwrap();
    assert!((6..=9).contains(&max), "{total}");
    assert!(html.contains("<small>version "), "version");
    assert!(html.contains("id=\"uptime\""));
    assert!(html.contains("Layer4 connection problem"), "mtp4's reason");
    assert!(!html.contains("<script"), "no JavaScript");
    screenshot(&ns, "stats.png", "1400,260");
    drop(held);
}

#[test]
fn stats_page_with_64_replicas_and_refreshes() {
    let ns = Netns::new();
    let _r: Vec<Replica> = (0..64)
        .map(|i| {
            Replica::start(
                &format!("mtp{}", i + 1),
                &format!("127.0.0.1:{}", 10000 + i),
            )
        })
        .collect();
    let agent = ns.agent(&["--replicas", "64"]);
    for i in 1..=64 {
        agent.wait_state(&format!("mtp{i}"), State::Up);
    }
    let held: Vec<_> = (0..128).map(|_| connect(BALANCED).unwrap()).collect();

    // curl | grep still finds each replica on one line.
    let (_, html) = http_get("/stats");
    for i in 1..=64 {
        let cell = format!("<td class=\"name\">mtp{i}</td>");
        assert_eq!(
            html.lines().filter(|l| l.contains(&cell)).count(),
            1,
            "mtp{i}"
        );
    }
    // A page that refreshes itself re-reads, it does not sample: the
    // history grows with time only (one sample every 10 s by default).
    let first = samples(&html, "total");
    let t = Instant::now();
    for _ in 0..20 {
        let (_, h) = http_get("/stats");
        let n = samples(&h, "total");
        let elapsed = t.elapsed().as_secs() as usize;
        assert!(
            n <= first + elapsed / 10 + 1,
            "{n} samples after 20 requests"
        );
    }

    let html = dom(&ns);
    assert_eq!(html.matches("<tr class=\"UP\"").count(), 64);
    assert_eq!(html.matches("<svg class=\"spark\"").count(), 65);
    let total = &html[html.find("<tfoot>").expect("totals row")..];
    assert!(
        total.contains("64 replicas") && total.contains("64 UP"),
        "{total}"
    );
    assert_eq!(attr(total, "data-active"), "128");
    for i in [1, 32, 64] {
        assert_eq!(attr(row(&html, &format!("mtp{i}")), "data-active"), "2");
    }
    screenshot(&ns, "stats-64.png", "1400,2200");
    drop(held);
}
