//! The nftables data plane: published ports and VIPs balanced in the kernel, in the
//! style of kube-proxy's nftables mode. One table of our own (`inet mesh`) holds a
//! verdict map per kind of frontend, a chain per frontend that picks a task with
//! `numgen inc` (exact round robin per host) and DNATs to it from the rule's own map.
//! Connections that leave for another host are masqueraded so the answer comes back
//! through this host.
//!
//! [`Ruleset`] is the pure part: a [`mesh_core::Plan`] in, the table's text out.
//! [`NftPlane`] is the reconciler: it installs the whole table in one `nft`
//! transaction, then sends each change as one netlink batch ([`netlink`]) of the
//! [`edit::Edit`]s that changed, and removes the table on shutdown.

pub mod command;
pub mod conntrack;
pub mod edit;
pub mod forward_accept;
pub mod names;
pub mod netlink;
pub mod nft;
pub mod plane;
pub mod ruleset;

pub use command::CommandError;
pub use conntrack::Conntrack;
pub use netlink::Netlink;
pub use nft::Nft;
pub use plane::NftPlane;
pub use ruleset::Ruleset;
