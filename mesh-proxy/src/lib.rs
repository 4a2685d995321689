//! The userspace L4 data plane: one listener per frontend, balancing each new TCP
//! connection or UDP flow over the routable tasks of the service, with connect retry,
//! PROXY headers, connection limits and idle timeouts.
//!
//! [`ProxyPlane`] implements [`mesh_dataplane::Dataplane`]: it reconciles the frontends
//! the plan gives it and changes only what the plan's changes name, so listeners of
//! unchanged ports stay bound and established connections are never touched by a
//! reconfiguration.

mod config;
mod copy;
mod deadlines;
mod listen;
mod listeners;
pub mod metrics;
mod plane;
pub mod proxy_header;
mod route;
mod slots;
mod sockopt;
mod tcp;
mod udp;
mod workers;

pub use config::ProxyConfig;
pub use listen::check_port_free;
pub use metrics::ProxyMetrics;
pub use plane::ProxyPlane;
