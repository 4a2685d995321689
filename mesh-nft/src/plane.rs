//! [`NftPlane`]: the reconciler. Each apply renders the table the plan wants and, when
//! the text differs from what it installed, replaces the table in one transaction, so
//! applying the same plan twice changes nothing. At start it adopts a table a previous
//! run left (kept for an upgrade, or left by a `kill -9`): the first apply replaces it
//! atomically, with no moment without rules.
//!
//! A task that leaves the table keeps its established flows in conntrack; what
//! happens to them follows the userspace plane: a UDP flow moves to another task on
//! its next datagram (its entry is deleted at once), a drained or removed task's TCP
//! connections go on until `drain_timeout` (then their entries are deleted, and the
//! next packet is refused), an unhealthy task's TCP connections go on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mesh_core::plan::{Features, PlaneKind};
use mesh_core::task::TaskState;
use mesh_core::{FrontendKey, Plan, PlanChange, Protocol};
use mesh_dataplane::{ApplyReport, Capabilities, Dataplane, PlaneError, PlaneStats, Target};
use tracing::{info, warn};

use crate::command::CommandError;
use crate::conntrack::Conntrack;
use crate::nft::Nft;
use crate::ruleset::{BackendKey, BackendOwner, Ruleset, TABLE};

pub struct NftPlane {
    nft: Nft,
    /// `None` when the tool is missing: flows of a gone task then keep their NAT
    /// until conntrack times them out, and status says so.
    conntrack: Option<Conntrack>,
    /// The text last installed; `None` before the first apply.
    installed: Option<String>,
    /// The backends of the installed table.
    backends: BTreeMap<BackendKey, BackendOwner>,
    /// Backends that left the table whose flows are forgotten at a deadline.
    forget_at: BTreeMap<BackendKey, Instant>,
    frontends: usize,
    /// Leave the table in the kernel at shutdown (`--keep-dataplane`): connections
    /// keep flowing while the agent is upgraded.
    keep: bool,
    /// Whether the kernel forwards IPv4: without it, connections arriving from
    /// outside cannot be sent to tasks on other hosts.
    forwarding: bool,
    /// The error of the last failed apply, reported until an apply succeeds.
    failed: Option<(Vec<FrontendKey>, String)>,
}

impl NftPlane {
    /// Checks that `nft` runs and the kernel takes a table from us, so `auto` can
    /// fall back with the reason.
    pub async fn open(
        nft: Nft,
        conntrack: Conntrack,
        keep: bool,
    ) -> Result<NftPlane, CommandError> {
        let adopted = nft.has_table(TABLE).await?;
        // The check (-c) runs the whole transaction in the kernel without keeping it:
        // it fails where nf_tables, NAT or numgen is missing.
        nft.run(&["-c", "-f", "-"], &Ruleset::default().render())
            .await?;
        if adopted {
            info!(table = %format!("inet {TABLE}"), "adopting the table a previous run left; the first apply replaces it");
        }
        let conntrack = match conntrack.works().await {
            Ok(()) => Some(conntrack),
            Err(e) => {
                warn!(error = %e, "without the conntrack tool, flows to a removed task keep their NAT until they idle out; install conntrack");
                None
            }
        };
        let forwarding =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1");
        if !forwarding {
            warn!(
                "net.ipv4.ip_forward is 0: connections from other machines cannot reach tasks on other hosts through nftables; set it to 1 (sysctl -w net.ipv4.ip_forward=1)"
            );
        }
        Ok(NftPlane {
            nft,
            conntrack,
            forwarding,
            installed: None,
            backends: BTreeMap::new(),
            forget_at: BTreeMap::new(),
            frontends: 0,
            keep,
            failed: None,
        })
    }

