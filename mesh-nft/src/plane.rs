//! [`NftPlane`]: the reconciler. The first apply replaces the whole table in one
//! transaction; after that each apply sends one transaction with the commands for the
//! frontends the plan diff names, so it costs what changed, and applying the same plan
//! twice sends nothing. A failed apply leaves the previous table in place and the next
//! one replaces the whole table again. At start it adopts a table a previous run left
//! (kept for an upgrade, or left by a `kill -9`): the first apply replaces it
//! atomically, with no moment without rules.
//!
//! A task that leaves the table keeps its established flows in conntrack; what
//! happens to them follows the userspace plane: a UDP flow moves to another task on
//! its next datagram (its entry is deleted at once), a drained or removed task's TCP
//! connections go on until `drain_timeout` (then their entries are deleted, and the
//! next packet is refused), an unhealthy task's TCP connections go on.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use mesh_core::plan::{Features, PlaneKind};
use mesh_core::{FrontendKey, Plan, PlanChange};
use mesh_dataplane::{
    Adoption, ApplyReport, Capabilities, Dataplane, Departure, Departures, PlaneError, PlaneStats,
    Target,
};
use tracing::{info, warn};

use crate::command::CommandError;
use crate::conntrack::Conntrack;
use crate::edit::script;
use crate::forward_accept::ForwardAccept;
use crate::netlink::{Netlink, NetlinkError};
use crate::nft::Nft;
use crate::ruleset::{BackendKey, BackendOwner, Ruleset, TABLE};

pub struct NftPlane {
    nft: Nft,
    /// Writes each change; `None` where the socket cannot be had (then `nft` does).
    netlink: Option<Netlink>,
    /// Changes written so far, over netlink and by `nft`.
    written: (u64, u64),
    /// `None` when the tool is missing: flows of a gone task then keep their NAT
    /// until conntrack times them out, and status says so.
    conntrack: Option<Conntrack>,
    /// What the kernel holds; `None` before the first apply.
    installed: Option<Ruleset>,
    /// The last apply failed: the kernel may differ from `installed`, so the next
    /// apply replaces the whole table.
    stale: bool,
    /// Backends that left the table whose flows are forgotten at a deadline.
    forget_at: Departures<BackendKey>,
    frontends: usize,
    /// Leave the table in the kernel at shutdown (`--keep-dataplane`): connections
    /// keep flowing while the agent is upgraded.
    keep: bool,
    /// Whether the kernel forwards IPv4: without it, connections arriving from
    /// outside cannot be sent to tasks on other hosts.
    forwarding: bool,
    /// The error of the last failed apply, reported until an apply succeeds.
    failed: Option<(Vec<FrontendKey>, String)>,
    /// Our accept in Docker's forward chain, checked now and then: dockerd may start
    /// (and make its chain) after the agent.
    forward_accept: ForwardAccept,
    forward_check_at: Instant,
    /// A previous run left a table: it is replaced at the first apply even when
    /// nothing is to be served, so its flows keep their NAT.
    adopted: bool,
    /// It is served unchanged while the restored tasks get their first probe.
    adoption: Adoption,
}

