//! The `/stats` page: what an operator used to HAProxy's stats page reads
//! at a glance. One table row per replica, each on one line of the HTML
//! (so `curl -s …/stats | grep mtp1` still shows a replica and its state),
//! a totals row, human units, the agent's version and uptime, the last
//! state change with its age and reason, and a sparkline per replica of
//! its active connections (inline SVG from the agent's bounded history: no
//! external asset, no JavaScript). The page refreshes itself; rendering
//! changes nothing, so that is safe.
//!
//! Built with maud: every value is HTML-escaped unless marked otherwise
//! (only the style sheet and the sparklines' own markup are).

use super::{
    history::History,
    snapshot::{BackendRow, Snapshot},
    sparkline::sparkline,
    units,
};
use crate::config::replica_name;
use maud::{DOCTYPE, Markup, PreEscaped, Render, html};
use mtlb_common::{
    MAX_REPLICAS,
    state::{Admin, ListenerState, Oper, ReplicaState},
};
use std::{
    collections::HashMap,
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

/// Text that stays on one line: control characters (a check's reason may
/// carry a newline) become spaces, so a replica's row is one line of HTML.
/// Escaped as any text.
struct OneLine<'a>(&'a str);

impl Render for OneLine<'_> {
    fn render_to(&self, out: &mut String) {
        let line: String = self
            .0
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        line.render_to(out);
    }
}

/// A change under way: checks counted toward the other operational state
/// ("UP 1/3", "DOWN 1/2"). Only a READY replica with a listener shows one:
/// DRAIN and MAINT say the operator's word, and without a listener nothing
/// rises.
fn changing(s: &ReplicaState) -> bool {
    s.admin == Admin::Ready && s.listener == ListenerState::Registered && s.oper.progress > 0
}

/// The row's class: its state word, and whether it is on its way to the
/// other operational state (HAProxy colours those apart too).
fn class(s: &ReplicaState) -> &'static str {
    match (s.admin, s.listener, s.oper.oper) {
        (Admin::Maint, ..) => "MAINT",
        (Admin::Drain, ..) => "DRAIN",
        (Admin::Ready, ListenerState::Missing, _) => "DOWN",
        (Admin::Ready, ListenerState::Registered, Oper::Up) if changing(s) => "UP going",
        (Admin::Ready, ListenerState::Registered, Oper::Up) => "UP",
        (Admin::Ready, ListenerState::Registered, Oper::Down) if changing(s) => "DOWN going",
        (Admin::Ready, ListenerState::Registered, Oper::Down) => "DOWN",
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
    if changing(&b.state) || b.check_reason.is_empty() {
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

/// The whole page. Line breaks sit where `grep` needs them: one per
/// replica row, one for the totals.
pub fn render(s: &Snapshot, cx: &Context) -> String {
    let window = cx.history.window();
    let up = s.backends.iter().filter(|b| b.up).count();
    let slots: HashMap<String, usize> = (0..MAX_REPLICAS as usize)
        .map(|i| (replica_name(i), i))
        .collect();
    html! {
        (DOCTYPE) "\n"
        html {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_S);
                title { "mtlb stats" } "\n"
                style { (PreEscaped(STYLE)) }
            }
            body {
                "\n"
                (summary(s, cx, up))
                table {
                    "\n" (columns(window)) "\n"
                    tbody {
                        "\n"
                        @for b in &s.backends {
                            (row(b, &spark_of(b, &slots, cx))) "\n"
                        }
                    }
                    "\n" (totals(s, up, cx)) "\n"
                }
                "\n"
            }
        }
        "\n"
    }
    .into_string()
}

/// The heading and the two lines under it.
fn summary(s: &Snapshot, cx: &Context, up: usize) -> Markup {
    let errors: u64 = s.steer_errors.values().sum();
    html! {
        h1 { "mtlb " small { "version " (OneLine(cx.version)) } } "\n"
        p class="summary" {
            "port " b { (s.port) }
            " · up " b id="uptime" { (units::duration(cx.uptime.as_secs_f64())) }
            " · " b id="up-count" { (up) } " of " (s.backends.len()) " replicas UP"
            " · lookups " b { (units::count(s.lookups)) }
            " · refused (no backend) " b { (units::count(s.no_backend)) }
            " · steering errors " b { (units::count(errors)) }
        } "\n"
        @if let Some(a) = &s.announce {
            p class="announce" id="announce" data-announced=(a.announced) {
                (OneLine(&crate::system::vip::list(&a.vips)))
                ": "
                @if a.announced {
                    b { "announced" } " (" (OneLine(&a.why)) ")"
                } @else {
                    b { "withdrawn" } ": " (OneLine(&a.why))
                }
            } "\n"
        }
        p class="read" {
            "read " (humantime::format_rfc3339_seconds(cx.wall))
            " · refreshes every " (REFRESH_S) "s"
            " · sparklines: last " (units::duration(cx.history.window().as_secs_f64()))
            ", a sample every " (units::duration(cx.history.every().as_secs_f64()))
        } "\n"
    }
}

fn columns(window: Duration) -> Markup {
    html! {
        thead { tr {
            th class="l" { "name" } th class="l" { "address" } th class="l" { "state" }
            th class="l" { "last change" } th class="l" { "last check" } th { "active" }
            th { "last " (units::duration(window.as_secs_f64())) }
            th { "total" } th { "weight" } th { "queue" } th { "downtime" }
            th { "in" } th { "out" }
        } }
    }
}