    /// Decides, for each backend that left the table, when its flows are forgotten;
    /// returns those to forget now. A backend back in the table keeps its flows.
    fn schedule(
        &mut self,
        plan: &Plan,
        next: &BTreeMap<BackendKey, BackendOwner>,
        now: Instant,
    ) -> Vec<BackendKey> {
        self.forget_at.retain(|k, _| !next.contains_key(k));
        let mut now_list = Vec::new();
        for (key, owner) in &self.backends {
            if next.contains_key(key) {
                continue;
            }
            let tasks = plan.services.get(&owner.service);
            let state = tasks.and_then(|t| t.tasks.get(&owner.task)).copied();
            let drain = owner.drain_timeout;
            match (key.1, state) {
                // Drained: its flows go on for drain_timeout, whatever the protocol.
                (_, Some(TaskState::Draining)) => {
                    self.forget_at.insert(*key, now + drain);
                }
                // Unhealthy or withdrawn, or removed: a UDP flow moves at once.
                (Protocol::Udp, _) => now_list.push(*key),
                // A removed task's connections drain.
                (Protocol::Tcp, None) => {
                    self.forget_at.insert(*key, now + drain);
                }
                // An unhealthy task's connections go on, as in userspace.
                (Protocol::Tcp, Some(TaskState::Active)) => {}
            }
        }
        now_list
    }

    async fn forget(&self, backends: Vec<BackendKey>) {
        let Some(conntrack) = &self.conntrack else {
            return;
        };
        for (addr, protocol) in backends {
            match conntrack.forget(addr, protocol).await {
                Ok(n) => {
                    info!(task = %addr, %protocol, flows = n, "flows to a task that left the table forgotten")
                }
                Err(e) => {
                    warn!(task = %addr, %protocol, error = %e, "cannot forget the flows to a task that left the table")
                }
            }
        }
    }

    fn report(&self) -> ApplyReport {
        let Some((keys, error)) = &self.failed else {
            return ApplyReport::default();
        };
        ApplyReport {
            errors: keys
                .iter()
                .map(|k| PlaneError {
                    target: Target::Frontend(*k),
                    service: None,
                    error: error.clone(),
                })
                .collect(),
        }
    }
}

