//! The Docker task source: this host's containers become tasks of the services their
//! labels (or their Compose project) name, and follow the engine's events.
//!
//! - [`container`]: what mesh reads of a container, in plain types.
//! - [`labels`]: the `mesh.*` labels and how they are checked.
//! - [`observe`]: the rules, pure: containers in, tasks and wanted services out.
//! - [`engine`]: the Docker API (bollard), turned into [`container::Container`]s.
//! - [`source`]: the loop that lists, follows events, reconnects with backoff, and
//!   publishes each new [`observe::Observation`] and its [`SourceStatus`].

pub mod config;
pub mod container;
pub mod engine;
pub mod fuzzing;
pub mod labels;
pub mod observe;
pub mod source;
pub mod view;

pub use config::DockerConfig;
pub use container::Container;
/// The connection to the engine, as `mesh status` shows it.
pub use mesh_api::EngineStatus as SourceStatus;
pub use observe::{AddressMode, Observation, Settings, Wanted};
pub use source::{DockerSource, Target};
