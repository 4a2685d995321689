//! A deterministic simulation of a whole cluster in one process: real foca and real
//! replicas per node, virtual time, a seeded RNG, and a network that loses, delays and
//! partitions datagrams. Each node's replica is owned by the simulator, which plays
//! the table: it applies the node's [`GossipEvent`](crate::GossipEvent)s and runs the real anti-entropy
//! steps ([`crate::anti_entropy`]) over simulated TCP (reliable, but cut by
//! partitions), with every message encoded and decoded as on the wire. Used by the
//! tests for invariants and by the benchmarks for convergence figures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use foca::Timer;
use mesh_core::{Delta, Replica, ReplicaConfig, VipPool};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::anti_entropy::{self, Back, Hello, Reply};
use crate::events::GossipEvent;
use crate::identity::NodeIdentity;
use crate::node::{GossipConfig, GossipNode};

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: usize,
    pub seed: u64,
    /// Probability that a datagram is lost.
    pub loss: f64,
    pub min_latency_ms: u64,
    pub max_latency_ms: u64,
    /// Anti-entropy period per node (jittered ±50%).
    pub anti_entropy_ms: u64,
    /// Each timer fires up to this much late, at random. A real timer does (tokio's
    /// wheel has 1 ms steps, and the task waits for the scheduler), and without it
    /// every host's probe timers stay in lockstep from boot to the end of a run. In
    /// lockstep, 3 of 40 crashes at 100 hosts went 3 s without a single ping of the
    /// crashed host, and the slowest withdrawal took 3.68 s; with up to 3 ms of
    /// lateness the slowest of the same 40 took 1.99 s.
    pub timer_late_ms: u64,
    pub gossip: GossipConfig,
    pub replica: ReplicaConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 16,
            seed: 1,
            loss: 0.0,
            min_latency_ms: 1,
            max_latency_ms: 5,
            anti_entropy_ms: 5_000,
            timer_late_ms: 3,
            gossip: GossipConfig::default(),
            replica: ReplicaConfig::default(),
        }
    }
}

enum Event {
    Deliver {
        to: usize,
        data: Vec<u8>,
    },
    Timer {
        node: usize,
        incarnation: u64,
        timer: Timer<NodeIdentity>,
    },
    AntiEntropy {
        node: usize,
        incarnation: u64,
    },
    Tick {
        node: usize,
        incarnation: u64,
    },
    /// The transport's look at foca's suspects.
    Suspects {
        node: usize,
        incarnation: u64,
    },
}

struct SimNode {
    name: String,
    addr: SocketAddr,
    /// Bumped at every restart; events of an older incarnation are dropped.
    incarnation: u64,
    /// The generation of the identity the node last ran as, renewals included.
    generation: u64,
    gossip: Option<GossipNode>,
    /// Owned here, as the agent's table owns it: the node only reports events.
    replica: Option<Replica>,
    bytes_sent: u64,
}

pub struct Sim {
    pub now_ms: u64,
    config: SimConfig,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Event>,
    next_event: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    /// One-way cuts: (from, to).
    blocked: HashSet<(usize, usize)>,
    /// Suspicions and down declarations a replica took about a node that was up.
    false_withdrawals: u64,
}

/// As the transport: foca's suspects are looked at every 100 ms.
const SUSPECT_POLL_MS: u64 = 100;

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1), 7946))
}

impl Sim {
    /// Builds the cluster; every node joins through node 0.
    pub fn new(mut config: SimConfig) -> Self {
        config.gossip.cluster_size = config.gossip.cluster_size.max(config.nodes as u32);
        let mut sim = Sim {
            now_ms: 0,
            rng: StdRng::seed_from_u64(config.seed),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event: 0,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            blocked: HashSet::new(),
            false_withdrawals: 0,
            config,
        };
        for i in 0..sim.config.nodes {
            let addr = addr_of(i);
            sim.by_addr.insert(addr, i);
            sim.nodes.push(SimNode {
                name: format!("n{i}"),
                addr,
                incarnation: 0,
                generation: 0,
                gossip: None,
                replica: None,
                bytes_sent: 0,
            });
            sim.boot(i);
        }
        sim
    }

    fn boot(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        // Above every identity the node ever had, as the agent's wall-clock
        // generation is: a node declared down falsely renews itself to generation + 1,
        // and a restart that reused that generation would be taken for the identity
        // its peers hold down, and ignored.
        let generation = self.now_ms.max(node.generation + 1);
        node.generation = generation;
        let identity = NodeIdentity {
            name: node.name.clone(),
            addr: node.addr,
            generation,
        };
        let replica = Replica::new(
            node.name.clone(),
            generation,
            VipPool::default(),
            self.config.replica.clone(),
        );
        let seed = self.config.seed ^ ((i as u64) << 20) ^ generation;
        let mut g = GossipNode::new(identity, &self.config.gossip, seed);
        let seeds = if i == 0 { vec![] } else { vec![addr_of(0)] };
        g.start(&seeds);
        node.gossip = Some(g);
        node.replica = Some(replica);
        let inc = node.incarnation;
        let jitter = self.rng.random_range(0..self.config.anti_entropy_ms.max(1));
        self.schedule(
            jitter,
            Event::AntiEntropy {
                node: i,
                incarnation: inc,
            },
        );
        self.schedule(
            1_000,
            Event::Tick {
                node: i,
                incarnation: inc,
            },
        );
        self.schedule(
            SUSPECT_POLL_MS,
            Event::Suspects {
                node: i,
                incarnation: inc,
            },
        );
        self.flush(i);
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.insert(id, event);
        self.queue.push(Reverse((self.now_ms + after_ms, id)));
    }

