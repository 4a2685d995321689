//! The map layouts of `bpf/port_lb.bpf.c`, byte for byte, and the building of a
//! published port's value: its tasks and their Maglev ring. Addresses and ports are
//! in network byte order, as the program reads them from packets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use mesh_core::Protocol;
use mesh_core::maglev;

/// The most tasks one published port balances over (`MAX_SLOTS`).
pub const MAX_SLOTS: usize = 256;
/// The Maglev ring's size (`RING`), the one `mesh_core::maglev` recommends.
pub const RING: usize = maglev::DEFAULT_SIZE as usize;
/// Entries of `mesh_ports`.
pub const MAX_PORTS: usize = 1024;
/// Entries of the LRU maps `mesh_port_flows` and `mesh_port_revnat`.
pub const MAX_PORT_FLOWS: u32 = 131072;

/// `struct port_key`: a published port and its protocol.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct port_backend`: a task's IPv4 address, and whether this host runs it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortBackend {
    pub ip: [u8; 4],
    pub port: [u8; 2],
    pub local: u8,
    pub pad: u8,
}

/// `struct port_frontend`: a published port's tasks and Maglev ring, in one value.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortFrontend {
    pub count: u32,
    pub pad: u32,
    pub backends: [PortBackend; MAX_SLOTS],
    pub ring: [u16; RING],
    pub pad2: u16,
}

/// `struct pick_key`: a task's address and the published port it was taken for, as
/// `mesh_port_picks` counts them.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PickKey {
    pub ip: [u8; 4],
    pub port: [u8; 2],
    pub published: [u8; 2],
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct route`: the way to another host's task, as the agent found it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    /// This host's source address towards the task (network order).
    pub src: [u8; 4],
}

/// `struct flow_key`: one direction of a flow, as a packet carries it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct snat`: how a hopped flow leaves (`mesh_port_snat`, keyed by the client's
/// packet).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snat {
    pub task_ip: [u8; 4],
    pub ip: [u8; 4],
    pub ifindex: u32,
    pub seen: u32,
    pub task_port: [u8; 2],
    pub port: [u8; 2],
}

/// `struct unsnat`: whose a bound port is (`mesh_port_unsnat`, keyed by the task's
/// reply as it arrives).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsnat {
    pub client_ip: [u8; 4],
    pub published_ip: [u8; 4],
    pub ifindex: u32,
    pub task_ifindex: u32,
    pub seen: u32,
    pub client_port: [u8; 2],
    pub published_port: [u8; 2],
    pub closed: u32,
}

impl Unsnat {
    /// Whether its flow ended long enough ago for any flow to take the port, by the
    /// rules of `reusable()` in port_lb.bpf.c (the constants are its REUSE_*), at
    /// `now` in the program's ticks (2^30 ns of CLOCK_MONOTONIC_COARSE).
    pub fn ended(&self, now: u32, proto: u8) -> bool {
        const FIN_FROM_CLIENT: u32 = 1;
        const FIN_FROM_TASK: u32 = 2;
        const ENDED_BY_RST: u32 = 4;
        const TASK_CLOSED_FIRST: u32 = 8;
        let idle = now.wrapping_sub(self.seen);
        if proto != 6 {
            return idle >= 120;
        }
        let c = self.closed;
        if c & ENDED_BY_RST != 0 {
            return idle >= 10;
        }
        if c & (FIN_FROM_CLIENT | FIN_FROM_TASK) != FIN_FROM_CLIENT | FIN_FROM_TASK {
            return idle >= 432_000;
        }
        idle >= if c & TASK_CLOSED_FIRST != 0 { 60 } else { 10 }
    }

    /// The `mesh_port_snat` key of the flow it belongs to.
    pub fn owner(&self, proto: u8) -> FlowKey {
        FlowKey {
            saddr: self.client_ip,
            daddr: self.published_ip,
            sport: self.client_port,
            dport: self.published_port,
            proto,
            pad: [0; 3],
        }
    }
}

