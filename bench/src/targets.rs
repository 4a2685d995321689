//! What the load goes through: nothing (direct), mesh's userspace plane, mesh's
//! nftables plane (DNAT in the LB namespace's kernel), HAProxy and nginx stream, each configured as fairly as we know how: one CPU, one worker, the
//! same backlog (4096, mesh's), generous timeouts, the same connection limit (7,000:
//! HAProxy wants about two descriptors per connection and this machine's hard limit is
//! 20,000), splice where offered.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{ECHO_PORT, HTTP_PORT};
use crate::process::{Running, pinned};
use crate::topology::{
    BACKEND_IP, LB_BACKEND_SIDE_IP, LB_CPU, LB_IP, LOAD_CPU, Topology, backend_addr, lb_addr,
};

pub const IPERF_PORT: u16 = 5201;
/// Where the proxies publish the echo, HTTP and iperf backends.
pub const LB_ECHO_PORT: u16 = 8000;
pub const LB_HTTP_PORT: u16 = 8080;
pub const LB_IPERF_PORT: u16 = 8201;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Direct,
    /// A second mesh binary (`--mesh-before`), to measure an optimisation's before and
    /// after in one interleaved run.
    #[value(name = "mesh-before")]
    #[serde(rename = "mesh-before")]
    MeshBefore,
    Mesh,
    /// mesh with `--dataplane nftables`: the kernel DNATs, no process touches a byte.
    #[value(name = "mesh-nft")]
    #[serde(rename = "mesh-nft")]
    MeshNft,
    /// mesh with `--dataplane ebpf`, the client connecting to VIPs: the socket
    /// programs rewrite each connect to the backend, and nothing is in the path after.
    #[value(name = "mesh-ebpf")]
    #[serde(rename = "mesh-ebpf")]
    MeshEbpf,
    /// mesh with `--dataplane ebpf` and its TC programs on the LB namespace's two
    /// interfaces, the client connecting to the published ports: the TC program DNATs
    /// each flow to the backend (a task of this host), and translates the replies.
    #[value(name = "mesh-tc")]
    #[serde(rename = "mesh-tc")]
    MeshTc,
    /// As `mesh-tc`, but the backend is another host's task: an agent in the backend
    /// namespace registers it, so the TC program hops each flow there (SNAT and DNAT,
    /// sent out of the LB namespace's interface past its stack) and back.
    #[value(name = "mesh-tc-hop")]
    #[serde(rename = "mesh-tc-hop")]
    MeshTcHop,
    /// As `mesh-tc`, with `ebpf.published_ports = "userspace"`: no nftables table
    /// beside the TC path, so no conntrack in the LB namespace.
    #[value(name = "mesh-tc-no-nft")]
    #[serde(rename = "mesh-tc-no-nft")]
    MeshTcNoNft,
    /// As `mesh-tc`, with `ebpf.port_hook = "xdp"`: native XDP on the LB namespace's
    /// veths DNATs each flow (veth runs it on the skb the peer sent), and tcx
    /// translates the replies.
    #[value(name = "mesh-xdp")]
    #[serde(rename = "mesh-xdp")]
    MeshXdp,
    Haproxy,
    /// HAProxy with `option splice-auto` instead of forced splice: its own heuristic,
    /// which splices only when buffers fill. Not a default target; for checking that
    /// forced splice does not handicap HAProxy on small exchanges.
    #[value(name = "haproxy-splice-auto")]
    #[serde(rename = "haproxy-splice-auto")]
    HaproxySpliceAuto,
    Nginx,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Direct => "direct",
            Target::MeshBefore => "mesh-before",
            Target::Mesh => "mesh",
            Target::MeshNft => "mesh-nft",
            Target::MeshEbpf => "mesh-ebpf",
            Target::MeshTc => "mesh-tc",
            Target::MeshTcHop => "mesh-tc-hop",
            Target::MeshTcNoNft => "mesh-tc-no-nft",
            Target::MeshXdp => "mesh-xdp",
            Target::Haproxy => "haproxy",
            Target::HaproxySpliceAuto => "haproxy-splice-auto",
            Target::Nginx => "nginx",
        })
    }
}

pub struct Addrs {
    pub echo: SocketAddr,
    pub http: SocketAddr,
    pub iperf: SocketAddr,
}

