//! Puts service VIPs on an interface (`lo`) through netlink, so connections to
//! VIP:port reach this host's VIP listeners. An address is removed once its service
//! is gone and the service's drain_timeout has passed, and all of them at shutdown.
//! The addresses this agent added are recorded in the data dir, so a restart after a
//! crash removes the ones no longer wanted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures_util::TryStreamExt;
use rtnetlink::{AddressMessageBuilder, Handle};
use tracing::{debug, info, warn};

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

pub struct VipInterface {
    handle: Handle,
    index: u32,
    name: String,
    /// Addresses this agent put on the interface.
    installed: BTreeSet<IpAddr>,
    /// Addresses waiting for their drain deadline before removal.
    pending: BTreeMap<IpAddr, Instant>,
    record: PathBuf,
}

impl VipInterface {
    pub async fn open(interface: &str, record: PathBuf) -> Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("cannot open a netlink socket")?;
        tokio::spawn(connection);
        let link = handle
            .link()
            .get()
            .match_name(interface.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| anyhow!("interface {interface:?}: {e}"))?
            .ok_or_else(|| anyhow!("interface {interface:?} not found"))?;
        let previous: BTreeSet<IpAddr> = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let mut me = Self {
            handle,
            index: link.header.index,
            name: interface.to_string(),
            installed: previous,
            pending: BTreeMap::new(),
            record,
        };
        // Whatever a previous run left is removed unless the first reconcile wants it.
        let now = Instant::now();
        me.pending = me.installed.iter().map(|ip| (*ip, now)).collect();
        Ok(me)
    }

    fn message(&self, ip: IpAddr) -> rtnetlink::packet_route::address::AddressMessage {
        match ip {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(self.index)
                .address(v4, 32)
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(self.index)
                .address(v6, 128)
                .build(),
        }
    }

    async fn add(&mut self, ip: IpAddr) -> Result<()> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        match self
            .handle
            .address()
            .add(self.index, ip, prefix)
            .execute()
            .await
        {
            Ok(()) => {
                info!(vip = %ip, interface = %self.name, "VIP added");
                self.installed.insert(ip);
                Ok(())
            }
            // Already there: ours from a previous run (recorded), or someone else's,
            // which we then leave alone.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(anyhow!("cannot add VIP {ip} to {}: {e}", self.name)),
        }
    }

    async fn remove(&mut self, ip: IpAddr) {
        match self.handle.address().del(self.message(ip)).execute().await {
            Ok(()) => info!(vip = %ip, interface = %self.name, "VIP removed"),
            Err(e) => debug!(vip = %ip, error = %e, "VIP was already gone"),
        }
        self.installed.remove(&ip);
    }

    /// Adds wanted addresses now; schedules unwanted ones for removal after `drain`.
    pub async fn reconcile(
        &mut self,
        wanted: &BTreeMap<IpAddr, Duration>,
        now: Instant,
    ) -> Result<()> {
        let mut first_error = None;
        for ip in wanted.keys() {
            self.pending.remove(ip);
            if !self.installed.contains(ip)
                && let Err(e) = self.add(*ip).await
            {
                first_error.get_or_insert(e);
            }
        }
        let unwanted: Vec<IpAddr> = self
            .installed
            .iter()
            .filter(|ip| !wanted.contains_key(ip))
            .copied()
            .collect();
        for ip in unwanted {
            self.pending.entry(ip).or_insert(now);
        }
        let due: Vec<IpAddr> = self
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.pending.remove(&ip);
            self.remove(ip).await;
        }
        self.save();
        first_error.map_or(Ok(()), Err)
    }

    /// Delays the removal of `ip` until `at`, for connections still draining.
    pub fn delay_removal(&mut self, ip: IpAddr, at: Instant) {
        if self.installed.contains(&ip) {
            let entry = self.pending.entry(ip).or_insert(at);
            *entry = (*entry).max(at);
        }
    }

    pub async fn clear(&mut self) {
        let all: Vec<IpAddr> = self.installed.iter().copied().collect();
        for ip in all {
            self.remove(ip).await;
        }
        self.pending.clear();
        self.save();
    }

    fn save(&self) {
        let tmp = self.record.with_extension("tmp");
        let text = serde_json::to_string(&self.installed).expect("json");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.record))
        {
            warn!(error = %e, path = %self.record.display(), "cannot record installed VIPs");
        }
    }
}
