//! The agent's stats page as the checks read it: its CSV export
//! (`/stats;csv`, one row per replica, a header row naming the columns),
//! read in the guest over ssh since it listens on the guest's loopback.

use crate::guest::Guest;
use anyhow::{Context as _, bail};
use std::time::{Duration, Instant};

/// The columns of a backend row the checks use; the others are not read.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Row {
    pub name: String,
    /// `UP`, `DOWN`, … as the page shows it.
    pub state: String,
    /// Connections the replica has taken.
    pub total: u64,
    pub check_reason: String,
}

/// The rows of a CSV export; a missing column or a malformed figure is an
/// error.
pub fn parse(csv: &str) -> anyhow::Result<Vec<Row>> {
    if csv.trim().is_empty() {
        bail!("empty CSV");
    }
    csv::Reader::from_reader(csv.as_bytes())
        .deserialize()
        .map(|r| r.context("the stats page's CSV"))
        .collect()
}

pub fn up(rows: &[Row], name: &str) -> bool {
    rows.iter().any(|r| r.name == name && r.state == "UP")
}

/// Connections `name` has taken, as the stats page counts them (0 if it
/// has no row).
pub fn total(rows: &[Row], name: &str) -> u64 {
    rows.iter().find(|r| r.name == name).map_or(0, |r| r.total)
}

/// The replica whose connection count grew between two readings.
pub fn served_by(before: &[Row], after: &[Row]) -> Option<String> {
    after
        .iter()
        .find(|a| {
            before
                .iter()
                .find(|b| b.name == a.name)
                .is_none_or(|b| a.total > b.total)
        })
        .map(|a| a.name.clone())
}

pub struct Stats {
    pub port: u16,
}

impl Stats {
    pub fn rows(&self, vm: &Guest) -> anyhow::Result<Vec<Row>> {
        parse(&vm.sh(&format!(
            "curl -fsS 'http://127.0.0.1:{}/stats;csv'",
            self.port
        ))?)
    }

    /// Reads the page until `ok` holds for it; bounded.
    pub fn wait(
        &self,
        vm: &Guest,
        timeout: Duration,
        ok: impl Fn(&[Row]) -> bool,
    ) -> anyhow::Result<Vec<Row>> {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows(vm);
            if let Ok(r) = &rows
                && ok(r)
            {
                return rows;
            }
            if Instant::now() > deadline {
                bail!(
                    "the stats page did not get there within {} s: {}",
                    timeout.as_secs(),
                    match rows {
                        Ok(r) => Self::show(&r),
                        Err(e) => format!("{e:#}"),
                    }
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    pub fn show(rows: &[Row]) -> String {
        rows.iter()
            .map(|r| {
                format!(
                    "{} {} (total {}, check: {})",
                    r.name, r.state, r.total, r.check_reason
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's CSV columns (mtlb-userspace stats::http COLUMNS), a
    /// quoted field with a comma and a doubled quote.
    const CSV: &str = "name,address,state,active,total,weight,check,check_reason,check_duration_ms,since_change_s,downtime_s,accept_queue,bytes_in,bytes_out,handshakes,queue_stalled\n\
        mtp1,127.0.0.1:10000,UP,7,10,1,passed,ok,3,60,0,0,100,200,10,0\n\
        mtp2,127.0.0.1:10001,DOWN,0,4,1,failed,\"connect: refused, \"\"no listener\"\"\",1,5,5,0,0,0,4,0\n";

    #[test]
    fn rows_by_column_name() {
        let rows = parse(CSV).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "mtp1");
        assert!(up(&rows, "mtp1") && !up(&rows, "mtp2"));
        assert_eq!(total(&rows, "mtp2"), 4);
        assert_eq!(total(&rows, "mtp9"), 0);
        assert_eq!(rows[1].check_reason, "connect: refused, \"no listener\"");
    }

    #[test]
    fn a_missing_column_or_bad_figure_is_an_error() {
        assert!(parse("name,state,total\nmtp1,UP,3\n").is_err());
        assert!(parse("name,state,total,check_reason\nmtp1,UP,many,ok\n").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn served_by_is_the_replica_whose_count_grew() {
        let before = parse(CSV).unwrap();
        let mut after = before.clone();
        after[1].total += 1;
        assert_eq!(served_by(&before, &after).as_deref(), Some("mtp2"));
        assert_eq!(served_by(&before, &before), None);
    }
}
