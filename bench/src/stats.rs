//! Small statistics and /proc readings.

/// The `q` quantile (nearest rank) of `v`, NaN when empty. Sorts `v`.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Median, min, max, first and third quartile of a series.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub q1: f64,
    pub q3: f64,
    pub n: usize,
}

pub fn summary(v: &[f64]) -> Summary {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            q1: f64::NAN,
            q3: f64::NAN,
            n: 0,
        };
    }
    let at = |q: f64| {
        // Linear interpolation between closest ranks.
        let pos = q * (s.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
    };
    Summary {
        median: at(0.5),
        min: s[0],
        max: s[s.len() - 1],
        q1: at(0.25),
        q3: at(0.75),
        n: s.len(),
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Process CPU seconds (utime + stime, all threads) from /proc/<pid>/stat.
pub fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    (ut + st) / clk_tck()
}

/// Children of a process (all its threads'), from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// CPU seconds of a process and its children (nginx: master + workers).
pub fn tree_cpu(pid: u32) -> f64 {
    proc_cpu(pid) + children(pid).into_iter().map(proc_cpu).sum::<f64>()
}

/// Whole-machine busy CPU seconds from /proc/stat (everything but idle
/// and iowait).
pub fn machine_cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let l = s.lines().next().unwrap_or("");
    let v: Vec<f64> = l
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy / clk_tck()
}

/// CPU seconds so far of every userspace process outside the network
/// namespace `ns_ino` (kernel threads left out: they also serve the
/// bench's traffic): pid -> seconds.
pub fn foreign_cpu(ns_ino: u64) -> std::collections::HashMap<u32, f64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut out = std::collections::HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if ns.ino() == ns_ino {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // ppid 2 (kthreadd) and kthreadd itself: kernel threads.
        if pid == 2 || f.get(1) == Some(&"2") {
            continue;
        }
        let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
        let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
        out.insert(pid, (ut + st) / clk_tck());
    }
    out
}

/// CPU seconds the processes of `after` used since `before` (a process
/// new in `after` counts whole).
pub fn foreign_delta(
    before: &std::collections::HashMap<u32, f64>,
    after: &std::collections::HashMap<u32, f64>,
) -> f64 {
    after
        .iter()
        .map(|(p, t)| (t - before.get(p).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// VmRSS of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_summary() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!(
            (s.median, s.min, s.max, s.q1, s.q3),
            (2.0, 1.0, 3.0, 1.5, 2.5)
        );
        assert!(summary(&[]).median.is_nan());
    }
}
