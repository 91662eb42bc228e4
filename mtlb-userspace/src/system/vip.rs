//! The service addresses (VIPs) a host announces, as the kernel holds
//! them: each VIP is a local address on `lo` (so sk_lookup sees its
//! connections), and an announced VIP is a host route in a routing table
//! of mtlb's own, which the host's BIRD learns (`protocol kernel { kernel
//! table N; learn; }`) and exports over BGP.
//!
//! The route, not the address, carries the announcement: withdrawing must
//! not take the address away (what the router still sends while it
//! converges is served, not reset by the host itself), and kernel state
//! outlives the agent,
//! so an agent killed or restarted leaves the announcement as it was.
//! No rule points at the table: it routes nothing on this host.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::{io, net::IpAddr};

/// "192.0.2.80, 2001:db8::80": addresses as the journal, the CLI and the
/// stats page list them.
pub fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The loopback device is ifindex 1 in every network namespace.
const LO: u32 = 1;

fn family(ip: IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// A rtnetlink socket of the calling thread's network namespace.
struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Strict checking makes a dump honour the request's table, so a host
        // with a large main table is not read whole (kernels before 4.20
        // filter nothing; `announced` filters too).
        sock.set_netlink_get_strict_chk(true).or_else(|e| {
            if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        Ok(Self { sock, seq: 0 })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq += 1;
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | flags;
        hdr.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        Ok(self.seq)
    }

    /// Reads the answers to request `seq` until its ACK/error or the end
    /// of its dump; hands each inner message to `each`.
    fn answers(&mut self, seq: u32, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv(&mut &mut buf[..], 0)?;
            let mut at = 0;
            while at < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[at..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    // A dump's own error comes in its end (strict
                    // checking); a table never used does not exist yet:
                    // nothing in it.
                    NetlinkPayload::Done(d) if d.code == 0 || d.code == -libc::ENOENT => {
                        return Ok(());
                    }
                    NetlinkPayload::Done(d) => {
                        return Err(io::Error::from_raw_os_error(-d.code));
                    }
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }

    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        self.answers(seq, |_| {})
    }
}

fn route(table: u32, vip: IpAddr) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(vip);
    m.header.destination_prefix_length = host_len(vip);
    // The table goes in RTA_TABLE: the header's byte holds only 0..=255.
    m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Link;
    m.header.kind = RouteType::Unicast;
    m.attributes = vec![
        RouteAttribute::Table(table),
        RouteAttribute::Destination(RouteAddress::from(vip)),
        RouteAttribute::Oif(LO),
    ];
    m
}

/// The VIPs announced in `table` now: its host routes.
pub fn announced(table: u32) -> io::Result<Vec<IpAddr>> {
    let mut nl = Rtnl::open()?;
    let mut found = Vec::new();
    for af in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut q = RouteMessage::default();
        q.header.address_family = af;
        q.attributes = vec![RouteAttribute::Table(table)];
        let seq = nl.send(RouteNetlinkMessage::GetRoute(q), NLM_F_DUMP)?;
        nl.answers(seq, |m| {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                return;
            };
            let in_table = r.attributes.contains(&RouteAttribute::Table(table));
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if let Some(dst) = dst
                && in_table
                && r.header.destination_prefix_length == host_len(dst)
            {
                found.push(dst);
            }
        })?;
    }
    Ok(found)
}

/// Of `vips`, those `found` in the announce table, in `vips`' order.
pub fn among(vips: &[IpAddr], found: &[IpAddr]) -> Vec<IpAddr> {
    vips.iter().copied().filter(|v| found.contains(v)).collect()
}

/// Announces (`announce`) or withdraws each of `vips` in `table`, every
/// one tried over one socket; the ones that failed, with why.
pub fn write(table: u32, vips: &[IpAddr], announce: bool) -> Vec<(IpAddr, io::Error)> {
    let mut nl = match Rtnl::open() {
        Ok(nl) => nl,
        Err(e) => {
            return vips
                .iter()
                .map(|&v| (v, io::Error::new(e.kind(), e.to_string())))
                .collect();
        }
    };
    vips.iter()
        .filter_map(|&v| {
            let r = if announce {
                nl.announce(table, v)
            } else {
                nl.withdraw(table, v)
            };
            r.err().map(|e| (v, e))
        })
        .collect()
}

impl Rtnl {
    /// `vip`'s host route in `table` (replaced if there).
    fn announce(&mut self, table: u32, vip: IpAddr) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewRoute(route(table, vip)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Deletes every host route to `vip` from `table`, whoever wrote it
    /// (none is fine).
    fn withdraw(&mut self, table: u32, vip: IpAddr) -> io::Result<()> {
        // Only the destination and the table: the kernel matches a delete
        // on every field it is given, and a route of another protocol,
        // scope or device left in the table would stay announced.
        let mut m = RouteMessage::default();
        m.header.address_family = family(vip);
        m.header.destination_prefix_length = host_len(vip);
        m.header.scope = RouteScope::NoWhere;
        m.attributes = vec![
            RouteAttribute::Table(table),
            RouteAttribute::Destination(RouteAddress::from(vip)),
        ];
        // A route added twice under other attributes is deleted once each.
        for _ in 0..16 {
            match self.request(RouteNetlinkMessage::DelRoute(m.clone()), 0) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
                Err(e) => return Err(e),
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

/// The first failure of a [`write`], as an error naming its VIP.
pub fn first_failure(failed: Vec<(IpAddr, io::Error)>) -> io::Result<()> {
    match failed.into_iter().next() {
        Some((v, e)) => Err(io::Error::new(e.kind(), format!("{v}: {e}"))),
        None => Ok(()),
    }
}

/// Takes mtlb off the announcement for good (`mtlb remove`): every route
/// in `table` withdrawn, whatever config wrote it, and `vips` taken off
/// `lo`. Returns what was withdrawn.
pub fn retire(table: u32, vips: &[IpAddr]) -> io::Result<Vec<IpAddr>> {
    let mut gone = announced(table)?;
    for &v in vips {
        if !gone.contains(&v) {
            gone.push(v);
        }
    }
    first_failure(write(table, &gone, false))?;
    remove_local(vips)?;
    Ok(gone)
}

fn address(vip: IpAddr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(vip);
    m.header.prefix_len = host_len(vip);
    m.header.scope = AddressScope::Universe;
    m.header.index = LO;
    m.attributes = vec![AddressAttribute::Local(vip), AddressAttribute::Address(vip)];
    m
}

/// Makes each VIP a local address on `lo` (a host prefix); returns those
/// it added (the others were there).
pub fn ensure_local(vips: &[IpAddr]) -> io::Result<Vec<IpAddr>> {
    let mut nl = Rtnl::open()?;
    let mut added = Vec::new();
    for &vip in vips {
        match nl.request(
            RouteNetlinkMessage::NewAddress(address(vip)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(()) => added.push(vip),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(added)
}

/// Takes the VIPs off `lo` (`mtlb remove`); one not there is fine.
pub fn remove_local(vips: &[IpAddr]) -> io::Result<()> {
    let mut nl = Rtnl::open()?;
    for &vip in vips {
        match nl.request(RouteNetlinkMessage::DelAddress(address(vip)), 0) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            r => r?,
        }
    }
    Ok(())
}
