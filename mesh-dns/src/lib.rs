//! The internal DNS server. It answers mesh names from the same immutable snapshot the
//! data planes read, and forwards every other name to upstream resolvers.
//!
//! [`Zone`] and [`answer::resolve`] are sans-IO: a snapshot in, a response message out.
//! [`server`] moves packets, and [`forward`] talks to upstreams.

pub mod answer;
pub mod config;
pub mod forward;
pub mod fuzzing;
pub mod metrics;
pub mod server;
pub mod wire;
pub mod zone;

pub use config::DnsConfig;
pub use metrics::DnsMetrics;
pub use server::DnsServer;
pub use zone::Zone;
