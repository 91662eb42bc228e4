//! The sk_lookup program's own cost, without the machine's noise: the
//! kernel runs `mtlb_steer` on a synthetic lookup (BPF_PROG_TEST_RUN, which
//! takes sk_lookup contexts since Linux 5.10) `repeat` times back to back
//! with preemption off and reports the mean time per run. No packet, no
//! client: a change in the program shows as a change here even where the
//! rate phases cannot tell it from noise. The kernel's run-time stats must
//! be off ([`run_stats_on`]): with them on every run also times their two
//! clock reads.
//!
//! The program runs against the live maps of a running agent, so it makes
//! the same choice it would make for a SYN: the counters it bumps
//! (LOOKUPS, SLOT_TOTALS.assigned) move, and the connections it "assigns"
//! are never made (the test run assigns into a context that is thrown
//! away).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` is at most this large for the commands used here; the
/// kernel takes a shorter attr as long as what it reads is there.
const ATTR: usize = 128;

fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR]) -> io::Result<i64> {
    // SAFETY: attr is a valid, writable buffer of ATTR bytes, laid out as
    // the command's member of union bpf_attr.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR as u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put_u32(a: &mut [u8; ATTR], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut [u8; ATTR], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(a: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(a[off..off + 4].try_into().expect("4 bytes"))
}

/// A loaded program: a descriptor of it and its id.
pub struct Prog {
    pub fd: OwnedFd,
    pub id: u32,
}

/// The program behind a pinned link (the agent pins links, not programs).
pub fn prog_of_pinned_link(path: &Path) -> io::Result<Prog> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut a = [0u8; ATTR];
    put_u64(&mut a, 0, c.as_ptr() as u64);
    // SAFETY: BPF_OBJ_GET returns a new descriptor we own.
    let link = unsafe { OwnedFd::from_raw_fd(bpf(BPF_OBJ_GET, &mut a)? as i32) };
    // struct bpf_link_info: type, id, prog_id, ...
    let mut info = [0u8; 256];
    let mut a = [0u8; ATTR];
    put_u32(&mut a, 0, link.as_raw_fd() as u32);
    put_u32(&mut a, 4, info.len() as u32);
    put_u64(&mut a, 8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    let prog_id = get_u32(&info, 8);
    let mut a = [0u8; ATTR];
    put_u32(&mut a, 0, prog_id);
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(bpf(BPF_PROG_GET_FD_BY_ID, &mut a)? as i32) };
    Ok(Prog { fd, id: prog_id })
}

fn run_count(prog: &Prog) -> io::Result<u64> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog.id)
        .map(|p| p.run_count())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the program is gone"))
}

/// Whether the kernel counts runs of `prog` now (kernel.bpf_stats_enabled,
/// or any process holding a BPF_ENABLE_STATS descriptor): its run count
/// moves over one test run only then.
pub fn run_stats_on(prog: &Prog) -> io::Result<bool> {
    let before = run_count(prog)?;
    let any: std::net::SocketAddrV4 = "127.0.0.1:9".parse().expect("an address");
    sk_lookup(prog, any, any, 1)?;
    Ok(run_count(prog)? != before)
}

/// `struct bpf_sk_lookup` as BPF_PROG_TEST_RUN takes it.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SkLookupCtx {
    /// Out: the cookie of the socket the program assigned, 0 for none.
    cookie: u64,
    family: u32,
    protocol: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    /// Network byte order.
    remote_port: u16,
    _pad: u16,
    local_ip4: u32,
    local_ip6: [u32; 4],
    /// Host byte order.
    local_port: u32,
    /// Must be 0 in a test run.
    ingress_ifindex: u32,
    /// The struct's tail padding, named so that it is zero: the kernel
    /// refuses a context with anything but zeros after local_port.
    _tail: u32,
}

const _: () = assert!(std::mem::size_of::<SkLookupCtx>() == 72);

/// One test run: `repeat` runs of the program on a TCP lookup from
/// `remote` to `local`.
#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    /// The program's verdict (SK_PASS 1, SK_DROP 0).
    pub verdict: u32,
    /// Mean time of one run (the kernel's figure, ns).
    pub ns_per_run: u32,
    /// The socket the last run assigned (its cookie), 0 for none.
    pub assigned: u64,
}

pub fn sk_lookup(
    prog: &Prog,
    remote: std::net::SocketAddrV4,
    local: std::net::SocketAddrV4,
    repeat: u32,
) -> io::Result<TestRun> {
    let mut ctx = SkLookupCtx {
        family: libc::AF_INET as u32,
        protocol: libc::IPPROTO_TCP as u32,
        remote_ip4: u32::from_ne_bytes(remote.ip().octets()),
        remote_port: remote.port().to_be(),
        local_ip4: u32::from_ne_bytes(local.ip().octets()),
        local_port: local.port() as u32,
        ..Default::default()
    };
    let size = std::mem::size_of::<SkLookupCtx>() as u32;
    let p = std::ptr::from_mut(&mut ctx) as u64;
    // The test member: prog_fd 0, retval 4, data_size_in 8, data_size_out
    // 12, data_in 16, data_out 24, repeat 32, duration 36, ctx_size_in 40,
    // ctx_size_out 44, ctx_in 48, ctx_out 56, flags 64, cpu 68.
    let mut a = [0u8; ATTR];
    put_u32(&mut a, 0, prog.fd.as_raw_fd() as u32);
    put_u32(&mut a, 32, repeat);
    put_u32(&mut a, 40, size);
    put_u32(&mut a, 44, size);
    put_u64(&mut a, 48, p);
    put_u64(&mut a, 56, p);
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    Ok(TestRun {
        verdict: get_u32(&a, 4),
        ns_per_run: get_u32(&a, 36),
        assigned: ctx.cookie,
    })
}
