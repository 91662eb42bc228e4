//! Raw `bpf(2)` element operations for the sockmap, a program's run
//! statistics by id, and where a pinned netns or cgroup link is attached.
//!
//! aya's `SockMap` assumes 4-byte values; ours has 8-byte values so that a
//! lookup returns the socket cookie (see `mtlb-ebpf/src/maps.rs`). With an
//! 8-byte value the kernel reads the fd to insert as a u64.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _},
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

/// Name, run count and run time (ns) of the program with id `id`: two
/// syscalls (aya finds a program by id only by walking every program on
/// the host, which a scrape should not do).
pub fn prog_stats(id: u32) -> io::Result<(String, u64, u64)> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // bpf_attr for GET_FD_BY_ID: prog_id, next_id, open_flags.
    let mut by_id = [id, 0u32, 0u32];
    // SAFETY: a valid bpf_attr prefix for the command, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            by_id.as_mut_ptr(),
            std::mem::size_of_val(&by_id),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: bpf_prog_info is plain data; all zeroes is its empty value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    obj_info(fd.as_fd(), &mut info)?;
    let name: Vec<u8> = info
        .name
        .iter()
        .map(|c| *c as u8)
        .take_while(|c| *c != 0)
        .collect();
    Ok((
        String::from_utf8_lossy(&name).into_owned(),
        info.run_cnt,
        info.run_time_ns,
    ))
}

/// Fills `info` (a `bpf_*_info` struct, plain data) for the object `fd`.
fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    // SAFETY: a valid bpf_attr prefix for the command, alive for the call;
    // the kernel writes at most info_len bytes to info.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The inode of the network namespace the netns link (sk_lookup) pinned at
/// `path` is attached to: 0 once that namespace is gone (the kernel
/// detaches a namespace's links when it is dismantled, and the link then
/// reports no namespace).
pub fn pinned_netns_link_ino(path: &std::path::Path) -> io::Result<u32> {
    const BPF_LINK_TYPE_NETNS: u32 = 5;
    let info = pinned_link_info(path, BPF_LINK_TYPE_NETNS, "netns")?;
    // SAFETY: the kernel filled the union's netns member (type checked).
    Ok(unsafe { info.__bindgen_anon_1.netns.netns_ino })
}

/// The id of the cgroup the cgroup link (sock_ops, bind) pinned at `path`
/// is attached to: 0 once that cgroup is gone.
pub fn pinned_cgroup_link_id(path: &std::path::Path) -> io::Result<u64> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let info = pinned_link_info(path, BPF_LINK_TYPE_CGROUP, "cgroup")?;
    // SAFETY: the kernel filled the union's cgroup member (type checked).
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// What the kernel says of the link pinned at `path`, which must be of
/// link type `want` (`what` names it for the error).
fn pinned_link_info(
    path: &std::path::Path,
    want: u32,
    what: &str,
) -> io::Result<aya_obj::generated::bpf_link_info> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // bpf_attr for OBJ_GET: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix for the command; `name` outlives it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &mut attr as *mut ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: bpf_link_info is plain data; all zeroes is its empty value.
    let mut info: aya_obj::generated::bpf_link_info = unsafe { std::mem::zeroed() };
    obj_info(fd.as_fd(), &mut info)?;
    if info.type_ != want {
        return Err(io::Error::other(format!(
            "{} is not a {what} link (type {})",
            path.display(),
            info.type_
        )));
    }
    Ok(info)
}
