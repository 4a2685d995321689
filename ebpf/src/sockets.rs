//! Ending the sockets connected to a task, from user space: the kernel's socket
//! diagnostics (`sock_diag`, what `ss` reads) list them, and `SOCK_DESTROY` (what
//! `ss -K` sends) aborts one. A TCP socket's owner sees `ECONNABORTED` on its next
//! call, and its peer a reset; a connected UDP socket is disconnected (its next
//! `send` fails with `EDESTADDRREQ`, its next `recv` with `ECONNABORTED`), so the
//! application connects again and is balanced anew.
//!
//! Socket programs rewrite `connect()` and leave nothing in the path, so a drained
//! task's connections through a VIP can only be ended this way. Cilium destroys them
//! from a BPF socket iterator; tracing programs are not available on our kernels,
//! and this needs none (`CONFIG_INET_DIAG_DESTROY`, on in distribution kernels).
//!
//! Written against the netlink ABI with `libc` rather than a crate: the
//! netlink-packet-sock-diag crate parses dumps but has no `SOCK_DESTROY` message, and
//! the two messages here are 72 bytes of fixed layout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mesh_core::Protocol;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg` (without attributes).
const MSG_LEN: usize = 72;
/// Every TCP state but LISTEN, TIME_WAIT and NEW_SYN_RECV (no owner to tell), and
/// every UDP socket (diag reports them as CLOSE or ESTABLISHED).
const STATES: u32 = !((1 << TCP_LISTEN) | (1 << 6) | (1 << 12));
/// The kernel's TCP_LISTEN state number.
const TCP_LISTEN: u32 = 10;
/// A dump, or a destroy's answer, that takes longer than this in all is abandoned.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Most messages one dump may bring; a host with more sockets is listed only this far.
const MAX_MESSAGES: usize = 1 << 20;

/// One socket connected to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// The kernel's socket cookie: what `bpf_get_socket_cookie` returns for it.
    pub cookie: u64,
    /// The address family the socket was made with (an IPv6 socket may reach an
    /// IPv4 peer through a mapped address).
    family: u8,
    /// The kernel's interface index from the listing, sent back to find the socket.
    ifindex: u32,
}

/// A `NETLINK_SOCK_DIAG` socket in the caller's network namespace.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

/// Most network namespaces [`SockDiag::every_namespace`] opens.
const MAX_NAMESPACES: usize = 4096;
/// Most namespace errors [`SockDiag::every_namespace`] reports.
const MAX_ERRORS: usize = 8;