/// How often Docker's chain is checked for our accept.
const FORWARD_CHECK: Duration = Duration::from_secs(10);

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
        let netlink = match Netlink::open(nft.program().netns()) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!(error = %e, "changes to the nftables table go through the nft tool, which is slower");
                None
            }
        };
        let mut forward_accept = ForwardAccept::beside(nft.program());
        forward_accept.ensure().await;
        Ok(NftPlane {
            forward_accept,
            forward_check_at: Instant::now() + FORWARD_CHECK,
            nft,
            netlink,
            written: (0, 0),
            conntrack,
            forwarding,
            installed: None,
            stale: false,
            forget_at: Departures::default(),
            frontends: 0,
            keep,
            failed: None,
            adopted,
            adoption: Adoption::new(adopted, Instant::now()),
        })
    }

    /// Sends changes through the `nft` tool instead of netlink: for comparing the
    /// two writers (bench and tests).
    pub fn write_changes_with_nft(&mut self) {
        self.netlink = None;
    }

    /// Decides, for each backend that left the table, when its flows are forgotten
    /// ([`Departures`]); returns those to forget now.
    fn schedule(
        &mut self,
        plan: &Plan,
        gone: Vec<(BackendKey, BackendOwner)>,
        now: Instant,
    ) -> Vec<BackendKey> {
        let gone = gone.into_iter().map(|(key, owner)| Departure {
            key,
            protocol: key.1,
            service: owner.service,
            task: owner.task,
            drain_timeout: owner.drain_timeout,
        });
        self.forget_at.schedule(plan, gone, now)
    }

    /// Sends the whole table; returns the backends that left it.
    async fn replace(&mut self, plan: &Plan) -> Result<Vec<(BackendKey, BackendOwner)>, String> {
        let rules = Ruleset::from_plan(plan);
        let started = Instant::now();
        self.nft
            .apply(&rules.render())
            .await
            .map_err(|e| e.to_string())?;
        info!(
            frontends = rules.frontends(),
            took_ms = started.elapsed().as_millis() as u64,
            "nftables table replaced"
        );
        let next = rules.backends();
        let gone = self
            .installed
            .as_ref()
            .map(|old| {
                old.backends()
                    .into_iter()
                    .filter(|(k, _)| !next.contains_key(k))
                    .collect()
            })
            .unwrap_or_default();
        self.forget_at.retain(|k| !next.contains_key(k));
        self.installed = Some(rules);
        // A fresh socket with each whole table: one held across the deletion of a
        // named namespace would write to the old one while nft writes to the new.
        if self.netlink.is_some() {
            self.netlink = Netlink::open(self.nft.program().netns()).ok();
        }
        Ok(gone)
    }

    /// Sends the commands for the frontends in `changes`; returns the backends that
    /// left the table. `None`: there is no table to change yet.
    async fn change(
        &mut self,
        plan: &Plan,
        changes: &[PlanChange],
    ) -> Option<Result<Vec<(BackendKey, BackendOwner)>, String>> {
        if self.stale {
            return None;
        }
        let rules = self.installed.as_mut()?;
        let keys: Vec<FrontendKey> = changes
            .iter()
            .filter_map(|c| match c {
                PlanChange::Frontend(k, _) => Some(*k),
                _ => None,
            })
            .collect();
        let update = rules.update(plan, &keys);
        if update.edits.is_empty() {
            return Some(Ok(Vec::new()));
        }
        let started = Instant::now();
        // A new task map's declaration is nft's own encoding: that change goes
        // through nft (it happens once per 16 frontends).
        let mut via = None;
        // Shared with the blocking thread, and kept here for nft if needed.
        let edits = std::sync::Arc::new(update.edits);
        if let (Some(netlink), false) = (&self.netlink, update.new_maps) {
            let (netlink, sending) = (netlink.clone(), edits.clone());
            let sent = tokio::task::spawn_blocking(move || netlink.apply(&sending))
                .await
                .unwrap_or_else(|e| Err(NetlinkError::Socket(std::io::Error::other(e))));
            match sent {
                Ok(()) => via = Some("netlink"),
                // The kernel read the batch and refused it: nft would be refused too.
                Err(e @ NetlinkError::Refused { .. }) => return Some(Err(e.to_string())),
                // Nothing reached the kernel (too big, no socket buffer): nft writes it.
                Err(e) => warn!(error = %e, "a change could not go over netlink; nft writes it"),
            }
        }
        let via = match via {
            Some(via) => via,
            None => match self.nft.apply(&script(&edits)).await {
                Ok(()) => "nft",
                Err(e) => return Some(Err(e.to_string())),
            },
        };
        match via {
            "netlink" => self.written.0 += 1,
            _ => self.written.1 += 1,
        }
        info!(
            frontends = keys.len(),
            edits = edits.len(),
            via,
            took_ms = started.elapsed().as_millis() as u64,
            "nftables table updated"
        );
        for b in &update.added {
            self.forget_at.cancel(b);
        }
        Some(Ok(update.gone))
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
        let mut d = if self.installed.is_none() && !self.adopted {
            format!("no table inet {TABLE} yet: no frontend is served by nftables")
        } else {
            format!(
                "table inet {TABLE}, {} frontends with tasks",
                self.frontends
            )
        };
        if self.written != (0, 0) {
            d.push_str(&format!(
                "; changes written: {} over netlink, {} by nft",
                self.written.0, self.written.1
            ));
        }
        if self.conntrack.is_none() {
            d.push_str("; conntrack tool missing: flows of removed tasks are not moved");
        }
        if !self.forwarding {
            d.push_str("; net.ipv4.ip_forward is 0: outside clients reach local tasks only");
        }
        if self.forward_accept.active() {
            d.push_str("; its connections accepted in Docker's DOCKER-USER chain");
        }
        d
    }

    fn preflight(&self, _frontends: &[FrontendKey]) -> Vec<PlaneError> {
        // DNAT binds no socket: nothing another process holds can stop it.
        Vec::new()
    }

    async fn apply(&mut self, plan: &Plan, changes: &[PlanChange], now: Instant) -> ApplyReport {
        if self.adoption.hold(plan, now) {
            return self.report();
        }
        // Until a frontend comes to this plane there is no table: a NAT chain, even an
        // empty one, turns conntrack on for every packet of the namespace, which costs
        // a host whose VIPs the eBPF plane serves a quarter of its connection rate.
        // Once made, the table stays until shutdown, so draining flows keep their NAT.
        if self.installed.is_none() && !self.adopted && plan.served_by(PlaneKind::Nftables) == 0 {
            return self.report();
        }
        let result = match self.change(plan, changes).await {
            Some(r) => r,
            None => self.replace(plan).await,
        };
        match result {
            Ok(gone) => {
                self.stale = false;
                self.failed = None;
                self.frontends = self.installed.as_ref().map_or(0, Ruleset::frontends);
                let now_list = self.schedule(plan, gone, now);
                self.forget(now_list).await;
            }
            Err(e) => {
                warn!(error = %e, "nftables apply failed; the previous table stays, the next apply replaces it whole");
                self.stale = true;
                let keys = plan
                    .frontends_of(PlaneKind::Nftables)
                    .map(|(k, _)| *k)
                    .collect();
                self.failed = Some((keys, e));
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
        let forget = self.forget_at.next_deadline();
        [
            forget,
            self.adoption.deadline(),
            Some(self.forward_check_at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    async fn on_deadline(&mut self, now: Instant) -> ApplyReport {
        if let Some(plan) = self.adoption.release(now) {
            // Everything is reconciled: the first apply after adopting replaces the
            // whole table.
            self.apply(&plan, &[], now).await;
        }
        let due = self.forget_at.take_due(now);
        self.forget(due).await;
        if self.forward_check_at <= now {
            self.forward_accept.ensure().await;
            self.forward_check_at = now + FORWARD_CHECK;
        }
        self.report()
    }

    async fn shutdown(&mut self, _grace: Duration) {
        if self.keep {
            info!(table = %format!("inet {TABLE}"), "keeping the nftables table (--keep-dataplane)");
            return;
        }
        if self.installed.is_none() && !self.adopted {
            self.forward_accept.remove().await;
            return;
        }
        match self.nft.delete_table(TABLE).await {
            Ok(()) => info!(table = %format!("inet {TABLE}"), "nftables table removed"),
            Err(e) => warn!(error = %e, "cannot remove the nftables table"),
        }
        self.forward_accept.remove().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use mesh_core::plan::Host;
    use mesh_core::replica::{Replica, ReplicaConfig};
    use mesh_core::service::{PortSpec, ServiceSpec};
    use mesh_core::task::TaskState;
    use mesh_core::task::{TaskSource, TaskSpec};
    use mesh_core::vip::VipPool;
    use mesh_core::{Health, Protocol};

    /// A network namespace of our own, removed when dropped (also after a panic).
    struct Ns(String);

    impl Ns {
        fn new() -> Option<Ns> {
            Self::new_named("unit")
        }

        fn new_named(what: &str) -> Option<Ns> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("SKIPPED (needs root): the nftables plane against a real kernel");
                return None;
            }
            let name = format!("mesh-nft-{what}-{}", std::process::id());
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
        let r = crate::ruleset::tests::replica_with(healthy);
        let host = Host::on("h1", PlaneKind::Nftables, Features::NONE, true);
        Plan::from_snapshot(&r.snapshot(), &host)
    }

    /// The plane hands each backend that left the table to [`Departures`] (whose own
    /// test covers every kind) with its owner's service, task and drain_timeout.
    #[test]
    fn a_backend_that_left_is_scheduled_with_its_owners_drain_timeout() {
        let owner = |task: &str| BackendOwner {
            service: "s".into(),
            task: task.into(),
            drain_timeout: Duration::from_secs(7),
        };
        let addr = |p: u16| -> std::net::SocketAddr { format!("10.0.0.1:{p}").parse().unwrap() };
        let mut plane = NftPlane {
            nft: Nft::default(),
            netlink: None,
            written: (0, 0),
            conntrack: None,
            installed: None,
            stale: false,
            forget_at: Departures::default(),
            frontends: 0,
            keep: false,
            forwarding: true,
            failed: None,
            forward_accept: ForwardAccept::beside(Nft::default().program()),
            forward_check_at: Instant::now() + Duration::from_secs(3600),
            adopted: false,
            adoption: Adoption::default(),
        };
        // Both tasks are gone from the plan: removed.
        let gone = vec![
            ((addr(1), Protocol::Udp), owner("removed-udp")),
            ((addr(3), Protocol::Tcp), owner("removed-tcp")),
        ];
        let now = Instant::now();
        let at_once = plane.schedule(&Plan::default(), gone, now);
        assert_eq!(at_once, vec![(addr(1), Protocol::Udp)]);
        let later = now + Duration::from_secs(7);
        assert_eq!(plane.next_deadline(), Some(later));
        assert_eq!(
            plane.forget_at.take_due(later),
            vec![(addr(3), Protocol::Tcp)]
        );
    }

    #[tokio::test]
    async fn no_table_is_made_until_a_frontend_comes_and_then_it_stays() {
        let Some(ns) = Ns::new() else { return };
        let nft = Nft::in_netns(&ns.0);
        let mut plane = NftPlane::open(nft.clone(), Conntrack::in_netns(&ns.0), false)
            .await
            .expect("open");
        let report = plane.apply(&Plan::default(), &[], Instant::now()).await;
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(
            !nft.has_table(TABLE).await.unwrap(),
            "no frontend, no table (and no conntrack)"
        );
        assert!(plane.detail().contains("no table"), "{}", plane.detail());
        let all = plan(&["web.1"]);
        let changes = Plan::diff(&Plan::default(), &all);
        plane.apply(&all, &changes, Instant::now()).await;
        assert!(
            nft.has_table(TABLE).await.unwrap(),
            "a frontend makes the table"
        );
        let changes = Plan::diff(&all, &Plan::default());
        plane
            .apply(&Plan::default(), &changes, Instant::now())
            .await;
        assert!(
            nft.has_table(TABLE).await.unwrap(),
            "the table stays once made, so draining flows keep their NAT"
        );
        plane.shutdown(Duration::ZERO).await;
        assert!(!nft.has_table(TABLE).await.unwrap());
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
        assert!(listed.contains("10.0.0.1 . 80"), "{listed}");
        assert!(listed.contains("fd00::3 . 80"), "{listed}");
        assert!(
            listed.contains("meta l4proto tcp ct mark set ct mark | 0x00100000 meta mark set meta mark | 0x00100000 dnat ip6 to numgen inc mod 1 ")
                && listed.contains("map @tasks_tcp6_0"),
            "{listed}"
        );
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
        let report = plane
            .apply(&fewer, &Plan::diff(&all, &fewer), Instant::now())
            .await;
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
        let started = Instant::now();
        let report = again.apply(&all, &[], started).await;
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(
            !nft.run(&["list", "table", "inet", TABLE], "")
                .await
                .unwrap()
                .contains("10.0.0.2"),
            "the adopted table is served unchanged while the restored tasks are probed"
        );
        let release = again.next_deadline().expect("the hold's end");
        assert!(release <= started + mesh_dataplane::adoption::HOLD);
        again.on_deadline(release).await;
        assert!(
            nft.run(&["list", "table", "inet", TABLE], "")
                .await
                .unwrap()
                .contains("10.0.0.2"),
            "then the latest plan replaces it"
        );

        again.shutdown(Duration::ZERO).await;
        assert!(
            !nft.has_table(TABLE).await.unwrap(),
            "shutdown removes the table"
        );
    }

    /// An edit the kernel refuses fails the batch with an error that names the edit,
    /// and nothing of the batch is kept.
    #[tokio::test]
    async fn a_refused_netlink_batch_names_its_edit_and_changes_nothing() {
        let Some(ns) = Ns::new_named("refused") else {
            return;
        };
        let nft = Nft::in_netns(&ns.0);
        let mut plane = NftPlane::open(nft.clone(), Conntrack::in_netns(&ns.0), false)
            .await
            .expect("open");
        let all = plan(&["web.1", "web.2", "web.3"]);
        assert!(
            plane
                .apply(&all, &[], Instant::now())
                .await
                .errors
                .is_empty()
        );
        let before = nft
            .run(&["list", "table", "inet", TABLE], "")
            .await
            .unwrap();
        let netlink = plane.netlink.clone().expect("a netlink socket");
        let err = netlink
            .apply(&[
                crate::edit::Edit::AddChain("svc_extra".into()),
                crate::edit::Edit::DeleteChain("svc_not_there".into()),
            ])
            .expect_err("no such chain");
        let text = err.to_string();
        assert!(
            text.contains("delete chain inet mesh svc_not_there") && text.contains("No such file"),
            "{text}"
        );
        assert_eq!(
            before,
            nft.run(&["list", "table", "inet", TABLE], "")
                .await
                .unwrap(),
            "the chain of the refused batch was not kept"
        );
    }

    /// A frontend with more tasks than fit one netlink message: its elements go in
    /// several messages of one batch, and the table ends as a full replace does.
    #[tokio::test]
    async fn a_large_frontend_changes_over_netlink_in_several_messages() {
        let (Some(a), Some(b)) = (Ns::new_named("large-inc"), Ns::new_named("large-full")) else {
            return;
        };
        let (nft_a, nft_b) = (Nft::in_netns(&a.0), Nft::in_netns(&b.0));
        let mut plane = NftPlane::open(nft_a.clone(), Conntrack::in_netns(&a.0), false)
            .await
            .expect("open");
        let host = Host::on("h1", PlaneKind::Nftables, Features::NONE, true);
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        r.create_service(
            ServiceSpec::new("big", vec![PortSpec::tcp(Some(8080), 80)]),
            0,
        )
        .unwrap();
        for t in 0..2500u32 {
            let id = format!("big.{t}");
            let ip = std::net::Ipv4Addr::from(0x0a01_0000 + t);
            r.add_task(TaskSpec::new("big", &id, ip.into()), TaskSource::Api, 0)
                .unwrap();
            r.set_health("big", &id, Health::Healthy, 0);
        }
        let before = Plan::from_snapshot(&r.snapshot(), &host);
        assert!(
            plane
                .apply(&before, &[], Instant::now())
                .await
                .errors
                .is_empty()
        );
        // The first task goes: every element after it moves down one key.
        r.set_health("big", "big.0", Health::Unhealthy, 1);
        let after = Plan::from_snapshot(&r.snapshot(), &host);
        let report = plane
            .apply(&after, &Plan::diff(&before, &after), Instant::now())
            .await;
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(plane.written, (1, 0), "written over netlink");
        nft_b
            .apply(&Ruleset::from_plan(&after).render())
            .await
            .expect("full replace");
        assert_eq!(kernel_view(&nft_a).await, kernel_view(&nft_b).await);
    }

    /// The kernel's view of a table, for comparing two: every chain's rules and every
    /// map's elements, without handles, elements sorted.
    async fn kernel_view(nft: &Nft) -> String {
        let json = nft
            .run(&["-j", "list", "table", "inet", TABLE], "")
            .await
            .expect("list the table");
        let v: serde_json::Value = serde_json::from_str(&json).expect("nft -j");
        fn strip(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.remove("handle");
                    for x in m.values_mut() {
                        strip(x);
                    }
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        // Which slot of which task map a frontend uses depends on the order frontends
        // came in, so each counter's lookup is compared by the tasks it reaches.
        let items: Vec<serde_json::Value> = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                let mut i = i.clone();
                strip(&mut i);
                i
            })
            .collect();
        let mut task_maps: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
        for m in items.iter().filter_map(|i| i.get("map")) {
            let name = m["name"].as_str().unwrap();
            if name.starts_with("tasks_") {
                let elems = task_maps.entry(format!("@{name}")).or_default();
                for e in m["elem"].as_array().into_iter().flatten() {
                    elems.insert(e[0].as_u64().expect("a counter key"), e[1].to_string());
                }
            }
        }
        fn resolve(v: &mut serde_json::Value, maps: &BTreeMap<String, BTreeMap<u64, String>>) {
            if let Some(m) = v.get("map")
                && let (Some(n), Some(name)) = (m["key"].get("numgen"), m["data"].as_str())
            {
                let (modulus, offset) = (
                    n["mod"].as_u64().unwrap(),
                    n["offset"].as_u64().unwrap_or(0),
                );
                let tasks: Vec<String> = (offset..offset + modulus)
                    .map(|k| {
                        maps.get(name)
                            .and_then(|e| e.get(&k))
                            .cloned()
                            .unwrap_or_else(|| "MISSING".into())
                    })
                    .collect();
                *v = serde_json::json!({ "round_robin": tasks });
                return;
            }
            match v {
                serde_json::Value::Object(m) => m.values_mut().for_each(|x| resolve(x, maps)),
                serde_json::Value::Array(a) => a.iter_mut().for_each(|x| resolve(x, maps)),
                _ => {}
            }
        }
        let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut maps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for mut item in items {
            if let Some(c) = item.get("chain") {
                chains
                    .entry(c["name"].as_str().unwrap().to_string())
                    .or_default();
            } else if let Some(r) = item.get_mut("rule") {
                resolve(&mut r["expr"], &task_maps);
                chains
                    .entry(r["chain"].as_str().unwrap().to_string())
                    .or_default()
                    .push(r["expr"].to_string());
            } else if let Some(m) = item.get("map") {
                let name = m["name"].as_str().unwrap();
                if name.starts_with("tasks_") {
                    continue;
                }
                let mut elems: Vec<String> = m["elem"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e.to_string())
                    .collect();
                elems.sort();
                maps.insert(name.to_string(), elems);
            }
        }
        format!("{chains:#?}\n{maps:#?}")
    }

    /// Changes applied one by one through netlink end where a whole table written
    /// by `nft` from the final plan ends, in the real kernel, over a random run of
    /// service and task changes: the netlink messages mean what nft's text means.
    #[tokio::test]
    async fn netlink_changes_end_where_a_full_replace_does() {
        incremental_changes_end_where_a_full_replace_does("netlink").await;
    }

    /// The same run with every change written by `nft`.
    #[tokio::test]
    async fn nft_changes_end_where_a_full_replace_does() {
        incremental_changes_end_where_a_full_replace_does("nft").await;
    }

    async fn incremental_changes_end_where_a_full_replace_does(writer: &str) {
        let (Some(a), Some(b)) = (
            Ns::new_named(&format!("inc-{writer}")),
            Ns::new_named(&format!("full-{writer}")),
        ) else {
            return;
        };
        let (nft_a, nft_b) = (Nft::in_netns(&a.0), Nft::in_netns(&b.0));
        let mut plane = NftPlane::open(nft_a.clone(), Conntrack::in_netns(&a.0), false)
            .await
            .expect("open");
        match writer {
            "nft" => plane.write_changes_with_nft(),
            _ => assert!(plane.netlink.is_some(), "a netlink socket in {}", a.0),
        }
        let host = Host::on("h1", PlaneKind::Nftables, Features::NONE, true);
        let mut r = Replica::new("h1", 1, VipPool::default(), ReplicaConfig::default());
        let mut rng = mesh_core::mutate::Mutator::new(0x6d65_7368);
        let mut prev = Plan::default();
        let mut snap_prev = r.snapshot();
        for step in 0..150u64 {
            let pick = rng.next_u64();
            let svc = format!("s{}", pick % 4);
            let task = format!("{svc}.{}", (pick >> 8) % 4);
            let ip = if (pick >> 16).is_multiple_of(3) {
                format!("fd00::{}", (pick >> 20) % 6 + 1)
            } else {
                format!("10.0.0.{}", (pick >> 20) % 6 + 1)
            };
            match (pick >> 32) % 7 {
                0 | 1 => {
                    let mut spec = ServiceSpec::new(
                        &svc,
                        vec![
                            PortSpec::tcp(Some(8000 + (pick % 4) as u16), 80),
                            PortSpec::udp(Some(9000 + (pick % 4) as u16), 53),
                        ],
                    );
                    if (pick >> 40).is_multiple_of(5) {
                        // Needs userspace: its frontends leave this plane.
                        spec.proxy_protocol = mesh_core::ProxyProtocol::V2;
                    }
                    let _ = r.put_service(spec, step);
                }
                2 => {
                    let _ = r.remove_service(&svc, step);
                }
                3 | 4 => {
                    if r.add_task(
                        TaskSpec::new(&svc, &task, ip.parse().unwrap()),
                        TaskSource::Api,
                        step,
                    )
                    .is_ok()
                    {
                        r.set_health(&svc, &task, Health::Healthy, step);
                    }
                }
                5 => {
                    let _ = r.remove_task(&svc, &task, step);
                }
                _ => {
                    let h = if (pick >> 44).is_multiple_of(2) {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    };
                    r.set_health(&svc, &task, h, step);
                    if (pick >> 45).is_multiple_of(4) {
                        let _ = r.set_task_state(&svc, &task, TaskState::Draining, step);
                    }
                }
            }
            let snap = r.snapshot();
            let next = prev.update(&snap_prev, &snap, &host);
            let report = plane
                .apply(&next, &Plan::diff(&prev, &next), Instant::now())
                .await;
            assert!(report.errors.is_empty(), "step {step}: {report:?}");
            nft_b
                .apply(&Ruleset::from_plan(&next).render())
                .await
                .expect("full replace");
            assert_eq!(
                kernel_view(&nft_a).await,
                kernel_view(&nft_b).await,
                "step {step}: the changed table differs from a fresh one"
            );
            prev = next;
            snap_prev = snap;
        }
        assert!(plane.frontends > 0, "the run exercised some frontends");
        match writer {
            "nft" => assert_eq!(plane.written.0, 0, "{:?}", plane.written),
            // New task maps go through nft; the rest through netlink.
            _ => assert!(plane.written.0 > plane.written.1, "{:?}", plane.written),
        }
        eprintln!("{writer}: {}", plane.detail());
    }
}
