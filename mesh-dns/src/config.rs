//! The `[dns]` section of the agent's config. The agent deserializes the TOML section
//! straight into [`DnsConfig`], so the defaults below are the only ones there are.
//!
//! Loading a config is three explicit steps, so nothing is rewritten behind a
//! caller's back: deserialize, [`DnsConfig::normalized`] (the spellings of the domain
//! that mean the same name become one), then [`DnsConfig::validate`]. A config whose
//! `listen` names interfaces takes a fourth step where it runs, once the host's
//! addresses are known: [`DnsConfig::resolve_interfaces`] (pure; the caller reads the
//! addresses) turns the names into addresses to serve on and subnets to allow.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use mesh_core::{Cidr, ModelError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest domain accepted, which is what the agent has always accepted. It
/// leaves room for the longest names we answer (`_<port>._<proto>.<service>.<domain>.`
/// with 63-character port and service names) within the 255 bytes of a DNS name.
pub const MAX_DOMAIN_LEN: usize = 63;

/// The longest TTL accepted. Mesh answers change whenever tasks come and go, so a
/// client that caches them longer keeps using tasks that are gone; the forwarding
/// cache caps upstream TTLs at the same hour.
pub const MAX_TTL: u32 = 3600;

/// The port of a `listen` entry that names an interface without one (`"docker0"`).
pub const DNS_PORT: u16 = 53;

/// The longest interface name Linux accepts: `IFNAMSIZ` (16) less the NUL.
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// The `[dns]` section. In the file, `listen` is one list of socket addresses and
/// interface names (see [`ListenOn`]); here they are two fields, because the server
/// binds socket addresses only: [`DnsConfig::resolve_interfaces`] moves the
/// interfaces' addresses into `listen` before the server is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "DnsSection", into = "DnsSection")]
pub struct DnsConfig {
    /// UDP and TCP addresses to serve on, e.g. `127.0.0.1:53`: the `listen` entries
    /// that are socket addresses (and, once resolved, the interfaces' addresses).
    /// Empty, with no `listen_interfaces` (the default): no DNS server.
    pub listen: Vec<SocketAddr>,
    /// The `listen` entries that name an interface (`"docker0"`, `"docker0:5353"`):
    /// served on each of its IPv4 and global IPv6 addresses, with their subnets
    /// added to `allow`, once [`DnsConfig::resolve_interfaces`] has run. The server
    /// itself never reads this field. Not a key of its own in the file.
    pub listen_interfaces: Vec<ListenInterface>,
    /// Mesh names live under this domain (`web.mesh`). Lowercase, no trailing dot
    /// (see [`DnsConfig::normalized`]).
    pub domain: String,
    /// TTL of mesh answers, and the negative TTL in the SOA.
    pub ttl: u32,
    /// Resolvers for every other name, tried in order. `None` (the default): the
    /// nameservers of /etc/resolv.conf, see [`DnsConfig::upstreams_or_resolv_conf`].
    /// `Some(vec![])` forwards nothing: other names get SERVFAIL.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// Clients allowed to query; everyone else gets REFUSED, so this is never an open
    /// resolver. Default: loopback only. The subnets of the `listen_interfaces` are
    /// added when they are resolved.
    pub allow: Vec<Cidr>,
    /// Forwarded queries in flight at once; beyond it, SERVFAIL at once.
    pub max_inflight: usize,
    /// Per upstream attempt, written like `"2s"` or `"500ms"`.
    pub forward_timeout: Duration,
    /// Entries in the forwarding cache; 0 turns the cache off.
    pub cache_size: usize,
}

/// `[dns]` as written: [`DnsConfig`] with `listen` as one list of [`ListenOn`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DnsSection {
    #[serde(deserialize_with = "listen_entries")]
    listen: Vec<ListenOn>,
    domain: String,
    ttl: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstreams: Option<Vec<SocketAddr>>,
    allow: Vec<Cidr>,
    max_inflight: usize,
    #[serde(with = "mesh_core::duration")]
    forward_timeout: Duration,
    cache_size: usize,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsConfig::default().into()
    }
}

impl From<DnsSection> for DnsConfig {
    fn from(s: DnsSection) -> Self {
        let mut listen = Vec::new();
        let mut listen_interfaces = Vec::new();
        for entry in s.listen {
            match entry {
                ListenOn::Addr(addr) => listen.push(addr),
                ListenOn::Interface(interface) => listen_interfaces.push(interface),
            }
        }
        Self {
            listen,
            listen_interfaces,
            domain: s.domain,
            ttl: s.ttl,
            upstreams: s.upstreams,
            allow: s.allow,
            max_inflight: s.max_inflight,
            forward_timeout: s.forward_timeout,
            cache_size: s.cache_size,
        }
    }
}

