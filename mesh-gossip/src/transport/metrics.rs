//! Prometheus metrics of gossip and anti-entropy.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Registry};

#[derive(Clone)]
pub struct GossipMetrics {
    pub auth_failures: IntCounter,
    pub refused_peers: IntCounter,
    pub members: IntGauge,
    /// Members (this host included) by state: alive, suspect, down, left.
    pub members_by_state: IntGaugeVec,
    pub bytes_out: IntCounter,
    pub bytes_in: IntCounter,
    pub syncs: IntCounter,
    /// When the last anti-entropy exchange completed, in seconds since the epoch (0:
    /// never): an alert can watch its age.
    pub last_sync: IntGauge,
    /// Local deltas dropped because gossip was behind; anti-entropy repairs them.
    pub dropped_deltas: IntCounter,
    /// Deltas waiting to be passed on by gossip (bounded, see
    /// [`crate::node::MAX_BROADCAST_BACKLOG`]).
    pub broadcast_backlog: IntGauge,
}

impl GossipMetrics {
    pub fn new(prom: &Registry) -> prometheus::Result<Self> {
        let counter = |n: &str, h: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(n, h)?;
            prom.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let members = IntGauge::new(
            "mesh_gossip_members",
            "Cluster members this host sees alive, itself included",
        )?;
        prom.register(Box::new(members.clone()))?;
        let members_by_state = IntGaugeVec::new(
            prometheus::Opts::new(
                "mesh_gossip_members_by_state",
                "Cluster members this host knows, itself included, by state",
            ),
            &["state"],
        )?;
        prom.register(Box::new(members_by_state.clone()))?;
        let last_sync = IntGauge::new(
            "mesh_gossip_last_sync_timestamp_seconds",
            "When the last anti-entropy exchange completed (seconds since the epoch; 0: never)",
        )?;
        prom.register(Box::new(last_sync.clone()))?;
        let broadcast_backlog = IntGauge::new(
            "mesh_gossip_broadcast_backlog",
            "Changes waiting to be passed on by gossip (new ones stop at 4096; beyond, anti-entropy carries them)",
        )?;
        prom.register(Box::new(broadcast_backlog.clone()))?;
        Ok(Self {
            broadcast_backlog,
            members_by_state,
            last_sync,
            auth_failures: counter(
                "mesh_gossip_auth_failures_total",
                "Gossip packets and sync frames dropped: wrong key, wrong cluster or unencrypted",
            )?,
            refused_peers: counter(
                "mesh_gossip_refused_peers_total",
                "Packets from non-loopback peers refused for lack of a cluster key",
            )?,
            members,
            bytes_out: counter("mesh_gossip_bytes_sent_total", "Gossip and sync bytes sent")?,
            bytes_in: counter(
                "mesh_gossip_bytes_received_total",
                "Gossip and sync bytes received",
            )?,
            syncs: counter(
                "mesh_gossip_syncs_total",
                "Anti-entropy exchanges completed",
            )?,
            dropped_deltas: counter(
                "mesh_gossip_dropped_deltas_total",
                "Local changes not gossiped because gossip was behind (anti-entropy delivers them)",
            )?,
        })
    }
}

impl GossipMetrics {
    /// Counts a completed anti-entropy exchange and stamps its time.
    pub fn synced(&self) {
        self.syncs.inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_sync.set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}
