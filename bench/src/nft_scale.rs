//! The nftables plane at scale: how long the kernel takes to install a table of many
//! services from empty, and then a one-task change on top, through the real plane
//! (`NftPlane::apply`) in a network namespace of its own. kube-proxy's nftables mode
//! changes only what changed; until ours does too, the second figure shows the cost
//! of re-rendering the whole table.

use std::time::Instant;

use anyhow::{Context, Result};
use integration::netns::Netns;
use mesh_core::plan::{Features, Host, PlaneKind};
use mesh_core::replica::{Replica, ReplicaConfig};
use mesh_core::service::{PortSpec, ServiceSpec};
use mesh_core::task::{TaskSource, TaskSpec};
use mesh_core::vip::VipPool;
use mesh_core::{Health, Plan};
use mesh_dataplane::Dataplane;
use mesh_nft::{Conntrack, Nft, NftPlane};
use serde::{Deserialize, Serialize};

use crate::stats::RunInfo;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NftScaleResults {
    pub run: RunInfo,
    pub services: usize,
    pub tasks_per_service: usize,
    /// Frontends in the table (a published port and a VIP per service).
    pub frontends: usize,
    /// Bytes of ruleset text handed to nft.
    pub ruleset_bytes: usize,
    /// From empty to the whole table, ms.
    pub from_empty_ms: f64,
    /// One task turning unhealthy on top, ms.
    pub one_change_ms: f64,
    /// The same plan again (nothing to do), ms.
    pub unchanged_ms: f64,
}

fn plan(replica: &Replica) -> Plan {
    let host = Host::on("h1", PlaneKind::Nftables, Features::NONE, true);
    Plan::from_snapshot(&replica.snapshot(), &host)
}

pub fn run(services: usize, tasks: usize) -> Result<NftScaleResults> {
    anyhow::ensure!(
        (1..=40_000).contains(&services) && (1..=100).contains(&tasks),
        "--services must be 1..=40000 and --tasks 1..=100"
    );
    let mut r = Replica::new("bench", 1, VipPool::default(), ReplicaConfig::default());
    for s in 0..services {
        let name = format!("s{s}");
        let port = 20_000 + s as u16;
        r.create_service(
            ServiceSpec::new(&name, vec![PortSpec::tcp(Some(port), 80)]),
            0,
        )
        .map_err(|e| anyhow::anyhow!("create {name}: {e}"))?;
        for t in 0..tasks {
            let id = format!("{name}.{t}");
            let ip = std::net::Ipv4Addr::from(0x0a00_0000u32 + (s * tasks + t) as u32 + 1);
            r.add_task(TaskSpec::new(&name, &id, ip.into()), TaskSource::Api, 0)
                .map_err(|e| anyhow::anyhow!("add {id}: {e}"))?;
            r.set_health(&name, &id, Health::Healthy, 0);
        }
    }
    let full = plan(&r);
    let ns = Netns::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut plane = NftPlane::open(Nft::in_netns(&ns.name), Conntrack::in_netns(&ns.name), false)
            .await
            .context("open the nftables plane")?;
        let ruleset_bytes = mesh_nft::Ruleset::from_plan(&full).render().len();
        let time = |started: Instant| started.elapsed().as_secs_f64() * 1000.0;

        let started = Instant::now();
        let report = plane.apply(&full, &[], Instant::now()).await;
        let from_empty_ms = time(started);
        anyhow::ensure!(report.errors.is_empty(), "apply failed: {:?}", report.errors.first());

        r.set_health("s0", "s0.0", Health::Unhealthy, 1);
        let changed = plan(&r);
        let started = Instant::now();
        let report = plane.apply(&changed, &Plan::diff(&full, &changed), Instant::now()).await;
        let one_change_ms = time(started);
        anyhow::ensure!(report.errors.is_empty(), "apply failed: {:?}", report.errors.first());

        let started = Instant::now();
        plane.apply(&changed, &[], Instant::now()).await;
        let unchanged_ms = time(started);

        let frontends = plane.detail();
        plane.shutdown(std::time::Duration::ZERO).await;
        eprintln!(
            "  nftables, {services} services x {tasks} tasks ({frontends}; {ruleset_bytes} bytes): \
             from empty {from_empty_ms:.0} ms, one change {one_change_ms:.0} ms, unchanged {unchanged_ms:.2} ms"
        );
        Ok(NftScaleResults {
            run: RunInfo::collect(),
            services,
            tasks_per_service: tasks,
            frontends: full.served_by(PlaneKind::Nftables),
            ruleset_bytes,
            from_empty_ms,
            one_change_ms,
            unchanged_ms,
        })
    })
}
