//! The typed edge of mesh: what the HTTP API returns and accepts. The agent serves
//! these types, the CLI sends and decodes them, and the dashboard too, so one
//! definition keeps all three in step.

mod docker;
mod error;
mod event;
mod node;
mod patch;
mod service;
mod status;
mod task;

pub use docker::{DockerView, EngineStatus};
pub use error::ErrorBody;
pub use event::{EventKind, EventLevel, EventView};
pub use node::NodeView;
pub use patch::merge_patch;
pub use service::ServiceView;
pub use status::{ClusterView, PlaneView, StatusView};
pub use task::{NewTask, TaskView};
