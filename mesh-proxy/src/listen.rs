//! Listening sockets: dual-stack, large backlog, bound with socket2 so the options are
//! set before bind.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

const BACKLOG: i32 = 4096;

/// How a listener binds.
#[derive(Clone, Copy)]
pub enum Bind {
    /// A published port: `ip`, or every IPv4 and IPv6 address when `None`.
    Published(Option<IpAddr>),
    /// A service VIP. IP_FREEBIND lets it bind before the address is on an interface,
    /// and SO_REUSEPORT lets VIP:80 coexist with a published `*:80`: the kernel
    /// prefers the exact-address listener for VIP traffic.
    Vip(IpAddr),
}

/// A listening socket, not yet registered with a runtime: the worker that serves it
/// registers it with its own.
pub fn tcp_at(bind: Bind, port: u16) -> io::Result<std::net::TcpListener> {
    let socket = match bind {
        Bind::Published(ip) => bind_plain(ip, port, Type::STREAM, Protocol::TCP, true)?,
        Bind::Vip(ip) => bind_vip(ip, port, Type::STREAM, Protocol::TCP)?,
    };
    // Accepted sockets inherit TCP_NODELAY and the keepalive settings from the
    // listener, which saves five setsockopt calls per client connection.
    crate::sockopt::tune(&socket);
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

pub fn udp_at(bind: Bind, port: u16) -> io::Result<tokio::net::UdpSocket> {
    let socket = match bind {
        Bind::Published(ip) => bind_plain(ip, port, Type::DGRAM, Protocol::UDP, true)?,
        Bind::Vip(ip) => bind_vip(ip, port, Type::DGRAM, Protocol::UDP)?,
    };
    let _ = socket.set_recv_buffer_size(4 << 20);
    tokio::net::UdpSocket::from_std(socket.into())
}

fn bind_vip(ip: IpAddr, port: u16, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let addr = SocketAddr::new(ip, port);
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    match ip {
        IpAddr::V4(_) => socket.set_freebind(true)?,
        IpAddr::V6(_) => socket.set_freebind_ipv6(true)?,
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Binds `port` on `ip`, or on every IPv4 and IPv6 address when `ip` is `None`
/// (`[::]` with IPV6_V6ONLY off, falling back to `0.0.0.0` on hosts without IPv6).
/// Listeners set SO_REUSEPORT so VIP listeners on the same port number can coexist.
fn bind_plain(
    ip: Option<IpAddr>,
    port: u16,
    ty: Type,
    proto: Protocol,
    reuse_port: bool,
) -> io::Result<Socket> {
    let addr = SocketAddr::new(ip.unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED)), port);
    let socket = match Socket::new(Domain::for_address(addr), ty, Some(proto)) {
        Err(e) if ip.is_none() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return bind_plain(
                Some(IpAddr::from([0, 0, 0, 0])),
                port,
                ty,
                proto,
                reuse_port,
            );
        }
        other => other?,
    };
    if addr.is_ipv6() && ip.is_none() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Whether `port` could be bound the way the plane would bind it. Lets the API refuse
/// a port held by another process with a clear answer instead of a later bind error.
pub fn check_port_free(
    ip: Option<IpAddr>,
    port: u16,
    protocol: mesh_core::Protocol,
) -> io::Result<()> {
    // Without SO_REUSEPORT: any other holder of the port, reuseport or not, makes
    // this bind fail.
    match protocol {
        mesh_core::Protocol::Tcp => {
            bind_plain(ip, port, Type::STREAM, Protocol::TCP, false)?.listen(1)
        }
        mesh_core::Protocol::Udp => {
            bind_plain(ip, port, Type::DGRAM, Protocol::UDP, false).map(drop)
        }
    }
}
