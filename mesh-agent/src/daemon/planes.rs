//! The data planes of this host under one driver: the userspace proxy, and the VIP
//! addresses when this host can put VIPs on an interface. Otherwise VIPs are still
//! allocated and answered by DNS, and status says, once and clearly, why they are not
//! reachable here.

use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::plan::{DataplaneChoice, Host, PlaneKind};
use mesh_dataplane::{AddressPlane, Dataplane, Driver, DriverHandle, has_net_admin};
use mesh_ebpf::EbpfPlane;
use mesh_ebpf::config::PublishedPorts;
use mesh_nft::ruleset::TABLE;
use mesh_nft::{Conntrack, Nft, NftPlane};
use mesh_proxy::{ProxyMetrics, ProxyPlane};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Settings;
use super::errors::AgentError;

/// VIPs a previous run recorded and could not remove (it was killed) go now, even
/// though this run does not manage VIPs: nothing else would ever remove them.
async fn clear_stale(settings: &Settings, record: &std::path::Path) {
    let recorded = std::fs::read_to_string(record).unwrap_or_default();
    if recorded.trim().is_empty() || recorded.trim() == "[]" {
        return;
    }
    if !has_net_admin() {
        warn!(record = %record.display(), "a previous run left VIPs on an interface; without CAP_NET_ADMIN they stay");
        return;
    }
    match AddressPlane::open(&settings.vip.interface, record.to_path_buf()).await {
        Ok(mut plane) => plane.shutdown(std::time::Duration::ZERO).await,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "cannot remove the VIPs a previous run left")
        }
    }
}

/// The nftables plane, if it works here. `required`: the operator asked for it by
/// name, so failing stops the agent; otherwise the failure is logged as `fallback`,
/// which says what serves instead.
async fn nftables(
    settings: &Settings,
    required: bool,
    fallback: &str,
) -> Result<Option<Box<dyn Dataplane>>, AgentError> {
    match NftPlane::open(
        Nft::default(),
        Conntrack::default(),
        settings.proxy.keep_dataplane,
    )
    .await
    {
        Ok(plane) => {
            info!(
                dataplane = "nftables",
                "published ports are served by nftables (table inet mesh); services needing a userspace-only option stay in userspace"
            );
            Ok(Some(Box::new(plane)))
        }
        Err(e) if !required => {
            warn!(error = %crate::error_chain(&e), "{fallback}");
            Ok(None)
        }
        Err(e) => Err(AgentError::Dataplane {
            plane: "nftables",
            source: e,
        }),
    }
}

/// The plane beside the eBPF plane's kernel path for published ports, as
/// `ebpf.published_ports` says: nftables where it works (`fallback` says what serves
/// where it does not), or none, the userspace plane serving them.
async fn beside_ebpf(
    settings: &Settings,
    fallback: &str,
) -> Result<Option<Box<dyn Dataplane>>, AgentError> {
    match settings.ebpf.published_ports {
        PublishedPorts::Nftables => nftables(settings, false, fallback).await,
        PublishedPorts::Userspace => {
            userspace_beside().await;
            Ok(None)
        }
    }
}

/// `ebpf.published_ports = "userspace"`: no nftables plane. The nftables table a
/// previous run left (killed while nftables served published ports) goes: it would
/// go on taking them ahead of the plane now chosen.
async fn userspace_beside() {
    info!(
        "published ports are served by the userspace plane beside the kernel path (ebpf.published_ports = \"userspace\"): no nftables table, so no conntrack"
    );
    let nft = Nft::default();
    if !nft.has_table(TABLE).await.unwrap_or(false) {
        return;
    }
    match nft.delete_table(TABLE).await {
        Ok(()) => {
            info!(table = %format!("inet {TABLE}"), "removed the nftables table a previous run left")
        }
        Err(e) => {
            warn!(error = %e, table = %format!("inet {TABLE}"), "cannot remove the nftables table a previous run left; it still takes published ports")
        }
    }
}

/// The eBPF plane, if it works here, on the same terms as [`nftables`].
fn ebpf(
    settings: &Settings,
    metrics: &ProxyMetrics,
    required: bool,
    fallback: &str,
) -> Result<Option<Box<dyn Dataplane>>, AgentError> {
    match EbpfPlane::open(
        &settings.ebpf,
        settings.proxy.keep_dataplane,
        Some(metrics.connections()),
    ) {
        Ok(plane) => {
            info!(
                dataplane = "ebpf",
                cgroup = %plane.cgroup().display(),
                "VIPs are balanced at connect() by the eBPF plane"
            );
            Ok(Some(Box::new(plane)))
        }
        Err(e) if !required => {
            warn!(error = %e, "{fallback}");
            Ok(None)
        }
        Err(e) => Err(AgentError::Ebpf(e)),
    }
}

