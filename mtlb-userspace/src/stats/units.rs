//! Numbers as an operator reads them on the stats page: durations like
//! `2h13m`, bytes in KiB/MiB/GiB. The CSV and /metrics keep raw numbers
//! for programs.

/// A duration in seconds, to two units at most: `0.4s`, `4.6s`, `42s`,
/// `13m05s`, `2h13m`, `3d04h`. Precision drops as it grows: at a glance
/// "2h13m" says more than "7980.4".
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 10.0 {
        // Tenths, truncated: 9.96 s is not yet "10.0s".
        return format!("{:.1}s", (secs * 10.0).floor() / 10.0);
    }
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Milliseconds of a health check: `3ms`, `1.2s`.
pub fn millis(ms: u32) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        duration(ms as f64 / 1000.0)
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `20.0 MiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    // 1023.96 KiB would print as "1024.0 KiB": say the next unit instead.
    if format!("{v:.1}") == "1024.0" && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A count with thin groups of three digits (`1 234 567`), so big totals
/// read at a glance; a no-break space keeps a number on one line.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() * 2);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (secs, want) in [
            (0.0, "0.0s"),
            (0.44, "0.4s"),
            (4.6, "4.6s"),
            (9.96, "9.9s"),
            (10.0, "10s"),
            (59.9, "59s"),
            (60.0, "1m00s"),
            (785.0, "13m05s"),
            (3599.0, "59m59s"),
            (3600.0, "1h00m"),
            (7980.4, "2h13m"),
            (86399.0, "23h59m"),
            (86400.0, "1d00h"),
            (273600.0, "3d04h"),
            (-1.0, "-"),
            (f64::NAN, "-"),
        ] {
            assert_eq!(duration(secs), want, "{secs}");
        }
    }

    #[test]
    fn check_millis() {
        assert_eq!(millis(0), "0ms");
        assert_eq!(millis(999), "999ms");
        assert_eq!(millis(1200), "1.2s");
        assert_eq!(millis(61_000), "1m01s");
    }

    #[test]
    fn binary_byte_units() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (20 * 1024 * 1024, "20.0 MiB"),
            (3_435_973_837, "3.2 GiB"),
            (5 << 40, "5.0 TiB"),
            (u64::MAX, "16.0 EiB"),
        ] {
            assert_eq!(bytes(n), want, "{n}");
        }
    }

    #[test]
    fn grouped_counts() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1\u{202f}000");
        assert_eq!(count(1_234_567), "1\u{202f}234\u{202f}567");
    }
}
