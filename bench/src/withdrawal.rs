//! How long a crashed host's tasks keep taking new connections, from the simulator
//! (real foca and replicas, virtual time): the crash of one host after another, each
//! timed until no live host routes to its tasks, and, over a quiet period with packet
//! loss, how often a live host's tasks were withdrawn (a false suspicion that lasted
//! the grace, or a false down).

use std::time::Duration;

use anyhow::Result;
use mesh_gossip::GossipConfig;
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
    /// The membership timers every row ran with.
    #[serde(default)]
    pub timers: Timers,
    pub rows: Vec<Row>,
}

/// The membership timers that decide withdrawal time, in milliseconds; the agent's
/// defaults unless a flag overrides one, so other values can be tried in virtual time.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Timers {
    pub probe_period_ms: u64,
    pub probe_rtt_ms: u64,
    pub suspect_grace_ms: u64,
    #[serde(default)]
    pub retransmit_mult: f64,
    #[serde(default)]
    pub indirect_probes: usize,
    #[serde(default)]
    pub gossip_interval_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        let g = GossipConfig::default();
        Self {
            probe_period_ms: g.probe_period.as_millis() as u64,
            probe_rtt_ms: g.probe_rtt.as_millis() as u64,
            suspect_grace_ms: g.suspect_grace.as_millis() as u64,
            retransmit_mult: g.retransmit_mult,
            indirect_probes: g.indirect_probes,
            gossip_interval_ms: g.gossip_interval.as_millis() as u64,
        }
    }
}

impl Timers {
    fn gossip(&self) -> GossipConfig {
        GossipConfig {
            probe_period: Duration::from_millis(self.probe_period_ms),
            probe_rtt: Duration::from_millis(self.probe_rtt_ms),
            suspect_grace: Duration::from_millis(self.suspect_grace_ms),
            retransmit_mult: self.retransmit_mult,
            indirect_probes: self.indirect_probes,
            gossip_interval: Duration::from_millis(self.gossip_interval_ms),
            ..GossipConfig::default()
        }
    }
}

fn cluster(nodes: usize, loss: f64, timers: &Timers) -> Sim {
    let mut sim = Sim::new(SimConfig {
        nodes,
        seed: 7,
        gossip: timers.gossip(),
        ..SimConfig::default()
    });
    crate::gossip::form_with_web(&mut sim, nodes, 900_000);
    sim.set_loss(loss);
    sim
}

pub fn measure(nodes: usize, loss: f64, crashes: usize, quiet_secs: u64, timers: &Timers) -> Row {
    let mut sim = cluster(nodes, loss, timers);
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

pub fn run(
    sizes: &[(usize, usize)],
    losses: &[f64],
    quiet_secs: u64,
    timers: Timers,
) -> Result<WithdrawalResults> {
    // The tree as it is when the run starts: the run takes the better part of an hour.
    let run_info = RunInfo::collect();
    let mut rows = Vec::new();
    for &(nodes, crashes) in sizes {
        for &loss in losses {
            let row = measure(nodes, loss, crashes, quiet_secs, &timers);
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
        run: run_info,
        timers,
        rows,
    })
}
