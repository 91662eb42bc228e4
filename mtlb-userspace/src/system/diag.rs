//! Live TCP sockets of this network namespace through sock_diag (what `ss`
//! uses), with their tcp_info byte counters.
//!
//! Per-replica traffic is attributed without any per-packet program: a
//! steered connection's socket cookie maps to its replica (the LIVE map,
//! kept by sock_ops), its bytes so far come from tcp_info here at scrape
//! time, and a closed connection's final counts are added to its replica's
//! totals by sock_ops at TCP_CLOSE.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// One connected TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    pub cookie: u64,
    pub local_port: u16,
    /// tcpi_bytes_received: bytes received from the peer.
    pub bytes_received: u64,
    /// tcpi_bytes_acked: bytes sent and acknowledged by the peer.
    pub bytes_acked: u64,
}

/// Every non-listening TCP socket whose local port is `port`.
pub fn connections(port: u16) -> std::io::Result<Vec<Conn>> {
    let mut out = Vec::new();
    let states = StateFlags::all() & !StateFlags::LISTEN & !StateFlags::TIME_WAIT;
    for family in [AF_INET, AF_INET6] {
        query(family, states.clone(), ExtensionFlags::INFO, |r| {
            if r.header.socket_id.source_port != port {
                return;
            }
            let mut c = Conn {
                cookie: u64::from_ne_bytes(r.header.socket_id.cookie),
                local_port: port,
                bytes_received: 0,
                bytes_acked: 0,
            };
            for nla in &r.nlas {
                if let Nla::TcpInfo(t) = nla {
                    c.bytes_received = t.bytes_received;
                    c.bytes_acked = t.bytes_acked;
                }
            }
            out.push(c);
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
}

/// Every listening TCP socket of this network namespace. The kernel walks
/// only its table of listeners for this, never the connections.
pub fn listeners() -> std::io::Result<Vec<Listening>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        query(family, StateFlags::LISTEN, ExtensionFlags::empty(), |r| {
            let h = &r.header;
            out.push(Listening {
                addr: std::net::SocketAddr::new(
                    h.socket_id.source_address,
                    h.socket_id.source_port,
                ),
                cookie: u64::from_ne_bytes(h.socket_id.cookie),
                inode: h.inode as u64,
                uid: h.uid,
                queued: h.recv_queue,
                backlog: h.send_queue,
            });
        })?;
    }
    Ok(out)
}

/// One sock_diag dump of TCP sockets of `family` in `states`.
fn query(
    family: u8,
    states: StateFlags,
    extensions: ExtensionFlags,
    mut each: impl FnMut(&InetResponse),
) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(
        hdr,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    req.finalize();
    let mut buf = vec![0; req.header.length as usize];
    req.serialize(&mut buf[..]);
    socket.send(&buf[..], 0)?;

    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                .map_err(|e| std::io::Error::other(format!("sock_diag: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => each(&r),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e:?}")));
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn sees_a_loopback_connection_and_its_bytes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(&[7u8; 1000]).unwrap();
        let mut b = [0u8; 1000];
        s.read_exact(&mut b).unwrap();
        let conns = connections(port).unwrap();
        let server = conns
            .iter()
            .find(|x| x.bytes_received == 1000)
            .unwrap_or_else(|| panic!("{conns:?}"));
        assert_eq!(server.local_port, port);
        assert_ne!(server.cookie, 0);
    }

    #[test]
    fn sees_a_listener_its_queue_and_backlog() {
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
    }
}