impl SockDiag {
    /// One socket per network namespace a process on the host is in (read from
    /// `/proc/*/ns/net`): a client in a container has sockets only its namespace lists.
    /// Namespaces that cannot be entered are skipped, with the reason.
    pub fn every_namespace() -> (Vec<SockDiag>, Vec<String>) {
        use std::os::unix::fs::MetadataExt;

        let mut seen = std::collections::BTreeSet::new();
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        // Our own namespace needs no entering (and a sandbox may forbid setns).
        match SockDiag::open() {
            Ok(d) => out.push(d),
            Err(e) => errors.push(format!("sock_diag: {e}")),
        }
        if let Ok(own) = std::fs::metadata("/proc/self/ns/net") {
            seen.insert((own.dev(), own.ino()));
        }
        let Ok(procs) = std::fs::read_dir("/proc") else {
            errors.push("cannot read /proc: only this namespace is listed".into());
            return (out, errors);
        };
        for entry in procs.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let path = entry.path().join("ns/net");
            let ns = match std::fs::File::open(&path) {
                Ok(ns) => ns,
                // The process exited meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Another user's process, without CAP_SYS_PTRACE, say: reported, up
                // to a few.
                Err(e) => {
                    if errors.len() < MAX_ERRORS {
                        errors.push(format!("{}: {e}", path.display()));
                    }
                    continue;
                }
            };
            let Ok(meta) = ns.metadata() else { continue };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            if seen.len() > MAX_NAMESPACES {
                errors.push(format!(
                    "more than {MAX_NAMESPACES} network namespaces; the rest are skipped"
                ));
                break;
            }
            match SockDiag::open_in(ns) {
                Ok(d) => out.push(d),
                Err(e) if errors.len() < MAX_ERRORS => {
                    errors.push(format!("{}: {e}", path.display()))
                }
                Err(_) => {}
            }
        }
        (out, errors)
    }

    /// A socket in the network namespace `ns` (a `/proc/PID/ns/net` file). A socket
    /// belongs to the namespace it was made in, so a short-lived thread enters `ns`,
    /// makes it, and ends; the caller's thread never changes namespace.
    pub fn open_in(ns: std::fs::File) -> io::Result<Self> {
        std::thread::Builder::new()
            .name("mesh-netns".into())
            .spawn(move || {
                // SAFETY: setns on a thread of our own, which ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                SockDiag::open()
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        socket2::SockRef::from(&fd).set_read_timeout(Some(TIMEOUT))?;
        // Connected to the kernel: the kernel then refuses datagrams other sockets
        // send us, so a process with CAP_NET_ADMIN in a namespace we list cannot
        // forge answers.
        let kernel = kernel_addr();
        // SAFETY: connect with a valid sockaddr_nl of the right size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, seq: 0 })
    }

    /// The sockets of `protocol` connected to any of `peers`: one listing per address
    /// family, whatever the number of peers (an IPv4 peer may be reached from an IPv6
    /// socket, through a mapped address).
    pub fn connected_to_any(
        &mut self,
        protocol: Protocol,
        peers: &[SocketAddr],
    ) -> io::Result<Vec<Connected>> {
        let mut families = vec![libc::AF_INET6 as u8];
        if peers.iter().any(SocketAddr::is_ipv4) {
            families.push(libc::AF_INET as u8);
        }
        let mut out = Vec::new();
        for family in families {
            self.dump(family, protocol, STATES, |body| {
                if let Some(c) = parse(body, protocol)
                    && peers.iter().any(|p| same_peer(c.peer, *p))
                {
                    out.push(c);
                }
            })?;
        }
        Ok(out)
    }

    /// The local ports of this namespace's listening TCP sockets and of all its UDP
    /// sockets, IPv4 and IPv6: the ports in use here that no other socket may share.
    pub fn bound_ports(&mut self) -> io::Result<std::collections::BTreeSet<u16>> {
        let mut out = std::collections::BTreeSet::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for (protocol, states) in [(Protocol::Tcp, 1 << TCP_LISTEN), (Protocol::Udp, !0)] {
                self.dump(family, protocol, states, |body| {
                    // inet_diag_msg: family, state, timer, retrans, then the sockid's
                    // source port.
                    if body.len() >= MSG_LEN {
                        out.insert(u16::from_be_bytes([body[4], body[5]]));
                    }
                })?;
            }
        }
        Ok(out)
    }

    /// Aborts one socket. A socket that closed meanwhile is not an error.
    pub fn destroy(&mut self, c: &Connected) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(
            SOCK_DESTROY,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            self.seq,
            c.family,
            c.protocol,
            STATES,
            Some(c),
        );
        self.send(&req)?;
        let mut buf = vec![0u8; 8192];
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = self.recv(&mut buf, deadline)?;
            for (ty, seq, body) in messages(&buf[..n]) {
                if seq != self.seq || ty != libc::NLMSG_ERROR as u16 {
                    continue;
                }
                return match errno(body) {
                    0 | libc::ENOENT => Ok(()),
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
        }
    }

    /// Each `inet_diag_msg` of the sockets of `family` and `protocol` in `states`.
    fn dump(
        &mut self,
        family: u8,
        protocol: Protocol,
        states: u32,
        mut each: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let req = request(
            SOCK_DIAG_BY_FAMILY,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            self.seq,
            family,
            protocol,
            states,
            None,
        );
        self.send(&req)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = 0usize;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = self.recv(&mut buf, deadline)?;
            for (ty, seq, body) in messages(&buf[..n]) {
                seen += 1;
                if seen > MAX_MESSAGES {
                    return Err(io::Error::other(format!(
                        "more than {MAX_MESSAGES} sockets listed"
                    )));
                }
                if seq != self.seq {
                    continue;
                }
                match ty {
                    t if t == libc::NLMSG_DONE as u16 => return Ok(()),
                    t if t == libc::NLMSG_ERROR as u16 => {
                        return Err(io::Error::from_raw_os_error(errno(body)));
                    }
                    SOCK_DIAG_BY_FAMILY => each(body),
                    _ => {}
                }
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let to = kernel_addr();
        // SAFETY: msg and to are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram from the kernel, by `deadline`.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "sock_diag did not finish in time",
                ));
            }
            // SAFETY: an all-zero sockaddr_nl is a valid buffer for the sender.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: buf and from are valid for writes of the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "sock_diag did not answer",
                        ));
                    }
                    _ => return Err(e),
                }
            }
            // Only the kernel speaks to us (the socket is connected to it).
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(n as usize);
        }
    }
}

