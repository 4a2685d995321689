//! Socket options and address forms shared by listeners, connections and the copy
//! loop. Kept apart so that none of those depends on another for them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// TCP_NODELAY and keepalive; on a listener, accepted sockets inherit both.
pub fn tune<'s>(socket: impl Into<SockRef<'s>>) {
    let sock = socket.into();
    let _ = sock.set_nodelay(true);
    set_keepalive(sock);
}

/// Idle connections live forever unless the service sets idle_timeout; keepalive
/// finds peers that vanished without a FIN.
pub fn set_keepalive(sock: SockRef<'_>) {
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = sock.set_tcp_keepalive(&ka);
}

/// A v4 client seen through a dual-stack socket arrives as `::ffff:a.b.c.d`; PROXY
/// headers and logs must show the plain IPv4 address.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
