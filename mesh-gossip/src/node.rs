//! One member: foca (SWIM) and the deltas it disseminates. Sans-IO: inputs are
//! datagrams, timer events and local deltas, each with the current time; outputs
//! collect in an [`Outbox`]: datagrams to send, timers to set, and [`GossipEvent`]s for
//! the table. The node owns no replica: whoever owns the table applies the events.

use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{Foca, Notification, PostcardCodec, Runtime, Timer};
use mesh_core::Delta;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::accusation::Accusations;
use crate::broadcast::{DeltaHandler, Inbox, encode, inbox};
use crate::events::GossipEvent;
use crate::identity::NodeIdentity;

/// Subjects remembered to tell news from echoes; a forgotten one is passed on once
/// more at worst. The capacity bounds a burst; the span bounds a steady churn.
const SEEN_CAPACITY: usize = 65_536;
/// Each subject is remembered for 5 to 10 minutes. A delta usually stops circulating
/// within seconds: at 1,000 hosts a host passes it on 19 times, piggybacked on every
/// message it sends (3 members every 100 ms, plus probes), about ten deltas to a full
/// 1.3 KB packet; a full backlog of [`MAX_BROADCAST_BACKLOG`] drains in about 4
/// minutes. One that outlives the span is taken for news once more and passed on
/// again; the replica refuses it as stale. Leaves are kept apart and never forgotten
/// this way ([`crate::broadcast::Seen`]).
const SEEN_SPAN_MS: u64 = 300_000;

/// Most deltas foca holds to pass on (about 300 bytes each). foca keeps a delta until
/// it has been sent its number of times, and only a newer delta about the same
/// subject replaces it: with no one to send to, or a churn faster than gossip, the
/// backlog would grow without end (the soak's one agent grew by ~470 bytes per task
/// change), and each addition scans it. Beyond the bound, new changes are left to
/// anti-entropy (a push-pull with a random member every few seconds, so O(log n)
/// rounds to reach everyone). The bound is checked before each addition, so a
/// packet's worth of relayed news, or a leave, may go a little past it. A host that
/// becomes alone keeps what it held, up to the bound, until it has members again.
pub const MAX_BROADCAST_BACKLOG: usize = 4_096;

#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// Expected cluster size; scales retransmissions and the suspicion timeout.
    pub cluster_size: u32,
    pub probe_period: Duration,
    pub probe_rtt: Duration,
    /// Members asked to probe on our behalf when a direct probe went unanswered. Each
    /// is an independent path; at 5% loss each path fails about one time in five.
    pub indirect_probes: usize,
    /// Extra time a suspect gets to refute before it is declared down. Default:
    /// 4·max(1, log10(n+1))·probe_period, n being the cluster's size but at least
    /// `cluster_size`: 1.48 s with the defaults (foca's LAN value is the same formula
    /// with a fixed 1 s period).
    pub suspect_to_down_after: Option<Duration>,
    /// How often a node with updates to pass on sends them to `gossip_fanout`
    /// members. foca sends nothing when it has nothing new, so a quiet cluster pays
    /// nothing for a short interval; a change (a suspicion above all) spreads by it.
    pub gossip_interval: Duration,
    pub gossip_fanout: usize,
    /// Largest datagram foca builds; leave room for the encryption envelope.
    pub max_packet_size: usize,
    /// Each node passes an update on ⌈mult·log10(n+1)⌉ times (n as above; 8 with the
    /// defaults). memberlist's RetransmitMult is the same idea, as mult·⌈log10(n+1)⌉.
    /// A host that hears of a suspicion only when the suspect is declared down routes
    /// to a dead host for seconds longer than the rest.
    pub retransmit_mult: f64,
    /// How long a member must stay suspect before its tasks stop taking new
    /// connections, in a cluster of up to 10 hosts: a suspicion raised by lost packets
    /// is usually refuted sooner. It grows by half per tenfold of the cluster's size
    /// ([`grace_ms`]).
    pub suspect_grace: Duration,
}

impl Default for GossipConfig {
    // foca's `new_lan` values, but for the probe timers and retransmissions.
    fn default() -> Self {
        Self {
            cluster_size: 16,
            // Tuned with `mesh-bench withdrawal` (bench/RESULTS.md) for a dead host
            // withdrawn in under 3 s at up to 1,000 hosts: probing every 300 ms finds
            // it sooner and bounds how long a host that missed the suspicion waits for
            // the down. Three times foca's LAN probing rate; about 1.5 KB a second
            // per host at 100 hosts (1.2 KB before). The ack gets 200 ms, more than foca's advice of under
            // half the period: on a busy host a short ack is the likelier false
            // suspicion, and the buddy system (crate::accusation) lets the accused
            // refute that within a round trip.
            probe_period: Duration::from_millis(300),
            probe_rtt: Duration::from_millis(200),
            indirect_probes: 5,
            suspect_to_down_after: None,
            // 100 ms, not 200: at 1,000 hosts the last host heard of a suspicion
            // sooner (withdrawal p99 3.39 s → 2.79 s over the same 20 crashes in
            // the simulator). A host with nothing new sends nothing more; with
            // changes, 100 hosts send 1.68 KB/s each instead of 1.45.
            gossip_interval: Duration::from_millis(100),
            gossip_fanout: 3,
            max_packet_size: 1_300,
            retransmit_mult: 6.0,
            suspect_grace: Duration::from_millis(350),
        }
    }
}

