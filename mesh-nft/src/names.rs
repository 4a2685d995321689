//! Chain names. nft identifiers allow letters, digits and a few marks; service names
//! and task addresses carry others (`.`, `:`), so a name keeps what is readable and a
//! hash keeps it unique.

use std::net::SocketAddr;

use mesh_core::hash::fnv1a;
use mesh_core::{FrontendKey, Listen, Protocol};

fn readable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn short_hash(s: &str) -> String {
    format!("{:08x}", fnv1a(s.as_bytes()) as u32)
}

/// `svc_web_tcp_8080` for a published port; `svc_web_vip_tcp_80_<hash>` for a VIP.
pub fn frontend_chain(service: &str, key: &FrontendKey) -> String {
    match key.listen {
        Listen::Published => format!("svc_{}_{}_{}", readable(service), key.protocol, key.port),
        Listen::Vip(ip) => format!(
            "svc_{}_vip_{}_{}_{}",
            readable(service),
            key.protocol,
            key.port,
            short_hash(&ip.to_string())
        ),
    }
}

/// `to_10_0_0_5_8000_tcp_<hash>`: one per task address and protocol, shared by the
/// frontends that route to it.
pub fn backend_chain(addr: &SocketAddr, protocol: Protocol) -> String {
    let text = format!("{addr}/{protocol}");
    format!(
        "to_{}_{}_{}_{}",
        readable(&addr.ip().to_string()),
        addr.port(),
        protocol,
        short_hash(&text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_nft_identifiers_and_distinct() {
        let v4: SocketAddr = "10.0.0.5:8000".parse().unwrap();
        let v6: SocketAddr = "[fd00::5]:8000".parse().unwrap();
        let a = backend_chain(&v4, Protocol::Tcp);
        let b = backend_chain(&v6, Protocol::Tcp);
        let c = backend_chain(&v4, Protocol::Udp);
        for n in [&a, &b, &c] {
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{n}"
            );
            assert!(n.len() < 256);
        }
        assert!(a != b && a != c && b != c);
        let vip = FrontendKey {
            listen: Listen::Vip("10.254.0.7".parse().unwrap()),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let published = FrontendKey {
            listen: Listen::Published,
            port: 80,
            protocol: Protocol::Tcp,
        };
        assert_ne!(
            frontend_chain("web", &vip),
            frontend_chain("web", &published)
        );
        assert_eq!(frontend_chain("web-2", &published), "svc_web_2_tcp_80");
    }
}
