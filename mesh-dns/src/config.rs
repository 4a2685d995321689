use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::Cidr;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP addresses to serve on.
    pub listen: Vec<SocketAddr>,
    /// Mesh names live under this domain (`web.mesh`). Lowercase, no trailing dot.
    pub domain: String,
    /// TTL of mesh answers, and the negative TTL in the SOA.
    pub ttl: u32,
    /// Resolvers for every other name, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Clients allowed to query; everyone else gets REFUSED, so this is never an open
    /// resolver.
    pub allow: Vec<Cidr>,
    /// Forwarded queries in flight at once; beyond it, SERVFAIL at once.
    pub max_inflight: usize,
    /// Per upstream attempt.
    pub forward_timeout: Duration,
    /// Entries in the forwarding cache.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            domain: "mesh".into(),
            ttl: 5,
            upstreams: Vec::new(),
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

/// Nameservers from a resolv.conf text, skipping the addresses this server listens
/// on (forwarding to ourselves would loop).
pub fn upstreams_from_resolv_conf(text: &str, own: &[SocketAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.trim()
                .split('%')
                .next()?
                .parse::<std::net::IpAddr>()
                .ok()
        })
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
}