    /// Turns a node's outbox into network and timer events, and hands its events to
    /// its replica.
    fn flush(&mut self, i: usize) {
        let Some(g) = self.nodes[i].gossip.as_mut() else {
            return;
        };
        let out = g.take_outbox();
        for event in &out.events {
            if let GossipEvent::MemberSuspect(name) | GossipEvent::MemberDown(name) = event
                && self
                    .by_name(name)
                    .is_some_and(|j| self.nodes[j].gossip.is_some())
            {
                self.false_withdrawals += 1;
            }
        }
        if let Some(r) = self.nodes[i].replica.as_mut() {
            for event in out.events {
                event.apply(r, self.now_ms);
            }
        }
        let inc = self.nodes[i].incarnation;
        for (after, timer) in out.timers {
            let late = self.rng.random_range(0..=self.config.timer_late_ms);
            self.schedule(
                after.as_millis() as u64 + late,
                Event::Timer {
                    node: i,
                    incarnation: inc,
                    timer,
                },
            );
        }
        for (to, data) in out.sends {
            self.nodes[i].bytes_sent += data.len() as u64;
            let Some(&j) = self.by_addr.get(&to) else {
                continue;
            };
            if self.blocked.contains(&(i, j)) || self.rng.random::<f64>() < self.config.loss {
                continue;
            }
            let latency = self
                .rng
                .random_range(self.config.min_latency_ms..=self.config.max_latency_ms);
            self.schedule(latency, Event::Deliver { to: j, data });
        }
    }

