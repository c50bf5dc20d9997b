//! Service virtual IP choice: a pure function from the range, the taken
//! addresses and the service's name to a free address. Uniqueness across
//! controller replicas comes from the store (a create-if-absent of
//! `vips/<ip>` in the same transaction as the Service), not from here.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// Whether `ip` may be a VIP of `range` (not its network or broadcast
/// address).
pub fn usable_v4(range: &Ipv4Net, ip: Ipv4Addr) -> bool {
    range.contains(&ip) && ip != range.network() && ip != range.broadcast()
}

pub fn usable_v6(range: &Ipv6Net, ip: std::net::Ipv6Addr) -> bool {
    range.contains(&ip) && ip != range.network()
}

/// A free address in `range`, starting from a point derived from `seed`
/// (so a re-created Service tends to get its old VIP back) and probing
/// upwards. None when the range is full.
pub fn choose_v4(range: &Ipv4Net, taken: &HashSet<IpAddr>, seed: &str) -> Option<Ipv4Addr> {
    let base = u32::from(range.network());
    let size = 1u64 << (32 - u32::from(range.prefix_len()));
    if size < 4 {
        return None;
    }
    // Usable offsets are 1..size-1 (skipping network and broadcast).
    let usable = size - 2;
    let start = fnv1a(seed) % usable;
    for i in 0..usable {
        let offset = 1 + (start + i) % usable;
        let ip = Ipv4Addr::from(base.wrapping_add(offset as u32));
        if !taken.contains(&IpAddr::V4(ip)) {
            return Some(ip);
        }
    }
    None
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_network_or_broadcast_or_taken() {
        let range: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let mut taken = HashSet::new();
        for i in 0..6 {
            let ip = choose_v4(&range, &taken, &format!("svc{i}")).unwrap();
            assert!(usable_v4(&range, ip), "{ip}");
            assert!(taken.insert(IpAddr::V4(ip)), "{ip} twice");
        }
        assert_eq!(choose_v4(&range, &taken, "full"), None);
    }

    #[test]
    fn the_same_seed_gets_the_same_address() {
        let range: Ipv4Net = "240.240.0.0/16".parse().unwrap();
        let empty = HashSet::new();
        assert_eq!(
            choose_v4(&range, &empty, "shop/web"),
            choose_v4(&range, &empty, "shop/web")
        );
    }

    #[test]
    fn usable_checks_the_range() {
        let range: Ipv4Net = "240.240.0.0/16".parse().unwrap();
        assert!(usable_v4(&range, "240.240.0.10".parse().unwrap()));
        assert!(!usable_v4(&range, "240.240.0.0".parse().unwrap()));
        assert!(!usable_v4(&range, "240.240.255.255".parse().unwrap()));
        assert!(!usable_v4(&range, "10.0.0.1".parse().unwrap()));
    }
}
