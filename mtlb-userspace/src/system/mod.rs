//! System plumbing: mounts, capabilities, namespaces, sock_diag, systemd
//! notification.

pub mod caps;
pub mod diag;
pub mod mounts;
pub mod netns;
pub mod vip;

/// Raises the soft limit on open files to the hard one: checks, the control
/// socket and the stats endpoint each need descriptors, and a low default
/// soft limit (1024) is the first thing a flood would exhaust. Returns the
/// limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(r.rlim_cur)
}
