//! One member: foca (SWIM) plus the replica it feeds. Sans-IO: inputs are datagrams,
//! timer events and local deltas, each with the current time; outputs collect in an
//! [`Outbox`].

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{Foca, Notification, PostcardCodec, Runtime, Timer};
use mesh_core::{Delta, Replica};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::broadcast::{DeltaHandler, encode};
use crate::identity::NodeIdentity;

#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// Expected cluster size; scales retransmissions and the suspicion timeout.
    pub cluster_size: u32,
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    /// Extra time a suspect gets to refute before it is declared down. Default:
    /// foca's LAN value, 4·max(1, log10 n)·probe_period.
    pub suspect_to_down_after: Option<Duration>,
    pub gossip_interval: Duration,
    pub gossip_fanout: usize,
    /// Largest datagram foca builds; leave room for the encryption envelope.
    pub max_packet_size: usize,
}

impl Default for GossipConfig {
    // memberlist's LAN defaults, as foca's `new_lan`.
    fn default() -> Self {
        Self {
            cluster_size: 16,
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            suspect_to_down_after: None,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            max_packet_size: 1_300,
        }
    }
}

impl GossipConfig {
    fn foca(&self) -> foca::Config {
        let mut c =
            foca::Config::new_lan(NonZeroU32::new(self.cluster_size.max(1)).expect("nonzero"));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        if let Some(d) = self.suspect_to_down_after {
            c.suspect_to_down_after = d;
        }
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_interval,
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).expect("nonzero"),
        });
        c.max_packet_size = NonZeroUsize::new(self.max_packet_size.max(512)).expect("nonzero");
        // Keep down members' identities so a returning host is recognised.
        c.remove_down_after = Some(Duration::from_secs(3_600));
        c
    }
}

/// What a node wants done after an input.
#[derive(Default)]
pub struct Outbox {
    pub sends: Vec<(SocketAddr, Vec<u8>)>,
    pub timers: Vec<(Duration, Timer<NodeIdentity>)>,
    /// Whether the replica changed: publish a new snapshot.
    pub changed: bool,
}

/// Lifeguard's local health multiplier, approximated from outside foca: while our
/// own probes keep failing we may be the slow one, so our timers stretch instead of
/// accusing others (shared/research/gossip.md §2.6).
#[derive(Default)]
struct LocalHealth {
    score: u32,
    failed_since_last_probe: bool,
    /// The member whose probe failed last. Repeated failures against one member mean
    /// that member is down; failures against different members point at us.
    last_failed: Option<std::net::SocketAddr>,
}

const MAX_HEALTH_SCORE: u32 = 8;

struct Io<'a> {
    outbox: &'a mut Outbox,
    replica: &'a Mutex<Replica>,
    health: &'a mut LocalHealth,
    now_ms: u64,
}

