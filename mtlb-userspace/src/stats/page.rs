//! The `/stats` page: what an operator used to HAProxy's stats page reads
//! at a glance. One table row per replica, each on one line of the HTML
//! (so `curl -s …/stats | grep mtp1` still shows a replica and its state),
//! a totals row, human units, the agent's version and uptime, the last
//! state change with its age and reason, and a sparkline per replica of
//! its active connections (inline SVG from the agent's bounded history: no
//! external asset, no JavaScript). The page refreshes itself; rendering
//! changes nothing, so that is safe.

use super::{
    history::{History, sparkline},
    snapshot::{BackendRow, Snapshot},
    units,
};
use crate::config::replica_name;
use mtlb_common::{MAX_REPLICAS, STATE_DRAIN, STATE_MAINT, STATE_UP};
use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, Instant, SystemTime},
};

/// Seconds between the page's own refreshes.
pub const REFRESH_S: u32 = 5;

/// What the page shows besides the snapshot.
pub struct Context<'a> {
    pub version: &'a str,
    /// How long the agent has run.
    pub uptime: Duration,
    pub history: &'a History,
    /// When the snapshot was read (ages of history samples are from here).
    pub now: Instant,
    pub wall: SystemTime,
}

/// HTML-escapes `s` for text and attribute values, on one line.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The row's class: its state word, and whether it is on its way to the
/// other operational state (HAProxy colours those apart too).
fn class(b: &BackendRow) -> &'static str {
    // "UP 1/3", "DOWN 1/2": the only labels with a slash.
    let going = b.state.to_string().contains('/');
    match (b.state.state_word(), going) {
        (STATE_UP, false) => "UP",
        (STATE_UP, true) => "UP going",
        (STATE_DRAIN, _) => "DRAIN",
        (STATE_MAINT, _) => "MAINT",
        (_, false) => "DOWN",
        (_, true) => "DOWN going",
    }
}