impl GossipConfig {
    fn foca(&self) -> foca::Config {
        let mut c =
            foca::Config::new_lan(NonZeroU32::new(self.cluster_size.max(1)).expect("nonzero"));
        let log_n = f64::from(self.cluster_size.saturating_add(1)).log10();
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = NonZeroUsize::new(self.indirect_probes.max(1)).expect("nonzero");
        // foca's LAN value assumes a 1 s probe period; this scales with ours.
        c.suspect_to_down_after = self
            .suspect_to_down_after
            .unwrap_or_else(|| self.probe_period.mul_f64(4.0 * log_n.max(1.0)));
        let tx = (self.retransmit_mult * log_n).ceil();
        // NaN (a nonsense multiplier) counts as once; infinity clamps to 255.
        let tx = if tx.is_nan() {
            1
        } else {
            tx.clamp(1.0, 255.0) as u8
        };
        c.max_transmissions = NonZeroU8::new(tx.max(1)).expect("at least 1");
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

/// How long a suspicion is held before its tasks are withdrawn, in a cluster of
/// `members`: `base` up to 10 hosts, then half as much again per tenfold. The grace
/// covers the lag between the suspicion reaching a host and the refutation reaching
/// it. The accused hears of its suspicion at once (the buddy system, see
/// [`crate::accusation`]), so that lag is the spread of two epidemics started a round
/// trip apart, which widens slowly with the cluster's size; without the buddy system
/// the accused first had to hear of it by gossip, and the grace grew as log10(n).
pub fn grace_ms(base: Duration, members: usize) -> u64 {
    let tens = (members.max(1) as f64).log10() - 1.0;
    (base.as_millis() as f64 * (1.0 + tens.max(0.0) / 2.0)) as u64
}

/// What a node wants done after an input.
#[derive(Default)]
pub struct Outbox {
    pub sends: Vec<(SocketAddr, Vec<u8>)>,
    pub timers: Vec<(Duration, Timer<NodeIdentity>)>,
    /// For the table, in the order they happened.
    pub events: Vec<GossipEvent>,
}

/// Lifeguard's local health multiplier (Dadgar et al., "Lifeguard: Local Health
/// Awareness for More Accurate Failure Detection", 2018), approximated from outside
/// foca: while our own probes keep failing we may be the slow one, so our timers
/// stretch instead of accusing others.
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
    inbox: &'a Mutex<Inbox>,
    health: &'a mut LocalHealth,
    accusations: &'a mut Accusations,
}

impl Io<'_> {
    fn event(&self, e: GossipEvent) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .events
            .push(e);
    }
}

