//! Gossip figures from the deterministic simulator (real foca and real replicas per
//! node, virtual time): how long a task change takes to reach every host, how long a
//! crashed host's tasks stay routed, what gossip costs per host, and how long a new
//! host takes to receive a large table.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{Context, Result};
use mesh_core::{
    Health, PortSpec, Replica, ReplicaConfig, ServiceSpec, TaskSpec, TaskState, VipPool,
};
use mesh_gossip::sim::{Sim, SimConfig};
use serde::{Deserialize, Serialize};

use crate::stats::RunInfo;

pub const LOSSES: [f64; 3] = [0.0, 0.05, 0.20];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub nodes: usize,
    pub loss: f64,
    pub changes: usize,
    /// Time until every live host has a task change, in virtual ms.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// Crash of a host → its task gone from every live host's routing view.
    pub withdrawal_ms: Option<u64>,
    pub bytes_per_node_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FullSync {
    pub services: usize,
    pub tasks_per_service: usize,
    /// postcard-encoded anti-entropy items, as they travel.
    pub bytes: usize,
    pub build_digest_and_items_ms: f64,
    pub encode_decode_ms: f64,
    pub apply_and_snapshot_ms: f64,
    pub total_ms: f64,
    /// The transfer at 1 Gbit/s, for scale: the bytes have to cross a wire too.
    pub wire_ms_at_1gbit: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipResults {
    pub run: RunInfo,
    /// (nodes, virtual ms until 99% of hosts saw ≥ 99% of members).
    pub formation_ms: Vec<(usize, Option<u64>)>,
    pub rows: Vec<Row>,
    pub full_sync: FullSync,
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn add_task(sim: &mut Sim, host: usize, id: &str) -> u64 {
    let id = id.to_string();
    let deltas = sim.with_replica(host, move |r, now| {
        let spec = TaskSpec {
            service: "web".into(),
            id: Some(id.clone()),
            ip: "10.0.0.1".parse().expect("literal address"),
            port: None,
            state: TaskState::Active,
            observed: None,
        };
        match r.add_task(spec, mesh_core::TaskSource::Api, now) {
            Ok((_, mut d)) => {
                d.extend(r.set_health("web", &id, Health::Healthy, now));
                d
            }
            Err(_) => Vec::new(),
        }
    });
    sim.publish(host, &deltas);
    let origin = sim.name(host).to_string();
    let w = sim.replica(host).watermark(&origin);
    w.map(|(_, w)| w).unwrap_or(0)
}

pub fn routes(sim: &Sim, viewer: usize, owner: &str) -> bool {
    let snap = sim.replica(viewer).snapshot();
    snap.services
        .get("web")
        .is_some_and(|w| w.tasks.iter().any(|t| t.node == owner))
}

/// Waits (up to `patience_ms` of virtual time) until 99% of the hosts know 99% of
/// the others, then creates `web` and waits until every host has it. Returns how long
/// the cluster took to form.
pub fn form_with_web(sim: &mut Sim, nodes: usize, patience_ms: u64) -> Option<u64> {
    let formed = sim.until(500, patience_ms, |s| {
        let want = nodes - 1 - nodes / 100;
        let up = s.up_nodes();
        up.iter().filter(|i| s.known_members(**i) >= want).count() * 100 >= up.len() * 99
    });
    sim.write(0, |r, now| {
        r.create_service(
            ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
            now,
        )
        .unwrap_or_default()
    });
    sim.until(50, 300_000, |s| {
        s.up_nodes()
            .iter()
            .all(|i| s.replica(*i).service("web").is_some())
    });
    formed
}

/// Forms an `nodes`-host cluster, then for each loss level measures `changes` task
/// changes and one crash.
pub fn cluster(nodes: usize, changes: usize) -> (Option<u64>, Vec<Row>) {
    let mut sim = Sim::new(SimConfig {
        nodes,
        seed: 42,
        ..SimConfig::default()
    });
    let formed = form_with_web(&mut sim, nodes, 600_000);
    let mut rows = Vec::new();
    let mut next_host = 1;
    for (level, loss) in LOSSES.into_iter().enumerate() {
        sim.set_loss(loss);
        let (bytes0, t0) = (sim.total_bytes(), sim.now_ms);
        let mut times = Vec::new();
        for c in 0..changes {
            let host = (next_host * 7919) % nodes;
            next_host += 1;
            if !sim.is_up(host) {
                continue;
            }
            let origin = sim.name(host).to_string();
            let id = format!("l{level}c{c}");
            let version = add_task(&mut sim, host, &id);
            let took = sim.until(10, 300_000, |s| {
                s.up_nodes().iter().all(|i| {
                    s.replica(*i)
                        .task_version(&origin, "web", &id)
                        .is_some_and(|v| v >= version)
                })
            });
            times.push(took.unwrap_or(u64::MAX));
            sim.run_for(1_000);
        }
        let secs = (sim.now_ms - t0) as f64 / 1000.0;
        let rate = (sim.total_bytes() - bytes0) as f64 / nodes as f64 / secs;
        // A host with a routed task crashes: how long until no live host routes to it?
        let victim = (next_host * 7919) % nodes;
        next_host += 1;
        let owner = sim.name(victim).to_string();
        add_task(&mut sim, victim, &format!("victim{level}"));
        sim.until(10, 300_000, |s| {
            s.up_nodes()
                .iter()
                .all(|i| *i == victim || routes(s, *i, &owner))
        });
        sim.crash(victim);
        let withdrawal = sim.until(10, 300_000, |s| {
            s.up_nodes().iter().all(|i| !routes(s, *i, &owner))
        });
        times.sort_unstable();
        rows.push(Row {
            nodes,
            loss,
            changes: times.len(),
            p50_ms: percentile(&times, 0.5),
            p99_ms: percentile(&times, 0.99),
            max_ms: *times.last().unwrap_or(&0),
            withdrawal_ms: withdrawal,
            bytes_per_node_s: rate,
        });
        eprintln!(
            "  gossip {nodes} nodes {:.0}% loss: p50 {} ms p99 {} ms, withdrawal {:?} ms, {:.0} B/s/node",
            loss * 100.0,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            withdrawal,
            rate
        );
    }
    (formed, rows)
}

/// A new host receives a `services` × `per_service` table through anti-entropy:
/// digest, items, postcard both ways, apply, first snapshot.
pub fn full_sync(services: usize, per_service: usize) -> Result<FullSync> {
    // As in a cluster: the services written on one host, the tasks registered by
    // `per_service` hosts, everything gossiped to `source`, which then syncs a new host.
    let now = 1_700_000_000_000;
    let replica = |name: &str| Replica::new(name, 1, VipPool::default(), ReplicaConfig::default());
    let mut source = replica("source");
    let mut owners: Vec<Replica> = (0..per_service)
        .map(|i| replica(&format!("h{i}")))
        .collect();
    for s in 0..services {
        let mut spec = ServiceSpec::new(format!("svc{s}"), vec![PortSpec::tcp(None, 80)]);
        spec.health.check = mesh_core::HealthKind::None;
        let deltas = source
            .create_service(spec, now)
            .context("create a service")?;
        for o in owners.iter_mut() {
            for d in &deltas {
                o.apply_delta(d.clone(), now);
            }
        }
    }
    for (i, o) in owners.iter_mut().enumerate() {
        for s in 0..services {
            let (_, deltas) = o.add_task(
                TaskSpec {
                    service: format!("svc{s}"),
                    id: Some(format!("t{i}")),
                    ip: format!("10.{}.{}.{}", (s >> 8) & 255, s & 255, i + 1).parse()?,
                    port: None,
                    state: TaskState::Active,
                    observed: None,
                },
                mesh_core::TaskSource::Api,
                now,
            )?;
            for d in deltas {
                source.apply_delta(d, now);
            }
        }
    }
    let mut fresh = replica("fresh");
    let start = Instant::now();
    let items = source.sync_for(&fresh.digest());
    let built = start.elapsed();
    let wire = postcard::to_allocvec(&items)?;
    let back: Vec<mesh_core::SyncItem> = postcard::from_bytes(&wire)?;
    let coded = start.elapsed();
    for item in back {
        fresh.apply_sync(item, now);
    }
    for i in 0..per_service {
        fresh.member_up(&format!("h{i}"));
    }
    let snap = fresh.snapshot();
    let total = start.elapsed();
    let routed: usize = snap.services.values().map(|s| s.tasks.len()).sum();
    let names: BTreeSet<&String> = snap.services.keys().collect();
    anyhow::ensure!(
        names.len() == services && routed == services * per_service,
        "full sync delivered {} services and {routed} tasks, expected {services} and {}",
        names.len(),
        services * per_service
    );
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    Ok(FullSync {
        services,
        tasks_per_service: per_service,
        bytes: wire.len(),
        build_digest_and_items_ms: ms(built),
        encode_decode_ms: ms(coded - built),
        apply_and_snapshot_ms: ms(total - coded),
        total_ms: ms(total),
        wire_ms_at_1gbit: wire.len() as f64 * 8.0 / 1e9 * 1000.0,
    })
}

pub fn run(sizes: &[(usize, usize)]) -> Result<GossipResults> {
    let full_sync = full_sync(10_000, 10)?;
    eprintln!(
        "  full sync 10,000 × 10: {:.0} ms, {} bytes",
        full_sync.total_ms, full_sync.bytes
    );
    // The sizes are independent simulations: one thread each.
    let handles: Vec<_> = sizes
        .iter()
        .map(|&(n, changes)| std::thread::spawn(move || (n, cluster(n, changes))))
        .collect();
    let mut formation_ms = Vec::new();
    let mut rows = Vec::new();
    for h in handles {
        let (n, (formed, r)) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a simulation panicked"))?;
        formation_ms.push((n, formed));
        rows.extend(r);
    }
    Ok(GossipResults {
        run: RunInfo::collect(),
        formation_ms,
        rows,
        full_sync,
    })
}