/// The programs' clock: CLOCK_MONOTONIC_COARSE in ticks of 2^30 ns, as
/// `bpf_ktime_get_coarse_ns() >> 30`.
pub fn ticks() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ((ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64) >> 30) as u32
}

/// `struct port_config`: the ports a flow hopped to another host may be bound to
/// (host byte order): `span` ports from `first`, skipping `skip_len` from `skip_from`;
/// `seed` keys the hash that picks among them.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortConfig {
    pub first: u16,
    pub span: u16,
    pub skip_from: u16,
    pub skip_len: u16,
    pub seed: u32,
}

/// `struct reserved_ports`: a bit per port that no hopped flow may be bound to.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedPorts {
    pub bits: [u64; 1024],
}

impl ReservedPorts {
    pub fn of(ports: impl IntoIterator<Item = u16>) -> ReservedPorts {
        let mut r = ReservedPorts { bits: [0; 1024] };
        for p in ports {
            r.bits[usize::from(p >> 6)] |= 1 << (p & 63);
        }
        r
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] >> (port & 63) & 1 == 1
    }
}

/// The lowest port a hopped flow is bound to: the ones below are services'.
pub const FIRST_BOUND_PORT: u16 = 1024;

impl PortConfig {
    /// Ports 1024–65535 without the kernel's `ip_local_port_range` (`low`–`high`),
    /// which this host's own sockets draw from: a bound port must never be the port
    /// of a connection this host makes to the same task, or the task's replies to
    /// that socket would be taken for a client's. A `span` of 0 leaves no port, and
    /// no flow is hopped.
    pub fn around(low: u16, high: u16, seed: u32) -> PortConfig {
        let (low, high) = (low.max(FIRST_BOUND_PORT), high);
        let all = u32::from(u16::MAX) - u32::from(FIRST_BOUND_PORT) + 1;
        if low > high {
            return PortConfig {
                first: FIRST_BOUND_PORT,
                span: all as u16,
                skip_from: u16::MAX,
                skip_len: 0,
                seed,
            };
        }
        let skip = u32::from(high) - u32::from(low) + 1;
        PortConfig {
            first: FIRST_BOUND_PORT,
            span: (all - skip) as u16,
            skip_from: low,
            skip_len: skip as u16,
            seed,
        }
    }

    /// The ports it allows, in order (for tests and `mesh status`).
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        (0..u32::from(self.span)).filter_map(|n| {
            let mut port = u32::from(self.first) + n;
            if port >= u32::from(self.skip_from) {
                port += u32::from(self.skip_len);
            }
            u16::try_from(port).ok()
        })
    }
}

// SAFETY: plain `repr(C)` data of integers and byte arrays with no implicit padding
// (checked by the size test below); any bit pattern is a valid value.
unsafe impl aya::Pod for PortKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PortBackend {}
// SAFETY: as above.
unsafe impl aya::Pod for PortFrontend {}
// SAFETY: as above.
unsafe impl aya::Pod for PickKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Route {}
// SAFETY: as above.
unsafe impl aya::Pod for PortConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for ReservedPorts {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Snat {}
// SAFETY: as above.
unsafe impl aya::Pod for Unsnat {}

impl PortKey {
    pub fn new(port: u16, protocol: Protocol) -> PortKey {
        PortKey {
            port: port.to_be_bytes(),
            proto: match protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            },
            pad: 0,
        }
    }
}

impl PickKey {
    /// The published port (as a `mesh_ports` key) and the task's address.
    pub fn parts(&self) -> (PortKey, SocketAddr) {
        (
            PortKey {
                port: self.published,
                proto: self.proto,
                pad: 0,
            },
            SocketAddr::new(IpAddr::from(self.ip), u16::from_be_bytes(self.port)),
        )
    }
}