impl Runtime<NodeIdentity> for Io<'_> {
    fn notify(&mut self, notification: Notification<'_, NodeIdentity>) {
        match notification {
            Notification::MemberUp(id) if !id.name.is_empty() => {
                self.event(GossipEvent::MemberUp(id.name.clone()))
            }
            Notification::MemberDown(id) if !id.name.is_empty() => {
                self.event(GossipEvent::MemberDown(id.name.clone()))
            }
            Notification::ProbeFailed(_, member) => {
                self.accusations.probe_failed(member);
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
    inbox: Arc<Mutex<Inbox>>,
    outbox: Outbox,
    health: LocalHealth,
    /// Members seen suspect, since when (ms), and whether the table was told.
    suspects: std::collections::HashMap<String, (u64, bool)>,
    /// Members our probes accused, told so directly.
    accusations: Accusations,
}

impl GossipNode {
    pub fn new(identity: NodeIdentity, config: &GossipConfig, rng_seed: u64) -> Self {
        let inbox = inbox(SEEN_CAPACITY, SEEN_SPAN_MS);
        let handler = DeltaHandler {
            inbox: inbox.clone(),
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
            inbox,
            outbox: Outbox::default(),
            health: LocalHealth::default(),
            suspects: std::collections::HashMap::new(),
            accusations: Accusations::default(),
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

    /// Runs foca with this node's runtime. foca itself keeps time through the timers
    /// it asks for, so `now` is not needed here.
    fn run<T>(
        &mut self,
        f: impl FnOnce(&mut Foca<NodeIdentity, PostcardCodec, StdRng, DeltaHandler>, &mut Io<'_>) -> T,
    ) -> T {
        let mut io = Io {
            outbox: &mut self.outbox,
            inbox: &self.inbox,
            health: &mut self.health,
            accusations: &mut self.accusations,
        };
        let out = f(&mut self.foca, &mut io);
        self.tell_suspects(false);
        let relay = self.foca.custom_broadcast_backlog() < MAX_BROADCAST_BACKLOG;
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        inbox.relay = relay;
        self.outbox.events.extend(std::mem::take(&mut inbox.events));
        drop(inbox);
        out
    }

    /// Starts gossip: foca's periodic timers, and an announce to each seed.
    pub fn start(&mut self, seeds: &[SocketAddr]) {
        self.run(|foca, io| {
            for seed in seeds {
                let _ = foca.announce(NodeIdentity::seed(*seed), &mut *io);
            }
        });
    }

    /// Announces to the seeds again (the agent retries until someone answers).
    pub fn announce(&mut self, seeds: &[SocketAddr]) {
        self.start(seeds);
    }

    pub fn handle_data(&mut self, data: &[u8]) -> Result<(), foca::Error> {
        let r = self.run(|foca, io| foca.handle_data(data, io));
        self.retune();
        r
    }

    pub fn handle_timer(&mut self, timer: Timer<NodeIdentity>) {
        if let Timer::ProbeRandomMember(_) = timer {
            // A probe period without a failed probe: we look healthy again.
            if !std::mem::take(&mut self.health.failed_since_last_probe) {
                self.health.score = self.health.score.saturating_sub(1);
            }
        }
        let _ = self.run(|foca, io| foca.handle_timer(timer, io));
    }

    /// Disseminates local writes (already applied to the table), sending at once.
    /// Returns how many were left to anti-entropy because the backlog was full
    /// ([`MAX_BROADCAST_BACKLOG`]). A host with no member to tell gossips nothing:
    /// whoever joins later gets the table by anti-entropy.
    pub fn publish(&mut self, deltas: &[Delta]) -> usize {
        if deltas.is_empty() || !self.has_members() {
            return 0;
        }
        self.run(|foca, io| {
            let mut deferred = 0;
            for d in deltas {
                if foca.custom_broadcast_backlog() >= MAX_BROADCAST_BACKLOG {
                    deferred += 1;
                } else {
                    let _ = foca.add_broadcast(&encode(d));
                }
            }
            let _ = foca.gossip(&mut *io);
            deferred
        })
    }

    /// Deltas foca holds to pass on.
    pub fn broadcast_backlog(&self) -> usize {
        self.foca.custom_broadcast_backlog()
    }

    /// Whether any member is active (alive or suspect): gossip has someone to tell.
    pub fn has_members(&self) -> bool {
        self.foca.num_members() > 0
    }

    /// Sends each member our probe just accused (or, with `retell`, one told fewer
    /// than [`crate::accusation::TELLS`] times) the news that it is suspect.
    fn tell_suspects(&mut self, retell: bool) {
        let due = self
            .accusations
            .due(self.foca.iter_membership_state(), retell);
        for m in due {
            let datagram = crate::accusation::encode(self.foca.identity(), &m);
            if !datagram.is_empty() {
                self.outbox.sends.push((m.id().addr, datagram));
            }
        }
    }

    /// The driver's periodic call, every few hundred milliseconds: suspicions are
    /// timed (below), and news seen long ago is forgotten ([`crate::broadcast::Seen`]).
    pub fn tick(&mut self, now_ms: u64) {
        self.poll_suspects(now_ms);
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen
            .age(now_ms);
    }

    /// Looks at which members foca holds suspect, at `now_ms`: one suspect for
    /// `suspect_grace` becomes a `MemberSuspect` event; one the table was told of that
    /// is alive again becomes a `MemberUp`. Foca raises no event for either. O(members).
    fn poll_suspects(&mut self, now_ms: u64) {
        let members = self.foca.iter_membership_state().len() + 1;
        let grace = grace_ms(self.config.suspect_grace, members);
        let mut seen = std::collections::HashSet::new();
        for m in self.foca.iter_membership_state() {
            let name = &m.id().name;
            if name.is_empty() {
                continue;
            }
            match m.state() {
                foca::State::Suspect => {
                    seen.insert(name.clone());
                    let entry = self.suspects.entry(name.clone()).or_insert((now_ms, false));
                    if !entry.1 && now_ms.saturating_sub(entry.0) >= grace {
                        entry.1 = true;
                        self.outbox
                            .events
                            .push(GossipEvent::MemberSuspect(name.clone()));
                    }
                }
                foca::State::Alive => {
                    if let Some((_, told)) = self.suspects.remove(name)
                        && told
                    {
                        self.outbox.events.push(GossipEvent::MemberUp(name.clone()));
                    }
                }
                foca::State::Down => {
                    self.suspects.remove(name);
                }
            }
        }
        self.suspects.retain(|n, _| seen.contains(n));
        self.tell_suspects(true);
    }

    /// Announces to one member declared down (`pick` chooses which), as Serf's
    /// reconnect does: a host that came back, or the far side of a healed partition,
    /// is found again even when no other message would reach it.
    pub fn reconnect(&mut self, pick: usize) {
        let down: Vec<SocketAddr> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == foca::State::Down && !m.id().name.is_empty())
            .map(|m| m.id().addr)
            .collect();
        if down.is_empty() {
            return;
        }
        let addr = down[pick % down.len()];
        self.run(|foca, io| {
            let _ = foca.announce(NodeIdentity::seed(addr), &mut *io);
        });
    }

    /// Tells the cluster we are leaving (`leave` is the table's `Delta::Leave`): our
    /// tasks are withdrawn everywhere at once.
    pub fn leave(&mut self, leave: Delta) {
        self.run(|foca, io| {
            // Past the backlog's bound too: no anti-entropy follows a leave. It
            // replaces our own pending task deltas ([`crate::broadcast::DeltaKey`]),
            // so it goes out first. Two rounds of gossip before foca's own reach
            // twice the members.
            let _ = foca.add_broadcast(&encode(&leave));
            let _ = foca.gossip(&mut *io);
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

    pub fn apply_membership(&mut self, members: Vec<foca::Member<NodeIdentity>>) {
        self.run(|foca, io| {
            let _ = foca.apply_many(members.into_iter(), true, io);
        });
        self.retune();
    }

    pub fn health_score(&self) -> u32 {
        self.health.score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_is_flat_to_ten_hosts_then_grows_by_half_per_tenfold() {
        let base = Duration::from_millis(350);
        assert_eq!(grace_ms(base, 0), 350);
        assert_eq!(grace_ms(base, 3), 350);
        assert_eq!(grace_ms(base, 10), 350);
        assert_eq!(grace_ms(base, 100), 525);
        assert_eq!(grace_ms(base, 1000), 700);
    }

    fn id(name: &str, port: u16) -> NodeIdentity {
        NodeIdentity {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            generation: 1,
        }
    }

    fn deleted(i: usize) -> Delta {
        Delta::Task {
            origin: "a".into(),
            generation: 1,
            version: i as u64 + 1,
            key: ("web".into(), format!("t{i}")),
            value: None,
        }
    }

    #[test]
    fn a_host_alone_holds_no_backlog() {
        let mut a = GossipNode::new(id("a", 1), &GossipConfig::default(), 1);
        a.start(&[]);
        for i in 0..10_000 {
            assert_eq!(a.publish(&[deleted(i)]), 0);
        }
        assert_eq!(a.broadcast_backlog(), 0);
    }

    #[test]
    fn the_backlog_stops_at_its_bound_and_the_rest_is_left_to_anti_entropy() {
        let mut a = GossipNode::new(id("a", 1), &GossipConfig::default(), 1);
        a.start(&[]);
        a.apply_membership(vec![foca::Member::alive(id("b", 2))]);
        // A burst faster than gossip: each round of sends passes on about ten.
        let burst: Vec<Delta> = (0..10_000).map(deleted).collect();
        let deferred = a.publish(&burst);
        assert!(
            a.broadcast_backlog() <= MAX_BROADCAST_BACKLOG,
            "backlog {}",
            a.broadcast_backlog()
        );
        assert!(deferred > 0, "nothing was left to anti-entropy");
        assert_eq!(deferred + a.broadcast_backlog(), 10_000);
        // A leave goes out first whatever the backlog: b, a real node, hears it from
        // the first datagrams a sends.
        let mut b = GossipNode::new(id("b", 2), &GossipConfig::default(), 2);
        b.start(&[]);
        let _ = a.take_outbox();
        let leave = Delta::Leave {
            origin: "a".into(),
            generation: 1,
        };
        a.leave(leave.clone());
        for (to, data) in a.take_outbox().sends {
            if to == id("b", 2).addr {
                let _ = b.handle_data(&data);
            }
        }
        let heard = b.take_outbox().events;
        let first = heard.iter().find_map(|e| match e {
            GossipEvent::Delta(d) => Some(d.as_ref()),
            _ => None,
        });
        assert_eq!(first, Some(&leave), "the leave is the first thing b hears");
        assert!(
            a.broadcast_backlog() <= 1,
            "the leave replaced a's own pending deltas: {} left",
            a.broadcast_backlog()
        );
    }
}
