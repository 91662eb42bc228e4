//! The replicas' table as `mtlb status` prints it, also shown by `mtlb
//! rollout` when it stops.

use super::snapshot::Snapshot;
use std::fmt::Write as _;

/// One line per replica under a header, then the balanced port's lookups.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let mut line = |cells: [&str; 9]| {
        let [
            name,
            address,
            state,
            active,
            total,
            weight,
            check,
            bytes_in,
            bytes_out,
        ] = cells;
        let _ = writeln!(
            out,
            "{name:<6} {address:<22} {state:<10} {active:>7} {total:>9} {weight:>6} {check:<34} {bytes_in:>12} {bytes_out:>12}"
        );
    };
    line([
        "NAME",
        "ADDRESS",
        "STATE",
        "ACTIVE",
        "TOTAL",
        "WEIGHT",
        "LAST CHECK",
        "BYTES IN",
        "BYTES OUT",
    ]);
    for b in &s.backends {
        let check = if b.check == "-" {
            "-".to_string()
        } else {
            format!("{} {} ({}ms)", b.check, b.check_reason, b.check_duration_ms)
        };
        line([
            &b.name,
            &b.address,
            &b.state.to_string(),
            &b.active.to_string(),
            &b.total.to_string(),
            &b.weight.to_string(),
            &check,
            &b.bytes_in.to_string(),
            &b.bytes_out.to_string(),
        ]);
    }
    let _ = writeln!(
        out,
        "port {}: {} lookups, {} refused (no backend)",
        s.port, s.lookups, s.no_backend
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_replica_under_the_header() {
        let t = render(&super::super::testutil::snap());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("NAME   ADDRESS"), "{t}");
        assert!(
            lines[1].starts_with("mtp1   127.0.0.1:10000        UP               7"),
            "{t}"
        );
        assert!(lines[1].contains("passed Layer4 check passed (3ms)"), "{t}");
        assert!(lines[2].contains(" DOWN 1/2 "), "{t}");
        assert_eq!(lines[3], "port 443: 12 lookups, 1 refused (no backend)");
    }
}
