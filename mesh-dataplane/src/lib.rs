//! The data-plane seam. Every plane (userspace proxy, VIP addresses, and the kernel
//! planes to come) implements [`Dataplane`]: it reconciles the [`Plan`] into its world
//! and reports what it could not do. The [`driver`] turns each snapshot into a plan,
//! diffs it against the previous one, hands the changes to every plane, fires their
//! deadlines and answers status, stats and preflight questions, so no plane runs
//! timers or watches snapshots of its own.
//!
//! [`Plan`]: mesh_core::Plan

pub mod addresses;
pub mod adoption;
pub mod departures;
pub mod driver;
pub mod plane;

pub use addresses::{AddressPlane, has_net_admin};
pub use adoption::Adoption;
pub use departures::{Departure, Departures};
pub use driver::{Driver, DriverHandle, PlaneClient, PlaneReport, PlaneState, PlaneStatus};
pub use plane::{ApplyReport, Capabilities, Dataplane, PlaneError, PlaneStats, Target};
