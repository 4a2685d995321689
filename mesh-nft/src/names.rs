//! Chain names. nft identifiers allow letters, digits and a few marks; service names
//! carry `-` and VIPs `.` or `:`, so a name keeps what is readable and a hash keeps it
//! unique.

use mesh_core::hash::fnv1a;
use mesh_core::{FrontendKey, Listen};

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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::Protocol;

    #[test]
    fn names_are_nft_identifiers_and_distinct() {
        let vip = FrontendKey {
            listen: Listen::Vip("10.254.0.7".parse().unwrap()),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let vip6 = FrontendKey {
            listen: Listen::Vip("fd00::7".parse().unwrap()),
            ..vip
        };
        let published = FrontendKey {
            listen: Listen::Published,
            port: 80,
            protocol: Protocol::Tcp,
        };
        let names = [
            frontend_chain("web", &vip),
            frontend_chain("web", &vip6),
            frontend_chain("web", &published),
        ];
        for n in &names {
            assert!(
                n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{n}"
            );
        }
        assert!(names[0] != names[1] && names[1] != names[2] && names[0] != names[2]);
        assert_eq!(frontend_chain("web-2", &published), "svc_web_2_tcp_80");
    }
}