impl Runtime<NodeIdentity> for Io<'_> {
    fn notify(&mut self, notification: Notification<'_, NodeIdentity>) {
        let mut replica = self.replica.lock().unwrap_or_else(|p| p.into_inner());
        let before = replica.version();
        match notification {
            Notification::MemberUp(id) if !id.name.is_empty() => replica.member_up(&id.name),
            Notification::MemberDown(id) if !id.name.is_empty() => {
                replica.member_down(&id.name, self.now_ms)
            }
            Notification::ProbeFailed(_, member) => {
                self.health.failed_since_last_probe = true;
                if self
                    .health
                    .last_failed
                    .is_some_and(|prev| prev != member.addr)
                {
                    self.health.score = (self.health.score + 1).min(MAX_HEALTH_SCORE);
                }
                self.health.last_failed = Some(member.addr);
            }
            _ => {}
        }
        self.outbox.changed |= replica.version() != before;
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        self.outbox.sends.push((to.addr, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        let stretch = match event {
            Timer::ProbeRandomMember(_)
            | Timer::SendIndirectProbe { .. }
            | Timer::ChangeSuspectToDown { .. } => 1 + self.health.score,
            _ => 1,
        };
        self.outbox.timers.push((after * stretch, event));
    }
}

pub struct GossipNode {
    foca: Foca<NodeIdentity, PostcardCodec, StdRng, DeltaHandler>,
    config: GossipConfig,
    /// The cluster size foca's retransmissions and suspicion are tuned for.
    tuned_for: u32,
    replica: Arc<Mutex<Replica>>,
    clock: Arc<AtomicU64>,
    outbox: Outbox,
    health: LocalHealth,
}

impl GossipNode {
    pub fn new(
        identity: NodeIdentity,
        config: &GossipConfig,
        rng_seed: u64,
        replica: Arc<Mutex<Replica>>,
    ) -> Self {
        let clock = Arc::new(AtomicU64::new(0));
        let handler = DeltaHandler {
            replica: replica.clone(),
            now_ms: clock.clone(),
        };
        let foca = Foca::with_custom_broadcast(
            identity,
            config.foca(),
            StdRng::seed_from_u64(rng_seed),
            PostcardCodec,
            handler,
        );
        Self {
            foca,
            config: config.clone(),
            tuned_for: config.cluster_size.max(1),
            replica,
            clock,
            outbox: Outbox::default(),
            health: LocalHealth::default(),
        }
    }

    /// Retunes retransmissions and the suspicion timeout when the cluster has grown
    /// or shrunk by half since the last tuning: SWIM's log(n) rules need n.
    fn retune(&mut self) {
        let n = (self.foca.iter_members().count() as u32 + 1).max(self.config.cluster_size);
        if n > self.tuned_for * 2 || n * 2 < self.tuned_for {
            let config = GossipConfig {
                cluster_size: n,
                ..self.config.clone()
            };
            if self.foca.set_config(config.foca()).is_ok() {
                self.tuned_for = n;
            }
        }
    }

    pub fn identity(&self) -> &NodeIdentity {
        self.foca.identity()
    }

    pub fn replica(&self) -> &Arc<Mutex<Replica>> {
        &self.replica
    }

    fn run<T>(
        &mut self,
        now_ms: u64,
        f: impl FnOnce(&mut Foca<NodeIdentity, PostcardCodec, StdRng, DeltaHandler>, &mut Io<'_>) -> T,
    ) -> T {
        self.clock.store(now_ms, Ordering::Relaxed);
        let before = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .version();
        let mut io = Io {
            outbox: &mut self.outbox,
            replica: &self.replica,
            health: &mut self.health,
            now_ms,
        };
        let out = f(&mut self.foca, &mut io);
        let after = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .version();
        self.outbox.changed |= after != before;
        out
    }

    /// Starts gossip: foca's periodic timers, and an announce to each seed.
    pub fn start(&mut self, seeds: &[SocketAddr], now_ms: u64) {
        self.run(now_ms, |foca, io| {
            for seed in seeds {
                let _ = foca.announce(NodeIdentity::seed(*seed), &mut *io);
            }
        });
    }

    /// Announces to the seeds again (the agent retries until someone answers).
    pub fn announce(&mut self, seeds: &[SocketAddr], now_ms: u64) {
        self.start(seeds, now_ms);
    }

    pub fn handle_data(&mut self, data: &[u8], now_ms: u64) -> Result<(), foca::Error> {
        let r = self.run(now_ms, |foca, io| foca.handle_data(data, io));
        self.retune();
        r
    }

    pub fn handle_timer(&mut self, timer: Timer<NodeIdentity>, now_ms: u64) {
        if let Timer::ProbeRandomMember(_) = timer {
            // A probe period without a failed probe: we look healthy again.
            if !std::mem::take(&mut self.health.failed_since_last_probe) {
                self.health.score = self.health.score.saturating_sub(1);
            }
        }
        let _ = self.run(now_ms, |foca, io| foca.handle_timer(timer, io));
    }

    /// Disseminates local writes (already applied to the replica), sending at once.
    pub fn publish(&mut self, deltas: &[Delta], now_ms: u64) {
        if deltas.is_empty() {
            return;
        }
        self.run(now_ms, |foca, io| {
            for d in deltas {
                let _ = foca.add_broadcast(&encode(d));
            }
            let _ = foca.gossip(&mut *io);
        });
        self.outbox.changed = true;
    }

    /// Tells the cluster we are leaving: our tasks are withdrawn everywhere at once.
    pub fn leave(&mut self, now_ms: u64) {
        let leave = self
            .replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .leave();
        self.publish(&[leave], now_ms);
        self.run(now_ms, |foca, io| {
            let _ = foca.gossip(&mut *io);
            let _ = foca.leave_cluster(&mut *io);
        });
    }

    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Members and their SWIM state (alive, suspect, down).
    pub fn members(&self) -> Vec<(NodeIdentity, foca::State)> {
        self.foca
            .iter_membership_state()
            .map(|m| (m.id().clone(), m.state()))
            .collect()
    }

    /// Active members, the candidates for anti-entropy.
    pub fn alive_members(&self) -> Vec<NodeIdentity> {
        self.foca.iter_members().map(|m| m.id().clone()).collect()
    }

    /// Every member foca knows, with its state: sent along with anti-entropy so that
    /// membership heals as fast as data after a partition (memberlist's push-pull).
    pub fn membership(&self) -> Vec<foca::Member<NodeIdentity>> {
        self.foca.iter_membership_state().cloned().collect()
    }

    pub fn apply_membership(&mut self, members: Vec<foca::Member<NodeIdentity>>, now_ms: u64) {
        self.run(now_ms, |foca, io| {
            let _ = foca.apply_many(members.into_iter(), true, io);
        });
        self.retune();
    }

    pub fn health_score(&self) -> u32 {
        self.health.score
    }
}
