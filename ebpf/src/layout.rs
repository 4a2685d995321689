//! The map layouts of `bpf/sock_lb.bpf.c`, byte for byte, and their conversion from
//! and to the plan's addresses. Both families use one 16-byte form (IPv4 as
//! `::ffff:a.b.c.d`), and every address and port is in network byte order, as the
//! kernel hands them to the programs.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use mesh_core::Protocol;

/// The most tasks one frontend balances over (`MAX_SLOTS` in the C program).
pub const MAX_SLOTS: usize = 256;
/// Entries of `mesh_backends`, and so the most distinct task addresses.
pub const MAX_BACKENDS: u32 = 65536;
/// Entries of `mesh_frontends`.
pub const MAX_FRONTENDS: usize = 16384;
/// Entries of the LRU maps `mesh_flows` and `mesh_revnat`: the sockets whose choice
/// is remembered before the least recently used is forgotten.
pub const MAX_FLOWS: u32 = 65536;
pub const MAX_REVNAT: u32 = 131072;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// `struct frontend_key`: a VIP, port and protocol.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub ip: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct frontend`: the whole backend set of a frontend, by backend id.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FrontendValue {
    pub count: u32,
    pub cursor: u32,
    pub backends: [u32; MAX_SLOTS],
}

/// `struct backend`: a task's address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendValue {
    pub ip: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

/// `struct revnat_key`: a socket (by cookie) and the task it was sent to. Its
/// presence says the programs chose that task for that socket.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevnatKey {
    pub cookie: u64,
    pub ip: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 6],
}

/// `struct revnat`: the VIP and port the socket asked for.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevnatValue {
    pub ip: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 2],
}

impl RevnatKey {
    pub fn new(cookie: u64, task: SocketAddr) -> RevnatKey {
        RevnatKey {
            cookie,
            ip: wide(task.ip()),
            port: task.port().to_be_bytes(),
            pad: [0; 6],
        }
    }
}

// SAFETY: plain `repr(C)` data of integers and byte arrays with no implicit padding
// (checked by the size test below); any bit pattern is a valid value.
unsafe impl aya::Pod for FrontendKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FrontendValue {}
// SAFETY: as above.
unsafe impl aya::Pod for BackendValue {}
// SAFETY: as above.
unsafe impl aya::Pod for RevnatKey {}
// SAFETY: as above.
unsafe impl aya::Pod for RevnatValue {}

fn wide(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn narrow(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl FrontendKey {
    pub fn new(vip: IpAddr, port: u16, protocol: Protocol) -> FrontendKey {
        FrontendKey {
            ip: wide(vip),
            port: port.to_be_bytes(),
            proto: match protocol {
                Protocol::Tcp => IPPROTO_TCP,
                Protocol::Udp => IPPROTO_UDP,
            },
            pad: 0,
        }
    }

    /// The VIP, port and protocol, or `None` for a key we never write.
    pub fn parts(&self) -> Option<(IpAddr, u16, Protocol)> {
        let protocol = match self.proto {
            IPPROTO_TCP => Protocol::Tcp,
            IPPROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        Some((narrow(self.ip), u16::from_be_bytes(self.port), protocol))
    }
}

impl FrontendValue {
    /// The value for `ids`, at most [`MAX_SLOTS`] of them.
    pub fn new(ids: &[u32]) -> FrontendValue {
        let mut backends = [0; MAX_SLOTS];
        let n = ids.len().min(MAX_SLOTS);
        backends[..n].copy_from_slice(&ids[..n]);
        FrontendValue {
            count: n as u32,
            cursor: 0,
            backends,
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.backends[..(self.count as usize).min(MAX_SLOTS)]
    }
}

impl BackendValue {
    pub fn new(addr: SocketAddr) -> BackendValue {
        BackendValue {
            ip: wide(addr.ip()),
            port: addr.port().to_be_bytes(),
            pad: [0; 2],
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(narrow(self.ip), u16::from_be_bytes(self.port))
    }
}

/// Whether a socket of `vip`'s family can reach `task`: an IPv4 socket cannot reach
/// an IPv6 address, and an IPv6 VIP is only given IPv6 tasks, so that a socket with
/// `IPV6_V6ONLY` never gets an address it cannot use.
pub fn reachable(vip: IpAddr, task: IpAddr) -> bool {
    vip.is_ipv4() == task.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn the_layouts_match_the_c_structs() {
        // sizeof in sock_lb.bpf.c: frontend_key 20, frontend 1032, backend 20,
        assert_eq!(std::mem::size_of::<FrontendKey>(), 20);
        assert_eq!(std::mem::size_of::<FrontendValue>(), 8 + 4 * MAX_SLOTS);
        assert_eq!(std::mem::size_of::<BackendValue>(), 20);
        // revnat_key 32, revnat 20.
        assert_eq!(std::mem::size_of::<RevnatKey>(), 32);
        assert_eq!(std::mem::size_of::<RevnatValue>(), 20);
        let k = RevnatKey::new(7, "10.0.0.2:8080".parse().unwrap());
        assert_eq!((k.cookie, k.port), (7, [0x1f, 0x90]));
        assert_eq!(&k.ip[10..], &[0xff, 0xff, 10, 0, 0, 2]);
    }

    #[test]
    fn addresses_and_ports_are_in_network_order_and_round_trip() {
        let key = FrontendKey::new("10.254.0.7".parse().unwrap(), 80, Protocol::Udp);
        assert_eq!(&key.ip[10..], &[0xff, 0xff, 10, 254, 0, 7]);
        assert_eq!(key.port, [0, 80]);
        assert_eq!(key.proto, 17);
        assert_eq!(
            key.parts(),
            Some(("10.254.0.7".parse().unwrap(), 80, Protocol::Udp))
        );
        let v6: SocketAddr = "[fd00::5]:8443".parse().unwrap();
        assert_eq!(BackendValue::new(v6).addr(), v6);
        let v4: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(BackendValue::new(v4).addr(), v4);
        assert_eq!(BackendValue::new(v4).port, [0x1f, 0x90]);
    }

    #[test]
    fn a_value_holds_at_most_max_slots() {
        let ids: Vec<u32> = (0..300).collect();
        let v = FrontendValue::new(&ids);
        assert_eq!(v.count as usize, MAX_SLOTS);
        assert_eq!(v.ids(), &ids[..MAX_SLOTS]);
        assert!(
            FrontendKey {
                proto: 1,
                ..FrontendKey::new(Ipv4Addr::UNSPECIFIED.into(), 1, Protocol::Tcp)
            }
            .parts()
            .is_none()
        );
    }
}
