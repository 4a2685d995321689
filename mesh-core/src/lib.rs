//! Sans-IO core of mesh: the model and its validation, the replicated table, the
//! immutable [`Snapshot`] that readers share, the [`Plan`] that data planes reconcile,
//! balancers and the health state machine.
//!
//! Nothing here does I/O or reads a clock: callers pass `now` and act on the results.

pub mod balance;
pub mod change;
pub mod cidr;
pub mod conflict;
pub mod duration;
pub mod error;
pub mod hash;
pub mod health;
pub mod io_error;
pub mod log_limit;
pub mod maglev;
pub mod member;
pub mod mutate;
pub mod name;
pub mod plan;
pub mod protocol;
pub mod replica;
pub mod service;
pub mod snapshot;
pub mod task;
pub mod text;
pub mod vip;

pub use balance::{BackendSet, Balance};
pub use change::Change;
pub use cidr::Cidr;
pub use conflict::Conflict;
pub use error::{ModelError, StateError};
pub use health::{Health, HealthTracker};
pub use member::MemberStatus;
pub use plan::{Frontend, FrontendKey, Listen, Plan, PlanChange};
pub use protocol::Protocol;
pub use replica::{Delta, Digest, Replica, ReplicaConfig, SyncItem};
pub use service::{ClientIp, HealthCheck, HealthKind, Mode, PortSpec, ProxyProtocol, ServiceSpec};
pub use snapshot::{ServiceEntry, Snapshot, TaskEntry};
pub use task::{Observed, TaskSource, TaskSpec, TaskState};
pub use vip::{VipPool, Vips};
