//! DNS: bound before anything starts (a busy port, or an interface in `dns.listen`
//! that is missing or has no address, fails the start with a clear error), then kept
//! in step with the snapshots.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures_util::TryStreamExt;
use mesh_core::Snapshot;
use mesh_dns::config::{InterfaceAddr, ResolvedInterface, Skipped};
use mesh_dns::{DnsConfig, DnsMetrics, DnsServer};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::AgentError;

pub struct BoundDns {
    server: Arc<DnsServer>,
    bound: mesh_dns::server::Bound,
}

pub async fn bind(
    config: &DnsConfig,
    prom: &prometheus::Registry,
) -> Result<Option<BoundDns>, AgentError> {
    if !config.serves() {
        return Ok(None);
    }
    // Everything below (the zone's name servers, the forwarders that are not
    // ourselves, the sockets, the access list) uses the resolved addresses.
    let config = resolve_interfaces(config).await?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = config.upstreams_or_resolv_conf(&resolv);
    if upstreams.is_empty() {
        warn!(
            "DNS has no upstream resolvers (none in /etc/resolv.conf or dns.upstreams): names outside the mesh get SERVFAIL"
        );
    }
    let listen = config.listen.clone();
    let server = DnsServer::new(config, upstreams, DnsMetrics::new(prom)?);
    let bound = server
        .bind()
        .await
        .map_err(|source| AgentError::Dns { listen, source })?;
    Ok(Some(BoundDns { server, bound }))
}

/// `config` with the interfaces named in `dns.listen` replaced by their addresses,
/// and their subnets allowed; logs one line per interface.
async fn resolve_interfaces(config: &DnsConfig) -> Result<DnsConfig, AgentError> {
    if config.listen_interfaces.is_empty() {
        return Ok(config.clone());
    }
    let failed = |source| AgentError::Dns {
        listen: config.listen.clone(),
        source,
    };
    let host = interface_addrs().await.map_err(failed)?;
    let (resolved, interfaces) = config
        .resolve_interfaces(&host)
        .map_err(|e| AgentError::DnsListen(e.within("dns")))?;
    for interface in &interfaces {
        log_interface(interface);
    }
    Ok(resolved)
}

fn log_interface(i: &ResolvedInterface) {
    let list = |items: Vec<String>| items.join(",");
    let addresses = list(i.listen.iter().map(ToString::to_string).collect());
    let allowed = list(i.subnets.iter().map(ToString::to_string).collect());
    if i.skipped.is_empty() {
        info!(interface = %i.name, %addresses, %allowed, "DNS serves on the interface's addresses and allows its subnets");
    } else {
        let skipped = list(
            i.skipped
                .iter()
                .map(|(ip, why)| format!("{ip}({why})"))
                .collect(),
        );
        info!(interface = %i.name, %addresses, %allowed, %skipped, "DNS serves on the interface's addresses and allows its subnets");
    }
    for (ip, why) in &i.skipped {
        if *why == Skipped::Tentative {
            warn!(interface = %i.name, %ip, "no DNS on this IPv6 address: duplicate address detection has not finished (a bridge without carrier, such as docker0 with no container, keeps it tentative); restart the agent once it has");
        }
    }
}

/// The addresses of every interface of this host (network namespace), by name; an
/// interface without addresses maps to an empty list.
///
/// Read over rtnetlink (already a dependency, for the VIP plane) rather than with
/// getifaddrs(3): a netlink address dump carries each address's flags, and an IPv6
/// address that is still tentative (duplicate address detection not done, as on
/// docker0 while no container is attached, since the bridge has no carrier) cannot
/// be bound; getifaddrs does not say which addresses those are.
async fn interface_addrs() -> std::io::Result<HashMap<String, Vec<InterfaceAddr>>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let result = async {
        let mut names = HashMap::new();
        let mut links = handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(std::io::Error::other)? {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            });
            if let Some(name) = name {
                names.insert(link.header.index, name);
            }
        }
        let mut by_name: HashMap<String, Vec<InterfaceAddr>> = names
            .values()
            .map(|name| (name.clone(), Vec::new()))
            .collect();
        let mut addrs = handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(std::io::Error::other)? {
            let Some(name) = names.get(&msg.header.index) else {
                continue;
            };
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
            // point-to-point link, and the same as IFA_LOCAL (or alone, for IPv6)
            // otherwise.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            let Some(ip): Option<IpAddr> = local.or(address) else {
                continue;
            };
            // The 32-bit IFA_FLAGS, when the kernel sends it, supersedes the header's.
            let tentative = match msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            }) {
                Some(f) => f.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed),
                None => msg
                    .header
                    .flags
                    .intersects(AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed),
            };
            if let Some(list) = by_name.get_mut(name) {
                list.push(InterfaceAddr {
                    ip,
                    prefix: msg.header.prefix_len,
                    tentative,
                });
            }
        }
        Ok(by_name)
    }
    .await;
    drop(handle);
    connection.abort();
    result
}

/// Serves DNS until `stop`; returns the addresses it serves on.
pub fn serve(
    dns: BoundDns,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Vec<SocketAddr> {
    let addrs = dns.bound.local_addrs();
    dns.server.update(&snapshots.borrow_and_update());
    let updater = dns.server.clone();
    let update_stop = stop.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                r = snapshots.changed() => if r.is_err() { break },
                _ = update_stop.cancelled() => break,
            }
            let snapshot = snapshots.borrow_and_update().clone();
            updater.update(&snapshot);
        }
    });
    tasks.spawn(dns.server.serve(dns.bound, stop));
    addrs
}