/// `b`'s sparkline: its slot's samples (a name that is no slot's has none).
fn spark_of(b: &BackendRow, slots: &HashMap<String, usize>, cx: &Context) -> Markup {
    let points = slots
        .get(&b.name)
        .map(|slot| cx.history.series(*slot, cx.now))
        .unwrap_or_default();
    sparkline(&points, b.active, cx.history.window(), "active connections")
}

fn row(b: &BackendRow, spark: &Markup) -> Markup {
    let why = change_reason(b);
    html! {
        tr class=(class(&b.state)) id=(OneLine(&b.name)) data-active=(b.active) {
            td class="name" { (OneLine(&b.name)) }
            td class="addr" { (OneLine(&b.address)) }
            td class="state" { (OneLine(&b.state.to_string())) }
            td class="change" {
                (units::duration(b.since_change_s)) " ago"
                @if !why.is_empty() { " " small { (OneLine(&why)) } }
            }
            td class="check" {
                @if b.check == "-" {
                    "-"
                } @else {
                    (OneLine(&b.check)) " "
                    small { (OneLine(&b.check_reason)) " · " (units::millis(b.check_duration_ms)) }
                }
            }
            td { (units::count(b.active)) }
            td class="spark" { (spark) }
            td { (units::count(b.total)) }
            td { (b.weight) }
            td {
                @if b.queue_stalled {
                    span class="stalled" { (b.accept_queue) " stalled" }
                } @else {
                    (b.accept_queue)
                }
            }
            td { (units::duration(b.downtime_s)) }
            td { (units::bytes(b.bytes_in)) }
            td { (units::bytes(b.bytes_out)) }
        }
    }
}

fn totals(s: &Snapshot, up: usize, cx: &Context) -> Markup {
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
    html! {
        tfoot { tr class="total" data-active=(active) {
            td class="name" { "total" }
            td class="addr" { (s.backends.len()) " replicas" }
            td class={ "state " (class) } { (up) " UP" }
            td class="change" {}
            td class="check" { (failing) " failing" }
            td { (units::count(active)) }
            td class="spark" { (spark) }
            td { (units::count(sum(|b| b.total))) }
            td {}
            td { (units::count(sum(|b| b.accept_queue as u64))) }
            td {}
            td { (units::bytes(sum(|b| b.bytes_in))) }
            td { (units::bytes(sum(|b| b.bytes_out))) }
        } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtlb_common::state::{Admin, ListenerState, Oper, ReplicaState};
    use std::collections::BTreeMap;

    fn st(oper: Oper, progress: u32, admin: Admin) -> ReplicaState {
        crate::stats::testutil::state(oper, progress, admin, ListenerState::Registered)
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
            stopping: false,
            stop_signals: 0,
            stop_queued: 0,
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
            check_errors: Default::default(),
            announce: None,
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

    /// The class comes from the typed state and agrees with the label an
    /// operator reads: "going" exactly when the label counts checks
    /// ("UP 1/3"), and the state word otherwise.
    #[test]
    fn class_follows_the_typed_state() {
        for oper in [Oper::Up, Oper::Down] {
            for progress in [0, 1, 2] {
                for admin in [Admin::Ready, Admin::Drain, Admin::Maint] {
                    for listener in [ListenerState::Registered, ListenerState::Missing] {
                        let s = ReplicaState {
                            listener,
                            ..st(oper, progress, admin)
                        };
                        let label = s.to_string();
                        let c = class(&s);
                        assert_eq!(c.ends_with(" going"), label.contains('/'), "{s:?}");
                        assert_eq!(changing(&s), label.contains('/'), "{s:?}");
                        let word = match s.state_word() {
                            mtlb_common::STATE_UP => "UP",
                            mtlb_common::STATE_DRAIN => "DRAIN",
                            mtlb_common::STATE_MAINT => "MAINT",
                            _ => "DOWN",
                        };
                        assert_eq!(c.split(' ').next(), Some(word), "{s:?}");
                    }
                }
            }
        }
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
    fn the_announcement_is_shown_with_why() {
        let h = History::new(Duration::from_secs(10));
        let mut s = four();
        assert!(!render_with(&s, &h, Instant::now()).contains("id=\"announce\""));
        s.announce = Some(crate::stats::snapshot::AnnounceRow {
            vips: vec![
                "192.0.2.80".parse().unwrap(),
                "2001:db8::80".parse().unwrap(),
            ],
            announced: false,
            why: "drained by operator".into(),
            changes: 1,
        });
        let page = render_with(&s, &h, Instant::now());
        let l = page
            .lines()
            .find(|l| l.contains("id=\"announce\""))
            .unwrap();
        assert!(
            l.contains("192.0.2.80, 2001:db8::80: <b>withdrawn</b>: drained by operator"),
            "{l}"
        );
        s.announce.as_mut().unwrap().announced = true;
        s.announce.as_mut().unwrap().why = "2 replicas UP".into();
        let page = render_with(&s, &h, Instant::now());
        assert!(page.contains("<b>announced</b> (2 replicas UP)"), "{page}");
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
        for i in 0..crate::stats::history::CAPACITY as u32 {
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
