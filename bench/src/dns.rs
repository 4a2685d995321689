//! DNS: dnsperf against mesh-dns and against unbound, knotd and dnsmasq serving the
//! same 1,000 names. Each server gets one CPU in a fresh namespace; dnsperf the other.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use integration::netns::Netns;
use serde::{Deserialize, Serialize};

use crate::process::{Running, pinned};
use crate::stats::{RunInfo, Spread};
use crate::topology::{LB_CPU, LOAD_CPU};

pub const NAMES: usize = 1000;
const PORT: u16 = 5300;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Server {
    Mesh,
    Unbound,
    Knot,
    Dnsmasq,
}

impl Server {
    pub const ALL: [Server; 4] = [Server::Mesh, Server::Unbound, Server::Knot, Server::Dnsmasq];

    pub fn name(self) -> &'static str {
        match self {
            Server::Mesh => "mesh-dns",
            Server::Unbound => "unbound",
            Server::Knot => "knotd",
            Server::Dnsmasq => "dnsmasq",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsTrial {
    pub server: Server,
    pub rep: usize,
    pub qps: f64,
    pub lost: u64,
    pub cpu_us_per_query: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsSummary {
    pub server: Server,
    pub qps: Spread,
    pub cpu_us_per_query: Spread,
    pub mesh_qps_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsResults {
    pub run: RunInfo,
    pub names: usize,
    pub secs: f64,
    pub clients: usize,
    pub trials: Vec<DnsTrial>,
    pub summary: Vec<DnsSummary>,
}

/// The address every server answers for name `i`; the same across servers.
fn address(i: usize) -> String {
    format!("10.254.{}.{}", i / 256, i % 256)
}

pub fn run(reps: usize, secs: f64, clients: usize, mesh_bin: &Path) -> Result<DnsResults> {
    let mut trials = Vec::new();
    for rep in 0..reps {
        for server in Server::ALL {
            let t = trial(server, rep, secs, clients, mesh_bin)
                .with_context(|| format!("{}, repetition {}", server.name(), rep + 1))?;
            eprintln!(
                "  {:<8} rep {}: {:>9.0} qps  {:.1} µs/query  lost {}",
                server.name(),
                rep + 1,
                t.qps,
                t.cpu_us_per_query,
                t.lost
            );
            trials.push(t);
        }
    }
    let qps_of = |s: Server| {
        Spread::of(
            &trials
                .iter()
                .filter(|t| t.server == s)
                .map(|t| t.qps)
                .collect::<Vec<_>>(),
        )
    };
    let mesh = qps_of(Server::Mesh).map_or(0.0, |s| s.median);
    let mut summary = Vec::new();
    for server in Server::ALL {
        let Some(qps) = qps_of(server) else { continue };
        let cpu: Vec<f64> = trials
            .iter()
            .filter(|t| t.server == server)
            .map(|t| t.cpu_us_per_query)
            .collect();
        summary.push(DnsSummary {
            server,
            qps,
            cpu_us_per_query: Spread::of(&cpu).unwrap_or_default(),
            mesh_qps_ratio: if qps.median > 0.0 {
                mesh / qps.median
            } else {
                0.0
            },
        });
    }
    Ok(DnsResults {
        run: RunInfo::collect(),
        names: NAMES,
        secs,
        clients,
        trials,
        summary,
    })
}

fn trial(
    server: Server,
    rep: usize,
    secs: f64,
    clients: usize,
    mesh_bin: &Path,
) -> Result<DnsTrial> {
    let ns = Netns::new();
    let dir = tempfile::Builder::new()
        .prefix("mesh-bench-dns-")
        .tempdir()?;
    let d = dir.path();
    let queries = d.join("queries");
    let mut q = String::new();
    for i in 0..NAMES {
        let _ = writeln!(q, "svc{i}.mesh A");
    }
    std::fs::write(&queries, q)?;
    let log = d.join("server.log");
    let mut running = Running::spawn(server.name(), command(server, &ns, d, mesh_bin)?, &log)?;
    wait_ready(&ns, &mut running, &log)?;
    let cpu_before = running.cpu_seconds();
    let out = pinned(
        &ns,
        LOAD_CPU,
        "dnsperf",
        &[
            "-s",
            "127.0.0.1",
            "-p",
            &PORT.to_string(),
            "-d",
            &queries.to_string_lossy(),
            "-c",
            &clients.to_string(),
            "-T",
            "1",
            "-l",
            &format!("{secs}"),
        ],
    )
    .output()
    .context("run dnsperf (apt-get install dnsperf)")?;
    let cpu = running.cpu_seconds() - cpu_before;
    running.check_alive(&log)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
        line.split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (Some(qps), Some(completed)) = (field("Queries per second"), field("Queries completed"))
    else {
        bail!(
            "dnsperf printed no result:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if completed == 0.0 {
        bail!("no query was answered:\n{text}");
    }
    Ok(DnsTrial {
        server,
        rep,
        qps,
        lost: field("Queries lost").unwrap_or(0.0) as u64,
        cpu_us_per_query: cpu * 1e6 / completed,
    })
}

fn wait_ready(ns: &Netns, running: &mut Running, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let last = format!("svc{}.mesh", NAMES - 1);
    while Instant::now() < deadline {
        running.check_alive(log)?;
        let answer = ns.run(
            "dig",
            &[
                "@127.0.0.1",
                "-p",
                &PORT.to_string(),
                "+short",
                "+time=1",
                "+tries=1",
                &last,
            ],
        );
        if answer.trim().parse::<std::net::Ipv4Addr>().is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{} did not answer {last} within 30 s (see {})",
        running.name,
        log.display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn command(server: Server, ns: &Netns, d: &Path, mesh_bin: &Path) -> Result<std::process::Command> {
    let dir = d.display();
    Ok(match server {
        Server::Mesh => {
            let mut cfg = format!(
                "node_name = \"dns\"\ndata_dir = \"{dir}/data\"\n[api]\nsocket = \"{dir}/mesh.sock\"\n\
                 [cluster]\nbind = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:{PORT}\"]\nupstreams = []\n"
            );
            for i in 0..NAMES {
                let _ = writeln!(
                    cfg,
                    "[[service]]\nname = \"svc{i}\"\nports = [{{ target = 80 }}]"
                );
            }
            let cfg = write(d, "mesh.toml", &cfg)?;
            pinned(
                ns,
                LB_CPU,
                &mesh_bin.to_string_lossy(),
                &["agent", "--config", &cfg.to_string_lossy(), "--no-vips"],
            )
        }
        Server::Unbound => {
            let mut cfg = format!(
                "server:\n  interface: 127.0.0.1@{PORT}\n  do-daemonize: no\n  num-threads: 1\n  \
                 username: \"\"\n  chroot: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  \
                 logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  \
                 local-zone: \"mesh.\" static\n"
            );
            for i in 0..NAMES {
                let _ = writeln!(cfg, "  local-data: \"svc{i}.mesh. 5 IN A {}\"", address(i));
            }
            cfg.push_str("remote-control:\n  control-enable: no\n");
            let cfg = write(d, "unbound.conf", &cfg)?;
            pinned(ns, LB_CPU, "unbound", &["-d", "-c", &cfg.to_string_lossy()])
        }
        Server::Knot => {
            let mut zone = String::from(
                "$ORIGIN mesh.\n$TTL 5\n@ SOA ns.mesh. hostmaster.mesh. 1 3600 600 86400 5\n@ NS ns.mesh.\nns A 10.254.255.254\n",
            );
            for i in 0..NAMES {
                let _ = writeln!(zone, "svc{i} A {}", address(i));
            }
            write(d, "mesh.zone", &zone)?;
            let cfg = format!(
                "server:\n  rundir: \"{dir}\"\n  listen: 127.0.0.1@{PORT}\n  udp-workers: 1\n  tcp-workers: 1\n  \
                 background-workers: 1\ndatabase:\n  storage: \"{dir}\"\nlog:\n  - target: stderr\n    any: error\n\
                 template:\n  - id: default\n    storage: \"{dir}\"\nzone:\n  - domain: mesh\n    file: mesh.zone\n"
            );
            let cfg = write(d, "knot.conf", &cfg)?;
            pinned(ns, LB_CPU, "knotd", &["-c", &cfg.to_string_lossy()])
        }
        Server::Dnsmasq => {
            let mut hosts = String::new();
            for i in 0..NAMES {
                let _ = writeln!(hosts, "{} svc{i}.mesh", address(i));
            }
            let hosts = write(d, "hosts", &hosts)?;
            let port = PORT.to_string();
            let addn = format!("--addn-hosts={}", hosts.display());
            pinned(
                ns,
                LB_CPU,
                "dnsmasq",
                &[
                    "-k",
                    "-C",
                    "/dev/null",
                    "-p",
                    &port,
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    &addn,
                    "--user=root",
                    "--pid-file",
                    "--local=/mesh/",
                    "--local-ttl=5",
                ],
            )
        }
    })
}
