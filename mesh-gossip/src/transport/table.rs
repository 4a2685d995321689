//! What the transport asks of the table, the one owner of the replica. Gossip owns no
//! replica: it sends these on a channel, and the table runs each one against its
//! replica with [`ToTable::run`], in arrival order.

use mesh_core::Replica;
use tokio::sync::oneshot;

use crate::anti_entropy::{self, Back, Hello, Members, Reply};
use crate::events::GossipEvent;

pub enum ToTable {
    /// A delta from a peer, or a membership change.
    Event(GossipEvent),
    /// Anti-entropy, initiator: our opening message.
    Hello {
        members: Members,
        reply: oneshot::Sender<Hello>,
    },
    /// Anti-entropy, responder: answer a peer's opening.
    Reply {
        hello: Hello,
        members: Members,
        reply: oneshot::Sender<Reply>,
    },
    /// Anti-entropy, initiator: take the peer's answer; say what the peer lacks.
    AbsorbReply {
        reply: Reply,
        back: oneshot::Sender<Back>,
    },
    /// Anti-entropy, responder: take what we lacked.
    Absorb { items: Back },
}

impl ToTable {
    /// Runs the request against the replica and answers it. Returns whether the
    /// replica changed (so the owner publishes a new snapshot).
    pub fn run(self, replica: &mut Replica, now_ms: u64) -> bool {
        match self {
            ToTable::Event(e) => e.apply(replica, now_ms),
            ToTable::Hello { members, reply } => {
                let _ = reply.send(anti_entropy::hello(replica, members));
                false
            }
            ToTable::Reply {
                hello,
                members,
                reply,
            } => {
                let _ = reply.send(anti_entropy::reply(replica, &hello, members));
                false
            }
            ToTable::AbsorbReply { reply, back } => {
                let (items, changed) = anti_entropy::absorb_reply(replica, reply, now_ms);
                let _ = back.send(items);
                changed
            }
            ToTable::Absorb { items } => anti_entropy::absorb(replica, items, now_ms),
        }
    }
}
