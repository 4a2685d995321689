//! The internal DNS server. It answers mesh names from the same immutable snapshot the
//! data planes read, and forwards every other name to upstream resolvers.
//!
//! [`Zone`], [`answer::resolve`] and [`respond::respond`] are sans-IO: a snapshot in,
//! a zone out; request bytes in, response bytes (or "forward it") out. [`server`] moves
//! packets and records metrics, and [`forward`] talks to upstreams.

pub mod answer;
pub mod config;
pub mod forward;
pub mod fuzzing;
pub mod metrics;
pub mod respond;
pub mod server;
pub mod wire;
pub mod zone;

pub use config::DnsConfig;
pub use metrics::DnsMetrics;
pub use respond::{Reply, Step, respond};
pub use server::DnsServer;
pub use zone::Zone;