/// The error of an `NLMSG_ERROR` message, as a positive errno (0: an acknowledgement).
fn errno(body: &[u8]) -> i32 {
    body.get(..4)
        .map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: an all-zero sockaddr_nl is valid; pid 0 is the kernel.
    let mut a: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    a.nl_family = libc::AF_NETLINK as u16;
    a
}

fn same_peer(listed: SocketAddr, wanted: SocketAddr) -> bool {
    let canonical = |a: SocketAddr| match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    };
    canonical(listed) == canonical(wanted)
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// A netlink message holding an `inet_diag_req_v2`; with `target`, its socket id.
fn request(
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    protocol: Protocol,
    states: u32,
    target: Option<&Connected>,
) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states.
    m.extend_from_slice(&[family, proto_number(protocol), 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    // inet_diag_sockid: sport, dport (network order), src[4], dst[4], if, cookie[2].
    let (local, peer, ifindex, cookie) = match target {
        Some(c) => (Some(c.local), Some(c.peer), c.ifindex, c.cookie),
        None => (None, None, 0, 0),
    };
    m.extend_from_slice(&local.map_or(0, |a| a.port()).to_be_bytes());
    m.extend_from_slice(&peer.map_or(0, |a| a.port()).to_be_bytes());
    m.extend_from_slice(&addr_bytes(local.map(|a| a.ip()), family));
    m.extend_from_slice(&addr_bytes(peer.map(|a| a.ip()), family));
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&(cookie as u32).to_ne_bytes());
    m.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    debug_assert_eq!(m.len(), len);
    m
}

/// An address as the 16 bytes of `inet_diag_sockid` for a socket of `family`.
fn addr_bytes(ip: Option<IpAddr>, family: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        Some(IpAddr::V4(v4)) if family == libc::AF_INET as u8 => {
            b[..4].copy_from_slice(&v4.octets())
        }
        Some(IpAddr::V4(v4)) => b = v4.to_ipv6_mapped().octets(),
        Some(IpAddr::V6(v6)) => b = v6.octets(),
        None => {}
    }
    b
}

/// The messages of one netlink datagram: (type, sequence, body).
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes"));
        out.push((ty, seq, &buf[NLMSG_HDR..len]));
        let aligned = (len + 3) & !3;
        buf = &buf[aligned.min(buf.len())..];
    }
    out
}

