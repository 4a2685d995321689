//! Replica deltas as foca custom broadcasts: small changes ride on SWIM's own
//! messages and reach every member in O(log n) rounds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use foca::{BroadcastHandler, Invalidates};
use mesh_core::{Delta, Replica};

use crate::identity::NodeIdentity;

/// The dissemination key: a newer delta about the same subject replaces an older one
/// in foca's backlog.
pub struct DeltaKey(pub Delta);

impl Invalidates for DeltaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.0.supersedes(&other.0)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable broadcast: {0}")]
pub struct BadBroadcast(#[from] postcard::Error);

pub struct DeltaHandler {
    pub replica: Arc<Mutex<Replica>>,
    /// Monotonic milliseconds, set by the node before handing foca any input (foca
    /// gives no access to its handler once built).
    pub now_ms: Arc<AtomicU64>,
}

pub fn encode(delta: &Delta) -> Vec<u8> {
    postcard::to_allocvec(delta).expect("deltas serialize")
}

impl BroadcastHandler<NodeIdentity> for DeltaHandler {
    type Key = DeltaKey;
    type Error = BadBroadcast;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeIdentity>,
    ) -> Result<Option<DeltaKey>, BadBroadcast> {
        let delta: Delta = postcard::from_bytes(data)?;
        if sender.is_none() {
            // Our own write, already applied: always disseminate it.
            return Ok(Some(DeltaKey(delta)));
        }
        let now = self.now_ms.load(Ordering::Relaxed);
        let news = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply_delta(delta.clone(), now);
        Ok(news.then_some(DeltaKey(delta)))
    }

    fn should_add_broadcast_data(&self, _member: &NodeIdentity) -> bool {
        true
    }
}
