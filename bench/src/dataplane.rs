//! The data-plane benchmark: every workload against every target, interleaved
//! (direct, mesh, haproxy, nginx, direct, …), each trial in fresh namespaces, with the
//! LB pinned to its own CPU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::load::{Kind, Latency, LoadResult};
use crate::process::{Running, pinned};
use crate::stats::{RunInfo, Spread};
use crate::targets::{IPERF_PORT, Target};
use crate::topology::{BACKEND_IP, LB_CPU, LOAD_CPU, Topology, cpu_busy_seconds};

/// Pause between trials; see `run`.
const SETTLE: Duration = Duration::from_millis(1500);

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Crr32,
    Crr128,
    Rr,
    Stream1,
    Stream4,
    Latency,
    Udp,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Crr32,
        Workload::Crr128,
        Workload::Rr,
        Workload::Stream1,
        Workload::Stream4,
        Workload::Latency,
        Workload::Udp,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Workload::Crr32 => "CRR, 32 concurrent (conn/s)",
            Workload::Crr128 => "CRR, 128 concurrent (conn/s)",
            Workload::Rr => "RR, 1 persistent connection (req/s)",
            Workload::Stream1 => "STREAM, 1 flow (Gbit/s)",
            Workload::Stream4 => "STREAM, 4 flows (Gbit/s)",
            Workload::Latency => "CRR latency at 50% of direct's CRR max, p99 (µs)",
            Workload::Udp => "UDP request/response, 32 flows (req/s)",
        }
    }

    /// Latency is better when lower; everything else when higher.
    pub fn lower_is_better(self) -> bool {
        self == Workload::Latency
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub workload: Workload,
    pub target: Target,
    pub rep: usize,
    /// conn/s, req/s, Gbit/s, or p99 µs for latency.
    pub value: f64,
    pub errors: u64,
    /// The LB process's CPU seconds over the whole trial, warm-up included; none for
    /// direct.
    pub lb_cpu_s: Option<f64>,
    /// The LB CPU's busy seconds from /proc/stat over the same span: the process and
    /// the LB namespace's packet processing (softirq), for every target. A kernel
    /// plane's work shows only here.
    #[serde(default)]
    pub lb_cpu_stat_s: Option<f64>,
    /// LB CPU (from /proc/stat) ms per 1,000 connections (CRR, and latency at its
    /// fixed rate) or s per GB (STREAM).
    pub lb_cost: Option<f64>,
    pub latency: Option<Latency>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub workload: Workload,
    pub target: Target,
    pub value: Spread,
    pub vs_direct: Option<f64>,
    pub vs_haproxy: Option<f64>,
    pub lb_cost: Option<Spread>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataplaneResults {
    pub run: RunInfo,
    pub reps: usize,
    pub secs: f64,
    pub latency_rate: Option<f64>,
    pub trials: Vec<Trial>,
    pub summary: Vec<Summary>,
}

impl DataplaneResults {
    /// The latency histograms of `target`, one per repetition.
    pub fn latencies(&self, target: Target) -> Vec<&Latency> {
        self.trials
            .iter()
            .filter(|t| t.workload == Workload::Latency && t.target == target)
            .filter_map(|t| t.latency.as_ref())
            .collect()
    }
}

pub struct Options {
    pub reps: usize,
    pub secs: f64,
    pub warmup: f64,
    pub targets: Vec<Target>,
    pub workloads: Vec<Workload>,
    pub latency_rate: Option<f64>,
    pub mesh_bin: PathBuf,
    /// The binary of the `mesh-before` target.
    pub mesh_before: Option<PathBuf>,
    /// `ethtool -K eth0 tx off` in the client's namespace (see `--client-full-checksums`).
    pub client_full_checksums: bool,
    pub self_bin: PathBuf,
}

pub fn run(o: &Options) -> Result<DataplaneResults> {
    let mut trials: Vec<Trial> = Vec::new();
    let mut latency_rate = o.latency_rate;
    let mut workloads = o.workloads.clone();
    workloads.sort();
    for &w in &workloads {
        if w == Workload::Latency && latency_rate.is_none() {
            let direct: Vec<f64> = trials
                .iter()
                .filter(|t| t.workload == Workload::Crr32 && t.target == Target::Direct)
                .map(|t| t.value)
                .collect();
            let Some(s) = Spread::of(&direct) else {
                bail!(
                    "the latency workload runs at 50% of direct's CRR rate: include --workloads crr32 and --targets direct, or give --latency-rate"
                );
            };
            latency_rate = Some((s.median * 0.5).round());
        }
        for rep in 0..o.reps {
            for &target in &o.targets {
                if w == Workload::Udp && !target.supports_udp() {
                    continue;
                }
                let t = trial(o, w, target, rep, latency_rate.unwrap_or(0.0))
                    .with_context(|| format!("{w:?} via {target}, repetition {}", rep + 1))?;
                // Deleting a namespace full of TIME_WAIT sockets is finished by a kernel
                // worker after `ip netns del` returns: let it finish before the next trial.
                std::thread::sleep(SETTLE);
                eprintln!(
                    "  {:<8} {:<8} rep {}: {:>12.1}  errors {}  lb process cpu {}  lb cpu (/proc/stat) {}",
                    format!("{w:?}").to_lowercase(),
                    target.to_string(),
                    rep + 1,
                    t.value,
                    t.errors,
                    t.lb_cpu_s.map_or("-".into(), |c| format!("{c:.2} s")),
                    t.lb_cpu_stat_s.map_or("-".into(), |c| format!("{c:.2} s")),
                );
                trials.push(t);
            }
        }
    }
    let summary = summarize(&trials);
    Ok(DataplaneResults {
        run: RunInfo::collect(),
        reps: o.reps,
        secs: o.secs,
        latency_rate,
        trials,
        summary,
    })
}

fn trial(o: &Options, w: Workload, target: Target, rep: usize, rate: f64) -> Result<Trial> {
    let mut topo = Topology::create()?;
    if matches!(
        target,
        Target::MeshEbpf
            | Target::MeshTc
            | Target::MeshTcHop
            | Target::MeshTcNoNft
            | Target::MeshXdp
    ) {
        let agent_ns = integration::netns::Netns::new();
        agent_ns.run("ip", &["link", "set", "lo", "up"]);
        topo.ebpf = Some((
            integration::ebpf::Cgroup::new(),
            integration::ebpf::PinDir::new(),
            agent_ns,
        ));
    }
    if o.client_full_checksums {
        topo.client.run("ethtool", &["-K", "eth0", "tx", "off"]);
    }
    let dir = tempfile::Builder::new().prefix("mesh-bench-").tempdir()?;
    let self_bin = o.self_bin.to_string_lossy().to_string();
    let backend_log = dir.path().join("backend.log");
    let mut backend = Running::spawn(
        "backend",
        pinned(
            &topo.backend,
            LOAD_CPU,
            &self_bin,
            &["backend", "--ip", &BACKEND_IP.to_string()],
        ),
        &backend_log,
    )?;
    let streaming = matches!(w, Workload::Stream1 | Workload::Stream4);
    let _iperf = if streaming {
        let port = IPERF_PORT.to_string();
        Some(Running::spawn(
            "iperf3 server",
            pinned(
                &topo.backend,
                LOAD_CPU,
                "iperf3",
                &["-s", "--forceflush", "-p", &port],
            ),
            &dir.path().join("iperf3.log"),
        )?)
    } else {
        None
    };
    let mesh_bin = match target {
        Target::MeshBefore => o
            .mesh_before
            .as_ref()
            .context("the mesh-before target needs --mesh-before PATH")?,
        _ => &o.mesh_bin,
    };
    let _task_host = if target == Target::MeshTcHop {
        // The topology gives every namespace all ports for its own sockets, which
        // leaves the TC path none to bind hopped flows to: the LB keeps 60000-65535.
        topo.lb.run(
            "sysctl",
            &["-qw", "net.ipv4.ip_local_port_range=60000 65535"],
        );
        Some(crate::targets::task_host_agent(
            &topo,
            dir.path(),
            mesh_bin,
        )?)
    } else {
        None
    };
    let mut lb = target.start(&topo, dir.path(), mesh_bin)?;
    let addrs = match target {
        Target::MeshEbpf => crate::targets::vip_addrs(mesh_bin, dir.path())?,
        _ => target.addrs(),
    };
    let probe = || {
        topo.client_command(LOAD_CPU, &self_bin, &[])
            .args([
                "probe",
                "--echo",
                &addrs.echo.to_string(),
                "--http",
                &addrs.http.to_string(),
            ])
            .args(if w == Workload::Udp {
                &["--udp"][..]
            } else {
                &[][..]
            })
            .output()
    };
    // mesh-tc-hop's LB agent learns its tasks from the backend's agent by gossip:
    // until then the port has no task.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let probe = loop {
        let out = probe()?;
        if out.status.success()
            || target != Target::MeshTcHop
            || std::time::Instant::now() > deadline
        {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    if !probe.status.success() {
        backend.check_alive(&backend_log)?;
        if let Some(lb) = lb.as_mut() {
            lb.check_alive(&dir.path().join(format!("{target}.log")))?;
        }
        bail!("probe: {}", String::from_utf8_lossy(&probe.stderr).trim());
    }
    if streaming {
        // iperf3 needs a moment after bind before its first test; the probe did not touch it.
        wait_for_iperf(dir.path())?;
    }
    let cpu_before = lb.as_ref().map(Running::cpu_seconds);
    let stat_before = cpu_busy_seconds(LB_CPU)?;
    let secs = o.secs + o.warmup;
    let (value, errors, units, latency) = if streaming {
        let flows = if w == Workload::Stream1 { 1 } else { 4 };
        let (gbps, bytes) = iperf(&topo, addrs.iperf, flows, secs)?;
        (gbps, 0, bytes as f64 / 1e9, None)
    } else {
        let (kind, conc) = match w {
            Workload::Crr32 => (Kind::Crr, 32),
            Workload::Crr128 => (Kind::Crr, 128),
            Workload::Rr => (Kind::Rr, 1),
            Workload::Udp => (Kind::Udp, 32),
            _ => (Kind::Latency, 0),
        };
        let r = load(o, &topo, kind, addrs.echo, conc, rate)?;
        let value = match &r.latency {
            Some(l) => l.p99_us,
            None => r.rate,
        };
        (value, r.errors, r.total_ops as f64 / 1000.0, r.latency)
    };
    let lb_cpu_s = match (lb.as_ref(), cpu_before) {
        (Some(lb), Some(before)) => Some(lb.cpu_seconds() - before),
        _ => None,
    };
    let lb_cpu_stat_s = Some(cpu_busy_seconds(LB_CPU)? - stat_before);
    if let Some(lb) = lb.as_mut() {
        lb.check_alive(&dir.path().join(format!("{target}.log")))?;
    }
    if target == Target::MeshXdp
        && let Some((_, pins, _)) = topo.ebpf.as_ref()
    {
        // Otherwise tcx, still attached, would have done the work unseen.
        let took = integration::ebpf::xdp_took(&pins.path).map_err(anyhow::Error::msg)?;
        if took == 0 {
            bail!("{target}: the XDP program took no packets (mesh_port_xdp_took is 0)");
        }
    }
    let lb_cost = match (lb_cpu_stat_s, w) {
        (Some(cpu), Workload::Crr32 | Workload::Crr128 | Workload::Latency) if units > 0.0 => {
            Some(cpu * 1000.0 / units)
        }
        (Some(cpu), Workload::Stream1 | Workload::Stream4) if units > 0.0 => Some(cpu / units),
        _ => None,
    };
    drop(lb);
    Ok(Trial {
        workload: w,
        target,
        rep,
        value,
        errors,
        lb_cpu_s,
        lb_cpu_stat_s,
        lb_cost,
        latency,
    })
}

fn load(
    o: &Options,
    topo: &Topology,
    kind: Kind,
    addr: std::net::SocketAddr,
    conc: usize,
    rate: f64,
) -> Result<LoadResult> {
    let self_bin = o.self_bin.to_string_lossy().to_string();
    let kind_name = format!("{kind:?}").to_lowercase();
    let out = topo
        .client_command(
            LOAD_CPU,
            &self_bin,
            &[
                "load",
                &kind_name,
                "--addr",
                &addr.to_string(),
                "--conc",
                &conc.to_string(),
                "--secs",
                &o.secs.to_string(),
                "--warmup",
                &o.warmup.to_string(),
                "--rate",
                &rate.to_string(),
            ],
        )
        .output()
        .context("run the load generator")?;
    if !out.status.success() {
        bail!(
            "load generator: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parse the load generator's output")
}

fn wait_for_iperf(dir: &Path) -> Result<()> {
    for _ in 0..100 {
        let log = std::fs::read_to_string(dir.join("iperf3.log")).unwrap_or_default();
        if log.contains("Server listening") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("iperf3 -s did not report listening within 5 s")
}

/// Gbit/s received and bytes moved, from iperf3's JSON report.
fn iperf(
    topo: &Topology,
    addr: std::net::SocketAddr,
    flows: usize,
    secs: f64,
) -> Result<(f64, u64)> {
    let out = topo
        .client_command(
            LOAD_CPU,
            "iperf3",
            &[
                "-c",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
                "-P",
                &flows.to_string(),
                "-t",
                &format!("{}", secs.ceil() as u64),
                "-J",
            ],
        )
        .output()
        .context("run iperf3")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse iperf3 -J output")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    let sum = &v["end"]["sum_received"];
    let (Some(bps), Some(bytes)) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_u64()) else {
        bail!("iperf3 report has no end.sum_received");
    };
    Ok((bps / 1e9, bytes))
}

pub fn summarize(trials: &[Trial]) -> Vec<Summary> {
    let mut groups: BTreeMap<(Workload, usize), Vec<&Trial>> = BTreeMap::new();
    let order = |t: Target| Target::ORDER.iter().position(|x| *x == t).unwrap_or(0);
    for t in trials {
        groups
            .entry((t.workload, order(t.target)))
            .or_default()
            .push(t);
    }
    let spread = |ts: &[&Trial]| Spread::of(&ts.iter().map(|t| t.value).collect::<Vec<_>>());
    let median_of = |w: Workload, target: Target| {
        groups
            .get(&(w, order(target)))
            .and_then(|ts| spread(ts))
            .map(|s| s.median)
    };
    let mut out = Vec::new();
    for ((w, _), ts) in &groups {
        let target = ts[0].target;
        let Some(value) = spread(ts) else { continue };
        let ratio = |base: Option<f64>| base.filter(|b| *b > 0.0).map(|b| value.median / b);
        out.push(Summary {
            workload: *w,
            target,
            value,
            vs_direct: ratio(median_of(*w, Target::Direct)),
            vs_haproxy: ratio(median_of(*w, Target::Haproxy)),
            lb_cost: Spread::of(&ts.iter().filter_map(|t| t.lb_cost).collect::<Vec<_>>()),
            errors: ts.iter().map(|t| t.errors).sum(),
        });
    }
    out
}
