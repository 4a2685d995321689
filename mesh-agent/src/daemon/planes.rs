//! The data planes of this host under one driver: the userspace proxy, and the VIP
//! addresses when this host can put VIPs on an interface. Otherwise VIPs are still
//! allocated and answered by DNS, and status says, once and clearly, why they are not
//! reachable here.

use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::plan::Host;
use mesh_dataplane::{AddressPlane, Driver, DriverHandle, has_net_admin};
use mesh_proxy::{ProxyMetrics, ProxyPlane};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Settings;

pub async fn spawn(
    settings: &Settings,
    metrics: ProxyMetrics,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stop: CancellationToken,
) -> DriverHandle {
    let proxy = ProxyPlane::new(settings.proxy.clone(), metrics);
    let mut host = Host::default();
    let record = settings.data_dir.join("vips-installed.json");
    let addresses = if !settings.vip.manage {
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
    let driver = Driver::new(host).plane(Box::new(proxy));
    let driver = match addresses {
        Ok(plane) => driver.plane(Box::new(plane)),
        Err(why) => driver.off("addresses", why),
    };
    driver.spawn(snapshots, stop, settings.proxy.shutdown_grace)
}