impl From<DnsConfig> for DnsSection {
    /// Socket addresses first, then interfaces.
    fn from(c: DnsConfig) -> Self {
        let listen = c
            .listen
            .into_iter()
            .map(ListenOn::Addr)
            .chain(c.listen_interfaces.into_iter().map(ListenOn::Interface))
            .collect();
        Self {
            listen,
            domain: c.domain,
            ttl: c.ttl,
            upstreams: c.upstreams,
            allow: c.allow,
            max_inflight: c.max_inflight,
            forward_timeout: c.forward_timeout,
            cache_size: c.cache_size,
        }
    }
}

/// The `listen` list, parsed entry by entry so that an error names the entry:
/// `listen[1]: "dock er0" is neither an address:port nor an interface name (...)`.
fn listen_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ListenOn>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<ListenOn>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(
                "a list of addresses (\"127.0.0.1:53\") and interface names (\"docker0\", \"docker0:5353\")",
            )
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(text) = seq.next_element::<String>()? {
                let entry = text.parse().map_err(|message: String| {
                    serde::de::Error::custom(ModelError::new(
                        format!("listen[{}]", entries.len()),
                        message,
                    ))
                })?;
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    d.deserialize_seq(Entries)
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            listen_interfaces: Vec::new(),
            domain: "mesh".into(),
            ttl: 5,
            upstreams: None,
            // Literals, so parsing cannot fail.
            allow: vec![
                "127.0.0.0/8".parse().expect("cidr"),
                "::1/128".parse().expect("cidr"),
            ],
            max_inflight: 1024,
            forward_timeout: Duration::from_secs(2),
            cache_size: 10_000,
        }
    }
}

/// One entry of `[dns] listen`: a socket address, or an interface to serve on.
/// Written as a string: `"127.0.0.1:53"`, `"[::1]:5353"`, `"docker0"` (port 53) or
/// `"docker0:5353"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenOn {
    Addr(SocketAddr),
    Interface(ListenInterface),
}

/// An interface named in `[dns] listen`, and the port to serve on at its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenInterface {
    /// A valid Linux interface name (see [`check_interface_name`]).
    pub name: String,
    pub port: u16,
}

impl From<SocketAddr> for ListenOn {
    fn from(addr: SocketAddr) -> Self {
        ListenOn::Addr(addr)
    }
}

impl FromStr for ListenOn {
    type Err = String;

    /// A socket address if it is one; otherwise `NAME` or `NAME:PORT`. Interface
    /// names cannot contain ':' (Linux refuses them), so the first ':' ends the name.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenOn::Addr(addr));
        }
        let neither =
            |why: &str| format!("{s:?} is neither an address:port nor an interface name ({why})");
        // An address, but no (valid) port: say so rather than "not an interface".
        let host = s.rsplit_once(':').map_or(s, |(host, _)| host);
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if s.starts_with('[') || s.parse::<IpAddr>().is_ok() || host.parse::<IpAddr>().is_ok() {
            return Err(neither(
                "an address needs a port from 0 to 65535, as in 172.17.0.1:53 or [fd00::1]:53",
            ));
        }
        let (name, port) = match s.split_once(':') {
            Some((name, port)) => {
                let port = port.parse::<u16>().map_err(|_| {
                    neither(&format!("{port:?} after ':' is not a port from 0 to 65535"))
                })?;
                (name, port)
            }
            None => (s, DNS_PORT),
        };
        check_interface_name(name).map_err(|why| neither(&why))?;
        Ok(ListenOn::Interface(ListenInterface {
            name: name.to_string(),
            port,
        }))
    }
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Addr(addr) => addr.fmt(f),
            ListenOn::Interface(interface) => interface.fmt(f),
        }
    }
}

impl fmt::Display for ListenInterface {
    /// `docker0` for port 53, else `docker0:5353`: the shortest form that parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == DNS_PORT {
            f.write_str(&self.name)
        } else {
            write!(f, "{}:{}", self.name, self.port)
        }
    }
}

