//! Forgetting the NAT of flows to a task that is gone, with the `conntrack` tool
//! (conntrack-tools). Without it a UDP flow keeps its DNAT to a removed task for as
//! long as datagrams keep coming, which is kube-proxy's oldest bug (its issues
//! #19029, #59368, #125467); and a drained task's TCP connections would outlive
//! `drain_timeout`. Deleting a flow's entry makes its next packet a new flow, which
//! the table sends to a task that is there.

use std::net::SocketAddr;

use mesh_core::Protocol;

use crate::command::{CommandError, Program};

#[derive(Debug, Clone)]
pub struct Conntrack(Program);

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack(Program::new("conntrack"))
    }
}

impl Conntrack {
    /// `conntrack` inside network namespace `ns`.
    pub fn in_netns(ns: &str) -> Self {
        Conntrack(Program::in_netns(ns, "conntrack"))
    }

    /// Whether the tool runs at all.
    pub async fn works(&self) -> Result<(), CommandError> {
        self.0.run(&["--version"], "").await.map(|_| ())
    }

    /// Deletes the entries of `protocol` flows answered by `task`; returns how many.
    pub async fn forget(&self, task: SocketAddr, protocol: Protocol) -> Result<u64, CommandError> {
        let ip = task.ip().to_string();
        let port = task.port().to_string();
        let family = if task.is_ipv4() { "ipv4" } else { "ipv6" };
        let proto = protocol.to_string();
        // Every flow the task answers: `--dst-nat` would miss flows DNATed to another
        // port of the same address (a task on the host's own IP). A flow that reached
        // the task without NAT loses nothing: its next packet makes a new entry to
        // the same place.
        let args = [
            "-D",
            "-f",
            family,
            "-p",
            &proto,
            "--reply-src",
            &ip,
            "--reply-port-src",
            &port,
        ];
        match self.0.run(&args, "").await {
            Ok(out) => Ok(deleted(&out)),
            // It exits 1 when nothing matched.
            Err(CommandError::Failed { stderr, .. }) if stderr.contains("0 flow entries") => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// The entries it printed, one line each.
fn deleted(stdout: &str) -> u64 {
    stdout.lines().filter(|l| !l.trim().is_empty()).count() as u64
}