/// One task of a published port, as the plan gives it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortTask {
    /// Its stable name, the same on every host: the Maglev key.
    pub task: String,
    pub addr: SocketAddr,
    /// Whether this host runs it, and the packet can go to it from here.
    pub local: bool,
}

impl PortFrontend {
    /// The value for `tasks` (IPv4 ones; at most [`MAX_SLOTS`], the first by name).
    /// `None` when no IPv4 task is left: the port is then not taken here at all.
    pub fn build(tasks: &[PortTask]) -> Option<Box<PortFrontend>> {
        let mut tasks: Vec<&PortTask> = tasks.iter().filter(|t| t.addr.is_ipv4()).collect();
        tasks.sort();
        tasks.truncate(MAX_SLOTS);
        if tasks.is_empty() {
            return None;
        }
        let keys: Vec<&[u8]> = tasks.iter().map(|t| t.task.as_bytes()).collect();
        let ring = maglev::table(&keys, RING as u32).ok()?;
        let mut value = Box::new(PortFrontend {
            count: tasks.len() as u32,
            pad: 0,
            backends: [PortBackend::default(); MAX_SLOTS],
            ring: [0; RING],
            pad2: 0,
        });
        for (slot, t) in value.backends.iter_mut().zip(&tasks) {
            let IpAddr::V4(ip) = t.addr.ip() else {
                continue;
            };
            *slot = PortBackend {
                ip: ip.octets(),
                port: t.addr.port().to_be_bytes(),
                // A loopback task cannot take a packet that arrived from outside:
                // the other plane reaches it.
                local: u8::from(t.local && !ip.is_loopback() && ip != Ipv4Addr::UNSPECIFIED),
                pad: 0,
            };
        }
        for (entry, owner) in value.ring.iter_mut().zip(ring) {
            *entry = owner as u16;
        }
        Some(value)
    }

