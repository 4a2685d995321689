//! PROXY protocol v1 and v2 headers (haproxy.org/download/2.9/doc/proxy-protocol.txt),
//! so a task sees the real client address. Only the sender side is needed here, and it
//! writes into a fixed buffer: no allocation per connection.

use std::net::SocketAddr;

use mesh_core::ProxyProtocol;

/// The longest header we write: v1 TCP6 with maximal addresses is 104 bytes.
pub const MAX_LEN: usize = 108;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Writes the header for a TCP connection from `client` to `local` into `buf` and
/// returns its length, or 0 for `Off`. Both addresses must be of one family, which
/// holds for the two ends of one accepted socket once v4-mapped addresses are unmapped.
pub fn encode(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
    buf: &mut [u8; MAX_LEN],
) -> usize {
    match version {
        ProxyProtocol::Off => 0,
        ProxyProtocol::V1 => encode_v1(client, local, buf),
        ProxyProtocol::V2 => encode_v2(client, local, buf),
    }
}

fn encode_v1(client: SocketAddr, local: SocketAddr, buf: &mut [u8; MAX_LEN]) -> usize {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let family = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        // Mixed families cannot be described; the spec's answer is UNKNOWN.
        _ => {
            let _ = cursor.write_all(b"PROXY UNKNOWN\r\n");
            return cursor.position() as usize;
        }
    };
    let _ = write!(
        cursor,
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    );
    cursor.position() as usize
}

fn encode_v2(client: SocketAddr, local: SocketAddr, buf: &mut [u8; MAX_LEN]) -> usize {
    buf[..12].copy_from_slice(&V2_SIGNATURE);
    buf[12] = 0x21; // version 2, command PROXY
    let mut at = 16;
    let family = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            buf[at..at + 4].copy_from_slice(&c.ip().octets());
            buf[at + 4..at + 8].copy_from_slice(&l.ip().octets());
            at += 8;
            0x11 // AF_INET, STREAM
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            buf[at..at + 16].copy_from_slice(&c.ip().octets());
            buf[at + 16..at + 32].copy_from_slice(&l.ip().octets());
            at += 32;
            0x21 // AF_INET6, STREAM
        }
        _ => 0x00, // AF_UNSPEC: the receiver uses the connection's own addresses
    };
    if family != 0 {
        buf[at..at + 2].copy_from_slice(&client.port().to_be_bytes());
        buf[at + 2..at + 4].copy_from_slice(&local.port().to_be_bytes());
        at += 4;
    }
    buf[13] = family;
    buf[14..16].copy_from_slice(&((at - 16) as u16).to_be_bytes());
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: ProxyProtocol, c: &str, l: &str) -> Vec<u8> {
        let mut buf = [0; MAX_LEN];
        let n = encode(v, c.parse().unwrap(), l.parse().unwrap(), &mut buf);
        buf[..n].to_vec()
    }

    #[test]
    fn v1_matches_the_spec_text() {
        assert_eq!(
            header(ProxyProtocol::V1, "192.0.2.1:5000", "198.51.100.2:80"),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n"
        );
        let long = header(
            ProxyProtocol::V1,
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        assert!(long.len() <= 107, "{}", long.len());
    }

    #[test]
    fn v1_and_v2_parse_with_an_independent_implementation() {
        let v1 = header(ProxyProtocol::V1, "[2001:db8::1]:4242", "[2001:db8::2]:80");
        let parsed = ppp::v1::Header::try_from(std::str::from_utf8(&v1).unwrap()).unwrap();
        assert_eq!(
            parsed.addresses,
            ppp::v1::Addresses::new_tcp6(
                "2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap(),
                "2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap(),
                4242,
                80
            )
        );

        for (c, l) in [
            ("192.0.2.1:5000", "198.51.100.2:80"),
            ("[2001:db8::1]:4242", "[2001:db8::2]:80"),
        ] {
            let v2 = header(ProxyProtocol::V2, c, l);
            let parsed = ppp::v2::Header::try_from(&v2[..]).unwrap();
            let (c, l): (SocketAddr, SocketAddr) = (c.parse().unwrap(), l.parse().unwrap());
            let expected: ppp::v2::Addresses = match (c, l) {
                (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                    ppp::v2::IPv4::new(*c.ip(), *l.ip(), c.port(), l.port()).into()
                }
                (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                    ppp::v2::IPv6::new(*c.ip(), *l.ip(), c.port(), l.port()).into()
                }
                _ => unreachable!(),
            };
            assert_eq!(parsed.addresses, expected);
            assert_eq!(parsed.command, ppp::v2::Command::Proxy);
            assert_eq!(parsed.len(), v2.len());
        }
    }
}
