//! The userspace L4 data plane: one listener per published port, balancing each new
//! TCP connection or UDP flow over the healthy tasks of the service.
//!
//! [`ProxyPlane`] is a reconciler: it is handed each new [`Snapshot`] and changes only
//! what differs, so listeners of unchanged ports stay bound and established
//! connections are never touched by a reconfiguration.
//!
//! [`Snapshot`]: mesh_core::Snapshot

mod copy;
mod listen;
pub mod metrics;
mod plane;
pub mod proxy_header;
mod route;
mod tcp;
mod udp;
mod workers;

pub use listen::check_port_free;
pub use metrics::ProxyMetrics;
pub use plane::{ProxyConfig, ProxyPlane};
