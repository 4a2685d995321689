//! How long a crashed host's tasks keep taking new connections, from the simulator
//! (real foca and replicas, virtual time): the crash of one host after another, each
//! timed until no live host routes to its tasks, and, over a quiet period with packet
//! loss, how often a live host's tasks were withdrawn (a false suspicion that lasted
//! the grace, or a false down).

use anyhow::Result;
use mesh_core::{PortSpec, ServiceSpec};
use mesh_gossip::sim::{Sim, SimConfig};
use serde::{Deserialize, Serialize};

use crate::gossip::{add_task, percentile, routes};
use crate::stats::RunInfo;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub nodes: usize,
    pub loss: f64,
    pub crashes: usize,
    /// Crash → no live host routes new connections to its tasks (virtual ms).
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// The quiet period with this loss, without crashes.
    pub quiet_secs: u64,
    pub false_withdrawals: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WithdrawalResults {
    pub run: RunInfo,
    pub rows: Vec<Row>,
}

fn cluster(nodes: usize, loss: f64) -> Sim {
    let mut sim = Sim::new(SimConfig {
        nodes,
        seed: 7,
        ..SimConfig::default()
    });
    sim.until(500, 900_000, |s| {
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
    sim.set_loss(loss);
    sim
}

pub fn measure(nodes: usize, loss: f64, crashes: usize, quiet_secs: u64) -> Row {
    let mut sim = cluster(nodes, loss);
    // Quiet first: no crash, no cut, only loss. Every withdrawal is a false one.
    let before = sim.false_withdrawals();
    sim.run_for(quiet_secs * 1000);
    let false_withdrawals = sim.false_withdrawals() - before;
    let mut times = Vec::new();
    for c in 0..crashes {
        // Never the seed, so restarted hosts can always rejoin through it.
        let victim = 1 + (c * 7919) % (nodes - 1);
        let owner = sim.name(victim).to_string();
        add_task(&mut sim, victim, &format!("victim{c}"));
        sim.until(10, 300_000, |s| {
            s.up_nodes()
                .iter()
                .all(|i| *i == victim || routes(s, *i, &owner))
        });
        sim.crash(victim);
        let took = sim.until(10, 300_000, |s| {
            s.up_nodes().iter().all(|i| !routes(s, *i, &owner))
        });
        times.push(took.unwrap_or(u64::MAX));
        sim.restart(victim);
        sim.run_for(5_000);
    }
    times.sort_unstable();
    Row {
        nodes,
        loss,
        crashes: times.len(),
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
        max_ms: *times.last().unwrap_or(&0),
        quiet_secs,
        false_withdrawals,
    }
}

pub fn run(sizes: &[(usize, usize)], losses: &[f64], quiet_secs: u64) -> Result<WithdrawalResults> {
    let mut rows = Vec::new();
    for &(nodes, crashes) in sizes {
        for &loss in losses {
            let row = measure(nodes, loss, crashes, quiet_secs);
            eprintln!(
                "  withdrawal {nodes} hosts {:.0}% loss: p50 {} ms, p99 {} ms, max {} ms over {} crashes; {} false withdrawals in {} s",
                loss * 100.0,
                row.p50_ms,
                row.p99_ms,
                row.max_ms,
                row.crashes,
                row.false_withdrawals,
                quiet_secs
            );
            rows.push(row);
        }
    }
    Ok(WithdrawalResults {
        run: RunInfo::collect(),
        rows,
    })
}
