//! The nftables plane at scale: how long the kernel takes to install a table of many
//! services from empty, and then a one-task change on top, through the real plane
//! (`NftPlane::apply`) in a network namespace of its own. Each one-task change is
//! timed through both writers the plane has: netlink batches (what it uses), and
//! as many like changes through `nft -f`; that comparison chose the writer.

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
    /// One task of a service turning unhealthy on top, written over netlink, ms: the
    /// median of [`FLIPS`] such changes (each of another service).
    pub one_change_ms: f64,
    /// As many such changes written by `nft -f`, ms (median).
    #[serde(default)]
    pub one_change_nft_ms: f64,
    /// The same plan again (nothing to do), ms.
    pub unchanged_ms: f64,
}

/// One-task changes timed per writer.
const FLIPS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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

        // Each change takes one task of another service down (and, past the last
        // service, back up).
        let mut current = full.clone();
        let mut clock = 1;
        let mut flip = |r: &mut Replica, i: usize| {
            let service = format!("s{}", i % services);
            let task = format!("{service}.0");
            let health = if (i / services).is_multiple_of(2) {
                Health::Unhealthy
            } else {
                Health::Healthy
            };
            clock += 1;
            r.set_health(&service, &task, health, clock);
            plan(r)
        };
        let mut times = (Vec::new(), Vec::new());
        for i in 0..2 * FLIPS {
            if i == FLIPS {
                plane.write_changes_with_nft();
            }
            let next = flip(&mut r, i);
            // The diff is the driver's work, not the plane's.
            let diff = Plan::diff(&current, &next);
            let started = Instant::now();
            let report = plane.apply(&next, &diff, Instant::now()).await;
            let ms = time(started);
            anyhow::ensure!(report.errors.is_empty(), "apply failed: {:?}", report.errors.first());
            if i < FLIPS {
                times.0.push(ms);
            } else {
                times.1.push(ms);
            }
            current = next;
        }
        let (one_change_ms, one_change_nft_ms) = (median(times.0), median(times.1));
        anyhow::ensure!(
            plane.detail().contains(&format!("{FLIPS} over netlink, {FLIPS} by nft")),
            "the changes did not go through the writer each was timed for: {}",
            plane.detail()
        );
        let changed = current;
        let mut unchanged = Vec::new();
        for _ in 0..FLIPS {
            let started = Instant::now();
            plane.apply(&changed, &[], Instant::now()).await;
            unchanged.push(time(started));
        }
        let unchanged_ms = median(unchanged);

        let frontends = plane.detail();
        plane.shutdown(std::time::Duration::ZERO).await;
        eprintln!(
            "  nftables, {services} services x {tasks} tasks ({frontends}; {ruleset_bytes} bytes): \
             from empty {from_empty_ms:.0} ms, one change {one_change_ms:.1} ms (nft -f: {one_change_nft_ms:.1} ms), unchanged {unchanged_ms:.2} ms"
        );
        Ok(NftScaleResults {
            run: RunInfo::collect(),
            services,
            tasks_per_service: tasks,
            frontends: full.served_by(PlaneKind::Nftables),
            ruleset_bytes,
            from_empty_ms,
            one_change_ms,
            one_change_nft_ms,
            unchanged_ms,
        })
    })
}
