//! Capability check up front, so a missing one is named instead of showing
//! up later as a bare EPERM from the kernel.

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent does that needs each capability.
///
/// CAP_PERFMON is not asked for: what it allows a BPF loader (reading
/// kernel memory, pointer leaks, no Spectre v1 masking) the programs do not
/// use, and the kernel grants all of it with CAP_SYS_ADMIN anyway
/// (`perfmon_capable()` in include/linux/capability.h).
pub const REQUIRED: &[(Capability, &str)] = &[
    (Capability::CAP_BPF, "load programs and create maps"),
    (
        Capability::CAP_NET_ADMIN,
        "attach sk_lookup and sock_ops programs",
    ),
    (
        Capability::CAP_SYS_ADMIN,
        "mount bpffs/cgroup2 and read socket cookies",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "adopt listeners of replicas started before the agent (pidfd_getfd)",
    ),
];

/// Required capabilities missing from `effective`, with their use.
pub fn missing(effective: &CapsHashSet) -> Vec<String> {
    REQUIRED
        .iter()
        .filter(|(cap, _)| !effective.contains(cap))
        .map(|(cap, why)| format!("{cap} (to {why})"))
        .collect()
}

/// Missing capabilities of this process (none named when they cannot be
/// read: the kernel will say).
pub fn check() -> Vec<String> {
    caps::read(None, CapSet::Effective).map_or_else(|_| Vec::new(), |eff| missing(&eff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_missing() {
        let all: CapsHashSet = caps::all();
        assert!(missing(&all).is_empty());
        let mut no_bpf = all.clone();
        no_bpf.remove(&Capability::CAP_BPF);
        let m = missing(&no_bpf);
        assert_eq!(m, ["CAP_BPF (to load programs and create maps)"]);
        assert_eq!(missing(&CapsHashSet::new()).len(), REQUIRED.len());
    }
}
