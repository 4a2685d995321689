//! One benchmark run's network: client | LB | backend, three fresh namespaces joined by
//! veth, addressed from 198.18.0.0/15 (RFC 2544's benchmarking block). Fresh per run,
//! so TIME_WAIT sockets and conntrack entries of one run never slow the next.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, Result, bail};
use integration::ebpf::{Cgroup, PinDir};
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
    /// For the eBPF plane: the cgroup its socket programs act on, where the client's
    /// processes start; where the agent pins them; and the agent's own namespace.
    pub ebpf: Option<(Cgroup, PinDir, Netns)>,
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
            ebpf: None,
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
        // Packets a veth receives are processed in softirq on the CPU that sent them,
        // so the LB namespace's kernel work (forwarding, conntrack, NAT) would land on
        // the load CPU and be invisible. RPS hands the LB's receive processing to the
        // LB's CPU, as a real LB host's NIC interrupts would: every target's kernel
        // cost is then counted on the LB's CPU (see `cpu_busy_seconds`).
        let mask = format!("{:x}", 1u32 << LB_CPU.parse::<u32>().context("LB_CPU")?);
        for dev in ["to-client", "to-backend"] {
            let path = format!("/sys/class/net/{dev}/queues/rx-0/rps_cpus");
            let out =
                t.lb.command("sh")
                    .args(["-c", &format!("echo {mask} > {path}")])
                    .output()
                    .context("run sh")?;
            if !out.status.success() {
                bail!(
                    "steer {dev}'s receive processing to CPU {LB_CPU} ({path}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(t)
    }
}

/// Time CPU `cpu` spent busy (user, nice, system, irq, softirq; not idle or iowait),
/// from /proc/stat, in seconds. It counts whatever ran there: the pinned LB process
/// and the LB namespace's packet processing alike.
pub fn cpu_busy_seconds(cpu: &str) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("/proc/stat has no {label} line"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(busy as f64 / hz.max(1) as f64)
}

impl Topology {
    /// `program args` in the client namespace, pinned to `cpu`, inside the eBPF
    /// cgroup when there is one.
    pub fn client_command(&self, cpu: &str, program: &str, args: &[&str]) -> Command {
        let mut c = crate::process::pinned(&self.client, cpu, program, args);
        if let Some((cgroup, _, _)) = &self.ebpf {
            cgroup.enter(&mut c);
        }
        c
    }
}

pub fn lb_addr(port: u16) -> std::net::SocketAddr {
    (IpAddr::V4(LB_IP), port).into()
}

pub fn backend_addr(port: u16) -> std::net::SocketAddr {
    (IpAddr::V4(BACKEND_IP), port).into()
}