impl Target {
    /// The default targets.
    pub const ALL: [Target; 6] = [
        Target::Direct,
        Target::Mesh,
        Target::MeshNft,
        Target::MeshEbpf,
        Target::Haproxy,
        Target::Nginx,
    ];
    /// Every target, in report order.
    pub const ORDER: [Target; 12] = [
        Target::Direct,
        Target::MeshBefore,
        Target::Mesh,
        Target::MeshNft,
        Target::MeshEbpf,
        Target::MeshTc,
        Target::MeshTcHop,
        Target::MeshTcNoNft,
        Target::MeshXdp,
        Target::Haproxy,
        Target::HaproxySpliceAuto,
        Target::Nginx,
    ];

    pub fn addrs(self) -> Addrs {
        if self == Target::Direct {
            Addrs {
                echo: backend_addr(ECHO_PORT),
                http: backend_addr(HTTP_PORT),
                iperf: backend_addr(IPERF_PORT),
            }
        } else {
            Addrs {
                echo: lb_addr(LB_ECHO_PORT),
                http: lb_addr(LB_HTTP_PORT),
                iperf: lb_addr(LB_IPERF_PORT),
            }
        }
    }

    /// HAProxy's community edition has no UDP load balancing.
    pub fn supports_udp(self) -> bool {
        !matches!(self, Target::Haproxy | Target::HaproxySpliceAuto)
    }

    /// Starts the LB in the topology's LB namespace; `None` for direct.
    pub fn start(self, topo: &Topology, dir: &Path, mesh_bin: &Path) -> Result<Option<Running>> {
        let log = dir.join(format!("{self}.log"));
        let cmd = match self {
            Target::Direct => return Ok(None),
            Target::MeshEbpf => {
                let (cgroup, pins, agent_ns) = topo
                    .ebpf
                    .as_ref()
                    .context("the mesh-ebpf target needs the topology's cgroup")?;
                let cfg = format!(
                    "{}\n{}",
                    mesh_config(dir, true, false),
                    integration::ebpf::config(cgroup, pins)
                );
                // In a namespace of its own, off the path: the socket programs act on
                // the client's connects wherever the agent runs, and the nftables
                // table it makes for published ports would otherwise turn on
                // conntrack for every packet the LB namespace forwards.
                ebpf_agent(agent_ns, mesh_bin, &write(dir, "mesh.toml", &cfg)?)
            }
            Target::MeshTc | Target::MeshTcHop | Target::MeshTcNoNft | Target::MeshXdp => {
                let (cgroup, pins, _) = topo
                    .ebpf
                    .as_ref()
                    .context("the mesh-tc targets need the topology's cgroup")?;
                // No service asks for a userspace-only option, so the TC path takes
                // them all. nftables serves the ports beside it, as `--dataplane
                // ebpf` does by default, and its table turns conntrack on in the LB
                // namespace: for a task of this host (mesh-tc), the DNATed packet
                // goes up the stack; a hopped one (mesh-tc-hop) never enters it.
                // mesh-tc-no-nft has the userspace plane beside it instead.
                let mesh = mesh_config(dir, true, false);
                let mesh = if self == Target::MeshTcHop {
                    // The tasks are the backend agent's (`task_host_agent`).
                    let services = mesh.split("\n[[task]]").next().unwrap_or_default();
                    edit(
                        services,
                        "bind = \"127.0.0.1:0\"",
                        &format!("bind = \"{LB_BACKEND_SIDE_IP}:{GOSSIP_PORT}\""),
                    )?
                } else {
                    mesh
                };
                let hook = match self {
                    Target::MeshXdp => "xdp",
                    _ => "tcx",
                };
                let beside = if self == Target::MeshTcNoNft {
                    "userspace"
                } else {
                    "nftables"
                };
                let cfg = format!(
                    "{mesh}\n{}interfaces = [\"to-client\", \"to-backend\"]\nport_hook = \"{hook}\"\npublished_ports = \"{beside}\"\n",
                    integration::ebpf::config(cgroup, pins)
                );
                // In the LB namespace, whose interfaces the programs attach to.
                let mut agent = ebpf_agent(&topo.lb, mesh_bin, &write(dir, "mesh.toml", &cfg)?);
                if self == Target::MeshTcHop {
                    agent.arg("--insecure");
                }
                agent
            }
            Target::Mesh | Target::MeshBefore | Target::MeshNft => {
                let nft = self == Target::MeshNft;
                let cfg = write(dir, "mesh.toml", &mesh_config(dir, nft, true))?;
                let bin = mesh_bin.to_string_lossy().to_string();
                let mut args = vec!["agent", "--config", &cfg, "--no-vips"];
                // Only when asked: a `mesh-before` binary may predate the flag.
                if nft {
                    args.extend(["--dataplane", "nftables"]);
                }
                pinned(&topo.lb, LB_CPU, &bin, &args)
            }
            Target::Haproxy | Target::HaproxySpliceAuto => {
                let splice = if self == Target::Haproxy {
                    "option splice-request\n  option splice-response"
                } else {
                    "option splice-auto"
                };
                let cfg = write(dir, "haproxy.cfg", &haproxy_config(splice))?;
                pinned(&topo.lb, LB_CPU, "haproxy", &["-db", "-f", &cfg])
            }
            Target::Nginx => {
                let cfg = write(dir, "nginx.conf", &nginx_config(dir))?;
                let prefix = format!("{}/", dir.display());
                pinned(
                    &topo.lb,
                    LB_CPU,
                    "nginx",
                    &["-p", &prefix, "-c", &cfg, "-e", "stderr"],
                )
            }
        };
        Running::spawn(&self.to_string(), cmd, &log).map(Some)
    }
}

