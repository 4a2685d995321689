//! What replicas exchange: deltas by gossip, digests and sync items by anti-entropy,
//! and what membership says about each host.

use serde::{Deserialize, Serialize};

use super::hlc::Hlc;
use super::origin::{TaskKey, TaskValue, Versioned};
use super::services::ServiceRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status")]
pub enum Liveness {
    /// Membership has not reported this host yet.
    Unknown,
    Alive,
    /// Membership has held it suspect for a while: new connections avoid its tasks,
    /// the records stay, and a refutation restores it at once.
    Suspect {
        since_ms: u64,
    },
    Down {
        since_ms: u64,
    },
    Left {
        since_ms: u64,
    },
}

/// A change that travels by gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    Task {
        origin: String,
        generation: u64,
        version: u64,
        key: TaskKey,
        value: Option<TaskValue>,
    },
    Service(ServiceRecord),
    /// The origin is leaving gracefully: withdraw its tasks now.
    Leave {
        origin: String,
        generation: u64,
    },
}

/// How new a delta is about its subject; deltas about one subject are totally ordered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Freshness {
    Task { generation: u64, version: u64 },
    Service(super::services::Stamp),
    Leave { generation: u64 },
}

impl Delta {
    /// Two deltas with the same subject: the newer replaces the older in a gossip
    /// backlog.
    pub fn subject(&self) -> (u8, &str, &str, &str) {
        match self {
            Delta::Task { origin, key, .. } => (0, origin, &key.0, &key.1),
            Delta::Service(r) => (1, &r.name, "", ""),
            Delta::Leave { origin, .. } => (2, origin, "", ""),
        }
    }

    pub fn freshness(&self) -> Freshness {
        match self {
            Delta::Task {
                generation,
                version,
                ..
            } => Freshness::Task {
                generation: *generation,
                version: *version,
            },
            Delta::Service(r) => Freshness::Service(r.stamp.clone()),
            Delta::Leave { generation, .. } => Freshness::Leave {
                generation: *generation,
            },
        }
    }

    /// Whether `self` supersedes `other` (same subject, newer).
    pub fn supersedes(&self, other: &Delta) -> bool {
        self.subject() == other.subject() && self.freshness() > other.freshness()
    }
}

/// What a replica has: compact enough to send every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// (origin, generation, watermark)
    pub origins: Vec<(String, u64, u64)>,
    pub buckets: Vec<u64>,
    pub floor: Option<Hlc>,
}

/// One unit of anti-entropy, sent in answer to a peer's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncItem {
    /// `full`: a complete copy of the origin, applied atomically (replaces what the
    /// receiver has); otherwise every entry above the peer's watermark.
    Origin {
        origin: String,
        generation: u64,
        watermark: u64,
        gc_floor: u64,
        full: bool,
        entries: Vec<(TaskKey, Versioned)>,
    },
    Bucket {
        bucket: u16,
        records: Vec<ServiceRecord>,
        floor: Option<Hlc>,
    },
}

/// One host as this replica sees it, for `mesh node ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub generation: u64,
    #[serde(flatten)]
    pub liveness: Liveness,
    pub tasks: usize,
}
