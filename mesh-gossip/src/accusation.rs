//! Lifeguard's buddy system (Dadgar et al., 2018, §IV-C): a member we start to
//! suspect is told so at once, directly, instead of waiting for the suspicion to
//! reach it through gossip. A live member refutes within a round trip, and its
//! refutation spreads right behind the suspicion, so the grace a suspicion is held
//! before its tasks are withdrawn need not grow with the time gossip takes to cross
//! the cluster.
//!
//! The message is foca's own: a `Gossip` datagram addressed to the suspect, carrying
//! one update, the suspect's own identity as `Suspect` at the incarnation we suspect.
//! foca on the other side refutes it as it refutes any such update. Nothing new goes
//! on the wire, so agents without this code understand it.

use std::collections::HashMap;

use bytes::BufMut;
use foca::{Codec, Header, Member, Message, PostcardCodec, State};

use crate::identity::NodeIdentity;

/// How many times a suspect is told: at once, then at the next poll (100 ms later)
/// if it is still suspect, so that one lost datagram does not cost the refutation.
pub const TELLS: u8 = 2;

/// The suspects this member accused, and how many times each was told.
#[derive(Debug, Default)]
pub struct Accusations {
    told: HashMap<NodeIdentity, u8>,
    /// Accused by our probe since the last [`Accusations::due`]: told at once.
    fresh: Vec<NodeIdentity>,
}

impl Accusations {
    /// Our probe of `id` failed: foca is about to hold it suspect.
    pub fn probe_failed(&mut self, id: &NodeIdentity) {
        if !self.told.contains_key(id) {
            self.told.insert(id.clone(), 0);
            self.fresh.push(id.clone());
        }
    }

    /// The accusations to send now, given each member's state: the fresh ones, and
    /// (when `retell`) those told fewer than [`TELLS`] times. A member no longer
    /// suspect is forgotten.
    pub fn due<'a>(
        &mut self,
        members: impl Iterator<Item = &'a Member<NodeIdentity>>,
        retell: bool,
    ) -> Vec<Member<NodeIdentity>> {
        // Called after every input: most find nothing to do, and skip the O(members)
        // walk.
        if self.told.is_empty() || (!retell && self.fresh.is_empty()) {
            return Vec::new();
        }
        let fresh = std::mem::take(&mut self.fresh);
        let mut out = Vec::new();
        let mut suspect = std::collections::HashSet::new();
        for m in members {
            if m.state() != State::Suspect {
                continue;
            }
            suspect.insert(m.id().clone());
            let Some(times) = self.told.get_mut(m.id()) else {
                continue;
            };
            if *times < TELLS && (retell || fresh.contains(m.id())) {
                *times += 1;
                out.push(m.clone());
            }
        }
        self.told.retain(|id, _| suspect.contains(id));
        out
    }
}

/// The datagram that tells `suspect` it is suspected, from `us`.
pub fn encode(us: &NodeIdentity, suspect: &Member<NodeIdentity>) -> Vec<u8> {
    let mut codec = PostcardCodec;
    let mut buf = Vec::new();
    let header = Header {
        src: us.clone(),
        // Our own incarnation is foca's secret. The receiver takes this as "the
        // sender is alive at incarnation 0 or later", which is never news.
        src_incarnation: 0,
        dst: suspect.id().clone(),
        message: Message::Gossip,
    };
    // Encoding into a Vec cannot run out of room; an identity that does not encode
    // would not be a member.
    if codec.encode_header(&header, &mut buf).is_err() {
        return Vec::new();
    }
    buf.put_u16(1);
    let update = Member::new(suspect.id().clone(), suspect.incarnation(), State::Suspect);
    if codec.encode_member(&update, &mut buf).is_err() {
        return Vec::new();
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{GossipConfig, GossipNode};
    use std::net::SocketAddr;

    fn id(name: &str, port: u16) -> NodeIdentity {
        NodeIdentity {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation: 1,
        }
    }

    /// Delivers every datagram the nodes send until none is left (timers are not
    /// run: only what the inputs cause).
    fn pump(nodes: &mut [GossipNode]) {
        for _ in 0..20 {
            let mut sent = Vec::new();
            for n in nodes.iter_mut() {
                sent.extend(n.take_outbox().sends);
            }
            if sent.is_empty() {
                return;
            }
            for (to, data) in sent {
                if let Some(n) = nodes.iter_mut().find(|n| n.identity().addr == to) {
                    let _ = n.handle_data(&data);
                }
            }
        }
    }

    #[test]
    fn a_suspect_told_directly_refutes_and_the_accuser_sees_it_alive() {
        let config = GossipConfig::default();
        let (a, b) = (id("a", 7001), id("b", 7002));
        let mut nodes = [
            GossipNode::new(a.clone(), &config, 1),
            GossipNode::new(b.clone(), &config, 2),
        ];
        nodes[0].start(&[b.addr]);
        pump(&mut nodes);
        let incarnation = |n: &GossipNode, who: &NodeIdentity| {
            n.membership()
                .into_iter()
                .find(|m| m.id() == who)
                .map(|m| (m.incarnation(), m.state()))
        };
        assert_eq!(incarnation(&nodes[0], &b), Some((0, State::Alive)));

        // a accuses b, directly.
        let suspect = Member::new(b.clone(), 0, State::Suspect);
        nodes[1]
            .handle_data(&encode(&a, &suspect))
            .expect("foca takes it");
        // b refutes with a higher incarnation, which rides the next message b sends
        // a, here the answer to an announce.
        nodes[0].announce(&[b.addr]);
        pump(&mut nodes);
        assert_eq!(incarnation(&nodes[0], &b), Some((1, State::Alive)));
    }

    #[test]
    fn each_accused_member_is_told_at_once_then_once_more_while_suspect() {
        let mut acc = Accusations::default();
        let b = id("b", 7002);
        let suspect = [Member::new(b.clone(), 3, State::Suspect)];
        assert!(
            acc.due(suspect.iter(), true).is_empty(),
            "not accused by us"
        );
        acc.probe_failed(&b);
        assert_eq!(acc.due(suspect.iter(), false).len(), 1, "at once");
        assert!(
            acc.due(suspect.iter(), false).is_empty(),
            "not again before the poll"
        );
        assert_eq!(
            acc.due(suspect.iter(), true).len(),
            1,
            "once more at the poll"
        );
        assert!(acc.due(suspect.iter(), true).is_empty(), "then no more");
        // Refuted, then accused again: told again.
        let alive = [Member::new(b.clone(), 4, State::Alive)];
        assert!(acc.due(alive.iter(), true).is_empty());
        acc.probe_failed(&b);
        let again = [Member::new(b.clone(), 4, State::Suspect)];
        assert_eq!(acc.due(again.iter(), false)[0].incarnation(), 4);
    }
}