/// The gossip port of the two agents of `mesh-tc-hop`.
const GOSSIP_PORT: u16 = 7946;

/// For `mesh-tc-hop`: an agent in the backend namespace that registers the backend's
/// tasks as its own and joins the LB's agent, on the load CPU (it only gossips; its
/// userspace plane's listeners on the backend's address take no load).
pub fn task_host_agent(topo: &Topology, dir: &Path, mesh_bin: &Path) -> Result<Running> {
    let mut cfg = mesh_config(dir, true, false);
    for (from, to) in [
        (
            "node_name = \"lb\"".to_string(),
            "node_name = \"backend\"".to_string(),
        ),
        ("/mesh-data\"".into(), "/backend-data\"".into()),
        ("/mesh.sock\"".into(), "/backend.sock\"".into()),
        (
            format!("bind = \"{LB_IP}\""),
            format!("bind = \"{BACKEND_IP}\""),
        ),
        (
            "bind = \"127.0.0.1:0\"".into(),
            format!("bind = \"{BACKEND_IP}:{GOSSIP_PORT}\""),
        ),
    ] {
        cfg = edit(&cfg, &from, &to)?;
    }
    let cfg = write(dir, "backend-mesh.toml", &cfg)?;
    let join = format!("{LB_BACKEND_SIDE_IP}:{GOSSIP_PORT}");
    let bin = mesh_bin.to_string_lossy().to_string();
    let args = [
        "agent",
        "--config",
        &cfg,
        "--no-vips",
        "--dataplane",
        "userspace",
        "--insecure",
        "--join",
        &join,
    ];
    Running::spawn(
        "backend agent",
        pinned(&topo.backend, LOAD_CPU, &bin, &args),
        &dir.join("backend-agent.log"),
    )
}

/// `mesh agent --dataplane ebpf` on the LB CPU in `ns`. nsenter, not `ip netns exec`:
/// the agent must see bpffs and the cgroup hierarchy, which the latter's private /sys
/// hides.
fn ebpf_agent(ns: &integration::netns::Netns, mesh_bin: &Path, cfg: &str) -> std::process::Command {
    let mut c = integration::ebpf::nsenter(ns);
    c.args(["taskset", "-c", LB_CPU])
        .arg(mesh_bin)
        .args(["agent", "--config"])
        .arg(cfg)
        .args(["--no-vips", "--dataplane", "ebpf"]);
    c
}

