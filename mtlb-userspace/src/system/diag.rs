//! TCP sockets of this network namespace through sock_diag (what `ss`
//! uses): listeners with their accept queues, and steered connections with
//! their byte counters and replica.
//!
//! Per-replica traffic is attributed without any per-packet program and
//! without a map entry per connection: the kernel filters the dump to the
//! balanced port (a bytecode filter, so other sockets cost it a comparison
//! and us nothing), and reports each socket's tag from the SK_TAGS socket
//! storage (`INET_DIAG_REQ_SK_BPF_STORAGES`) beside its tcp_info. A
//! closing connection's counts are added to its replica's totals by
//! sock_ops as it leaves ESTABLISHED (its tag then says closed).
//!
//! The request carries attributes (the filter, the storage map) that
//! netlink-packet-sock-diag cannot express, and the dump of a busy server
//! has one message per connection, so requests are built and answers
//! parsed here, by the layouts of linux/inet_diag.h and sock_diag.h.

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use std::os::fd::{AsRawFd as _, BorrowedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;

/// Kernel TCP states (include/net/tcp_states.h) as `idiag_states` bits.
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_NEW_SYN_RECV: u32 = 12;

/// Request attributes (enum in inet_diag.h).
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
/// Answer attributes.
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// `idiag_ext` bit of INET_DIAG_INFO (bit `type - 1`).
const EXT_INFO: u8 = 1 << (INET_DIAG_INFO - 1);
/// sock_diag.h: the map fd inside INET_DIAG_REQ_SK_BPF_STORAGES, and the
/// nesting of the answer.
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

/// sizeof(struct nlmsghdr), sizeof(struct inet_diag_req_v2),
/// sizeof(struct inet_diag_msg).
const NLMSG_HDR: usize = 16;
const REQ_V2: usize = 56;
const DIAG_MSG: usize = 72;
/// Offsets in struct tcp_info.
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// One steered connection (a socket of the balanced port that carries a
/// tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub cookie: u64,
    /// The raw SK_TAGS value: slot and state.
    pub tag: mtlb_common::SockTag,
    /// tcpi_bytes_received: bytes received from the peer.
    pub bytes_received: u64,
    /// tcpi_bytes_acked: bytes sent and acknowledged by the peer.
    pub bytes_acked: u64,
}

/// Every connected TCP socket of the namespace that has a value in the
/// socket storage map `tags` (SK_TAGS): steered connections and direct
/// ones to replica listeners (the caller tells them apart by the tag's
/// state). Not filtered by port: connections steered on a balanced port
/// the agent no longer serves (changed by a reload or a restart) are still
/// open and still count. Needs CAP_SYS_ADMIN (storage) like the agent has.
pub fn connections(tags: BorrowedFd<'_>) -> std::io::Result<Vec<Conn>> {
    let mut attrs = Vec::new();
    let mut nested = Vec::new();
    put_attr(
        &mut nested,
        SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
        &(tags.as_raw_fd() as u32).to_ne_bytes(),
    );
    put_attr(
        &mut attrs,
        INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
        &nested,
    );
    // Every state but listening, time-wait and request sockets (none has
    // storage or counts).
    let states = !(1 << TCP_LISTEN | 1 << TCP_TIME_WAIT | 1 << TCP_NEW_SYN_RECV) & 0xfff;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, states, EXT_INFO, &attrs, |m| {
            let mut c = Conn {
                cookie: m.cookie,
                tag: mtlb_common::SockTag::default(),
                bytes_received: 0,
                bytes_acked: 0,
            };
            let mut tagged = false;
            for (ty, v) in attrs_of(m.attrs) {
                match ty {
                    INET_DIAG_INFO => {
                        c.bytes_acked = u64_at(v, TCPI_BYTES_ACKED);
                        c.bytes_received = u64_at(v, TCPI_BYTES_RECEIVED);
                    }
                    INET_DIAG_SK_BPF_STORAGES => {
                        if let Some(t) = storage_value(v) {
                            c.tag = t;
                            tagged = true;
                        }
                    }
                    _ => {}
                }
            }
            if tagged {
                out.push(c);
            }
        })?;
    }
    Ok(out)
}

/// A listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listening {
    pub addr: std::net::SocketAddr,
    pub cookie: u64,
    pub inode: u64,
    /// Owner: the uid that created the socket.
    pub uid: u32,
    /// Accept queue length now, and its limit (the listen() backlog, as
    /// the kernel caps it).
    pub queued: u32,
    pub backlog: u32,
    /// The cgroup (v2 id: the inode of its directory) the socket was
    /// created in; 0 when the kernel did not say.
    pub cgroup: u64,
}

/// Every listening TCP socket of this network namespace. The kernel walks
/// only its table of listeners for this, never the connections.
pub fn listeners() -> std::io::Result<Vec<Listening>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(family, 1 << TCP_LISTEN, 0, &[], |m| {
            let cgroup = attrs_of(m.attrs)
                .find(|(t, _)| *t == INET_DIAG_CGROUP_ID)
                .map_or(0, |(_, v)| u64_at(v, 0));
            out.push(Listening {
                addr: m.local,
                cookie: m.cookie,
                inode: m.inode as u64,
                uid: m.uid,
                queued: m.rqueue,
                backlog: m.wqueue,
                cgroup,
            });
        })?;
    }
    Ok(out)
}