/// Why it is in its state, when the maps tell: a stalled accept queue
/// (the agent's own verdict), else the last check's reason while the state
/// is steady (then the last check agrees with the change). While a change
/// is under way ("DOWN 1/2") the checks disagree with the state, and the
/// last check column says what they say.
pub fn change_reason(b: &BackendRow) -> String {
    if b.queue_stalled {
        return "accept queue stalled".into();
    }
    if b.state.to_string().contains('/') || b.check_reason.is_empty() {
        return String::new();
    }
    b.check_reason.clone()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1em;color:#222}\
h1{font-size:1.3em;margin:0 0 .2em}h1 small{font-weight:normal;color:#666}\
p.summary{margin:0;color:#444}p.summary b{color:#222}p.read{margin:0 0 .8em;color:#666;font-size:.85em}\
table{border-collapse:collapse;font-size:.9em}\
th,td{border:1px solid #bbb;padding:2px 6px;text-align:right;white-space:nowrap;vertical-align:middle}\
th{background:#dde;position:sticky;top:0}\
td.name,td.addr,td.state,td.change,td.check,th.l{text-align:left}\
td.name{font-weight:bold}td.state{font-weight:bold}\
small{color:#555}\
tr.UP td{background:#c7f0c7}tr.DOWN td{background:#f6b8b8}tr.DRAIN td{background:#bcd6fb}\
tr.MAINT td{background:#d2d2d2}tr.UP.going td{background:#f4e49a}tr.DOWN.going td{background:#f8cf9a}\
tfoot td{background:#eee;font-weight:bold;border-top:2px solid #888}\
tfoot td.state.all{background:#c7f0c7}tfoot td.state.some{background:#f4e49a}tfoot td.state.none{background:#f6b8b8}\
td.spark{padding:0 4px}tr td.spark{background:#fff}svg.spark{display:block}\
svg.spark polyline{fill:none;stroke:#2a5db0;stroke-width:1.5}\
svg.spark path.area{fill:#2a5db0;fill-opacity:.15;stroke:none}\
svg.spark circle{fill:#2a5db0}\
.stalled{color:#b00;font-weight:bold}";

pub fn render(s: &Snapshot, cx: &Context) -> String {
    let window = cx.history.window();
    let up = s.backends.iter().filter(|b| b.up).count();
    let errors: u64 = s.steer_errors.values().sum();
    let mut out = String::with_capacity(2048 + 1536 * s.backends.len());
    let _ = write!(
        out,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>mtlb stats</title>\n<style>{STYLE}</style></head><body>\n"
    );
    let _ = writeln!(
        out,
        "<h1>mtlb <small>version {}</small></h1>",
        esc(cx.version)
    );
    let _ = writeln!(
        out,
        "<p class=\"summary\">port <b>{}</b> · up <b id=\"uptime\">{}</b> · <b id=\"up-count\">{up}</b> of {} replicas UP · lookups <b>{}</b> · refused (no backend) <b>{}</b> · steering errors <b>{}</b></p>\n<p class=\"read\">read {} · refreshes every {REFRESH_S}s · sparklines: last {}, a sample every {}</p>",
        s.port,
        units::duration(cx.uptime.as_secs_f64()),
        s.backends.len(),
        units::count(s.lookups),
        units::count(s.no_backend),
        units::count(errors),
        humantime::format_rfc3339_seconds(cx.wall),
        units::duration(window.as_secs_f64()),
        units::duration(cx.history.every().as_secs_f64()),
    );
    out.push_str("<table>\n<thead><tr><th class=\"l\">name</th><th class=\"l\">address</th><th class=\"l\">state</th><th class=\"l\">last change</th><th class=\"l\">last check</th><th>active</th>");
    let _ = write!(
        out,
        "<th>last {}</th>",
        units::duration(window.as_secs_f64())
    );
    out.push_str("<th>total</th><th>weight</th><th>queue</th><th>downtime</th><th>in</th><th>out</th></tr></thead>\n<tbody>\n");
    let slots: HashMap<String, usize> = (0..MAX_REPLICAS as usize)
        .map(|i| (replica_name(i), i))
        .collect();
    for b in &s.backends {
        let points = slots
            .get(&b.name)
            .map(|slot| cx.history.series(*slot, cx.now))
            .unwrap_or_default();
        row(
            &mut out,
            b,
            &sparkline(&points, b.active, window, "active connections"),
        );
    }
    out.push_str("</tbody>\n");
    totals(&mut out, s, up, cx);
    out.push_str("</table>\n</body></html>\n");
    out
}

fn row(out: &mut String, b: &BackendRow, spark: &str) {
    let name = esc(&b.name);
    let why = change_reason(b);
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" <small>{}</small>", esc(&why))
    };
    let check = match b.check.as_str() {
        "-" => "-".to_string(),
        result => format!(
            "{result} <small>{} · {}</small>",
            esc(&b.check_reason),
            units::millis(b.check_duration_ms)
        ),
    };
    let queue = if b.queue_stalled {
        format!("<span class=\"stalled\">{} stalled</span>", b.accept_queue)
    } else {
        b.accept_queue.to_string()
    };
    let _ = writeln!(
        out,
        "<tr class=\"{}\" id=\"{name}\" data-active=\"{}\"><td class=\"name\">{name}</td><td class=\"addr\">{}</td><td class=\"state\">{}</td><td class=\"change\">{} ago{why}</td><td class=\"check\">{check}</td><td>{}</td><td class=\"spark\">{spark}</td><td>{}</td><td>{}</td><td>{queue}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        class(b),
        b.active,
        esc(&b.address),
        esc(&b.state.to_string()),
        units::duration(b.since_change_s),
        units::count(b.active),
        units::count(b.total),
        b.weight,
        units::duration(b.downtime_s),
        units::bytes(b.bytes_in),
        units::bytes(b.bytes_out),
    );
}

fn totals(out: &mut String, s: &Snapshot, up: usize, cx: &Context) {
    let sum = |f: fn(&BackendRow) -> u64| {
        s.backends
            .iter()
            .map(f)
            .fold(0u64, |a, b| a.saturating_add(b))
    };
    let active = sum(|b| b.active);
    let failing = s.backends.iter().filter(|b| b.check == "failed").count();
    // The row stays neutral; its UP count says how many are.
    let class = match (up, s.backends.len()) {
        (0, _) => "none",
        (u, n) if u == n => "all",
        _ => "some",
    };
    let spark = sparkline(
        &cx.history.total(cx.now),
        active,
        cx.history.window(),
        "active connections, all replicas",
    );
    let _ = writeln!(
        out,
        "<tfoot><tr class=\"total\" data-active=\"{active}\"><td class=\"name\">total</td><td class=\"addr\">{} replicas</td><td class=\"state {class}\">{up} UP</td><td class=\"change\"></td><td class=\"check\">{failing} failing</td><td>{}</td><td class=\"spark\">{spark}</td><td>{}</td><td></td><td>{}</td><td></td><td>{}</td><td>{}</td></tr></tfoot>",
        s.backends.len(),
        units::count(active),
        units::count(sum(|b| b.total)),
        units::count(sum(|b| b.accept_queue as u64)),
        units::bytes(sum(|b| b.bytes_in)),
        units::bytes(sum(|b| b.bytes_out)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtlb_common::state::{Admin, ListenerState, Oper, OperState, ReplicaState};
    use std::collections::BTreeMap;

    fn st(oper: Oper, progress: u32, admin: Admin) -> ReplicaState {
        ReplicaState {
            oper: OperState {
                oper,
                progress,
                rise: 2,
                fall: 3,
            },
            admin,
            listener: ListenerState::Registered,
        }
    }

    fn row(slot: usize, state: ReplicaState, active: u64) -> BackendRow {
        BackendRow {
            name: replica_name(slot),
            address: format!("127.0.0.1:{}", 10000 + slot),
            state,
            up: state.takes_connections(),
            active,
            handshakes: 0,
            total: 1000 + active,
            weight: 1,
            check: "passed".into(),
            check_reason: "Layer4 check passed".into(),
            check_duration_ms: 3,
            check_failures: 0,
            transitions_up: 1,
            transitions_down: 0,
            since_change_s: 7980.4,
            downtime_s: 4.6,
            accept_queue: 0,
            queue_stalled: false,
            bytes_in: 3 << 20,
            bytes_out: 5 << 30,
        }
    }

    fn snap(backends: Vec<BackendRow>) -> Snapshot {
        Snapshot {
            port: 443,
            backends,
            lookups: 1_234_567,
            no_backend: 2,
            flow_hits: 0,
            cookie_synacks: 0,
            steer_errors: BTreeMap::from([("no_socket".to_string(), 1)]),
            programs: vec![],
        }
    }

    fn render_with(s: &Snapshot, h: &History, now: Instant) -> String {
        render(
            s,
            &Context {
                version: "1.2.3",
                uptime: Duration::from_secs(2 * 3600 + 13 * 60),
                history: h,
                now,
                wall: SystemTime::UNIX_EPOCH,
            },
        )
    }

    fn four() -> Snapshot {
        let mut down = row(3, st(Oper::Down, 0, Admin::Ready), 0);
        down.up = false;
        down.check = "failed".into();
        down.check_reason = "Layer4 connection problem".into();
        snap(vec![
            row(0, st(Oper::Up, 0, Admin::Ready), 7),
            row(1, st(Oper::Up, 1, Admin::Ready), 3),
            row(2, st(Oper::Up, 0, Admin::Drain), 1),
            down,
        ])
    }

    #[test]
    fn one_line_per_replica_with_its_state_and_class() {
        let h = History::new(Duration::from_secs(10));
        let page = render_with(&four(), &h, Instant::now());
        for (name, class, label) in [
            ("mtp1", "UP", "UP"),
            ("mtp2", "UP going", "UP 1/3"),
            ("mtp3", "DRAIN", "DRAIN"),
            ("mtp4", "DOWN", "DOWN"),
        ] {
            let lines: Vec<&str> = page.lines().filter(|l| l.contains(name)).collect();
            assert_eq!(lines.len(), 1, "{name}: {lines:?}");
            let l = lines[0];
            assert!(
                l.starts_with(&format!("<tr class=\"{class}\" id=\"{name}\"")),
                "{l}"
            );
            assert!(
                l.contains(&format!("<td class=\"state\">{label}</td>")),
                "{l}"
            );
            assert!(l.contains("<svg class=\"spark\""), "{l}");
        }
    }

    #[test]
    fn human_units_version_and_uptime() {
        let h = History::new(Duration::from_secs(10));
        let page = render_with(&four(), &h, Instant::now());
        let mtp1 = page.lines().find(|l| l.contains("mtp1")).unwrap();
        assert!(
            mtp1.contains("<td class=\"change\">2h13m ago <small>Layer4 check passed</small></td>"),
            "{mtp1}"
        );
        assert!(mtp1.contains("<td>4.6s</td>"), "downtime: {mtp1}");
        assert!(
            mtp1.contains("<td>3.0 MiB</td><td>5.0 GiB</td>"),
            "bytes: {mtp1}"
        );
        assert!(
            mtp1.contains("passed <small>Layer4 check passed · 3ms</small>"),
            "{mtp1}"
        );
        assert!(page.contains("<small>version 1.2.3</small>"));
        assert!(page.contains("up <b id=\"uptime\">2h13m</b>"));
        assert!(page.contains("lookups <b>1\u{202f}234\u{202f}567</b>"));
        assert!(page.contains("steering errors <b>1</b>"));
        assert!(page.contains("<b id=\"up-count\">2</b> of 4 replicas UP"));
        assert!(page.contains("sparklines: last 10m00s, a sample every 10s"));
        assert!(page.contains("read 1970-01-01T00:00:00Z"));
        // A change under way: the last check, not the state, has the word.
        let mtp2 = page.lines().find(|l| l.contains("mtp2")).unwrap();
        assert!(
            mtp2.contains("<td class=\"change\">2h13m ago</td>"),
            "{mtp2}"
        );
    }

    #[test]
    fn totals_row_sums_the_replicas() {
        let h = History::new(Duration::from_secs(10));
        let page = render_with(&four(), &h, Instant::now());
        let t = page.lines().find(|l| l.starts_with("<tfoot>")).unwrap();
        assert!(t.contains("data-active=\"11\""), "{t}");
        assert!(
            t.contains("<td class=\"addr\">4 replicas</td><td class=\"state some\">2 UP</td>"),
            "{t}"
        );
        assert!(
            t.contains("<td class=\"check\">1 failing</td><td>11</td>"),
            "{t}"
        );
        // 1007 + 1003 + 1001 + 1000.
        assert!(t.contains("<td>4\u{202f}011</td>"), "{t}");
        assert!(t.contains("<td>12.0 MiB</td><td>20.0 GiB</td>"), "{t}");
        assert!(t.contains("<svg class=\"spark\""), "{t}");
    }

    #[test]
    fn a_stalled_queue_is_said_in_the_row() {
        let mut s = four();
        s.backends[0].queue_stalled = true;
        s.backends[0].accept_queue = 4;
        let h = History::new(Duration::from_secs(10));
        let page = render_with(&s, &h, Instant::now());
        let mtp1 = page.lines().find(|l| l.contains("mtp1")).unwrap();
        assert!(
            mtp1.contains("<span class=\"stalled\">4 stalled</span>"),
            "{mtp1}"
        );
        assert!(
            mtp1.contains("ago <small>accept queue stalled</small>"),
            "{mtp1}"
        );
    }

    #[test]
    fn sparklines_come_from_the_history_of_each_slot() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(10));
        for i in 0..5u64 {
            h.record(t0 + Duration::from_secs(10 * i), vec![i, 10 * i, 0, 0]);
        }
        let page = render_with(&four(), &h, t0 + Duration::from_secs(45));
        let mtp2 = page.lines().find(|l| l.contains("mtp2")).unwrap();
        // 5 samples, the largest 40; now 3.
        assert!(
            mtp2.contains("data-samples=\"5\" data-max=\"40\" data-now=\"3\""),
            "{mtp2}"
        );
        let t = page.lines().find(|l| l.starts_with("<tfoot>")).unwrap();
        assert!(
            t.contains("data-samples=\"5\" data-max=\"44\" data-now=\"11\""),
            "{t}"
        );
    }

    #[test]
    fn rendering_does_not_change_what_the_next_render_shows() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(10));
        h.record(t0, vec![1, 2, 3, 4]);
        let s = four();
        let a = render_with(&s, &h, t0);
        let b = render_with(&s, &h, t0);
        assert_eq!(a, b, "a refresh is a pure re-read");
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn sixty_four_replicas_sixty_four_lines() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(10));
        for i in 0..super::super::history::CAPACITY as u32 {
            h.record(t0 + Duration::from_secs(10) * i, (0..64).collect());
        }
        let s = snap(
            (0..64)
                .map(|i| row(i, st(Oper::Up, 0, Admin::Ready), i as u64))
                .collect(),
        );
        let page = render_with(&s, &h, t0 + Duration::from_secs(600));
        for i in 0..64 {
            let name = replica_name(i);
            // "mtp1" is also in "mtp10".."mtp19": match the cell.
            let cell = format!("<td class=\"name\">{name}</td>");
            let n = page.lines().filter(|l| l.contains(&cell)).count();
            assert_eq!(n, 1, "{name}");
        }
        assert_eq!(page.matches("<svg class=\"spark\"").count(), 65);
        assert_eq!(page.matches("<tr class=\"UP\"").count(), 64);
        let t = page.lines().find(|l| l.starts_with("<tfoot>")).unwrap();
        // 0 + 1 + … + 63.
        assert!(t.contains("data-active=\"2016\""), "{t}");
        assert!(page.len() < 200 * 1024, "{} bytes", page.len());
    }

    #[test]
    fn names_and_reasons_are_escaped() {
        let mut s = four();
        s.backends[3].check_reason = "<b>\"x\"\nnext".into();
        let h = History::new(Duration::from_secs(10));
        let page = render_with(&s, &h, Instant::now());
        let mtp4 = page.lines().find(|l| l.contains("mtp4")).unwrap();
        assert!(mtp4.contains("&lt;b&gt;&quot;x&quot; next"), "{mtp4}");
    }
}
