//! IP networks in CIDR notation, for VIP pools and DNS access lists. `ipnet` does the
//! parsing and the prefix math; this type adds what mesh needs on top: a bare address
//! means a single host, an IPv4 client seen through a dual-stack socket
//! (`::ffff:a.b.c.d`) matches IPv4 networks, and a pool can be indexed.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    pub fn prefix(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.contains(&ip)
    }

    /// The number of addresses in the network (saturating for a whole IPv6 space).
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(self.0.max_prefix_len() - self.0.prefix_len());
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    }

    /// The address at `offset` from the start of the network.
    pub fn nth(&self, offset: u128) -> IpAddr {
        match self.0.network() {
            IpAddr::V4(base) => IpAddr::V4(u32::from(base).wrapping_add(offset as u32).into()),
            IpAddr::V6(base) => IpAddr::V6(u128::from(base).wrapping_add(offset).into()),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Cidr(IpNet::from(ip)));
        }
        s.parse::<IpNet>()
            .map(Cidr)
            .map_err(|_| format!("{s:?} is not an IP network like 10.0.0.0/8 or fd00::/64"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_and_parse() {
        let c: Cidr = "10.254.0.0/16".parse().unwrap();
        assert!(c.contains("10.254.3.4".parse().unwrap()));
        assert!(!c.contains("10.253.3.4".parse().unwrap()));
        assert!(c.contains("::ffff:10.254.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
        let v6: Cidr = "fd6d:6573:6800::/64".parse().unwrap();
        assert!(v6.contains("fd6d:6573:6800::1234".parse().unwrap()));
        assert_eq!("127.0.0.1".parse::<Cidr>().unwrap().prefix(), 32);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("ten/8".parse::<Cidr>().is_err());
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
    }

    #[test]
    fn size_and_nth() {
        let c: Cidr = "192.0.2.0/30".parse().unwrap();
        assert_eq!(c.size(), 4);
        assert_eq!(c.nth(1), "192.0.2.1".parse::<IpAddr>().unwrap());
        let all: Cidr = "::/0".parse().unwrap();
        assert_eq!(all.size(), u128::MAX);
    }
}
