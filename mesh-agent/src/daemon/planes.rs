//! The data planes of this host under one driver: the userspace proxy, and the VIP
//! addresses when this host can put VIPs on an interface. Otherwise VIPs are still
//! allocated and answered by DNS, and status says, once and clearly, why they are not
//! reachable here.

use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::plan::{DataplaneChoice, Host, PlaneKind};
use mesh_dataplane::{AddressPlane, Dataplane, Driver, DriverHandle, has_net_admin};
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

/// The kernel plane the settings ask for, if it works here. `nftables` that does not
/// work stops the agent (the operator asked for it by name); `auto` falls back to
/// userspace with one line saying why.
async fn kernel_plane(settings: &Settings) -> Result<Option<Box<dyn Dataplane>>, AgentError> {
    let keep = settings.proxy.keep_dataplane;
    let choice = settings.proxy.dataplane;
    if choice == DataplaneChoice::Userspace {
        return Ok(None);
    }
    match NftPlane::open(Nft::default(), Conntrack::default(), keep).await {
        Ok(plane) => {
            info!(
                dataplane = "nftables",
                "frontends are served by nftables (table inet mesh); services needing a userspace-only option stay in userspace"
            );
            Ok(Some(Box::new(plane)))
        }
        Err(e) if choice == DataplaneChoice::Auto => {
            warn!(error = %crate::error_chain(&e), "dataplane auto: nftables does not work here; frontends are served by the userspace plane");
            Ok(None)
        }
        Err(e) => Err(AgentError::Dataplane {
            plane: "nftables",
            source: e,
        }),
    }
}

pub async fn spawn(
    settings: &Settings,
    metrics: ProxyMetrics,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
) -> Result<DriverHandle, AgentError> {
    let proxy = ProxyPlane::new(settings.proxy.clone(), metrics);
    let mut host = Host {
        node: settings.node_name.clone(),
        ..Host::default()
    };
    let kernel = kernel_plane(settings).await?;
    if let Some(plane) = &kernel {
        host.plane = plane.capabilities().serves.unwrap_or(PlaneKind::Userspace);
        host.features = plane.capabilities().features;
    }
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
    host.serve_vips = addresses.is_ok();
    let mut driver = Driver::new(host).plane(Box::new(proxy));
    if let Some(plane) = kernel {
        driver = driver.plane(plane);
    }
    let driver = match addresses {
        Ok(plane) => driver.plane(Box::new(plane)),
        Err(why) => driver.off("addresses", why),
    };
    Ok(driver.spawn(snapshots, stop, settings.proxy.shutdown_grace))
}