impl Serialize for ListenOn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Whether Linux would accept `name` for an interface (the kernel's
/// `dev_valid_name`): 1 to [`MAX_INTERFACE_NAME_LEN`] bytes, not `.` or `..`, and no
/// '/', ':' or whitespace. The error says which rule `name` breaks.
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an interface name must not be empty".into());
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "an interface name is at most {MAX_INTERFACE_NAME_LEN} bytes; this is {}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not interface names".into());
    }
    // The kernel's isspace() also counts \v, which Rust's is_ascii_whitespace does not.
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c == ':' || c == '\0' || c == '\x0b' || c.is_ascii_whitespace())
    {
        return Err(format!(
            "an interface name has no '/', ':' or whitespace, and this has {c:?}"
        ));
    }
    Ok(())
}

/// An address on an interface, as the kernel lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub ip: IpAddr,
    /// The prefix length of the address's subnet (`24` for 172.17.0.1/24).
    pub prefix: u8,
    /// IPv6 duplicate address detection has not finished, or failed: the address
    /// cannot be bound yet. Linux keeps a bridge's IPv6 addresses tentative while the
    /// bridge has no carrier, e.g. docker0 while no container runs.
    pub tentative: bool,
}

/// What one interface of `listen` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInterface {
    pub name: String,
    /// The socket addresses to serve on: each usable address at the entry's port.
    pub listen: Vec<SocketAddr>,
    /// The subnet of each of those addresses, for `allow`.
    pub subnets: Vec<Cidr>,
    /// Addresses of the interface not served on, with why.
    pub skipped: Vec<(IpAddr, Skipped)>,
}

/// Why an address of an interface is not served on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// fe80::/10: a socket there needs a scope id, and so would its clients.
    LinkLocal,
    /// See [`InterfaceAddr::tentative`].
    Tentative,
    /// Unspecified or multicast: not an address to serve on.
    NotUnicast,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Skipped::LinkLocal => "link-local",
            Skipped::Tentative => "tentative",
            Skipped::NotUnicast => "not unicast",
        })
    }
}

impl ListenInterface {
    /// Where to serve for this entry, given the addresses of the interface (`None`:
    /// the host has no such interface). Served on: every IPv4 address and every IPv6
    /// address but link-local ones (fe80::/10; a socket there needs a scope id, and
    /// clients would too) and tentative ones. The error names the field relative to
    /// the section (`listen`), like [`DnsConfig::validate`]'s.
    pub fn resolve(
        &self,
        addrs: Option<&[InterfaceAddr]>,
    ) -> Result<ResolvedInterface, ModelError> {
        let name = &self.name;
        let Some(addrs) = addrs else {
            return Err(ModelError::new(
                "listen",
                format!("interface {name:?} does not exist on this host"),
            ));
        };
        let mut resolved = ResolvedInterface {
            name: name.clone(),
            listen: Vec::new(),
            subnets: Vec::new(),
            skipped: Vec::new(),
        };
        for a in addrs {
            let skip = match a.ip {
                IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(Skipped::LinkLocal),
                IpAddr::V6(_) if a.tentative => Some(Skipped::Tentative),
                ip if ip.is_unspecified() || ip.is_multicast() => Some(Skipped::NotUnicast),
                _ => None,
            };
            if let Some(why) = skip {
                resolved.skipped.push((a.ip, why));
                continue;
            }
            let addr = SocketAddr::new(a.ip, self.port);
            if !resolved.listen.contains(&addr) {
                resolved.listen.push(addr);
            }
            let subnet = subnet(a.ip, a.prefix);
            if !resolved.subnets.contains(&subnet) {
                resolved.subnets.push(subnet);
            }
        }
        if resolved.listen.is_empty() {
            let mut message = format!(
                "interface {name:?} has no IPv4 or global IPv6 address; is dockerd running?"
            );
            if !resolved.skipped.is_empty() {
                let skipped: Vec<String> = resolved
                    .skipped
                    .iter()
                    .map(|(ip, why)| format!("{ip} is {why}"))
                    .collect();
                message.push_str(&format!(" ({})", skipped.join(", ")));
            }
            return Err(ModelError::new("listen", message));
        }
        Ok(resolved)
    }
}

/// The network of `ip` with a prefix of `prefix` bits (capped at the family's
/// width): 172.17.0.1/16 is in 172.17.0.0/16.
pub fn subnet(ip: IpAddr, prefix: u8) -> Cidr {
    let (network, prefix): (IpAddr, u8) = match ip {
        IpAddr::V4(v4) => {
            let prefix = prefix.min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            (Ipv4Addr::from(u32::from(v4) & mask).into(), prefix)
        }
        IpAddr::V6(v6) => {
            let prefix = prefix.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            (Ipv6Addr::from(u128::from(v6) & mask).into(), prefix)
        }
    };
    format!("{network}/{prefix}")
        .parse()
        .expect("a masked address with a valid prefix is a network")
}

