//! The `[dns]` section of the agent's config. The agent deserializes the TOML section
//! straight into [`DnsConfig`], so the defaults below are the only ones there are.
//!
//! Loading a config is three explicit steps, so nothing is rewritten behind a
//! caller's back: deserialize, [`DnsConfig::normalized`] (the spellings of the domain
//! that mean the same name become one), then [`DnsConfig::validate`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_core::{Cidr, ModelError};
use serde::{Deserialize, Serialize};

/// The longest domain accepted, which is what the agent has always accepted. It
/// leaves room for the longest names we answer (`_<port>._<proto>.<service>.<domain>.`
/// with 63-character port and service names) within the 255 bytes of a DNS name.
pub const MAX_DOMAIN_LEN: usize = 63;

/// The longest TTL accepted. Mesh answers change whenever tasks come and go, so a
/// client that caches them longer keeps using tasks that are gone; the forwarding
/// cache caps upstream TTLs at the same hour.
pub const MAX_TTL: u32 = 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP addresses to serve on, e.g. the container bridge address:53.
    /// Empty (the default): no DNS server.
    pub listen: Vec<SocketAddr>,
    /// Mesh names live under this domain (`web.mesh`). Lowercase, no trailing dot
    /// (see [`DnsConfig::normalized`]).
    pub domain: String,
    /// TTL of mesh answers, and the negative TTL in the SOA.
    pub ttl: u32,
    /// Resolvers for every other name, tried in order. `None` (the default): the
    /// nameservers of /etc/resolv.conf, see [`DnsConfig::upstreams_or_resolv_conf`].
    /// `Some(vec![])` forwards nothing: other names get SERVFAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<Vec<SocketAddr>>,
    /// Clients allowed to query; everyone else gets REFUSED, so this is never an open
    /// resolver. Default: loopback only.
    pub allow: Vec<Cidr>,
    /// Forwarded queries in flight at once; beyond it, SERVFAIL at once.
    pub max_inflight: usize,
    /// Per upstream attempt, written like `"2s"` or `"500ms"`.
    #[serde(with = "mesh_core::duration")]
    pub forward_timeout: Duration,
    /// Entries in the forwarding cache; 0 turns the cache off.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
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
    /// without our own listen addresses.
    pub fn upstreams_or_resolv_conf(&self, resolv_conf_text: &str) -> Vec<SocketAddr> {
        match &self.upstreams {
            Some(upstreams) => upstreams.clone(),
            None => upstreams_from_resolv_conf(resolv_conf_text, &self.listen),
        }
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
            listen = ["127.0.0.1:5353", "[::1]:5353"]
            domain = "cluster.internal"
            ttl = 30
            upstreams = ["192.0.2.53:53"]
            allow = ["10.0.0.0/8", "fd00::/8"]
            max_inflight = 8
            forward_timeout = "500ms"
            cache_size = 0
        "#;
        let config: DnsConfig = toml::from_str(text).unwrap();
        assert_eq!(config.listen.len(), 2);
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

        let again: DnsConfig = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
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
        ] {
            let err = toml::from_str::<DnsConfig>(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
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
