//! `/stats;csv`: one line per replica with raw numbers, for scripts (as
//! HAProxy's `;csv`). Scripts read columns by name or by position, so new
//! columns only ever go at the end.

use super::snapshot::{BackendRow, Snapshot};

const COLUMNS: [&str; 16] = [
    "name",
    "address",
    "state",
    "active",
    "total",
    "weight",
    "check",
    "check_reason",
    "check_duration_ms",
    "since_change_s",
    "downtime_s",
    "accept_queue",
    "bytes_in",
    "bytes_out",
    // Added at the end: readers by position keep working.
    "handshakes",
    "queue_stalled",
];

fn cells(b: &BackendRow) -> [String; COLUMNS.len()] {
    [
        b.name.clone(),
        b.address.clone(),
        b.state.to_string(),
        b.active.to_string(),
        b.total.to_string(),
        b.weight.to_string(),
        b.check.clone(),
        b.check_reason.clone(),
        b.check_duration_ms.to_string(),
        format!("{:.1}", b.since_change_s),
        format!("{:.1}", b.downtime_s),
        b.accept_queue.to_string(),
        b.bytes_in.to_string(),
        b.bytes_out.to_string(),
        b.handshakes.to_string(),
        (b.queue_stalled as u8).to_string(),
    ]
}

/// A cell quoted as RFC 4180 wants when it holds a comma or a quote.
fn quoted(c: String) -> String {
    if c.contains([',', '"']) {
        format!("\"{}\"", c.replace('"', "\"\""))
    } else {
        c
    }
}

/// The header line, then a line per replica.
pub fn render(s: &Snapshot) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for b in &s.backends {
        let row: Vec<String> = cells(b).into_iter().map(quoted).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::testutil::snap;

    #[test]
    fn csv_table() {
        let c = render(&snap());
        let mut l = c.lines();
        let head = l.next().unwrap();
        assert!(head.starts_with("name,address,state,active"));
        assert!(head.ends_with(",bytes_in,bytes_out,handshakes,queue_stalled"));
        assert!(
            l.next()
                .unwrap()
                .starts_with("mtp1,127.0.0.1:10000,UP,7,10,1,passed")
        );
    }
}
