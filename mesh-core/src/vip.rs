//! Virtual IPs: each service gets one IPv4 and (when a v6 pool is set) one IPv6
//! address, chosen deterministically from its name so that hosts that allocate
//! independently usually agree, and kept for as long as the service exists.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::hash::fnv1a;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vips {
    #[serde(default)]
    pub v4: Option<Ipv4Addr>,
    #[serde(default)]
    pub v6: Option<Ipv6Addr>,
}

impl Vips {
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPool {
    pub v4: Option<Cidr>,
    pub v6: Option<Cidr>,
}

impl Default for VipPool {
    fn default() -> Self {
        Self {
            v4: Some("10.254.0.0/16".parse().expect("cidr")),
            v6: Some("fd6d:6573:6800::/64".parse().expect("cidr")),
        }
    }
}

fn pick(cidr: &Cidr, name: &str, taken: &impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    // Skip the network address (and the v4 broadcast); tiny pools have no room.
    let size = cidr.size();
    let usable = if cidr.is_ipv4() {
        size.saturating_sub(2)
    } else {
        size.saturating_sub(1)
    };
    if usable == 0 {
        return None;
    }
    let start = u128::from(fnv1a(name.as_bytes())) % usable;
    // Linear probing; bounded so a full v6 /64 cannot loop for ages.
    (0..usable.min(1 << 20))
        .map(|k| cidr.nth(1 + (start + k) % usable))
        .find(|ip| !taken(*ip))
}

impl VipPool {
    /// VIPs for `name` that are not in `taken`.
    pub fn allocate(&self, name: &str, taken: &HashSet<IpAddr>) -> Vips {
        self.allocate_with(name, |ip| taken.contains(&ip))
    }

    /// VIPs for `name` for which `taken` is false.
    pub fn allocate_with(&self, name: &str, taken: impl Fn(IpAddr) -> bool) -> Vips {
        let taken = &taken;
        Vips {
            v4: self
                .v4
                .as_ref()
                .and_then(|c| pick(c, name, taken))
                .and_then(|ip| match ip {
                    IpAddr::V4(v4) => Some(v4),
                    _ => None,
                }),
            v6: self
                .v6
                .as_ref()
                .and_then(|c| pick(c, name, taken))
                .and_then(|ip| match ip {
                    IpAddr::V6(v6) => Some(v6),
                    _ => None,
                }),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.v4.is_some_and(|c| c.contains(ip)) || self.v6.is_some_and(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_collision_free() {
        let pool = VipPool::default();
        let a = pool.allocate("web", &HashSet::new());
        assert_eq!(
            a,
            pool.allocate("web", &HashSet::new()),
            "same name, same VIP"
        );
        assert!(pool.v4.unwrap().contains(IpAddr::V4(a.v4.unwrap())));
        assert!(pool.v6.unwrap().contains(IpAddr::V6(a.v6.unwrap())));
        let taken: HashSet<IpAddr> = a.iter().collect();
        let b = pool.allocate("web", &taken);
        assert_ne!(a.v4, b.v4);
        assert_ne!(a.v6, b.v6);
    }

    #[test]
    fn a_small_pool_fills_up_without_duplicates() {
        let pool = VipPool {
            v4: Some("192.0.2.0/29".parse().unwrap()),
            v6: None,
        };
        let mut taken = HashSet::new();
        for i in 0..6 {
            let v = pool
                .allocate(&format!("s{i}"), &taken)
                .v4
                .expect("room for 6");
            assert!(taken.insert(IpAddr::V4(v)));
            assert_ne!(v.octets()[3], 0);
            assert_ne!(v.octets()[3], 7);
        }
        assert_eq!(pool.allocate("s7", &taken).v4, None);
    }
}
