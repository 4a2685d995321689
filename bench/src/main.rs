//! `mesh-bench`: mesh side by side with a direct connection, HAProxy and nginx stream;
//! mesh-dns beside unbound, knotd and dnsmasq; gossip figures from the simulator.
//! `bench/run.sh` runs all of it and writes bench/RESULTS.md; see bench/README.md.

mod api;
mod backend;
mod dataplane;
mod dns;
mod gossip;
mod load;
mod nft_scale;
mod plot;
mod process;
mod report;
mod soak;
mod stats;
mod targets;
mod topology;
mod withdrawal;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use dataplane::Workload;
use targets::Target;

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "Benchmarks mesh against direct, HAProxy, nginx and DNS servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The data-plane benchmark: writes OUT/dataplane.json.
    Dataplane {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Measured seconds per trial, after the warm-up.
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, value_delimiter = ',', default_values_t = Target::ALL)]
        targets: Vec<Target>,
        #[arg(long, value_delimiter = ',', value_enum, default_values_t = Workload::ALL)]
        workloads: Vec<Workload>,
        /// Connections per second for the latency workload; default: half of direct's CRR.
        #[arg(long)]
        latency_rate: Option<f64>,
        /// The mesh binary; default: `mesh` beside this program.
        #[arg(long)]
        mesh: Option<PathBuf>,
        /// An earlier mesh binary, run as the `mesh-before` target.
        #[arg(long)]
        mesh_before: Option<PathBuf>,
        /// The client sends whole checksums (`ethtool -K eth0 tx off` on its veth), as
        /// packets from another machine arrive; a veth's offloaded ones carry only
        /// the pseudo-header's sum, which the XDP targets leave to tcx. Needed by
        /// the XDP targets; applies to every target of the run, for a fair
        /// comparison.
        #[arg(long)]
        client_full_checksums: bool,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The DNS benchmark: writes OUT/dns.json.
    Dns {
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// dnsperf's simulated clients (-c).
        #[arg(long, default_value_t = 10)]
        clients: usize,
        #[arg(long)]
        mesh: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Gossip figures from the simulator: writes OUT/gossip.json.
    Gossip {
        /// NODES:CHANGES pairs: cluster sizes and task changes measured per loss level.
        #[arg(long, value_delimiter = ',', default_value = "100:30,1000:10", value_parser = size_pair)]
        sizes: Vec<(usize, usize)>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Withdrawal of crashed hosts and false withdrawals under loss, from the simulator:
    /// writes OUT/withdrawal.json.
    Withdrawal {
        /// NODES:CRASHES pairs.
        #[arg(long, value_delimiter = ',', default_value = "3:40,100:40,1000:20", value_parser = size_pair)]
        sizes: Vec<(usize, usize)>,
        /// Packet loss levels, as fractions.
        #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.05])]
        losses: Vec<f64>,
        /// Virtual seconds of loss without crashes, counting false withdrawals.
        #[arg(long, default_value_t = 300)]
        quiet_secs: u64,
        /// SWIM probe period in ms (default: the agent's).
        #[arg(long)]
        probe_period_ms: Option<u64>,
        /// Direct probe timeout in ms (default: the agent's).
        #[arg(long)]
        probe_rtt_ms: Option<u64>,
        /// Suspicion held before withdrawal, at up to 10 hosts, in ms (default: the agent's).
        #[arg(long)]
        suspect_grace_ms: Option<u64>,
        /// Retransmissions per update are ⌈mult·log10(n+1)⌉ (default: the agent's).
        #[arg(long)]
        retransmit_mult: Option<f64>,
        /// Indirect probes after a direct probe went unanswered (default: the agent's).
        #[arg(long)]
        indirect_probes: Option<usize>,
        /// How often pending updates are gossiped, in ms (default: the agent's).
        #[arg(long)]
        gossip_interval_ms: Option<u64>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The nftables plane's apply time for SERVICES x TASKS from empty, then one task
    /// changed on top: writes OUT/nft_scale.json. Needs root.
    NftScale {
        #[arg(long, default_value_t = 10_000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        tasks: usize,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Soak: one agent under churn for MINUTES, memory and descriptors sampled every
    /// minute: writes OUT/soak.json.
    Soak {
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        #[arg(long)]
        mesh: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// API write cost: times POST /v1/services at each table size; writes OUT/api.json.
    Api {
        /// Services the agent holds before each size's timed creates, increasing.
        #[arg(long, value_delimiter = ',', default_values_t = [100, 1000, 10000])]
        sizes: Vec<usize>,
        /// Timed creates per size, one at a time; they stay in the table.
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Connections that fill the table up to each size (not timed).
        #[arg(long, default_value_t = 4)]
        fill_connections: usize,
        #[arg(long)]
        mesh: Option<PathBuf>,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// Writes bench/RESULTS.md and bench/plots/ from the JSON in DIR.
    Report {
        #[arg(long, default_value = "bench/results")]
        results: PathBuf,
        #[arg(long, default_value = "bench")]
        bench_dir: PathBuf,
    },
    /// Serves TCP/UDP echo and HTTP (run by the harness in the backend namespace).
    Backend {
        #[arg(long)]
        ip: IpAddr,
    },
    /// One load-generator run; prints JSON (run by the harness in the client namespace).
    Load {
        #[arg(value_enum)]
        kind: load::Kind,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 32)]
        conc: usize,
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Waits until echo and HTTP work through a target (run by the harness).
    Probe {
        #[arg(long)]
        echo: SocketAddr,
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value = "30s", value_parser = humantime_secs)]
        timeout: Duration,
    },
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    s.strip_suffix('s')
        .and_then(|n| n.parse::<u64>().ok())
        .map(Duration::from_secs)
        .ok_or_else(|| format!("expected whole seconds like 30s, got {s:?}"))
}

fn size_pair(s: &str) -> Result<(usize, usize), String> {
    let parsed = s
        .split_once(':')
        .and_then(|(n, c)| Some((n.parse::<usize>().ok()?, c.parse::<usize>().ok()?)));
    match parsed {
        Some((n, c)) if n >= 2 && c >= 1 => Ok((n, c)),
        _ => Err(format!(
            "expected NODES:CHANGES with NODES ≥ 2 and CHANGES ≥ 1, like 1000:10; got {s:?}"
        )),
    }
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and must run as root");
    }
    Ok(())
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locate mesh-bench")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found; build it first (cargo build --release -p mesh-agent)",
            path.display()
        );
    }
    Ok(path)
}

