//! [`NftPlane`]: the reconciler. Each apply renders the table the plan wants and, when
//! the text differs from what it installed, replaces the table in one transaction, so
//! applying the same plan twice changes nothing. At start it adopts a table a previous
//! run left (kept for an upgrade, or left by a `kill -9`): the first apply replaces it
//! atomically, with no moment without rules.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use mesh_core::plan::{Features, PlaneKind};
use mesh_core::{FrontendKey, Plan, PlanChange};
use mesh_dataplane::{ApplyReport, Capabilities, Dataplane, PlaneError, PlaneStats, Target};
use tracing::{info, warn};

use crate::nft::{Nft, NftError};
use crate::ruleset::{Ruleset, TABLE};

pub struct NftPlane {
    nft: Nft,
    /// The text last installed; `None` before the first apply.
    installed: Option<String>,
    frontends: usize,
    /// Leave the table in the kernel at shutdown (`--keep-dataplane`): connections
    /// keep flowing while the agent is upgraded.
    keep: bool,
    /// The error of the last failed apply, reported until an apply succeeds.
    failed: Option<(Vec<FrontendKey>, String)>,
}

impl NftPlane {
    /// Checks that `nft` runs and the kernel takes a table from us, so `auto` can
    /// fall back with the reason.
    pub async fn open(nft: Nft, keep: bool) -> Result<NftPlane, NftError> {
        let adopted = nft.has_table(TABLE).await?;
        // The check (-c) runs the whole transaction in the kernel without keeping it:
        // it fails where nf_tables, NAT or numgen is missing.
        nft.run(&["-c", "-f", "-"], &Ruleset::default().render())
            .await?;
        if adopted {
            info!(table = %format!("inet {TABLE}"), "adopting the table a previous run left; the first apply replaces it");
        }
        Ok(NftPlane {
            nft,
            installed: None,
            frontends: 0,
            keep,
            failed: None,
        })
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
        format!(
            "table inet {TABLE}, {} frontends with tasks",
            self.frontends
        )
    }

    fn preflight(&self, _frontends: &[FrontendKey]) -> Vec<PlaneError> {
        // DNAT binds no socket: nothing another process holds can stop it.
        Vec::new()
    }

    async fn apply(&mut self, plan: &Plan, _changes: &[PlanChange], _now: Instant) -> ApplyReport {
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
                self.installed = Some(text);
                self.frontends = rules.frontends();
                self.failed = None;
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
        // A failed apply is retried at the next plan change; drains need no timer
        // (conntrack keeps established flows).
        None
    }

    async fn on_deadline(&mut self, _now: Instant) -> ApplyReport {
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

    #[tokio::test]
    async fn the_kernel_takes_the_table_an_unchanged_plan_changes_nothing_and_shutdown_removes_it()
    {
        let Some(ns) = Ns::new() else { return };
        let nft = Nft::in_netns(&ns.0);
        let mut plane = NftPlane::open(nft.clone(), false).await.expect("open");
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
        let mut again = NftPlane::open(nft.clone(), false).await.expect("reopen");
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