#[async_trait]
impl Dataplane for NftPlane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            serves: Some(PlaneKind::Nftables),
            features: Features::NONE,
            addresses: false,
        }
    }

    fn detail(&self) -> String {
        let mut d = format!(
            "table inet {TABLE}, {} frontends with tasks",
            self.frontends
        );
        if self.conntrack.is_none() {
            d.push_str("; conntrack tool missing: flows of removed tasks are not moved");
        }
        if !self.forwarding {
            d.push_str("; net.ipv4.ip_forward is 0: outside clients reach local tasks only");
        }
        d
    }

    fn preflight(&self, _frontends: &[FrontendKey]) -> Vec<PlaneError> {
        // DNAT binds no socket: nothing another process holds can stop it.
        Vec::new()
    }

    async fn apply(&mut self, plan: &Plan, _changes: &[PlanChange], now: Instant) -> ApplyReport {
        let rules = Ruleset::from_plan(plan);
        let text = rules.render();
        if self.installed.as_deref() == Some(text.as_str()) && self.failed.is_none() {
            return self.report();
        }
        let started = Instant::now();
        match self.nft.apply(&text).await {
            Ok(()) => {
                info!(
                    frontends = rules.frontends(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "nftables table replaced"
                );
                let backends = rules.backends();
                let gone = self.schedule(plan, &backends, now);
                self.installed = Some(text);
                self.backends = backends;
                self.frontends = rules.frontends();
                self.failed = None;
                self.forget(gone).await;
            }
            Err(e) => {
                warn!(error = %e, "nftables apply failed; the previous table stays");
                let keys = plan
                    .frontends_of(PlaneKind::Nftables)
                    .map(|(k, _)| *k)
                    .collect();
                self.failed = Some((keys, e.to_string()));
            }
        }
        self.report()
    }

    fn stats(&self) -> PlaneStats {
        // Connections through NAT live in conntrack, not here.
        PlaneStats::default()
    }

    fn next_deadline(&self) -> Option<Instant> {
        // A failed apply is retried at the next plan change.
        self.forget_at.values().min().copied()
    }

    async fn on_deadline(&mut self, now: Instant) -> ApplyReport {
        let due: Vec<BackendKey> = self
            .forget_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in &due {
            self.forget_at.remove(k);
        }
        self.forget(due).await;
        self.report()
    }

    async fn shutdown(&mut self, _grace: Duration) {
        if self.keep {
            info!(table = %format!("inet {TABLE}"), "keeping the nftables table (--keep-dataplane)");
            return;
        }
        match self.nft.delete_table(TABLE).await {
            Ok(()) => info!(table = %format!("inet {TABLE}"), "nftables table removed"),
            Err(e) => warn!(error = %e, "cannot remove the nftables table"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::Health;
    use mesh_core::plan::Host;
    use mesh_core::replica::{Replica, ReplicaConfig};
    use mesh_core::service::{PortSpec, ServiceSpec};
    use mesh_core::task::{TaskSource, TaskSpec};
    use mesh_core::vip::VipPool;

    /// A network namespace of our own, removed when dropped (also after a panic).
    struct Ns(String);

    impl Ns {
        fn new() -> Option<Ns> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIPPED (needs root): the nftables plane against a real kernel");
                return None;
            }
            let name = format!("mesh-nft-unit-{}", std::process::id());
            // A namespace a crashed run left behind goes first.
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name}");
            Some(Ns(name))
        }
    }

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn plan(healthy: &[&str]) -> Plan {
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        r.create_service(
            ServiceSpec::new(
                "web",
                vec![PortSpec::tcp(Some(8080), 80), PortSpec::udp(Some(5353), 53)],
            ),
            0,
        )
        .unwrap();
        for (id, ip) in [
            ("web.1", "10.0.0.1"),
            ("web.2", "10.0.0.2"),
            ("web.3", "fd00::3"),
        ] {
            r.add_task(
                TaskSpec::new("web", id, ip.parse().unwrap()),
                TaskSource::Api,
                0,
            )
            .unwrap();
            let h = if healthy.contains(&id) {
                Health::Healthy
            } else {
                Health::Unhealthy
            };
            r.set_health("web", id, h, 0);
        }
        let host = Host {
            plane: PlaneKind::Nftables,
            features: Features::NONE,
            serve_vips: true,
        };
        Plan::from_snapshot(&r.snapshot(), &host)
    }

    /// What happens to the flows of each kind of backend that leaves the table.
    #[test]
    fn flows_of_a_gone_task_move_drain_or_stay_as_in_userspace() {
        use std::sync::Arc;

        use mesh_core::plan::ServiceTasks;

        let owner = |task: &str| BackendOwner {
            service: "s".into(),
            task: task.into(),
            drain_timeout: Duration::from_secs(30),
        };
        let addr = |p: u16| -> std::net::SocketAddr { format!("10.0.0.1:{p}").parse().unwrap() };
        let mut plane = NftPlane {
            nft: Nft::default(),
            conntrack: None,
            installed: None,
            backends: BTreeMap::from([
                ((addr(1), Protocol::Udp), owner("removed-udp")),
                ((addr(2), Protocol::Udp), owner("unhealthy-udp")),
                ((addr(3), Protocol::Tcp), owner("removed-tcp")),
                ((addr(4), Protocol::Tcp), owner("unhealthy-tcp")),
                ((addr(5), Protocol::Tcp), owner("drained-tcp")),
                ((addr(6), Protocol::Tcp), owner("still-here")),
            ]),
            forget_at: BTreeMap::new(),
            frontends: 0,
            keep: false,
            forwarding: true,
            failed: None,
        };
        let mut plan = Plan::default();
        plan.services.insert(
            "s".into(),
            Arc::new(ServiceTasks {
                drain_timeout: Duration::from_secs(30),
                tasks: BTreeMap::from([
                    ("unhealthy-udp".to_string(), TaskState::Active),
                    ("unhealthy-tcp".to_string(), TaskState::Active),
                    ("drained-tcp".to_string(), TaskState::Draining),
                    ("still-here".to_string(), TaskState::Active),
                ]),
            }),
        );
        let next = BTreeMap::from([((addr(6), Protocol::Tcp), owner("still-here"))]);
        let now = Instant::now();
        let at_once = plane.schedule(&plan, &next, now);
        assert_eq!(
            at_once,
            vec![(addr(1), Protocol::Udp), (addr(2), Protocol::Udp)],
            "UDP flows move at once"
        );
        let later = now + Duration::from_secs(30);
        assert_eq!(
            plane.forget_at,
            BTreeMap::from([
                ((addr(3), Protocol::Tcp), later),
                ((addr(5), Protocol::Tcp), later),
            ]),
            "removed and drained TCP connections go on for drain_timeout; unhealthy ones stay"
        );
        assert_eq!(plane.next_deadline(), Some(later));
        // The drained task comes back before its deadline: its flows stay.
        plane.backends = next.clone();
        let mut back = next.clone();
        back.insert((addr(5), Protocol::Tcp), owner("drained-tcp"));
        plane.schedule(&plan, &back, now);
        assert!(!plane.forget_at.contains_key(&(addr(5), Protocol::Tcp)));
    }

    #[tokio::test]
    async fn the_kernel_takes_the_table_an_unchanged_plan_changes_nothing_and_shutdown_removes_it()
    {
        let Some(ns) = Ns::new() else { return };
        let nft = Nft::in_netns(&ns.0);
        let mut plane = NftPlane::open(nft.clone(), Conntrack::in_netns(&ns.0), false)
            .await
            .expect("open");
        let all = plan(&["web.1", "web.2", "web.3"]);
        let report = plane.apply(&all, &[], Instant::now()).await;
        assert!(report.errors.is_empty(), "{report:?}");
        let listed = nft
            .run(&["list", "table", "inet", TABLE], "")
            .await
            .unwrap();
        assert!(listed.contains("dnat ip to 10.0.0.1:80"), "{listed}");
        assert!(listed.contains("dnat ip6 to [fd00::3]:80"), "{listed}");
        assert!(listed.contains("numgen inc mod 2"), "{listed}");

        // The same plan again: no transaction at all (the table's handle stays).
        let handles = nft
            .run(&["-a", "list", "table", "inet", TABLE], "")
            .await
            .unwrap();
        plane.apply(&all, &[], Instant::now()).await;
        assert_eq!(
            handles,
            nft.run(&["-a", "list", "table", "inet", TABLE], "")
                .await
                .unwrap()
        );

        // A task turns unhealthy: it leaves the kernel's table.
        let fewer = plan(&["web.1", "web.3"]);
        let report = plane.apply(&fewer, &[], Instant::now()).await;
        assert!(report.errors.is_empty(), "{report:?}");
        let listed = nft
            .run(&["list", "table", "inet", TABLE], "")
            .await
            .unwrap();
        assert!(!listed.contains("10.0.0.2"), "{listed}");
        assert!(listed.contains("numgen inc mod 1"), "{listed}");

        // A restarted agent adopts the table and replaces it.
        let mut again = NftPlane::open(nft.clone(), Conntrack::in_netns(&ns.0), false)
            .await
            .expect("reopen");
        let report = again.apply(&all, &[], Instant::now()).await;
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(
            nft.run(&["list", "table", "inet", TABLE], "")
                .await
                .unwrap()
                .contains("10.0.0.2")
        );

        again.shutdown(Duration::ZERO).await;
        assert!(
            !nft.has_table(TABLE).await.unwrap(),
            "shutdown removes the table"
        );
    }
}