impl DnsConfig {
    /// The config with the domain in the one form the server uses: ASCII-lowercase and
    /// without the trailing dot of its fully-qualified spelling. DNS names are
    /// case-insensitive and `mesh.` names the same domain as `mesh`, so users may write
    /// either; call this before [`DnsConfig::validate`], which accepts only this form.
    pub fn normalized(mut self) -> Self {
        if let Some(stripped) = self.domain.strip_suffix('.') {
            self.domain.truncate(stripped.len());
        }
        self.domain.make_ascii_lowercase();
        self
    }

    /// Checks the values the types do not: the domain is a DNS name in normalized
    /// form, the TTL is at most [`MAX_TTL`], and the forwarding limits can let a query
    /// through. The error's field is relative to this section (`domain`); the caller
    /// adds the section with [`ModelError::within`].
    pub fn validate(&self) -> Result<(), ModelError> {
        check_domain(&self.domain).map_err(|m| ModelError::new("domain", m))?;
        for interface in &self.listen_interfaces {
            check_interface_name(&interface.name).map_err(|why| {
                ModelError::new(
                    "listen",
                    format!("{:?} is not an interface name ({why})", interface.name),
                )
            })?;
        }
        if self.ttl > MAX_TTL {
            return Err(ModelError::new(
                "ttl",
                format!(
                    "{} s is longer than the {MAX_TTL} s allowed: clients would keep using tasks that are gone",
                    self.ttl
                ),
            ));
        }
        if self.max_inflight == 0 {
            return Err(ModelError::new(
                "max_inflight",
                "must be at least 1, or every forwarded query gets SERVFAIL",
            ));
        }
        if self.forward_timeout.is_zero() {
            return Err(ModelError::new(
                "forward_timeout",
                "must be longer than 0, or every forwarded query gets SERVFAIL",
            ));
        }
        Ok(())
    }

    /// The upstreams to forward to: the configured ones, or else the nameservers in
    /// `resolv_conf_text` (the caller reads /etc/resolv.conf, so this stays pure),
    /// without our own listen addresses. Call it on the config
    /// [`DnsConfig::resolve_interfaces`] returned, so that the interfaces' addresses
    /// count as our own too.
    pub fn upstreams_or_resolv_conf(&self, resolv_conf_text: &str) -> Vec<SocketAddr> {
        match &self.upstreams {
            Some(upstreams) => upstreams.clone(),
            None => upstreams_from_resolv_conf(resolv_conf_text, &self.listen),
        }
    }

    /// Whether there is anything to serve on: an address or an interface.
    pub fn serves(&self) -> bool {
        !self.listen.is_empty() || !self.listen_interfaces.is_empty()
    }

    /// The config the server runs with: each of `listen_interfaces` replaced by its
    /// addresses in `listen` (see [`ListenInterface::resolve`]) and their subnets
    /// added to `allow`, plus what each interface resolved to, for the log. `host`
    /// maps the name of every interface that exists (at least of those named) to its
    /// addresses; the caller reads them, so this stays pure. An address or subnet
    /// already listed is not added twice. The error names the field relative to the
    /// section (`listen`) and the interface.
    pub fn resolve_interfaces(
        &self,
        host: &HashMap<String, Vec<InterfaceAddr>>,
    ) -> Result<(DnsConfig, Vec<ResolvedInterface>), ModelError> {
        let mut config = self.clone();
        let mut resolved = Vec::new();
        for interface in std::mem::take(&mut config.listen_interfaces) {
            let found = interface.resolve(host.get(&interface.name).map(Vec::as_slice))?;
            for addr in &found.listen {
                if !config.listen.contains(addr) {
                    config.listen.push(*addr);
                }
            }
            for subnet in &found.subnets {
                if !config.allow.contains(subnet) {
                    config.allow.push(*subnet);
                }
            }
            resolved.push(found);
        }
        Ok((config, resolved))
    }
}

