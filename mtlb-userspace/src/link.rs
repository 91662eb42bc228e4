//! Proxy links for users: `tg://proxy?…` and `https://t.me/proxy?…`.

use std::net::IpAddr;

/// The two links for `server`, `port` and `secret`.
pub fn links(server: &str, port: u16, secret: &str) -> [String; 2] {
    let q = format!("server={server}&port={port}&secret={secret}");
    [format!("tg://proxy?{q}"), format!("https://t.me/proxy?{q}")]
}

/// The interface of the default route, from /proc/net/route (no traffic).
pub fn default_route_interface(route: &str) -> Option<String> {
    route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Destination 00000000 with mask 00000000 is the default route.
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// This host's address clients would reach: the first IPv4 address of the
/// default route's interface.
pub fn detect_server() -> Option<IpAddr> {
    let route = std::fs::read_to_string("/proc/net/route").ok()?;
    let iface = default_route_interface(&route)?;
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        if a.interface_name != iface {
            return None;
        }
        let sin = a.address?;
        sin.as_sockaddr_in().map(|s| IpAddr::V4(s.ip()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_exact() {
        let [tg, tme] = links("203.0.113.5", 443, "dd00000000000000000000000000000000");
        assert_eq!(
            tg,
            "tg://proxy?server=203.0.113.5&port=443&secret=dd00000000000000000000000000000000"
        );
        assert_eq!(
            tme,
            "https://t.me/proxy?server=203.0.113.5&port=443&secret=dd00000000000000000000000000000000"
        );
    }

    #[test]
    fn finds_the_default_route() {
        let t = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                 eth1\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(t).as_deref(), Some("eth1"));
        assert_eq!(default_route_interface("Iface\n"), None);
    }
}