/// The kernel planes the settings ask for, as far as they work here. `nftables` and
/// `ebpf` that do not work stop the agent (the operator asked for them by name), except
/// that `ebpf` serves published ports with nftables only where nftables works. `auto`
/// takes eBPF for VIPs and nftables for the rest, and falls back with one line saying
/// why.
async fn kernel_planes(
    settings: &Settings,
    metrics: &ProxyMetrics,
) -> Result<Vec<Box<dyn Dataplane>>, AgentError> {
    let mut planes = Vec::new();
    match settings.proxy.dataplane {
        DataplaneChoice::Userspace => {}
        DataplaneChoice::Nftables => {
            planes.extend(nftables(settings, true, "").await?);
        }
        DataplaneChoice::Ebpf => {
            planes.extend(ebpf(settings, metrics, true, "")?);
            planes.extend(
                beside_ebpf(
                    settings,
                    "--dataplane ebpf: nftables does not work here; published ports are served by the userspace plane",
                )
                .await?,
            );
        }
        DataplaneChoice::Auto => {
            let mut ebpf_loaded = false;
            if !settings.vip.manage {
                info!(
                    "dataplane auto: VIPs are off (vip.manage = false or --no-vips), so the eBPF plane, which serves VIPs, is not loaded"
                );
            } else if let Some(plane) = ebpf(
                settings,
                metrics,
                false,
                "dataplane auto: the eBPF plane does not work here; VIPs are served by nftables or userspace",
            )? {
                planes.push(plane);
                ebpf_loaded = true;
            }
            let fallback = "dataplane auto: nftables does not work here; frontends are served by the userspace plane";
            // Without the eBPF plane, nftables also serves the VIPs: the setting
            // then has nothing to stand beside.
            planes.extend(if ebpf_loaded {
                beside_ebpf(settings, fallback).await?
            } else {
                nftables(settings, false, fallback).await?
            });
        }
    }
    Ok(planes)
}

pub async fn spawn(
    settings: &Settings,
    registry: &prometheus::Registry,
    metrics: ProxyMetrics,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
) -> Result<DriverHandle, AgentError> {
    let kernel = kernel_planes(settings, &metrics).await?;
    let proxy = ProxyPlane::new(settings.proxy.clone(), metrics);
    let mut host = Host {
        node: settings.node_name.clone(),
        ..Host::default()
    };
    // nftables serves published ports and VIPs; eBPF, when loaded, takes the VIPs.
    for plane in &kernel {
        let caps = plane.capabilities();
        match caps.serves {
            Some(PlaneKind::Nftables) => {
                host.plane = PlaneKind::Nftables;
                host.features = caps.features;
                if host.vip_plane != PlaneKind::Ebpf {
                    host.vip_plane = PlaneKind::Nftables;
                    host.vip_features = caps.features;
                }
            }
            Some(PlaneKind::Ebpf) => {
                host.vip_plane = PlaneKind::Ebpf;
                host.vip_features = caps.features;
            }
            _ => {}
        }
    }
    let socket_vips = host.vip_plane == PlaneKind::Ebpf;
    let record = settings.data_dir.join("vips-installed.json");
    let addresses = if !settings.vip.manage {
        clear_stale(settings, &record).await;
        Err("not managed (vip.manage = false or --no-vips)".to_string())
    } else if !has_net_admin() {
        let why = "not reachable on this host: the agent lacks CAP_NET_ADMIN to add them to an interface; DNS still answers with VIPs";
        warn!(
            "VIPs are {why}. Run the agent as root (or with CAP_NET_ADMIN), or set vip.manage = false to silence this."
        );
        Err(why.to_string())
    } else {
        AddressPlane::open(&settings.vip.interface, record)
            .await
            .map_err(|e| {
                let why = format!("not reachable: {}", crate::error_chain(&e));
                warn!("VIPs are {why}");
                why
            })
    };
    // Socket balancing needs no address on an interface: VIPs are served either way.
    host.serve_vips = addresses.is_ok() || socket_vips;
    let mut driver = Driver::new(host).metrics(registry)?.plane(Box::new(proxy));
    for plane in kernel {
        driver = driver.plane(plane);
    }
    let driver = match addresses {
        Ok(plane) => driver.plane(Box::new(plane)),
        Err(why) => driver.off("addresses", why),
    };
    Ok(driver.spawn(snapshots, stop, settings.proxy.shutdown_grace))
}
