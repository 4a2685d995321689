//! One benchmark run's network: client | LB | backend, three fresh namespaces joined by
//! veth, addressed from 198.18.0.0/15 (RFC 2544's benchmarking block). Fresh per run,
//! so TIME_WAIT sockets and conntrack entries of one run never slow the next.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};
use integration::netns::Netns;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The LB's address on the client side: where every proxy listens.
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LB_BACKEND_SIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);

/// The CPU the load balancer gets to itself; client and backend share the other.
pub const LB_CPU: &str = "1";
pub const LOAD_CPU: &str = "0";

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backend: Netns,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Topology {
    pub fn create() -> Result<Topology> {
        let t = Topology {
            client: Netns::new(),
            lb: Netns::new(),
            backend: Netns::new(),
        };
        let (c, l, b) = (&t.client.name, &t.lb.name, &t.backend.name);
        t.lb.add_veth("to-client", &t.client, "eth0")
            .map_err(anyhow::Error::msg)?;
        t.lb.add_veth("to-backend", &t.backend, "eth0")
            .map_err(anyhow::Error::msg)?;
        for (ns, dev, addr) in [
            (c, "eth0", format!("{CLIENT_IP}/24")),
            (l, "to-client", format!("{LB_IP}/24")),
            (l, "to-backend", format!("{LB_BACKEND_SIDE_IP}/24")),
            (b, "eth0", format!("{BACKEND_IP}/24")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            c,
            "route",
            "add",
            "default",
            "via",
            &LB_IP.to_string(),
        ])?;
        ip(&[
            "-n",
            b,
            "route",
            "add",
            "default",
            "via",
            &LB_BACKEND_SIDE_IP.to_string(),
        ])?;
        // The same socket limits in every namespace, so no target is starved of ports
        // or backlog; forwarding in the LB namespace is the "direct" path.
        for ns in [&t.client, &t.lb, &t.backend] {
            let out = ns
                .command("sysctl")
                .args([
                    "-qw",
                    "net.ipv4.ip_local_port_range=1024 65535",
                    "net.ipv4.tcp_tw_reuse=1",
                    "net.core.somaxconn=8192",
                    "net.ipv4.tcp_max_syn_backlog=8192",
                    "net.ipv4.ip_forward=1",
                ])
                .output()
                .context("run sysctl")?;
            if !out.status.success() {
                bail!(
                    "sysctl in {}: {}",
                    ns.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(t)
    }
}

pub fn lb_addr(port: u16) -> std::net::SocketAddr {
    (IpAddr::V4(LB_IP), port).into()
}

pub fn backend_addr(port: u16) -> std::net::SocketAddr {
    (IpAddr::V4(BACKEND_IP), port).into()
}
