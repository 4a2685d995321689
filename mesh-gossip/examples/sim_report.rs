//! Convergence report from the deterministic simulator:
//! `cargo run --release -p mesh-gossip --example sim_report -- [NODES] [TRIALS]`.
//! For 0% and 10% loss: forms the cluster, then repeatedly registers a task on a
//! random host and measures (virtual) time until every host has its latest version
//! (what routing needs), and the gossip bytes per host per second.

use mesh_core::{Health, PortSpec, ServiceSpec, TaskSpec, TaskState};
use mesh_gossip::sim::{Sim, SimConfig};

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let trials: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    println!("| nodes | loss | p50 ms | p99 ms | max ms | bytes/s per node |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for loss in [0.0, 0.10] {
        let mut sim = Sim::new(SimConfig {
            nodes,
            seed: 42,
            ..SimConfig::default()
        });
        sim.until(500, 300_000, |s| {
            s.up_nodes()
                .iter()
                .all(|i| s.known_members(*i) >= nodes - 1 - nodes / 100)
        });
        sim.write(0, |r, now| {
            r.create_service(
                ServiceSpec::new("web", vec![PortSpec::tcp(Some(8080), 80)]),
                now,
            )
            .unwrap()
        });
        sim.until(50, 120_000, |s| {
            s.up_nodes()
                .iter()
                .all(|i| s.replica(*i).service("web").is_some())
        });
        sim.set_loss(loss);
        let (bytes0, t0) = (sim.total_bytes(), sim.now_ms);
        let mut times = Vec::new();
        for t in 0..trials {
            let host = (t * 7919) % nodes;
            let origin = sim.name(host).to_string();
            let id = format!("task{t}");
            let version = {
                let id = id.clone();
                let deltas = sim.with_replica(host, move |r, now| {
                    let spec = TaskSpec {
                        service: "web".into(),
                        id: Some(id.clone()),
                        ip: "10.0.0.1".parse().unwrap(),
                        port: None,
                        state: TaskState::Active,
                        observed: None,
                    };
                    let mut d = r.add_task(spec, mesh_core::TaskSource::Api, now).unwrap().1;
                    d.extend(r.set_health("web", &id, Health::Healthy, now));
                    d
                });
                sim.publish(host, &deltas);
                sim.replica(host)
                    .watermark(&origin)
                    .map(|(_, w)| w)
                    .unwrap_or(0)
            };
            let took = sim.until(10, 120_000, |s| {
                s.up_nodes().iter().all(|i| {
                    s.replica(*i)
                        .task_version(&origin, "web", &id)
                        .is_some_and(|v| v >= version)
                })
            });
            times.push(took.unwrap_or(u64::MAX));
            sim.run_for(1_000);
        }
        times.sort_unstable();
        let secs = (sim.now_ms - t0) as f64 / 1000.0;
        let rate = (sim.total_bytes() - bytes0) as f64 / nodes as f64 / secs;
        println!(
            "| {nodes} | {:.0}% | {} | {} | {} | {:.0} |",
            loss * 100.0,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.last().unwrap(),
            rate
        );
    }
}
