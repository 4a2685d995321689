//! The VIP-address plane: puts the plan's addresses on an interface (`lo`) over
//! netlink, so connections to VIP:port reach this host's VIP listeners. An address
//! stays for its service's `drain_timeout` after the plan drops it, so draining
//! connections keep their destination; at shutdown all of them go. The addresses
//! this agent added are recorded in a file, so a restart after a crash removes the
//! ones no longer wanted. An address that could not be added is retried.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use mesh_core::plan::{Address, Change, Features};
use mesh_core::{FrontendKey, Plan, PlanChange};
use rtnetlink::{AddressMessageBuilder, Handle};
use tracing::{debug, info, warn};

use crate::plane::{ApplyReport, Capabilities, Dataplane, PlaneError, PlaneStats, Target};

/// How long a failed address waits before it is tried again.
const RETRY: Duration = Duration::from_secs(5);

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

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("interface {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
}

pub struct AddressPlane {
    handle: Handle,
    index: u32,
    interface: String,
    /// Addresses this agent put on the interface.
    installed: BTreeSet<IpAddr>,
    /// What the plan wants, with the drain each address gets when dropped.
    wanted: BTreeMap<IpAddr, Address>,
    /// Addresses waiting for their drain deadline before removal.
    pending: BTreeMap<IpAddr, Instant>,
    /// Addresses that could not be added, with the error, until the next retry.
    failed: BTreeMap<IpAddr, String>,
    retry_at: Option<Instant>,
    record: PathBuf,
    /// Lines in the record file, to know when to rewrite it.
    record_lines: usize,
}

impl AddressPlane {
    /// Opens `interface`. Addresses recorded in `record` by a previous run are removed
    /// at the first deadline unless the first plan wants them.
    pub async fn open(interface: &str, record: PathBuf) -> Result<Self, OpenError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(OpenError::Netlink)?;
        tokio::spawn(connection);
        let link = handle
            .link()
            .get()
            .match_name(interface.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|source| match source {
                rtnetlink::Error::NetlinkError(ref e) if e.raw_code() == -libc::ENODEV => {
                    OpenError::NoInterface(interface.to_string())
                }
                source => OpenError::Lookup {
                    name: interface.to_string(),
                    source,
                },
            })?
            .ok_or_else(|| OpenError::NoInterface(interface.to_string()))?;
        // One address per line; an older agent wrote a JSON list, read too.
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let previous: BTreeSet<IpAddr> = serde_json::from_str(&text)
            .unwrap_or_else(|_| text.lines().filter_map(|l| l.trim().parse().ok()).collect());
        let now = Instant::now();
        Ok(Self {
            handle,
            index: link.header.index,
            interface: interface.to_string(),
            pending: previous.iter().map(|ip| (*ip, now)).collect(),
            installed: previous,
            wanted: BTreeMap::new(),
            failed: BTreeMap::new(),
            retry_at: None,
            record_lines: text.lines().count(),
            record,
        })
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

    async fn add(&mut self, ip: IpAddr, now: Instant) {
        self.note(ip);
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        match self
            .handle
            .address()
            .add(self.index, ip, prefix)
            .execute()
            .await
        {
            Ok(()) => {
                info!(vip = %ip, interface = %self.interface, "VIP added");
                self.installed.insert(ip);
                self.failed.remove(&ip);
            }
            // Already there: ours from a previous run (recorded), or someone else's,
            // which we then leave alone.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                self.failed.remove(&ip);
            }
            Err(e) => {
                let error = format!("cannot add it to {}: {e}", self.interface);
                if self.failed.insert(ip, error.clone()).is_none() {
                    warn!(vip = %ip, %error, "VIP not reachable; retrying");
                }
                self.retry_at.get_or_insert(now + RETRY);
            }
        }
    }

    async fn remove(&mut self, ip: IpAddr) {
        match self.handle.address().del(self.message(ip)).execute().await {
            Ok(()) => info!(vip = %ip, interface = %self.interface, "VIP removed"),
            Err(e) => debug!(vip = %ip, error = %e, "VIP was already gone"),
        }
        self.installed.remove(&ip);
    }

    /// Records `ip` before it is added.
    fn note(&mut self, ip: IpAddr) {
        if self.record_lines > 2 * self.installed.len() + 64 {
            self.rewrite();
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.record)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{ip}\n").as_bytes()));
        match appended {
            Ok(()) => self.record_lines += 1,
            Err(e) => {
                warn!(error = %e, path = %self.record.display(), "cannot record a VIP; a crash now may leave it on the interface")
            }
        }
    }

    /// Rewrites the record with just the installed addresses.
    fn rewrite(&mut self) {
        let tmp = self.record.with_extension("tmp");
        let text: String = self.installed.iter().map(|ip| format!("{ip}\n")).collect();
        match std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &self.record)) {
            Ok(()) => self.record_lines = self.installed.len(),
            Err(e) => {
                warn!(error = %e, path = %self.record.display(), "cannot record installed VIPs")
            }
        }
    }

    fn report(&self) -> ApplyReport {
        ApplyReport {
            errors: self
                .failed
                .iter()
                .map(|(ip, error)| PlaneError {
                    target: Target::Address(*ip),
                    service: None,
                    error: error.clone(),
                })
                .collect(),
        }
    }
}

#[async_trait::async_trait]
impl Dataplane for AddressPlane {
    fn name(&self) -> &'static str {
        "addresses"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            serves: None,
            features: Features::default(),
            addresses: true,
        }
    }

    fn detail(&self) -> String {
        if self.failed.is_empty() {
            format!("reachable on {}", self.interface)
        } else {
            format!(
                "partly reachable on {}: {} VIPs not added (retrying)",
                self.interface,
                self.failed.len()
            )
        }
    }

    fn preflight(&self, _frontends: &[FrontendKey]) -> Vec<PlaneError> {
        Vec::new()
    }

    async fn apply(&mut self, plan: &Plan, changes: &[PlanChange], now: Instant) -> ApplyReport {
        for change in changes {
            let PlanChange::Address(ip, change) = change else {
                continue;
            };
            match change {
                Change::Added | Change::Updated => {
                    let Some(address) = plan.addresses.get(ip) else {
                        continue;
                    };
                    self.wanted.insert(*ip, *address);
                    self.pending.remove(ip);
                    if !self.installed.contains(ip) {
                        self.add(*ip, now).await;
                    }
                }
                Change::Removed => {
                    self.failed.remove(ip);
                    if let Some(address) = self.wanted.remove(ip)
                        && self.installed.contains(ip)
                    {
                        let at = now + address.drain_timeout;
                        let due = self.pending.entry(*ip).or_insert(at);
                        *due = (*due).max(at);
                    }
                }
            }
        }
        self.report()
    }

    fn stats(&self) -> PlaneStats {
        PlaneStats::default()
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().copied().chain(self.retry_at).min()
    }

    async fn on_deadline(&mut self, now: Instant) -> ApplyReport {
        let due: Vec<IpAddr> = self
            .pending
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in due {
            self.pending.remove(&ip);
            if !self.wanted.contains_key(&ip) {
                self.remove(ip).await;
            }
        }
        if self.retry_at.is_some_and(|at| at <= now) {
            self.retry_at = None;
            let retry: Vec<IpAddr> = self.failed.keys().copied().collect();
            for ip in retry {
                self.add(ip, now).await;
            }
        }
        self.report()
    }

    async fn shutdown(&mut self, _grace: Duration) {
        let all: Vec<IpAddr> = self.installed.iter().copied().collect();
        for ip in all {
            self.remove(ip).await;
        }
        self.pending.clear();
        self.rewrite();
    }
}
