//! [`RouteLookup`]: the kernel's route from this host to an address (`ip route get`),
//! over a blocking rtnetlink socket with a receive timeout.
//!
//! The TC program sends a flow hopped to another host's task straight out of an
//! interface, past the stack, so it needs that interface and this host's source
//! address towards the task. `bpf_fib_lookup` would give both per packet, but it is
//! for GPL programs only; the agent asks here instead, for each task, every few
//! seconds.

use std::net::Ipv4Addr;
use std::time::Duration;

use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long one answer may take: the kernel answers at once, so this only bounds a
/// wedged socket.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Messages read for one question before giving up: the answer is one message, and
/// anything else (a late answer to an earlier question) is skipped.
const MAX_READS: usize = 8;

/// Where the kernel would send a packet for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteTo {
    pub ifindex: u32,
    /// This host's source address for it.
    pub src: Ipv4Addr,
}

pub struct RouteLookup {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RouteLookup {
    pub fn open() -> std::io::Result<RouteLookup> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        // Only the kernel may answer.
        socket.connect(&SocketAddr::new(0, 0))?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(TIMEOUT))?;
        Ok(RouteLookup {
            socket,
            seq: 0,
            buf: vec![0; 16384],
        })
    }

    /// The route to `to`, or `None` when there is none (unreachable, or a route
    /// without an interface or a source address).
    pub fn get(&mut self, to: Ipv4Addr) -> Result<Option<RouteTo>, String> {
        self.seq = self.seq.wrapping_add(1);
        let mut question = RouteMessage::default();
        question.header.address_family = AddressFamily::Inet;
        question.header.destination_prefix_length = 32;
        question
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(to)));
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(question)),
        );
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| format!("asking the route to {to}: {e}"))?;
        for _ in 0..MAX_READS {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| format!("reading the route to {to}: {e}"))?;
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[..n])
                .map_err(|e| format!("reading the route to {to}: {e}"))?;
            if answer.header.sequence_number != self.seq {
                continue;
            }
            return match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    Ok(route_of(&route))
                }
                // ENETUNREACH, EHOSTUNREACH and the like: no way there.
                NetlinkPayload::Error(_) => Ok(None),
                other => Err(format!(
                    "the route to {to}: unexpected answer {:?}",
                    other.message_type()
                )),
            };
        }
        Err(format!(
            "the route to {to}: no answer in {MAX_READS} messages"
        ))
    }
}

/// The index of the interface `name` in this network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

fn route_of(route: &RouteMessage) -> Option<RouteTo> {
    let mut ifindex = None;
    let mut src = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => src = Some(*ip),
            _ => {}
        }
    }
    Some(RouteTo {
        ifindex: ifindex?,
        src: src?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_to_loopback_is_through_lo() {
        let mut lookup = RouteLookup::open().unwrap();
        let index = ifindex("lo").unwrap();
        let route = lookup.get(Ipv4Addr::new(127, 0, 0, 2)).unwrap().unwrap();
        assert_eq!(route.ifindex, index);
        assert_eq!(route.src, Ipv4Addr::LOCALHOST);
        // Asking again on the same socket works (the sequence moves on).
        assert_eq!(
            lookup.get(Ipv4Addr::new(127, 0, 0, 3)).unwrap(),
            Some(route)
        );
    }
}
