//! What the running kernel must offer, checked before anything is loaded:
//! a kernel without one of them gets a sentence naming it and the Linux
//! version that has it, instead of a verifier dump.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// The oldest kernel with everything below (`bpf_get_netns_cookie` in
/// sock_ops came last, in 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "this kernel ({release}) is older than Linux {}.{}, the oldest mtlb runs on",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    TooOld { release: String },
    #[error("this kernel ({release}) lacks {what} (Linux {since}+ has it)")]
    Missing {
        release: String,
        what: String,
        since: &'static str,
    },
    #[error("probing the kernel for {what}: {detail}")]
    Probe { what: String, detail: String },
}

enum Feature {
    Program(ProgramType, &'static str),
    Map(MapType, &'static str),
    Helper(ProgramType, BpfHelper, &'static str),
}

/// (feature, the Linux version that has it).
fn needs() -> Vec<(Feature, &'static str)> {
    use Feature::*;
    vec![
        (Program(ProgramType::SkLookup, "sk_lookup programs"), "5.9"),
        (Program(ProgramType::SockOps, "sock_ops programs"), "4.13"),
        (
            Program(ProgramType::CgroupSockAddr, "cgroup bind hooks"),
            "4.17",
        ),
        (
            Program(
                ProgramType::TracePoint,
                "tracepoint programs (signal:signal_generate, the stop-signal watch)",
            ),
            "4.7",
        ),
        (Map(MapType::SockMap, "sockmaps"), "4.14"),
        (Map(MapType::SkStorage, "socket-local storage"), "5.2"),
        (Map(MapType::RingBuf, "BPF ring buffers"), "5.8"),
        (Map(MapType::LruHash, "LRU hash maps"), "4.10"),
        (
            Helper(
                ProgramType::SkLookup,
                BpfHelper::BPF_FUNC_sk_assign,
                "bpf_sk_assign in sk_lookup",
            ),
            "5.9",
        ),
        (
            Helper(
                ProgramType::SockOps,
                BpfHelper::BPF_FUNC_get_netns_cookie,
                "bpf_get_netns_cookie in sock_ops",
            ),
            "5.15",
        ),
        (
            Helper(
                ProgramType::SockOps,
                BpfHelper::BPF_FUNC_sk_storage_get,
                "socket storage in sock_ops",
            ),
            "5.3",
        ),
        (
            Helper(
                ProgramType::SockOps,
                BpfHelper::BPF_FUNC_ringbuf_output,
                "ring buffers in sock_ops",
            ),
            "5.8",
        ),
        (
            Helper(
                ProgramType::TracePoint,
                BpfHelper::BPF_FUNC_ringbuf_output,
                "ring buffers in tracepoint programs",
            ),
            "5.8",
        ),
        (
            Helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_current_uid_gid,
                "bpf_get_current_uid_gid in bind hooks",
            ),
            "4.17",
        ),
        (
            Helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_sk_storage_get,
                "socket storage in bind hooks",
            ),
            "5.10",
        ),
        (
            Helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
                "bpf_get_current_ancestor_cgroup_id in bind hooks",
            ),
            "5.7",
        ),
        (
            Helper(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_get_current_cgroup_id,
                "bpf_get_current_cgroup_id in bind hooks",
            ),
            "5.7",
        ),
    ]
}

/// `major.minor` of a release string like "6.1.0-57-amd64".
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The release uname(2) reports to this process.
fn uname_release() -> Option<String> {
    // SAFETY: uname fills a local struct; release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(u.release.as_ptr())
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Checks the running kernel; the first thing missing is the error.
pub fn check() -> Result<(), ProbeError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    // uname, not /proc: a process may be told an older version (personality
    // UNAME26), and then it is that kernel it must refuse.
    let reported = uname_release().unwrap_or_else(|| release.clone());
    match version_of(&reported) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => return Err(ProbeError::TooOld { release: reported }),
    }
    for (feature, since) in needs() {
        let (what, supported) = match feature {
            Feature::Program(t, what) => (what, is_program_supported(t).map_err(|e| e.to_string())),
            Feature::Map(t, what) => (what, is_map_supported(t).map_err(|e| e.to_string())),
            Feature::Helper(t, h, what) => {
                (what, is_helper_supported(t, h).map_err(|e| e.to_string()))
            }
        };
        match supported {
            Ok(true) => {}
            Ok(false) => {
                return Err(ProbeError::Missing {
                    release,
                    what: what.into(),
                    since,
                });
            }
            Err(detail) => {
                return Err(ProbeError::Probe {
                    what: what.into(),
                    detail,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version_of("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(version_of("5.15.0"), Some((5, 15)));
        assert_eq!(version_of("2.6.60"), Some((2, 6)));
        assert!((5, 14) < MIN_KERNEL && (5, 15) >= MIN_KERNEL && (6, 1) > MIN_KERNEL);
        assert_eq!(version_of("garbage"), None);
    }
}