/// One answer of a dump: struct inet_diag_msg and its attributes.
struct Msg<'a> {
    local: std::net::SocketAddr,
    cookie: u64,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
    attrs: &'a [u8],
}

fn parse_msg(b: &[u8]) -> Option<Msg<'_>> {
    if b.len() < DIAG_MSG {
        return None;
    }
    let family = b[0];
    // inet_diag_sockid: sport, dport (network order), src[4], dst[4]
    // (network order words), if, cookie[2].
    let sport = u16::from_be_bytes([b[4], b[5]]);
    let src: [u8; 16] = b[8..24].try_into().ok()?;
    let ip = if family == AF_INET {
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(src[0], src[1], src[2], src[3]))
    } else {
        std::net::IpAddr::V6(std::net::Ipv6Addr::from(src))
    };
    Some(Msg {
        local: std::net::SocketAddr::new(ip, sport),
        cookie: u64_at(b, 44),
        rqueue: u32_at(b, 56),
        wqueue: u32_at(b, 60),
        uid: u32_at(b, 64),
        inode: u32_at(b, 68),
        attrs: &b[DIAG_MSG..],
    })
}

/// One sock_diag dump of TCP sockets of `family` in `states`, with
/// request attributes `attrs`.
fn dump(
    family: u8,
    states: u32,
    ext: u8,
    attrs: &[u8],
    mut each: impl FnMut(&Msg),
) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let len = NLMSG_HDR + REQ_V2 + attrs.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&[0; 8]); // seq, pid
    // inet_diag_req_v2: family, protocol, ext, pad, states, then a zero
    // inet_diag_sockid (48 bytes) and its cookie "no cookie" (all ones is
    // INET_DIAG_NOCOOKIE, but a dump ignores it).
    req.extend_from_slice(&[family, IPPROTO_TCP, ext, 0]);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0; 48]);
    req.extend_from_slice(attrs);
    socket.send(&req, 0)?;

    let mut rx = vec![0u8; 1 << 17];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off + NLMSG_HDR <= n {
            let mlen = u32_at(&rx, off) as usize;
            let ty = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
            if mlen < NLMSG_HDR || off + mlen > n {
                return Err(std::io::Error::other("sock_diag: truncated message"));
            }
            let body = &rx[off + NLMSG_HDR..off + mlen];
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = body
                        .get(..4)
                        .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                    if errno != 0 {
                        return Err(std::io::Error::from_raw_os_error(-errno));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(m) = parse_msg(body) {
                        each(&m);
                    }
                }
                _ => {}
            }
            off += align4(mlen);
        }
    }
}

/// The netlink attributes in `b`: (type without flags, value).
fn attrs_of(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let v = &b[4..len];
        b = &b[align4(len).min(b.len())..];
        Some((ty, v))
    })
}

/// The SK_TAGS value inside INET_DIAG_SK_BPF_STORAGES (one map asked for,
/// so the first storage is ours).
fn storage_value(v: &[u8]) -> Option<mtlb_common::SockTag> {
    let (_, storage) = attrs_of(v).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE)?;
    let (_, value) = attrs_of(storage).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE_MAP_VALUE)?;
    Some(mtlb_common::SockTag {
        slot: u32_at(value, 0),
        state: u32_at(value, 4),
    })
}

fn put_attr(out: &mut Vec<u8>, ty: u16, v: &[u8]) {
    let len = 4 + v.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(v);
    out.resize(out.len() + align4(len) - len, 0);
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Native-endian words at `off`; 0 past the end (an older kernel's shorter
/// struct).
fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |x| u32::from_ne_bytes(x.try_into().unwrap()))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |x| u64::from_ne_bytes(x.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_listener_its_queue_backlog_and_cgroup() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        s.listen(7).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let l = listeners().unwrap();
        let me = l
            .iter()
            .find(|l| l.addr == addr)
            .unwrap_or_else(|| panic!("{l:?}"));
        assert_eq!((me.queued, me.backlog), (1, 7));
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert_ne!(me.inode, 0);
        assert_ne!(me.cookie, 0);
        assert_ne!(me.cgroup, 0, "kernels since 5.7 report the cgroup");
    }

    #[test]
    fn attributes_round_trip() {
        let mut b = Vec::new();
        put_attr(&mut b, 7, &[1, 2, 3]);
        put_attr(&mut b, 9 | NLA_F_NESTED, &[4; 8]);
        let got: Vec<_> = attrs_of(&b).collect();
        assert_eq!(got, vec![(7, &[1u8, 2, 3][..]), (9, &[4u8; 8][..])]);
        // A storage answer as the kernel nests it.
        let mut value = Vec::new();
        value.extend_from_slice(&5u32.to_ne_bytes());
        value.extend_from_slice(&2u32.to_ne_bytes());
        let mut inner = Vec::new();
        put_attr(&mut inner, 2, &42u32.to_ne_bytes());
        put_attr(&mut inner, SK_DIAG_BPF_STORAGE_MAP_VALUE, &value);
        let mut outer = Vec::new();
        put_attr(&mut outer, SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &inner);
        assert_eq!(
            storage_value(&outer),
            Some(mtlb_common::SockTag { slot: 5, state: 2 })
        );
    }
}
