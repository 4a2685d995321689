//! What a host is to the cluster, as membership reports it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    Alive,
    /// Missed its probes; peers are waiting for it to refute before declaring it down.
    Suspect,
    Down,
    /// Left gracefully.
    Left,
}

impl MemberStatus {
    /// Counted as a member: alive, or suspected but not yet declared down.
    pub fn is_member(self) -> bool {
        matches!(self, MemberStatus::Alive | MemberStatus::Suspect)
    }
}

impl std::fmt::Display for MemberStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberStatus::Alive => "alive",
            MemberStatus::Suspect => "suspect",
            MemberStatus::Down => "down",
            MemberStatus::Left => "left",
        })
    }
}
