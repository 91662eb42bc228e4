//! The Prometheus text format (0.0.4) of what prometheus-client writes as
//! OpenMetrics.
//!
//! prometheus-client writes OpenMetrics only. Prometheus asks for it and
//! reads it, but most other readers of `/metrics` (`promtool check
//! metrics`, curl and grep, older agents) speak the older text format, in
//! which a counter's HELP and TYPE name the `_total` sample itself, there
//! is no `info` type and no `# EOF`. So `/metrics` serves OpenMetrics to
//! clients that ask for it (as Prometheus does) and this text to the rest,
//! as the Go client does. The samples are the same lines.

/// Rewrites OpenMetrics text into the 0.0.4 text format: counter families
/// are named by their `_total` sample, `info` families become gauges
/// named `_info`, UNIT lines and `# EOF` go. Anything else passes through.
pub fn from_openmetrics(om: &str) -> String {
    // Family name -> the name its metadata takes in the text format.
    let mut renamed: Vec<(String, String)> = Vec::new();
    for line in om.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let Some((name, kind)) = rest.split_once(' ') else {
            continue;
        };
        let new = match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => continue,
        };
        renamed.push((name.to_string(), new));
    }
    let rename = |name: &str| {
        renamed
            .iter()
            .find(|(from, _)| from == name)
            .map_or(name.to_string(), |(_, to)| to.clone())
    };
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", rename(name)));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = if kind == "info" { "gauge" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", rename(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n\
                      # HELP a_temp Temperature.\n# TYPE a_temp gauge\n# UNIT a_temp celsius\na_temp 1.5\n\
                      # HELP a_build Build.\n# TYPE a_build info\na_build_info{version=\"1\"} 1\n# EOF\n";

    #[test]
    fn counters_and_infos_are_named_by_their_samples() {
        assert_eq!(
            from_openmetrics(OM),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n\
             # HELP a_temp Temperature.\n# TYPE a_temp gauge\na_temp 1.5\n\
             # HELP a_build_info Build.\n# TYPE a_build_info gauge\na_build_info{version=\"1\"} 1\n"
        );
    }

    #[test]
    fn sample_lines_are_unchanged() {
        let text = from_openmetrics(OM);
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(String::from)
                .collect()
        };
        assert_eq!(samples(&text), samples(OM));
    }
}
