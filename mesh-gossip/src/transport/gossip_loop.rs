//! The task that drives the [`GossipNode`]: datagrams in and out over UDP, foca's
//! timers, local deltas from the table out, events from peers to the table, and an
//! anti-entropy round with a random member every `anti_entropy` (jittered).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foca::Timer;
use mesh_core::{Delta, MemberStatus};
use rand::RngExt;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info};

use super::members::MemberView;
use super::metrics::GossipMetrics;
use super::sync::{Roster, SYNC_TIMEOUT, SyncCtx};
use super::table::ToTable;
use super::{TransportConfig, allowed};
use crate::events::GossipEvent;
use crate::identity::NodeIdentity;
use crate::log_limit::LogLimit;
use crate::node::GossipNode;
use crate::versions::{VersionNote, Versions};

/// How often foca's suspects are looked at: adds at most this to the time a dead
/// host's tasks keep taking new connections.
const SUSPECT_POLL: Duration = Duration::from_millis(100);

/// How often (in 1 s ticks) a member declared down is announced to.
const RECONNECT_EVERY_TICKS: u64 = 10;

pub(super) struct GossipLoop {
    pub config: TransportConfig,
    pub udp: Arc<UdpSocket>,
    pub node: GossipNode,
    pub table: mpsc::Sender<ToTable>,
    pub metrics: GossipMetrics,
    pub sync: SyncCtx,
    pub roster_tx: watch::Sender<Roster>,
    pub views_tx: watch::Sender<Vec<MemberView>>,
    pub timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pub timer_seq: u64,
    pub pending: BTreeMap<u64, Timer<NodeIdentity>>,
    pub log: LogLimit,
    /// Hosts that announced a graceful leave, until they are seen alive again.
    pub left: BTreeSet<String>,
    /// Which mesh release each host runs, as anti-entropy exchanges tell it.
    pub versions: Versions,
}

pub(super) struct Inputs {
    pub deltas: mpsc::Receiver<Vec<Delta>>,
    pub learned: mpsc::Receiver<Roster>,
    pub stop: oneshot::Receiver<Delta>,
}

impl GossipLoop {
    pub async fn run(mut self, mut inputs: Inputs) {
        let seeds = self.config.seeds.clone();
        self.node.start(&seeds);
        self.flush().await;
        let mut buf = vec![0u8; 65_536];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut suspects = tokio::time::interval(SUSPECT_POLL);
        let ae = self.config.anti_entropy.max(Duration::from_millis(100));
        let mut next_sync = tokio::time::Instant::now() + ae;
        let mut unanswered = 0u32;
        let mut ticks = 0u64;
        let mut was_alone = true;
        loop {
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse((at, _))| tokio::time::Instant::from_std(*at));
            let timer_sleep = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = self.udp.recv_from(&mut buf) => {
                    let (n, src) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Never spin on a socket that keeps failing.
                            self.log.warn("udp-recv", || format!("gossip receive failed: {e}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    self.metrics.bytes_in.inc_by(n as u64);
                    if !allowed(&self.config, src.ip()) {
                        self.metrics.refused_peers.inc();
                        self.log.warn("refused", || format!("refused gossip from {src}: this agent has no cluster key, so it accepts no peer (set cluster.keys from `mesh keygen`, or pass --insecure)"));
                        continue;
                    }
                    match self.config.keyring.open(&buf[..n]) {
                        Ok(plain) => {
                            if let Err(e) = self.node.handle_data(&plain) {
                                debug!(%src, error = %e, "undecodable gossip");
                            }
                        }
                        Err(e) => {
                            self.metrics.auth_failures.inc();
                            self.log.warn("auth", || format!("dropped gossip from {src}: {e}"));
                        }
                    }
                }
                _ = timer_sleep => {
                    let now = Instant::now();
                    while let Some(Reverse((at, id))) = self.timers.peek().copied() {
                        if at > now { break }
                        self.timers.pop();
                        if let Some(t) = self.pending.remove(&id) {
                            self.node.handle_timer(t);
                        }
                    }
                }
                Some(d) = inputs.deltas.recv() => {
                    let deferred = self.node.publish(&d);
                    self.metrics.dropped_deltas.inc_by(deferred as u64);
                }
                _ = suspects.tick() => self.node.tick(super::wall_ms()),
                Some(r) = inputs.learned.recv() => {
                    self.node.apply_membership(r.members);
                    for note in r.versions {
                        self.versions.learn(note);
                    }
                }
                _ = tokio::time::sleep_until(next_sync) => {
                    let jitter = rand::rng().random_range(0.5..1.5);
                    next_sync = tokio::time::Instant::now() + ae.mul_f64(jitter);
                    self.sync_with_random_member();
                }
                _ = tick.tick() => {
                    if self.node.alive_members().is_empty() && !seeds.is_empty() {
                        // Keep knocking until a seed answers, and say why it may not.
                        self.node.announce(&seeds);
                        unanswered += 1;
                        if unanswered >= 5 {
                            let seeds = seeds.clone();
                            self.log.warn("no-seed", move || format!(
                                "no seed has answered yet ({seeds:?}); retrying. If this persists, check that cluster.keys and cluster.name match the cluster's"
                            ));
                        }
                    } else {
                        unanswered = 0;
                    }
                    ticks += 1;
                    if ticks.is_multiple_of(RECONNECT_EVERY_TICKS) {
                        self.node.reconnect(rand::rng().random_range(0..usize::MAX));
                    }
                    self.refresh_members();
                }
                leave = &mut inputs.stop => {
                    if let Ok(leave) = leave {
                        self.node.leave(leave);
                        self.flush().await;
                        info!("left the cluster");
                    }
                    return;
                }
            }
            self.flush().await;
            // A host alone gossips none of its writes: the first member to appear
            // gets them, and gives its own, by anti-entropy at once rather than at
            // the next round.
            let alone = !self.node.has_members();
            if was_alone && !alone {
                self.sync_with_random_member();
            }
            was_alone = alone;
        }
    }