    /// The tasks, in slot order.
    pub fn tasks(&self) -> impl Iterator<Item = (SocketAddr, bool)> + '_ {
        self.backends
            .iter()
            .take(self.count.min(MAX_SLOTS as u32) as usize)
            .map(|b| {
                (
                    SocketAddr::new(IpAddr::from(b.ip), u16::from_be_bytes(b.port)),
                    b.local == 1,
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_c_structs() {
        // `RING` and `MAX_SLOTS` in port_lb.bpf.c, which checks its own size.
        assert_eq!((RING, MAX_SLOTS), (16381, 256));
        assert_eq!(std::mem::size_of::<PortKey>(), 4);
        assert_eq!(std::mem::size_of::<PortBackend>(), 8);
        assert_eq!(std::mem::size_of::<PickKey>(), 12);
        assert_eq!(std::mem::size_of::<Route>(), 8);
        assert_eq!(std::mem::size_of::<PortConfig>(), 12);
        assert_eq!(std::mem::size_of::<ReservedPorts>(), 8192);
        assert_eq!(std::mem::size_of::<FlowKey>(), 16);
        assert_eq!(std::mem::size_of::<Snat>(), 20);
        assert_eq!(std::mem::size_of::<Unsnat>(), 28);
        assert_eq!(
            std::mem::size_of::<PortFrontend>(),
            8 + 8 * MAX_SLOTS + 2 * RING + 2
        );
    }

    fn task(name: &str, addr: &str, local: bool) -> PortTask {
        PortTask {
            task: name.into(),
            addr: addr.parse().unwrap(),
            local,
        }
    }

    #[test]
    fn every_host_builds_the_same_ring_whatever_it_runs() {
        let on_h1 = [
            task("web.2", "10.0.0.2:80", false),
            task("web.1", "10.0.0.1:80", true),
        ];
        let on_h2 = [
            task("web.1", "10.0.0.1:80", false),
            task("web.2", "10.0.0.2:80", true),
        ];
        let (a, b) = (
            PortFrontend::build(&on_h1).unwrap(),
            PortFrontend::build(&on_h2).unwrap(),
        );
        assert_eq!(a.ring, b.ring);
        assert_eq!(a.count, 2);
        let owned = a.ring.iter().filter(|i| **i == 0).count();
        assert!(
            owned.abs_diff(RING / 2) <= 1,
            "each task owns half: {owned}"
        );
        assert_eq!(
            a.tasks().collect::<Vec<_>>(),
            [
                ("10.0.0.1:80".parse().unwrap(), true),
                ("10.0.0.2:80".parse().unwrap(), false)
            ]
        );
    }

    #[test]
    fn hopped_flows_are_bound_to_ports_outside_the_local_range() {
        let c = PortConfig::around(32768, 60999, 7);
        let ports: Vec<u16> = c.ports().collect();
        assert_eq!(ports.len(), usize::from(c.span));
        assert_eq!(ports.len(), (32768 - 1024) + (65535 - 61000 + 1));
        assert_eq!((ports[0], *ports.last().unwrap()), (1024, 65535));
        assert!(ports.contains(&32767) && ports.contains(&61000));
        assert!(!ports.iter().any(|p| (32768..=60999).contains(p)));
        // A range that starts below 1024 skips from 1024.
        let low = PortConfig::around(500, 2000, 7);
        assert_eq!(low.ports().next(), Some(2001));
        // A local range of every port leaves none: nothing is hopped.
        assert_eq!(PortConfig::around(1024, 65535, 7).span, 0);
        assert_eq!(PortConfig::around(1, 65535, 7).ports().count(), 0);
        // An empty range (low above high) skips nothing.
        assert_eq!(PortConfig::around(5000, 4000, 7).ports().count(), 64512);
    }

    #[test]
    fn a_bound_port_ends_by_the_programs_rules() {
        let u = |closed, seen| Unsnat {
            client_ip: [0; 4],
            published_ip: [0; 4],
            ifindex: 0,
            task_ifindex: 0,
            seen,
            client_port: [0; 2],
            published_port: [0; 2],
            closed,
        };
        let now = 1_000_000;
        // UDP: 120 ticks of quiet.
        assert!(!u(0, now - 119).ended(now, 17) && u(0, now - 120).ended(now, 17));
        // TCP open: 5 days of quiet.
        assert!(!u(0, now - 431_999).ended(now, 6) && u(0, now - 432_000).ended(now, 6));
        // A RST, or both FINs with the client first: 10.
        assert!(!u(4, now - 9).ended(now, 6) && u(4, now - 10).ended(now, 6));
        assert!(u(3, now - 10).ended(now, 6));
        // One FIN is not an end.
        assert!(!u(1, now - 1000).ended(now, 6));
        // The task first: 60 (TIME_WAIT).
        assert!(!u(3 | 8, now - 59).ended(now, 6) && u(3 | 8, now - 60).ended(now, 6));
        // A clock that wrapped still counts forward.
        assert!(u(0, u32::MAX - 10).ended(200, 17));
    }

    #[test]
    fn reserved_ports_are_one_bit_each() {
        let r = ReservedPorts::of([0, 63, 64, 8080, 65535]);
        for p in [0, 63, 64, 8080, 65535] {
            assert!(r.contains(p), "{p}");
        }
        assert!(!r.contains(1) && !r.contains(8081) && !r.contains(65534));
        assert_eq!(r.bits.iter().map(|w| w.count_ones()).sum::<u32>(), 5);
    }

    #[test]
    fn ipv6_and_loopback_tasks_are_left_to_the_other_plane() {
        assert!(PortFrontend::build(&[task("a", "[fd00::1]:80", true)]).is_none());
        let v = PortFrontend::build(&[task("a", "127.0.0.1:80", true)]).unwrap();
        assert!(
            !v.tasks().next().unwrap().1,
            "a loopback task is not taken here"
        );
    }
}
