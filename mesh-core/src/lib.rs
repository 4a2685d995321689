//! Sans-IO core of mesh: the model, its validation, the local state, the immutable
//! [`Snapshot`] that data planes read, balancers and the health state machine.
//!
//! Nothing here does I/O or reads a clock: callers pass `now` and act on the results.

pub mod balance;
pub mod cidr;
pub mod duration;
pub mod error;
pub mod health;
pub mod name;
pub mod replica;
pub mod service;
pub mod snapshot;
pub mod task;
pub mod vip;

pub use balance::{BackendSet, Balance};
pub use cidr::Cidr;
pub use error::{ModelError, StateError};
pub use health::{Health, HealthTracker};
pub use replica::{Delta, Digest, Replica, ReplicaConfig, SyncItem};
pub use service::{HealthCheck, HealthKind, Mode, PortSpec, Protocol, ProxyProtocol, ServiceSpec};
pub use snapshot::{ServiceEntry, Snapshot, TaskEntry};
pub use task::{TaskSpec, TaskState};
pub use vip::{VipPool, Vips};