/// The VIP addresses of the echo, HTTP and iperf services, from the agent's API once
/// it has them.
pub fn vip_addrs(mesh_bin: &Path, dir: &Path) -> Result<Addrs> {
    let api = format!("unix:{}", dir.join("mesh.sock").display());
    let vip = |service: &str| -> Option<std::net::IpAddr> {
        let out = std::process::Command::new(mesh_bin)
            .args([
                "--api", &api, "--format", "json", "service", "inspect", service,
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["vips"]["v4"].as_str()?.parse().ok()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let (Some(e), Some(h), Some(i)) = (vip("echo"), vip("http"), vip("iperf")) {
            return Ok(Addrs {
                echo: (e, ECHO_PORT).into(),
                http: (h, HTTP_PORT).into(),
                iperf: (i, IPERF_PORT).into(),
            });
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the mesh-ebpf agent did not report its services' VIPs within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `text` with `from` replaced by `to`; an error if `from` is not there, so a change
/// to `mesh_config` cannot silently leave the second agent's config wrong.
fn edit(text: &str, from: &str, to: &str) -> Result<String> {
    anyhow::ensure!(
        text.contains(from),
        "the mesh config has no {from:?} to change"
    );
    Ok(text.replace(from, to))
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path.to_string_lossy().to_string())
}

/// `kernel`: a kernel plane's config. It leaves out `max_connections`, which only the
/// userspace plane implements (a service that asks for it stays in userspace).
/// `probe`: health checks; without them the agent need not reach the backend.
fn mesh_config(dir: &Path, kernel: bool, probe: bool) -> String {
    let max_connections = if kernel { "" } else { "max_connections = 7000" };
    let (echo_health, http_health) = if probe {
        ("", r#"health = { check = "http", path = "/" }"#)
    } else {
        (
            r#"health = { check = "none" }"#,
            r#"health = { check = "none" }"#,
        )
    };
    format!(
        r#"node_name = "lb"
data_dir = "{dir}/mesh-data"
log_format = "text"

[api]
socket = "{dir}/mesh.sock"

[proxy]
bind = "{LB_IP}"
shutdown_grace = "1s"

[cluster]
bind = "127.0.0.1:0"

[[service]]
name = "echo"
ports = [
  {{ published = {LB_ECHO_PORT}, target = {ECHO_PORT}, protocol = "tcp" }},
  {{ published = {LB_ECHO_PORT}, target = {ECHO_PORT}, protocol = "udp" }},
]
{max_connections}
{echo_health}

[[service]]
name = "http"
ports = [{{ published = {LB_HTTP_PORT}, target = {HTTP_PORT}, protocol = "tcp" }}]
{http_health}

[[service]]
name = "iperf"
ports = [{{ published = {LB_IPERF_PORT}, target = {IPERF_PORT}, protocol = "tcp" }}]
# A TCP probe would look like a stray data connection to iperf3.
health = {{ check = "none" }}

[[task]]
service = "echo"
id = "echo.1"
ip = "{BACKEND_IP}"

[[task]]
service = "http"
id = "http.1"
ip = "{BACKEND_IP}"

[[task]]
service = "iperf"
id = "iperf.1"
ip = "{BACKEND_IP}"
"#,
        dir = dir.display()
    )
}

fn haproxy_config(splice: &str) -> String {
    let listen = |name: &str, port: u16, target: u16| {
        format!("listen {name}\n  bind {LB_IP}:{port}\n  server {name}1 {BACKEND_IP}:{target}\n\n")
    };
    format!(
        "global\n  nbthread 1\n  maxconn 7000\n  log stderr format raw local0 err\n\n\
         defaults\n  mode tcp\n  maxconn 7000\n  backlog 4096\n  {splice}\n  \
         timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n{}{}{}",
        listen("echo", LB_ECHO_PORT, ECHO_PORT),
        listen("http", LB_HTTP_PORT, HTTP_PORT),
        listen("iperf", LB_IPERF_PORT, IPERF_PORT),
    )
}

fn nginx_config(dir: &Path) -> String {
    let server = |port: u16, target: u16, udp: bool| {
        let (flag, extra) = if udp {
            (" udp", "proxy_responses 1; proxy_timeout 10s; ")
        } else {
            (" backlog=4096", "")
        };
        format!(
            "  server {{ listen {LB_IP}:{port}{flag}; {extra}proxy_pass {BACKEND_IP}:{target}; }}\n"
        )
    };
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
         pid {dir}/nginx.pid;\nerror_log stderr error;\n\
         load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         events {{ worker_connections 7000; }}\n\
         stream {{\n{}{}{}{}}}\n",
        server(LB_ECHO_PORT, ECHO_PORT, false),
        server(LB_ECHO_PORT, ECHO_PORT, true),
        server(LB_HTTP_PORT, HTTP_PORT, false),
        server(LB_IPERF_PORT, IPERF_PORT, false),
        dir = dir.display()
    )
}
