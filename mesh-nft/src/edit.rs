//! One change to the table, typed: what [`crate::Ruleset::update`] decides and both
//! writers send. Its `Display` is the `nft` command (for `nft -f`, errors and logs);
//! [`crate::netlink`] encodes the same value as nf_tables messages. Keeping one value
//! for both is what lets a test hold the two writers to the same table.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use mesh_core::{FrontendKey, Listen, Protocol};

use crate::ruleset::{FORWARD_MARK, MASQUERADE_MARK, TABLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub(crate) fn nfproto(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The address family's word in `dnat ip to` and `ip daddr`.
    pub(crate) fn nat(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// A task map: the tasks of a group of frontends of one family and protocol, keyed by
/// the counter's value (see [`crate::ruleset`] for why frontends share maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaskMap {
    pub family: Family,
    pub protocol: Protocol,
    pub group: u32,
}

impl TaskMap {
    pub fn name(&self) -> String {
        let v = match self.family {
            Family::V4 => 4,
            Family::V6 => 6,
        };
        format!("tasks_{}{v}_{}", self.protocol, self.group)
    }

    pub(crate) fn declaration(&self) -> String {
        // `typeof` because the counter's type has no fixed-size name to declare. The
        // port is the protocol's own (`tcp dport`), not `th dport`: nft 1.0.6 reads a
        // `th` type back from the kernel and then refuses a rule that matched tcp.
        format!(
            "typeof numgen inc mod 2 : {} daddr . {} dport",
            self.family.nat(),
            self.protocol
        )
    }
}

/// A frontend chain's rule for one family: mark the connection (and, unless the
/// client's address is kept, the packet for masquerade), then DNAT to the task the
/// counter picks from the frontend's slot of its task map. The connection's mark lets
/// a host firewall pass the plane's forwarded connections (see `forward_accept`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnatRule {
    pub map: TaskMap,
    /// How many tasks the counter runs over.
    pub modulus: u32,
    /// The first key of the frontend's slot.
    pub offset: u32,
    pub masquerade: bool,
}

impl fmt::Display for DnatRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = self.map.family;
        write!(
            f,
            "meta nfproto {} meta l4proto {} ct mark set ct mark | {FORWARD_MARK:#010x} ",
            family.nfproto(),
            self.map.protocol
        )?;
        if self.masquerade {
            write!(f, "meta mark set meta mark | {MASQUERADE_MARK:#010x} ")?;
        }
        write!(
            f,
            "dnat {} to numgen inc mod {}",
            family.nat(),
            self.modulus
        )?;
        // Written as `nft list` prints it, which leaves out a zero offset.
        if self.offset != 0 {
            write!(f, " offset {}", self.offset)?;
        }
        write!(f, " map @{}", self.map.name())
    }
}

/// The verdict map a frontend's element lives in.
pub(crate) fn dispatch_map(key: &FrontendKey) -> &'static str {
    match key.listen {
        Listen::Published => "published",
        Listen::Vip(IpAddr::V4(_)) => "vip4",
        Listen::Vip(IpAddr::V6(_)) => "vip6",
    }
}

/// A frontend's key in its verdict map, as nft writes it.
pub(crate) fn dispatch_key(key: &FrontendKey) -> String {
    match key.listen {
        Listen::Published => format!("{} . {}", key.protocol, key.port),
        Listen::Vip(ip) => format!("{ip} . {} . {}", key.protocol, key.port),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Makes a task map if it is not there.
    AddMap(TaskMap),
    /// Takes these counter values out of a task map.
    DeleteTasks {
        map: TaskMap,
        keys: Vec<u32>,
    },
    /// Puts a task at each counter value.
    AddTasks {
        map: TaskMap,
        tasks: Vec<(u32, SocketAddr)>,
    },
    AddChain(String),
    /// Removes every rule of a chain.
    FlushChain(String),
    /// Removes a chain (already empty, and jumped to by nothing).
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: DnatRule,
    },
    /// Sends a frontend's packets to its chain.
    AddFrontend {
        key: FrontendKey,
        chain: String,
    },
    DeleteFrontend(FrontendKey),
}

impl fmt::Display for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Edit::AddMap(m) => write!(
                f,
                "add map inet {TABLE} {} {{ {}; }}",
                m.name(),
                m.declaration()
            ),
            Edit::DeleteTasks { map, keys } => {
                write!(f, "delete element inet {TABLE} {} {{ ", map.name())?;
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}")?;
                }
                f.write_str(" }")
            }
            Edit::AddTasks { map, tasks } => {
                write!(f, "add element inet {TABLE} {} {{ ", map.name())?;
                for (i, (k, addr)) in tasks.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", task_element(*k, addr))?;
                }
                f.write_str(" }")
            }
            Edit::AddChain(c) => write!(f, "add chain inet {TABLE} {c}"),
            Edit::FlushChain(c) => write!(f, "flush chain inet {TABLE} {c}"),
            Edit::DeleteChain(c) => write!(f, "delete chain inet {TABLE} {c}"),
            Edit::AddRule { chain, rule } => write!(f, "add rule inet {TABLE} {chain} {rule}"),
            Edit::AddFrontend { key, chain } => write!(
                f,
                "add element inet {TABLE} {} {{ {} : goto {chain} }}",
                dispatch_map(key),
                dispatch_key(key)
            ),
            Edit::DeleteFrontend(key) => write!(
                f,
                "delete element inet {TABLE} {} {{ {} }}",
                dispatch_map(key),
                dispatch_key(key)
            ),
        }
    }
}

/// A task map's element as nft writes it: the counter's value, then the task.
pub(crate) fn task_element(key: u32, addr: &SocketAddr) -> String {
    format!("{key} : {} . {}", addr.ip(), addr.port())
}

/// The edits as one `nft -f` script (one transaction).
pub fn script(edits: &[Edit]) -> String {
    let mut out = String::new();
    for e in edits {
        out.push_str(&e.to_string());
        out.push('\n');
    }
    out
}

/// Whether `protocol` is TCP or UDP, as the kernel numbers it.
pub(crate) fn ip_proto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}