/// A normalized DNS name: dot-separated labels of lowercase letters, digits and `-`
/// (RFC 1123), none empty and none starting or ending with `-`.
fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("must not be empty".into());
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "{domain:?} is {} characters long; at most {MAX_DOMAIN_LEN} are allowed",
            domain.len()
        ));
    }
    if domain.ends_with('.') {
        return Err(format!(
            "{domain:?} ends with '.'; write it without the trailing dot"
        ));
    }
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{domain:?} must be lowercase"));
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(format!(
                "{domain:?} has an empty label (two dots in a row or a leading dot)"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
        {
            return Err(format!(
                "{domain:?} contains {c:?}; use lowercase letters, digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "{domain:?}: the label {label:?} must not start or end with '-'"
            ));
        }
    }
    Ok(())
}

/// Nameservers from a resolv.conf text, skipping the addresses this server listens
/// on (forwarding to ourselves would loop).
pub fn upstreams_from_resolv_conf(text: &str, own: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| !own.contains(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:53".parse().unwrap()];
        let got = upstreams_from_resolv_conf(
            "# c\nsearch x\nnameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n",
            &own,
        );
        assert_eq!(
            got,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn upstreams_come_from_resolv_conf_only_when_not_configured() {
        let resolv = "nameserver 127.0.0.1\nnameserver 192.0.2.53\n";
        let config = DnsConfig {
            listen: vec!["127.0.0.1:53".parse().unwrap()],
            ..DnsConfig::default()
        };
        assert_eq!(
            config.upstreams_or_resolv_conf(resolv),
            vec!["192.0.2.53:53".parse::<SocketAddr>().unwrap()],
            "our own listen address is skipped"
        );
        let none = DnsConfig {
            upstreams: Some(Vec::new()),
            ..config.clone()
        };
        assert!(none.upstreams_or_resolv_conf(resolv).is_empty());
        let set = DnsConfig {
            upstreams: Some(vec!["192.0.2.1:5353".parse().unwrap()]),
            ..config
        };
        assert_eq!(
            set.upstreams_or_resolv_conf(resolv),
            vec!["192.0.2.1:5353".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn an_empty_section_is_the_default() {
        let config: DnsConfig = toml::from_str("").unwrap();
        assert_eq!(config, DnsConfig::default());
        assert!(config.listen.is_empty(), "no DNS unless asked for");
        assert!(config.listen_interfaces.is_empty());
        assert!(!config.serves());
        assert_eq!(config.domain, "mesh");
        assert_eq!(config.ttl, 5);
        assert_eq!(config.upstreams, None);
        assert_eq!(
            config.allow,
            vec![
                "127.0.0.0/8".parse::<Cidr>().unwrap(),
                "::1/128".parse().unwrap()
            ]
        );
        assert_eq!(config.max_inflight, 1024);
        assert_eq!(config.forward_timeout, Duration::from_secs(2));
        assert_eq!(config.cache_size, 10_000);
        config.validate().unwrap();
    }

    #[test]
    fn every_field_parses_and_round_trips() {
        let text = r#"
            listen = ["127.0.0.1:5353", "docker0", "[::1]:5353", "br0:5353"]
            domain = "cluster.internal"
            ttl = 30
            upstreams = ["192.0.2.53:53"]
            allow = ["10.0.0.0/8", "fd00::/8"]
            max_inflight = 8
            forward_timeout = "500ms"
            cache_size = 0
        "#;
        let config: DnsConfig = toml::from_str(text).unwrap();
        assert_eq!(
            config.listen,
            vec![
                "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
        assert_eq!(
            config.listen_interfaces,
            vec![interface("docker0", 53), interface("br0", 5353)]
        );
        assert_eq!(config.domain, "cluster.internal");
        assert_eq!(config.ttl, 30);
        assert_eq!(
            config.upstreams,
            Some(vec!["192.0.2.53:53".parse().unwrap()])
        );
        assert!(config.allow[0].contains("10.1.2.3".parse().unwrap()));
        assert_eq!(config.max_inflight, 8);
        assert_eq!(config.forward_timeout, Duration::from_millis(500));
        assert_eq!(config.cache_size, 0);
        config.validate().unwrap();

        let written = toml::to_string(&config).unwrap();
        assert!(
            written.contains(r#"listen = ["127.0.0.1:5353", "[::1]:5353", "docker0", "br0:5353"]"#),
            "one list, addresses first: {written}"
        );
        let again: DnsConfig = toml::from_str(&written).unwrap();
        assert_eq!(again, config);
        let default: DnsConfig =
            toml::from_str(&toml::to_string(&DnsConfig::default()).unwrap()).unwrap();
        assert_eq!(default, DnsConfig::default());
    }

    #[test]
    fn typos_and_bad_values_are_rejected_when_parsing() {
        for (text, needle) in [
            ("listn = []", "listn"),
            ("forward_timeout = \"soon\"", "soon"),
            ("allow = [\"ten/8\"]", "ten/8"),
            ("ttl = -1", "ttl"),
            (
                r#"listen = ["127.0.0.1:53", "dock er0"]"#,
                r#"listen[1]: "dock er0" is neither an address:port nor an interface name"#,
            ),
            (
                r#"listen = ["docker0:99999"]"#,
                r#"listen[0]: "docker0:99999""#,
            ),
            (r#"listen = [53]"#, "string"),
            (r#"listen = "docker0""#, "list"),
        ] {
            let err = toml::from_str::<DnsConfig>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    fn interface(name: &str, port: u16) -> ListenInterface {
        ListenInterface {
            name: name.into(),
            port,
        }
    }

    #[test]
    fn listen_entries_parse_as_addresses_or_interfaces() {
        let addr = |s: &str| ListenOn::Addr(s.parse().unwrap());
        let iface = |name: &str, port| ListenOn::Interface(interface(name, port));
        for (text, want, shown) in [
            ("127.0.0.1:5353", addr("127.0.0.1:5353"), "127.0.0.1:5353"),
            ("[::1]:53", addr("[::1]:53"), "[::1]:53"),
            ("0.0.0.0:0", addr("0.0.0.0:0"), "0.0.0.0:0"),
            ("docker0", iface("docker0", 53), "docker0"),
            ("docker0:5353", iface("docker0", 5353), "docker0:5353"),
            ("docker0:53", iface("docker0", 53), "docker0"),
            ("docker0:0", iface("docker0", 0), "docker0:0"),
            // 15 bytes: a Docker network's bridge.
            (
                "br-0123456789ab",
                iface("br-0123456789ab", 53),
                "br-0123456789ab",
            ),
            ("eth0.100", iface("eth0.100", 53), "eth0.100"),
            ("veth-x_1@", iface("veth-x_1@", 53), "veth-x_1@"),
        ] {
            let got: ListenOn = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), shown, "{text}");
            assert_eq!(
                shown.parse::<ListenOn>().unwrap(),
                got,
                "{text} round-trips"
            );
            let written = toml_of(&got);
            assert_eq!(written, format!("listen = [\"{shown}\"]\n"));
        }
    }

    /// `listen = [<entry>]` as the TOML serializer writes it.
    fn toml_of(entry: &ListenOn) -> String {
        #[derive(Serialize)]
        struct One<'a> {
            listen: [&'a ListenOn; 1],
        }
        toml::to_string(&One { listen: [entry] }).unwrap()
    }

    #[test]
    fn bad_listen_entries_are_refused_with_the_value_and_the_reason() {
        for (text, why) in [
            ("dock er0", "whitespace"),
            ("dock\ter0", "whitespace"),
            ("dock\u{b}er0", "whitespace"),
            ("", "empty"),
            ("docker0:", "not a port"),
            ("docker0:x", "not a port"),
            ("docker0:65536", "not a port"),
            ("a:b:c", "not a port"),
            (":53", "empty"),
            ("0123456789abcdef", "at most 15 bytes"),
            ("a/b", "'/'"),
            (".", "not interface names"),
            ("..", "not interface names"),
            ("172.17.0.1", "needs a port"),
            ("::1", "needs a port"),
            ("[::1]", "needs a port"),
            ("1.2.3.4:99999", "needs a port"),
            ("[fd00::1]:x", "needs a port"),
        ] {
            let err = text.parse::<ListenOn>().unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "{text:?} is neither an address:port nor an interface name ("
                )),
                "{text:?}: {err}"
            );
            assert!(err.contains(why), "{text:?}: {err}");
        }
    }

    #[test]
    fn interface_names_follow_the_kernel() {
        for ok in ["lo", "docker0", "a", "br-0123456789ab", "x.y", "..."] {
            check_interface_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a:b",
            "a/b",
            "a\0b",
            "0123456789abcdef",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
        // A name built in code is checked by validate, like the domain.
        let config = DnsConfig {
            listen_interfaces: vec![interface("dock er0", 53)],
            ..DnsConfig::default()
        };
        let err = config.validate().unwrap_err().within("dns");
        assert_eq!(err.field, "dns.listen");
        assert!(err.message.contains("\"dock er0\""), "{err}");
        let ok = DnsConfig {
            listen_interfaces: vec![interface("docker0", 53)],
            ..DnsConfig::default()
        };
        ok.validate().unwrap();
        assert!(ok.serves());
    }

    fn host_addr(text: &str, tentative: bool) -> InterfaceAddr {
        let (ip, prefix) = text.split_once('/').unwrap();
        InterfaceAddr {
            ip: ip.parse().unwrap(),
            prefix: prefix.parse().unwrap(),
            tentative,
        }
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn sockets(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn an_interface_resolves_to_its_ipv4_and_global_ipv6_addresses_and_their_subnets() {
        let addrs = [
            host_addr("172.17.0.1/16", false),
            host_addr("fe80::42:acff:fe11:1/64", false),
            host_addr("fd00:dead:beef::1/64", false),
            host_addr("fd66::1/64", true),
            host_addr("172.18.5.1/24", false),
            host_addr("2001:db8::1/64", false),
        ];
        let got = interface("docker0", 53).resolve(Some(&addrs)).unwrap();
        assert_eq!(got.name, "docker0");
        assert_eq!(
            got.listen,
            sockets(&[
                "172.17.0.1:53",
                "[fd00:dead:beef::1]:53",
                "172.18.5.1:53",
                "[2001:db8::1]:53"
            ])
        );
        assert_eq!(
            got.subnets,
            cidrs(&[
                "172.17.0.0/16",
                "fd00:dead:beef::/64",
                "172.18.5.0/24",
                "2001:db8::/64"
            ])
        );
        assert_eq!(
            got.skipped,
            vec![
                ("fe80::42:acff:fe11:1".parse().unwrap(), Skipped::LinkLocal),
                ("fd66::1".parse().unwrap(), Skipped::Tentative),
            ]
        );
        // The entry's port, on every address.
        let got = interface("docker0", 5353)
            .resolve(Some(&addrs[..1]))
            .unwrap();
        assert_eq!(got.listen, sockets(&["172.17.0.1:5353"]));
        // Two addresses in one subnet: the subnet once.
        let two = [
            host_addr("10.66.0.1/24", false),
            host_addr("10.66.0.2/24", false),
        ];
        let got = interface("br0", 53).resolve(Some(&two)).unwrap();
        assert_eq!(got.listen, sockets(&["10.66.0.1:53", "10.66.0.2:53"]));
        assert_eq!(got.subnets, cidrs(&["10.66.0.0/24"]));
    }

    #[test]
    fn a_missing_or_addressless_interface_is_an_error_naming_field_and_interface() {
        let err = interface("docker0", 53).resolve(None).unwrap_err();
        assert_eq!(
            err.within("dns").to_string(),
            "dns.listen: interface \"docker0\" does not exist on this host"
        );
        let err = interface("docker0", 53).resolve(Some(&[])).unwrap_err();
        assert_eq!(
            err.within("dns").to_string(),
            "dns.listen: interface \"docker0\" has no IPv4 or global IPv6 address; is dockerd running?"
        );
        let unusable = [
            host_addr("fe80::1/64", false),
            host_addr("fd66::1/64", true),
        ];
        let err = interface("docker0", 53)
            .resolve(Some(&unusable))
            .unwrap_err()
            .within("dns")
            .to_string();
        assert!(
            err.starts_with("dns.listen: interface \"docker0\" has no IPv4 or global IPv6 address")
                && err.ends_with("(fe80::1 is link-local, fd66::1 is tentative)"),
            "{err}"
        );
    }

    #[test]
    fn resolving_adds_the_addresses_to_listen_and_the_subnets_to_allow() {
        let config: DnsConfig = toml::from_str(
            r#"
            listen = ["127.0.0.1:53", "docker0", "br0:5353", "172.17.0.1:53"]
            allow = ["127.0.0.0/8", "172.17.0.0/16"]
            "#,
        )
        .unwrap();
        let host = HashMap::from([
            (
                "docker0".to_string(),
                vec![
                    host_addr("172.17.0.1/16", false),
                    host_addr("fe80::1/64", false),
                ],
            ),
            (
                "br0".to_string(),
                vec![
                    host_addr("10.66.0.1/24", false),
                    host_addr("fd66::1/64", false),
                ],
            ),
            ("eth0".to_string(), vec![host_addr("192.0.2.7/24", false)]),
        ]);
        let (resolved, interfaces) = config.resolve_interfaces(&host).unwrap();
        assert_eq!(
            resolved.listen,
            sockets(&[
                "127.0.0.1:53",
                "172.17.0.1:53",
                "10.66.0.1:5353",
                "[fd66::1]:5353"
            ]),
            "an address listed already is not listed twice"
        );
        assert_eq!(
            resolved.allow,
            cidrs(&["127.0.0.0/8", "172.17.0.0/16", "10.66.0.0/24", "fd66::/64"])
        );
        assert!(resolved.listen_interfaces.is_empty(), "{resolved:?}");
        assert_eq!(interfaces.len(), 2);
        assert_eq!(interfaces[1].name, "br0");
        assert_eq!(
            resolved.resolve_interfaces(&HashMap::new()).unwrap().0,
            resolved,
            "a resolved config resolves to itself"
        );
        // The forwarders skip the interface's address: it is our own.
        let resolv = "nameserver 172.17.0.1\nnameserver 10.66.0.1\nnameserver 192.0.2.53\n";
        assert_eq!(
            resolved.upstreams_or_resolv_conf(resolv),
            sockets(&["10.66.0.1:53", "192.0.2.53:53"]),
            "10.66.0.1 is served on port 5353, not 53"
        );
        let err = config
            .resolve_interfaces(&HashMap::from([("br0".to_string(), vec![])]))
            .unwrap_err();
        assert_eq!(
            err.within("dns").to_string(),
            "dns.listen: interface \"docker0\" does not exist on this host"
        );
    }

    #[test]
    fn subnets_mask_the_address() {
        let cases = [
            ("10.66.0.1", 24, "10.66.0.0/24"),
            ("172.17.0.1", 16, "172.17.0.0/16"),
            ("192.0.2.7", 32, "192.0.2.7/32"),
            ("192.0.2.7", 0, "0.0.0.0/0"),
            ("192.0.2.7", 40, "192.0.2.7/32"),
            ("fd00:dead:beef::1", 64, "fd00:dead:beef::/64"),
            ("2001:db8::1", 128, "2001:db8::1/128"),
            ("2001:db8:ffff::1", 33, "2001:db8:8000::/33"),
        ];
        for (ip, prefix, want) in cases {
            assert_eq!(
                subnet(ip.parse().unwrap(), prefix),
                want.parse::<Cidr>().unwrap(),
                "{ip}/{prefix}"
            );
        }
    }

    #[test]
    fn normalized_lowercases_and_drops_the_trailing_dot() {
        let config = DnsConfig {
            domain: "Cluster.Mesh.".into(),
            ..DnsConfig::default()
        };
        assert_eq!(
            config.validate().unwrap_err().field,
            "domain",
            "validate does not normalize"
        );
        let config = config.normalized();
        assert_eq!(config.domain, "cluster.mesh");
        config.validate().unwrap();
        // Only one dot goes: "mesh.." is not a name.
        let twice = DnsConfig {
            domain: "mesh..".into(),
            ..DnsConfig::default()
        }
        .normalized();
        assert_eq!(twice.domain, "mesh.");
        assert!(twice.validate().is_err());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let ok = DnsConfig::default();
        for domain in ["mesh", "k8s.local", "a-b.c1", "1.mesh"] {
            let c = DnsConfig {
                domain: domain.into(),
                ..ok.clone()
            };
            assert!(c.validate().is_ok(), "{domain}");
        }
        let long = "a".repeat(MAX_DOMAIN_LEN + 1);
        for domain in [
            "", ".", "mesh.", ".mesh", "a..b", "Mesh", "me_sh", "-mesh", "mesh-", "a.-b", &long,
        ] {
            let c = DnsConfig {
                domain: domain.into(),
                ..ok.clone()
            };
            let err = c.validate().unwrap_err();
            assert_eq!(err.field, "domain", "{domain:?}");
        }
        let bad = [
            (
                DnsConfig {
                    ttl: MAX_TTL + 1,
                    ..ok.clone()
                },
                "ttl",
            ),
            (
                DnsConfig {
                    max_inflight: 0,
                    ..ok.clone()
                },
                "max_inflight",
            ),
            (
                DnsConfig {
                    forward_timeout: Duration::ZERO,
                    ..ok.clone()
                },
                "forward_timeout",
            ),
        ];
        for (config, field) in bad {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field, field);
            assert_eq!(err.within("dns").field, format!("dns.{field}"));
        }
        assert!(
            DnsConfig {
                ttl: 0,
                ..ok.clone()
            }
            .validate()
            .is_ok(),
            "TTL 0 (no caching) is valid"
        );
    }
}
