//! The eBPF data plane of mesh. VIPs are balanced by socket programs in a cgroup, in
//! the manner of Cilium's kube-proxy replacement: `connect()` and `sendto()` to
//! VIP:port are rewritten to a task's address before anything is routed, so there is
//! no NAT, the task sees the client's own address, and nothing is in the path after
//! the connect. Replies and `getpeername()` show the VIP.
//!
//! Published ports get a fast path at the TC hook (tcx) on the interfaces
//! `ebpf.interfaces` names: a flow whose Maglev pick is a task on this host is taken
//! to it in the kernel, keeping the client's address; one whose pick is another
//! host's task is sent to it from this host's address, past the stack.
//!
//! - `bpf/sock_lb.bpf.c` and `bpf/port_lb.bpf.c`: the programs, compiled by
//!   `build.rs` with clang when the `bpf` feature is on;
//! - [`layout`] and [`port_layout`]: the maps' byte layouts;
//! - [`table`]: the pure reconciler (what the maps hold, what to write);
//! - [`mounts`]: bpffs and the cgroup v2 hierarchy;
//! - [`programs`] and [`ports`]: loading, attaching and pinning with aya;
//! - [`routes`]: the way to another host's task (rtnetlink);
//! - [`sockets`]: listing and aborting the sockets connected to a task (sock_diag);
//! - [`endings`]: the thread that ends the sockets balanced to tasks that left;
//! - [`plane`]: the [`mesh_dataplane::Dataplane`] that ties them together.

pub mod config;
pub mod endings;
pub mod layout;
pub mod mounts;
pub mod plane;
pub mod port_layout;
pub mod ports;
pub mod programs;
pub mod routes;
pub mod sockets;
pub mod table;

pub use config::EbpfConfig;
pub use plane::EbpfPlane;