/// `--mesh`, or the `mesh` binary built beside this program.
fn mesh_or_sibling(mesh: Option<PathBuf>) -> Result<PathBuf> {
    match mesh {
        Some(p) => Ok(p),
        None => sibling("mesh"),
    }
}

fn write_json(out: &Path, name: &str, value: &impl serde::Serialize) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let path = out.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dataplane {
            reps,
            secs,
            warmup,
            targets,
            workloads,
            latency_rate,
            mesh,
            mesh_before,
            client_full_checksums,
            out,
        } => {
            require_root()?;
            if !client_full_checksums && targets.contains(&Target::MeshXdp) {
                bail!(
                    "the XDP targets need --client-full-checksums: XDP leaves the client's offloaded packets to tcx"
                );
            }
            if reps == 0 || !secs.is_finite() || secs <= 0.0 || !warmup.is_finite() || warmup < 0.0
            {
                bail!("--reps must be at least 1 and --secs positive");
            }
            let mesh_bin = mesh_or_sibling(mesh)?;
            let opts = dataplane::Options {
                reps,
                secs,
                warmup,
                targets,
                workloads,
                latency_rate,
                mesh_bin,
                mesh_before,
                client_full_checksums,
                self_bin: std::env::current_exe()?,
            };
            let results = dataplane::run(&opts)?;
            write_json(&out, "dataplane.json", &results)
        }
        Command::Dns {
            reps,
            secs,
            clients,
            mesh,
            out,
        } => {
            require_root()?;
            if reps == 0 || !secs.is_finite() || secs < 1.0 || clients == 0 {
                bail!("--reps and --clients must be at least 1, --secs at least 1");
            }
            let mesh_bin = mesh_or_sibling(mesh)?;
            let results = dns::run(reps, secs, clients, &mesh_bin)?;
            write_json(&out, "dns.json", &results)
        }
        Command::Gossip { sizes, out } => {
            let results = gossip::run(&sizes)?;
            write_json(&out, "gossip.json", &results)
        }
        Command::NftScale {
            services,
            tasks,
            out,
        } => {
            require_root()?;
            let results = nft_scale::run(services, tasks)?;
            write_json(&out, "nft_scale.json", &results)
        }
        Command::Soak { minutes, mesh, out } => {
            let results = soak::run(&mesh_or_sibling(mesh)?, minutes)?;
            write_json(&out, "soak.json", &results)
        }
        Command::Withdrawal {
            sizes,
            losses,
            quiet_secs,
            probe_period_ms,
            probe_rtt_ms,
            suspect_grace_ms,
            retransmit_mult,
            indirect_probes,
            gossip_interval_ms,
            out,
        } => {
            let mut timers = withdrawal::Timers::default();
            timers.probe_period_ms = probe_period_ms.unwrap_or(timers.probe_period_ms);
            timers.probe_rtt_ms = probe_rtt_ms.unwrap_or(timers.probe_rtt_ms);
            timers.suspect_grace_ms = suspect_grace_ms.unwrap_or(timers.suspect_grace_ms);
            timers.retransmit_mult = retransmit_mult.unwrap_or(timers.retransmit_mult);
            timers.indirect_probes = indirect_probes.unwrap_or(timers.indirect_probes);
            timers.gossip_interval_ms = gossip_interval_ms.unwrap_or(timers.gossip_interval_ms);
            anyhow::ensure!(
                timers.probe_rtt_ms < timers.probe_period_ms,
                "--probe-rtt-ms ({}) must be shorter than --probe-period-ms ({})",
                timers.probe_rtt_ms,
                timers.probe_period_ms
            );
            anyhow::ensure!(
                timers.retransmit_mult.is_finite() && timers.retransmit_mult > 0.0,
                "--retransmit-mult must be a positive number, not {}",
                timers.retransmit_mult
            );
            anyhow::ensure!(
                timers.probe_period_ms > 0
                    && timers.indirect_probes > 0
                    && timers.gossip_interval_ms > 0,
                "--probe-period-ms, --indirect-probes and --gossip-interval-ms must be at least 1"
            );
            let results = withdrawal::run(&sizes, &losses, quiet_secs, timers)?;
            write_json(&out, "withdrawal.json", &results)
        }
        Command::Api {
            sizes,
            samples,
            fill_connections,
            mesh,
            out,
        } => {
            // No root: the agent runs without VIPs, on a unix socket and loopback.
            let opts = api::Options {
                sizes,
                samples,
                fill_connections,
                mesh_bin: mesh_or_sibling(mesh)?,
            };
            let results = api::run(&opts)?;
            api::print(&results);
            write_json(&out, "api.json", &results)
        }
        Command::Report { results, bench_dir } => {
            let inputs = report::Inputs::load(&results)?;
            report::write(&results, &bench_dir, &inputs)?;
            plot::all(&bench_dir.join("plots"), &inputs)
        }
        Command::Backend { ip } => backend::run(ip),
        Command::Load {
            kind,
            addr,
            conc,
            secs,
            warmup,
            rate,
        } => {
            if conc == 0 && kind != load::Kind::Latency {
                bail!("--conc must be at least 1");
            }
            let r = load::run(&load::Params {
                kind,
                addr,
                conc,
                secs,
                warmup,
                rate,
            })?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Command::Probe {
            echo,
            http,
            udp,
            timeout,
        } => load::probe(echo, http, udp, timeout),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