/// One `inet_diag_msg`; `None` when short or not connected.
fn parse(body: &[u8], protocol: Protocol) -> Option<Connected> {
    if body.len() < MSG_LEN {
        return None;
    }
    let family = body[0];
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    let ip = |at: usize| -> IpAddr {
        let b: [u8; 16] = body[at..at + 16].try_into().expect("16 bytes");
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(b))
        }
    };
    // The sockid starts at byte 4: sport, dport, src, dst, if, cookie.
    let local = SocketAddr::new(ip(8), port(4));
    let peer = SocketAddr::new(ip(24), port(6));
    if peer.port() == 0 {
        return None;
    }
    let ifindex = u32::from_ne_bytes(body[40..44].try_into().expect("4 bytes"));
    let lo = u32::from_ne_bytes(body[44..48].try_into().expect("4 bytes"));
    let hi = u32::from_ne_bytes(body[48..52].try_into().expect("4 bytes"));
    Some(Connected {
        protocol,
        local,
        peer,
        cookie: u64::from(lo) | (u64::from(hi) << 32),
        family,
        ifindex,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};

    use super::*;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED: destroying sockets needs CAP_NET_ADMIN (run as root)");
        }
        root
    }

    #[test]
    fn a_listed_tcp_connection_is_aborted_and_its_neighbour_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut doomed = TcpStream::connect(addr).unwrap();
        let (mut doomed_server, _) = listener.accept().unwrap();
        let mut spared = TcpStream::connect(addr).unwrap();
        let (mut spared_server, _) = listener.accept().unwrap();

        let mut diag = SockDiag::open().unwrap();
        let listed = diag.connected_to_any(Protocol::Tcp, &[addr]).unwrap();
        let mine = |s: &TcpStream| s.local_addr().unwrap();
        assert!(
            listed.iter().any(|c| c.local == mine(&doomed))
                && listed.iter().any(|c| c.local == mine(&spared)),
            "both connections are listed: {listed:?}"
        );
        assert!(listed.iter().all(|c| c.peer == addr && c.cookie != 0));
        if !root() {
            return;
        }
        let target = listed.iter().find(|c| c.local == mine(&doomed)).unwrap();
        diag.destroy(target).unwrap();
        // Destroying what is gone already is not an error.
        diag.destroy(target).unwrap();

        let err = doomed
            .write_all(b"x")
            .and_then(|_| doomed.read(&mut [0u8; 1]).map(|_| ()));
        assert_eq!(
            err.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ECONNABORTED)),
            "the aborted socket's owner is told"
        );
        // Its peer sees a reset or an end, never data.
        let mut b = [0u8; 1];
        assert!(matches!(doomed_server.read(&mut b), Ok(0) | Err(_)));
        spared.write_all(b"y").unwrap();
        spared_server.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"y", "the other connection is untouched");
        assert!(
            diag.connected_to_any(Protocol::Tcp, &[addr])
                .unwrap()
                .iter()
                .all(|c| c.local != mine(&doomed)),
            "the aborted socket is no longer listed"
        );
    }

    #[test]
    fn a_connected_udp_socket_is_listed_and_aborted() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(addr).unwrap();
        let mut diag = SockDiag::open().unwrap();
        let listed = diag.connected_to_any(Protocol::Udp, &[addr]).unwrap();
        let target = listed
            .iter()
            .find(|c| c.local == client.local_addr().unwrap())
            .copied()
            .unwrap_or_else(|| panic!("the connected UDP socket is listed: {listed:?}"));
        if !root() {
            return;
        }
        diag.destroy(&target).unwrap();
        // The socket is disconnected, and its error waits for the next receive.
        assert_eq!(
            client.send(b"x").map_err(|e| e.raw_os_error()),
            Err(Some(libc::EDESTADDRREQ))
        );
        client.set_nonblocking(true).unwrap();
        assert_eq!(
            client.recv(&mut [0u8; 8]).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ECONNABORTED))
        );
    }

    #[test]
    fn bound_ports_are_listeners_and_udp_sockets_not_connections() {
        // Listing needs no privilege.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("[::1]:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let ports = SockDiag::open().unwrap().bound_ports().unwrap();
        assert!(ports.contains(&listener.local_addr().unwrap().port()));
        assert!(ports.contains(&udp.local_addr().unwrap().port()));
        assert!(
            !ports.contains(&client.local_addr().unwrap().port()),
            "a connection's own port is not a listener's"
        );
    }

    /// Another socket in the namespace (a process with CAP_NET_ADMIN there) cannot
    /// send us forged answers: ours is connected to the kernel.
    #[test]
    fn no_other_socket_can_send_to_ours() {
        let diag = SockDiag::open().unwrap();
        // SAFETY: an all-zero sockaddr_nl is valid; getsockname fills it.
        let mut ours: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: valid descriptor and buffer.
        let rc = unsafe {
            libc::getsockname(
                diag.fd.as_raw_fd(),
                (&mut ours as *mut libc::sockaddr_nl).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_ne!(ours.nl_pid, 0, "the kernel gave our socket a port id");
        // SAFETY: plain socket(2), owned at once.
        let forger = unsafe {
            OwnedFd::from_raw_fd(libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            ))
        };
        let fake = request(
            libc::NLMSG_DONE as u16,
            0,
            1,
            2,
            Protocol::Tcp,
            STATES,
            None,
        );
        // SAFETY: valid buffer and address.
        let n = unsafe {
            libc::sendto(
                forger.as_raw_fd(),
                fake.as_ptr().cast(),
                fake.len(),
                0,
                (&ours as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        let err = std::io::Error::last_os_error();
        if n >= 0 || err.raw_os_error() == Some(libc::EPERM) {
            // EPERM: not root, so the kernel refused for lack of CAP_NET_ADMIN
            // before it got to the connection; as root it must be the connection.
            assert!(n < 0 && !root(), "a forged datagram reached our socket");
            return;
        }
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED), "{err}");
    }

    #[test]
    fn an_ipv6_socket_to_a_mapped_ipv4_peer_counts_as_that_peer() {
        let v4: SocketAddr = "10.1.2.3:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert!(same_peer(mapped, v4));
        assert!(!same_peer(mapped, "10.1.2.3:81".parse().unwrap()));
    }

    #[test]
    fn truncated_or_garbled_answers_are_skipped() {
        assert!(messages(&[0u8; 10]).is_empty());
        // A length beyond the datagram ends the walk.
        let mut m = request(SOCK_DIAG_BY_FAMILY, 0, 1, 2, Protocol::Tcp, STATES, None);
        m[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(messages(&m).is_empty());
        assert!(parse(&[0u8; 10], Protocol::Tcp).is_none());
    }
}