    /// Runs the simulation for `ms` of virtual time.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now_ms = at;
            let Some(event) = self.events.remove(&id) else {
                continue;
            };
            self.handle(event);
        }
        self.now_ms = until;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, data } => {
                if let Some(g) = self.nodes[to].gossip.as_mut() {
                    let _ = g.handle_data(&data);
                    self.flush(to);
                }
            }
            Event::Timer {
                node,
                incarnation,
                timer,
            } => {
                if self.nodes[node].incarnation == incarnation
                    && let Some(g) = self.nodes[node].gossip.as_mut()
                {
                    g.handle_timer(timer);
                    self.flush(node);
                }
            }
            Event::Tick { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].gossip.is_none()
                {
                    return;
                }
                let deltas = self.with_replica(node, |r, now| r.tick(now));
                self.publish(node, &deltas);
                // As the transport does every 10 s: announce to a member declared down.
                if self.now_ms % 10_000 < 1_000 {
                    let pick = self.rng.random_range(0..usize::MAX);
                    if let Some(g) = self.nodes[node].gossip.as_mut() {
                        g.reconnect(pick);
                    }
                    self.flush(node);
                }
                self.schedule(1_000, Event::Tick { node, incarnation });
            }
            Event::Suspects { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation {
                    return;
                }
                let now = self.now_ms;
                if let Some(g) = self.nodes[node].gossip.as_mut() {
                    g.tick(now);
                }
                self.flush(node);
                self.schedule(SUSPECT_POLL_MS, Event::Suspects { node, incarnation });
            }
            Event::AntiEntropy { node, incarnation } => {
                if self.nodes[node].incarnation != incarnation || self.nodes[node].gossip.is_none()
                {
                    return;
                }
                self.anti_entropy(node);
                let period = self.config.anti_entropy_ms.max(2);
                let next = period / 2 + self.rng.random_range(0..period);
                self.schedule(next, Event::AntiEntropy { node, incarnation });
            }
        }
    }

    /// Carries one anti-entropy message from node `from` over simulated TCP: encoded,
    /// counted and decoded, as the transport does.
    fn carry<T: Serialize + DeserializeOwned>(&mut self, from: usize, msg: &T) -> T {
        let bytes = postcard::to_allocvec(msg).expect("sync messages encode");
        self.nodes[from].bytes_sent += bytes.len() as u64;
        postcard::from_bytes(&bytes).expect("sync messages decode")
    }

    /// One push-pull exchange with a random live member, if the network lets a TCP
    /// connection through (both directions): the real anti-entropy steps, each run
    /// against the replica of the side that takes it.
    fn anti_entropy(&mut self, i: usize) {
        let members = self.nodes[i]
            .gossip
            .as_ref()
            .map(|g| g.alive_members())
            .unwrap_or_default();
        if members.is_empty() {
            return;
        }
        let peer = &members[self.rng.random_range(0..members.len())];
        let Some(&j) = self.by_addr.get(&peer.addr) else {
            return;
        };
        if self.nodes[j].gossip.is_none()
            || self.blocked.contains(&(i, j))
            || self.blocked.contains(&(j, i))
        {
            return;
        }
        let now = self.now_ms;
        let membership = |sim: &Sim, k: usize| {
            sim.nodes[k]
                .gossip
                .as_ref()
                .map(|g| g.membership())
                .unwrap_or_default()
        };
        let hello = anti_entropy::hello(self.replica(i), membership(self, i));
        let mut hello: Hello = self.carry(i, &hello);
        let theirs_i = std::mem::take(&mut hello.members);
        let reply = anti_entropy::reply(self.replica(j), &hello, membership(self, j));
        let mut reply: Reply = self.carry(j, &reply);
        let theirs_j = std::mem::take(&mut reply.members);
        let (back, _) = anti_entropy::absorb_reply(self.replica_mut(i), reply, now);
        let back: Back = self.carry(i, &back);
        anti_entropy::absorb(self.replica_mut(j), back, now);
        if let Some(g) = self.nodes[i].gossip.as_mut() {
            g.apply_membership(theirs_j);
        }
        if let Some(g) = self.nodes[j].gossip.as_mut() {
            g.apply_membership(theirs_i);
        }
        self.flush(i);
        self.flush(j);
    }

    /// The replica of a node that is up.
    pub fn replica(&self, i: usize) -> &Replica {
        self.nodes[i].replica.as_ref().expect("node is up")
    }

    fn replica_mut(&mut self, i: usize) -> &mut Replica {
        self.nodes[i].replica.as_mut().expect("node is up")
    }

    /// Runs a local write on node `i` (gossip its deltas with [`Sim::publish`]).
    pub fn with_replica<T>(&mut self, i: usize, f: impl FnOnce(&mut Replica, u64) -> T) -> T {
        let now = self.now_ms;
        f(self.replica_mut(i), now)
    }

    pub fn publish(&mut self, i: usize, deltas: &[Delta]) {
        if let Some(g) = self.nodes[i].gossip.as_mut() {
            g.publish(deltas);
        }
        self.flush(i);
    }

    /// A write with its deltas gossiped.
    pub fn write(&mut self, i: usize, f: impl FnOnce(&mut Replica, u64) -> Vec<Delta>) {
        let deltas = self.with_replica(i, f);
        self.publish(i, &deltas);
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].gossip.is_some()
    }

    /// kill -9: the node stops, its pending timers die with it.
    pub fn crash(&mut self, i: usize) {
        if let Some(g) = &self.nodes[i].gossip {
            self.nodes[i].generation = self.nodes[i].generation.max(g.identity().generation);
        }
        self.nodes[i].gossip = None;
        self.nodes[i].replica = None;
        self.nodes[i].incarnation += 1;
    }

    /// Comes back as a new generation with an empty table, rejoining via node 0.
    pub fn restart(&mut self, i: usize) {
        self.boot(i);
    }

    pub fn leave(&mut self, i: usize) {
        let leave = self.nodes[i].replica.as_ref().map(|r| r.leave());
        if let (Some(g), Some(leave)) = (self.nodes[i].gossip.as_mut(), leave) {
            g.leave(leave);
        }
        self.flush(i);
        self.crash(i);
    }

    /// Cuts traffic from every node in `a` to every node in `b` (one way).
    pub fn cut(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.blocked.insert((x, y));
            }
        }
    }

    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        self.cut(a, b);
        self.cut(b, a);
    }

    pub fn set_loss(&mut self, loss: f64) {
        self.config.loss = loss;
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.is_up(*i)).collect()
    }

    fn by_name(&self, name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok()
    }

    /// How many times a node took a live node for suspect or down (a false
    /// withdrawal of its tasks). Partitions make such verdicts right from one side:
    /// read it over a period without cuts.
    pub fn false_withdrawals(&self) -> u64 {
        self.false_withdrawals
    }

    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    pub fn bytes_sent(&self, i: usize) -> u64 {
        self.nodes[i].bytes_sent
    }

    pub fn total_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.bytes_sent).sum()
    }

    /// Advances in `step_ms` steps until `cond` holds for the simulation, up to
    /// `limit_ms`. Returns the virtual time it took, or None.
    pub fn until(
        &mut self,
        step_ms: u64,
        limit_ms: u64,
        mut cond: impl FnMut(&Sim) -> bool,
    ) -> Option<u64> {
        let start = self.now_ms;
        while self.now_ms - start <= limit_ms {
            if cond(self) {
                return Some(self.now_ms - start);
            }
            self.run_for(step_ms);
        }
        None
    }

    /// The generation node `i` runs as (renewals included); None while it is down.
    pub fn generation(&self, i: usize) -> Option<u64> {
        self.nodes[i]
            .gossip
            .as_ref()
            .map(|g| g.identity().generation)
    }

    /// Members node `i` sees alive (including suspect), not counting itself.
    pub fn known_members(&self, i: usize) -> usize {
        self.nodes[i]
            .gossip
            .as_ref()
            .map_or(0, |g| g.alive_members().len())
    }
}
