//! From the agent's state to map contents: what the kernel programs should
//! see (SETTINGS, ADDRESSES, and per slot BACKENDS and STATUS), as effects
//! for what differs from what was written last.

use super::{effect::Effect, slot::Slot};
use crate::config::Config;
use mtlb_common::{Backend, MAX_REPLICAS, Settings, Status, v4_mapped};
use std::{net::IpAddr, time::Instant};

/// Records `want` as written; true when it differs from what was.
fn changed<T: PartialEq + Copy>(written: &mut Option<T>, want: T) -> bool {
    let differs = *written != Some(want);
    *written = Some(want);
    differs
}

/// Writes for each slot whose BACKENDS or STATUS entry changed.
pub(super) fn slots(cfg: &Config, slots: &mut [Slot], now: Instant, out: &mut Vec<Effect>) {
    for (i, s) in slots.iter_mut().enumerate() {
        let slot = i as u32;
        let backend = s.backend(cfg, i, now);
        if changed(&mut s.written_backend, backend) {
            out.push(Effect::WriteBackend { slot, backend });
        }
        let status = s.status(cfg, i, now);
        if changed(&mut s.written_status, status) {
            out.push(Effect::WriteStatus { slot, status });
        }
    }
}

/// Writes that empty `range` (slots not configured, or gone after
/// draining): disabled, and no STATUS row.
pub(super) fn clear(range: std::ops::Range<usize>, out: &mut Vec<Effect>) {
    for slot in range.start as u32..(range.end as u32).min(MAX_REPLICAS) {
        out.push(Effect::WriteBackend {
            slot,
            backend: Backend::default(),
        });
        out.push(Effect::WriteStatus {
            slot,
            status: Status::default(),
        });
    }
}

/// Whether new listeners must pass a check before they get clients: with
/// any check at all.
pub fn verifies(cfg: &Config) -> bool {
    cfg.check.kind != crate::config::CheckKind::None
}

/// ADDRESSES for `cfg`: the balanced addresses (empty: all, by SETTINGS).
pub fn addresses(cfg: &Config) -> Vec<[u8; 16]> {
    cfg.addresses.iter().map(|a| addr16(*a)).collect()
}

/// IPv4-mapped bytes of an address, the form the programs compare.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// SETTINGS for `cfg`, with `slots` replica slots (more than configured
/// while replicas scaled away by a reload are still draining).
pub fn settings(cfg: &Config, netns_cookie: u64, slots: u16) -> Settings {
    Settings {
        netns_cookie,
        port: cfg.port,
        base_port: cfg.base_port,
        replicas: slots,
        all_addresses: cfg.addresses.is_empty() as u8,
        accept_wildcard: 1,
        replica_addr: addr16(cfg.replica_address),
        require_owner: !cfg.any_replica_owner as u8,
        require_verified: verifies(cfg) as u8,
        draws: cfg.algorithm.draws(),
        _pad: [0; 5],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_follow_config() {
        let cfg = Config {
            replicas: 3,
            ..Default::default()
        };
        let s = settings(&cfg, 42, cfg.replicas);
        assert_eq!(s.netns_cookie, 42);
        assert_eq!((s.port, s.base_port, s.replicas), (443, 10000, 3));
        assert_eq!(s.all_addresses, 1);
        assert_eq!(s.replica_addr, v4_mapped([127, 0, 0, 1]));
        assert_eq!(s.draws, 0);
        let cfg = Config {
            algorithm: crate::config::Algorithm::Random,
            ..cfg
        };
        assert_eq!(settings(&cfg, 42, 3).draws, 2);
    }

    #[test]
    fn addresses_in_mapped_form() {
        assert_eq!(
            addr16("10.1.2.3".parse().unwrap())[10..],
            [0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(addr16("::1".parse().unwrap())[15], 1);
    }
}
