//! Network namespace identity.

use std::io;

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie the kernel programs compare
/// with `bpf_get_netns_cookie` to tell this namespace's sockets apart.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of this thread's network namespace.
pub fn cookie() -> io::Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    // Any socket will do; it needs no address (lo may still be down).
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length for a u64 option.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