    async fn flush(&mut self) {
        let out = self.node.take_outbox();
        for (to, data) in out.sends {
            let sealed = self.config.keyring.seal(&data);
            self.metrics.bytes_out.inc_by(sealed.len() as u64);
            let _ = self.udp.send_to(&sealed, to).await;
        }
        for (after, timer) in out.timers {
            self.timer_seq += 1;
            self.pending.insert(self.timer_seq, timer);
            self.timers
                .push(Reverse((Instant::now() + after, self.timer_seq)));
        }
        for event in out.events {
            match &event {
                GossipEvent::Delta(d) => {
                    // A leave from before the host's restart (a lower generation than
                    // the one we know) says nothing about the host now.
                    if let Delta::Leave { origin, generation } = d.as_ref()
                        && !self
                            .node
                            .members()
                            .iter()
                            .any(|(id, _)| id.name == *origin && id.generation > *generation)
                    {
                        self.left.insert(origin.clone());
                    }
                }
                GossipEvent::MemberUp(name) => {
                    self.left.remove(name);
                }
                _ => {}
            }
            // The table applies events in order; waiting here slows gossip down to
            // the table's pace instead of queueing without bound.
            if self.table.send(ToTable::Event(event)).await.is_err() {
                return;
            }
        }
    }

    fn refresh_members(&mut self) {
        let me = self.node.identity().clone();
        // foca may have renewed our identity (a new generation): the note follows it.
        self.versions.learn(VersionNote {
            host: me.name.clone(),
            generation: me.generation,
            version: self.config.version.clone(),
        });
        let members = self.node.members();
        // Once a second and per sync, so a set: a large cluster has many members.
        let known: std::collections::HashSet<&str> =
            members.iter().map(|(id, _)| id.name.as_str()).collect();
        self.versions
            .retain(|host| host == me.name || known.contains(host));
        self.roster_tx.send_replace(Roster {
            members: self.node.membership(),
            versions: self.versions.notes(),
        });
        let mut views = vec![MemberView {
            version: self.versions.of(&me.name, me.generation).map(String::from),
            name: me.name,
            addr: me.addr,
            generation: me.generation,
            status: MemberStatus::Alive,
        }];
        for (id, state) in members {
            if id.name.is_empty() {
                continue;
            }
            let status = match state {
                _ if self.left.contains(&id.name) => MemberStatus::Left,
                foca::State::Alive => MemberStatus::Alive,
                foca::State::Suspect => MemberStatus::Suspect,
                foca::State::Down => MemberStatus::Down,
            };
            views.push(MemberView {
                version: self.versions.of(&id.name, id.generation).map(String::from),
                name: id.name,
                addr: id.addr,
                generation: id.generation,
                status,
            });
        }
        self.metrics
            .members
            .set(views.iter().filter(|v| v.status.is_member()).count() as i64);
        self.metrics
            .broadcast_backlog
            .set(self.node.broadcast_backlog() as i64);
        for state in [
            MemberStatus::Alive,
            MemberStatus::Suspect,
            MemberStatus::Down,
            MemberStatus::Left,
        ] {
            let n = views.iter().filter(|v| v.status == state).count();
            self.metrics
                .members_by_state
                .with_label_values(&[&state.to_string()])
                .set(n as i64);
        }
        self.views_tx.send_replace(views);
    }

    fn sync_with_random_member(&mut self) {
        let members = self.node.alive_members();
        if members.is_empty() {
            return;
        }
        let peer = members[rand::rng().random_range(0..members.len())].addr;
        self.refresh_members();
        let ctx = self.sync.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(SYNC_TIMEOUT, ctx.initiate(peer)).await {
                Ok(Ok(())) => ctx.metrics.synced(),
                Ok(Err(e)) => debug!(%peer, error = %e, "anti-entropy failed"),
                Err(_) => debug!(%peer, "anti-entropy timed out"),
            }
        });
    }
}
