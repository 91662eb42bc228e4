//! Raw `bpf(2)` element operations for the sockmap.
//!
//! aya's `SockMap` assumes 4-byte values; ours has 8-byte values so that a
//! lookup returns the socket cookie (see `mtlb-ebpf/src/maps.rs`). With an
//! 8-byte value the kernel reads the fd to insert as a u64.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// The `bpf_attr` member used by the MAP_*_ELEM commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> io::Result<()> {
    // SAFETY: attr is a valid bpf_attr prefix for this command and lives
    // for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Cookie of the socket in `slot`, or None when the slot is empty.
pub fn sockmap_cookie(map: BorrowedFd<'_>, slot: u32) -> io::Result<Option<u64>> {
    let mut cookie: u64 = 0;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &slot as *const u32 as u64,
        value: &mut cookie as *mut u64 as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(cookie)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Puts `socket` (a listening TCP socket) in `slot` if the slot is empty;
/// EEXIST when it holds a socket.
pub fn sockmap_insert(map: BorrowedFd<'_>, slot: u32, socket: impl AsFd) -> io::Result<()> {
    let fd: u64 = socket.as_fd().as_raw_fd() as u64;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &slot as *const u32 as u64,
        value: &fd as *const u64 as u64,
        flags: 1, // BPF_NOEXIST
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
}

/// Empties `slot` of a sockmap.
pub fn sockmap_delete(map: BorrowedFd<'_>, slot: u32) -> io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &slot as *const u32 as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
