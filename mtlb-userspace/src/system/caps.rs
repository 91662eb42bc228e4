//! Capability check up front, so a missing one is named instead of showing
//! up later as a bare EPERM from the kernel.

/// What the agent does that needs each capability.
pub const REQUIRED: &[(u32, &str, &str)] = &[
    (39, "CAP_BPF", "load programs and create maps"),
    (
        38,
        "CAP_PERFMON",
        "load the fexit programs that count handshakes",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "attach sk_lookup and sock_ops programs",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "mount bpffs/cgroup2 and read socket cookies",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "adopt listeners of replicas started before the agent (pidfd_getfd)",
    ),
];

/// Parses the `CapEff:` line of /proc/self/status.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Names of required capabilities missing from `eff`, with their use.
pub fn missing(eff: u64) -> Vec<String> {
    REQUIRED
        .iter()
        .filter(|(bit, _, _)| eff & (1u64 << bit) == 0)
        .map(|(_, name, why)| format!("{name} (to {why})"))
        .collect()
}

/// Missing capabilities of this process.
pub fn check() -> Vec<String> {
    match std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(parse_cap_eff)
    {
        Some(eff) => missing(eff),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_missing() {
        let s = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(s), Some(0x1ff_ffff_ffff));
        assert!(missing(0x1ff_ffff_ffff).is_empty());
        let m = missing(0x1ff_ffff_ffff & !(1 << 39));
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_BPF"));
        assert_eq!(missing(0).len(), REQUIRED.len());
    }
}
