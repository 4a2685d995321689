//! bench/RESULTS.md from the JSON each benchmark wrote to bench/results/.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

use crate::api::{ApiResults, RATIO_LIMIT, WARMUP};
use crate::dataplane::{DataplaneResults, Summary, Workload};
use crate::dns::DnsResults;
use crate::gossip::GossipResults;
use crate::nft_scale::NftScaleResults;
use crate::soak::SoakResults;
use crate::stats::RunInfo;
use crate::targets::Target;
use crate::withdrawal::WithdrawalResults;

pub struct Inputs {
    pub dataplane: Option<DataplaneResults>,
    pub dns: Option<DnsResults>,
    pub gossip: Option<GossipResults>,
    pub api: Option<ApiResults>,
    pub withdrawal: Option<WithdrawalResults>,
    pub soak: Option<SoakResults>,
    pub nft_scale: Option<NftScaleResults>,
}

fn read<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("parse {}", path.display()))
}

impl Inputs {
    pub fn load(dir: &Path) -> Result<Inputs> {
        Ok(Inputs {
            dataplane: read(&dir.join("dataplane.json"))?,
            dns: read(&dir.join("dns.json"))?,
            gossip: read(&dir.join("gossip.json"))?,
            api: read(&dir.join("api.json"))?,
            withdrawal: read(&dir.join("withdrawal.json"))?,
            soak: read(&dir.join("soak.json"))?,
            nft_scale: read(&dir.join("nft_scale.json"))?,
        })
    }
}

fn run_line(out: &mut String, what: &str, r: &RunInfo) {
    let _ = writeln!(
        out,
        "_{what}: {} · {} · commit `{}`_\n",
        r.date, r.machine, r.commit
    );
}

fn fmt_value(w: Workload, v: f64) -> String {
    match w {
        Workload::Stream1 | Workload::Stream4 => format!("{v:.2}"),
        Workload::Latency => format!("{v:.0}"),
        _ => format!("{v:.0}"),
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}"))
}

fn find(s: &[Summary], w: Workload, t: Target) -> Option<&Summary> {
    s.iter().find(|x| x.workload == w && x.target == t)
}

fn dataplane(out: &mut String, d: &DataplaneResults) {
    let _ = writeln!(out, "## Data plane\n");
    run_line(out, "Measured", &d.run);
    // A run made before the eBPF target existed says nothing of it.
    let ebpf = d.summary.iter().any(|x| x.target == Target::MeshEbpf);
    let (ebpf_order, ebpf_text) = if ebpf {
        (
            " mesh-ebpf,",
            " mesh-ebpf is mesh with `--dataplane ebpf`, the client (in the programs' cgroup) \
             connecting to VIPs: each connect is rewritten to the backend, so its path is \
             direct's; its agent runs in a namespace off the path, without health checks.",
        )
    } else {
        ("", " This run had no mesh-ebpf target.")
    };
    let _ = writeln!(
        out,
        "{} repetitions, interleaved (direct, mesh, mesh-nft,{ebpf_order} haproxy, nginx, direct, …), {} s measured \
         after 1 s warm-up, each trial in fresh namespaces. LB on CPU 1, with the LB namespace's \
         receive processing steered there too (RPS); client and backend on CPU 0. mesh-nft is mesh \
         with `--dataplane nftables`: the LB namespace's kernel DNATs and no process touches a byte.\
         {ebpf_text} \
         LB cost is CPU 1's busy time from /proc/stat (process and softirq alike). \
         Latency ran open-loop at {} connections/s (half of direct's median CRR at 32).\n",
        d.reps,
        d.secs,
        d.latency_rate.map_or("–".into(), |r| format!("{r:.0}"))
    );
    let _ = writeln!(
        out,
        "### Headline: mesh against direct and HAProxy (ratio of medians)\n"
    );
    let _ = writeln!(
        out,
        "| workload | mesh | ÷ direct | ÷ HAProxy | mesh-nft ÷ direct | mesh-ebpf ÷ direct | HAProxy ÷ direct |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for w in Workload::ALL {
        let Some(m) = find(&d.summary, w, Target::Mesh) else {
            continue;
        };
        let h = find(&d.summary, w, Target::Haproxy);
        let n = find(&d.summary, w, Target::MeshNft);
        let e = find(&d.summary, w, Target::MeshEbpf);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            w.title(),
            fmt_value(w, m.value.median),
            ratio(m.vs_direct),
            ratio(m.vs_haproxy),
            ratio(n.and_then(|n| n.vs_direct)),
            ratio(e.and_then(|e| e.vs_direct)),
            ratio(h.and_then(|h| h.vs_direct)),
        );
    }
    let _ = writeln!(
        out,
        "\nFor latency a ratio below 1 is better; for everything else above 1. UDP has no HAProxy \
         figure: the community edition has no UDP load balancing.\n"
    );
    let _ = writeln!(out, "### Every workload\n");
    let _ = writeln!(
        out,
        "| workload | target | median | min | max | ÷ direct | ÷ HAProxy | LB cost | errors |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for s in &d.summary {
        let cost = match (s.workload, s.lb_cost) {
            (Workload::Crr32 | Workload::Crr128 | Workload::Latency, Some(c)) => {
                format!("{:.0} ms CPU / 1k conn", c.median)
            }
            (Workload::Stream1 | Workload::Stream4, Some(c)) => {
                format!("{:.2} s CPU / GB", c.median)
            }
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w_short(s.workload),
            s.target,
            fmt_value(s.workload, s.value.median),
            fmt_value(s.workload, s.value.min),
            fmt_value(s.workload, s.value.max),
            ratio(s.vs_direct),
            ratio(s.vs_haproxy),
            cost,
            s.errors
        );
    }
    let _ = writeln!(
        out,
        "\n### Latency at a fixed rate (medians over repetitions, µs)\n"
    );
    let _ = writeln!(out, "| target | p50 | p99 | p99.9 | max |");
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    for t in Target::ORDER {
        let ls = d.latencies(t);
        if ls.is_empty() {
            continue;
        }
        let med = |f: fn(&crate::load::Latency) -> f64| {
            crate::stats::Spread::of(&ls.iter().map(|l| f(l)).collect::<Vec<_>>())
                .map_or(0.0, |s| s.median)
        };
        let _ = writeln!(
            out,
            "| {t} | {:.0} | {:.0} | {:.0} | {:.0} |",
            med(|l| l.p50_us),
            med(|l| l.p99_us),
            med(|l| l.p999_us),
            med(|l| l.max_us)
        );
    }
    let _ = writeln!(
        out,
        "\n![ratio to direct per target](plots/dataplane-ratios.png)\n"
    );
    let _ = writeln!(
        out,
        "![latency CDF at the fixed rate](plots/latency-cdf.png)\n"
    );
    let slower: Vec<String> = d
        .summary
        .iter()
        .filter(|s| s.target == Target::Mesh)
        .filter_map(|s| {
            let r = s.vs_haproxy?;
            let worse = if s.workload.lower_is_better() {
                r > 1.0
            } else {
                r < 1.0
            };
            worse.then(|| format!("{} ({:.2}× HAProxy)", w_short(s.workload), r))
        })
        .collect();
    let _ = writeln!(
        out,
        "**Where mesh is behind HAProxy in this run:** {}\n",
        if slower.is_empty() {
            "nowhere.".to_string()
        } else {
            slower.join(", ")
        }
    );
}

fn w_short(w: Workload) -> &'static str {
    match w {
        Workload::Crr32 => "CRR c=32",
        Workload::Crr128 => "CRR c=128",
        Workload::Rr => "RR c=1",
        Workload::Stream1 => "STREAM ×1 (Gbit/s)",
        Workload::Stream4 => "STREAM ×4 (Gbit/s)",
        Workload::Latency => "latency p99 (µs)",
        Workload::Udp => "UDP RR c=32",
    }
}

fn dns(out: &mut String, d: &DnsResults) {
    let _ = writeln!(out, "## DNS\n");
    run_line(out, "Measured", &d.run);
    let _ = writeln!(
        out,
        "{} names (`svcN.mesh A`), `dnsperf -c {} -T 1 -l {}` on CPU 0, the server alone on CPU 1, \
         a fresh namespace per trial, {} repetitions interleaved. CPU µs per query is the server's \
         user+system time over answered queries.\n",
        d.names,
        d.clients,
        d.secs,
        d.trials.iter().map(|t| t.rep).max().map_or(0, |r| r + 1)
    );
    let _ = writeln!(
        out,
        "| server | QPS median | min | max | CPU µs / query | mesh-dns QPS ÷ this |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for s in &d.summary {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            s.server.name(),
            s.qps.median,
            s.qps.min,
            s.qps.max,
            s.cpu_us_per_query.median,
            s.mesh_qps_ratio
        );
    }
    let _ = writeln!(out, "\n![DNS queries per second](plots/dns-qps.png)\n");
}

fn gossip(out: &mut String, g: &GossipResults) {
    let _ = writeln!(out, "## Gossip (deterministic simulator)\n");
    run_line(out, "Computed", &g.run);
    let _ = writeln!(
        out,
        "Real foca and real replicas per host, virtual time, seeded; the agent's default timers at \
         the commit above (anti-entropy 5 s). A change is one task registered on one host; \
         its time is until every live host has it. Withdrawal is a crash of a host with a routed task \
         until no live host routes to it. Loss is applied to every packet, UDP and sync alike.\n"
    );
    let _ = writeln!(
        out,
        "| nodes | loss | changes | p50 | p99 | max | crash → withdrawn everywhere | bytes/s per node |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &g.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0}% | {} | {:.2} s | {:.2} s | {:.2} s | {} | {:.0} |",
            r.nodes,
            r.loss * 100.0,
            r.changes,
            r.p50_ms as f64 / 1000.0,
            r.p99_ms as f64 / 1000.0,
            r.max_ms as f64 / 1000.0,
            r.withdrawal_ms
                .map_or("not within 300 s".into(), |w| format!(
                    "{:.1} s",
                    w as f64 / 1000.0
                )),
            r.bytes_per_node_s
        );
    }
    for (n, f) in &g.formation_ms {
        let _ = writeln!(
            out,
            "\n{n} hosts joining at once: 99% of hosts saw 99% of members after {}.",
            f.map_or("more than 600 s".into(), |ms| format!(
                "{:.1} s",
                ms as f64 / 1000.0
            ))
        );
    }
    let f = &g.full_sync;
    let _ = writeln!(
        out,
        "\n**Full sync** of {} services × {} tasks to a new host: {:.0} ms of CPU ({:.0} ms to build \
         the items, {:.0} ms postcard encode+decode, {:.0} ms to apply and build the first snapshot); \
         {:.1} MB on the wire, {:.0} ms more at 1 Gbit/s.\n",
        f.services,
        f.tasks_per_service,
        f.total_ms,
        f.build_digest_and_items_ms,
        f.encode_decode_ms,
        f.apply_and_snapshot_ms,
        f.bytes as f64 / 1e6,
        f.wire_ms_at_1gbit
    );
    let _ = writeln!(
        out,
        "**Against Serf/memberlist** (shared/research/gossip.md §4): the Serf convergence model gives \
         99.99% of 1,000 nodes in 2.2 s at 0% loss and 2.4 s at 10%; memberlist's failure-to-dead on a \
         LAN is about 9.5 s at 100 nodes with two confirmations (probe 1 s + 0.5 s + suspicion 8 s); \
         Serf's estimated maximum is about 41 KB/s per node (328 kbit/s).\n"
    );
    let _ = writeln!(out, "![gossip convergence](plots/gossip.png)\n");
}

fn api(out: &mut String, a: &ApiResults) {
    let _ = writeln!(out, "## API write cost\n");
    run_line(out, "Measured", &a.run);
    let _ = writeln!(
        out,
        "One `mesh agent` per size, each with its API on a unix socket (`--no-vips`, data dir \
         in a temp directory), filled through the API ({} connections, then the last {WARMUP} \
         one at a time; not timed). Then the agents take turns: each of {} rounds times one \
         create (`POST /v1/services`, one unpublished port) on every agent, on its keep-alive \
         connection, from the request's first byte to the end of the 201. The timed creates \
         stay in the tables.\n",
        a.fill_connections, a.samples
    );
    let _ = writeln!(out, "| services held | p50 | p90 | p99 | mean | max |");
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for r in &a.rows {
        let l = &r.create;
        let _ = writeln!(
            out,
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            r.services, l.p50_ms, l.p90_ms, l.p99_ms, l.mean_ms, l.max_ms
        );
    }
    if let (Some(first), Some(last), Some(met)) = (a.rows.first(), a.rows.last(), a.within_limit())
    {
        let _ = writeln!(
            out,
            "\n**{} ÷ {} services:** p50 {}×, mean {}×. The target is at most {RATIO_LIMIT}× for \
             both: {}.\n",
            last.services,
            first.services,
            ratio(a.p50_ratio),
            ratio(a.mean_ratio),
            if met { "met" } else { "not met" }
        );
    }
}

fn withdrawal(out: &mut String, w: &WithdrawalResults) {
    let _ = writeln!(out, "## Withdrawal of a crashed host (simulator)\n");
    run_line(out, "Measured", &w.run);
    let _ = writeln!(
        out,
        "Real foca and replicas per host, virtual time. A host with a routed task crashes; \
         the time is until no live host routes new connections to its tasks (a host held \
         suspect for the grace, or declared down). Then it restarts and the next one crashes. \
         Before the crashes, a quiet period with the same loss counts false withdrawals: a \
         live host's tasks withdrawn by a suspicion that outlived the grace, or a false down.\n"
    );
    let t = &w.timers;
    let _ = writeln!(
        out,
        "Timers: probe every {} ms, {} ms for the ack, {} indirect probes, a host whose probe \
         fails tells the suspect at once (Lifeguard's buddy system), a grace of {} ms up to \
         10 hosts and half as much again per tenfold, each update passed on \
         ⌈{}·log10(n+1)⌉ times, pending updates gossiped every {} ms. Where a row has fewer \
         than 100 crashes, its p99 is its slowest.\n",
        t.probe_period_ms,
        t.probe_rtt_ms,
        t.indirect_probes,
        t.suspect_grace_ms,
        t.retransmit_mult,
        t.gossip_interval_ms
    );
    let _ = writeln!(
        out,
        "| hosts | loss | crashes | p50 | p99 | max | false withdrawals (quiet period) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for r in &w.rows {
        let _ = writeln!(
            out,
            "| {} | {:.0}% | {} | {:.2} s | {:.2} s | {:.2} s | {} in {} s |",
            r.nodes,
            r.loss * 100.0,
            r.crashes,
            r.p50_ms as f64 / 1000.0,
            r.p99_ms as f64 / 1000.0,
            r.max_ms as f64 / 1000.0,
            r.false_withdrawals,
            r.quiet_secs
        );
    }
    let _ = writeln!(out);
}

fn nft_scale(out: &mut String, n: &NftScaleResults) {
    let _ = writeln!(out, "## nftables plane: apply time at scale\n");
    run_line(out, "Measured", &n.run);
    let _ = writeln!(
        out,
        "`mesh-bench nft-scale`: the real plane (`NftPlane::apply`) in a namespace of its own, \
         {} services with {} tasks each, a published port and a VIP per service ({} \
         frontends, {:.1} MB of rules). Goals: under 1 s from empty, under 10 ms for a \
         one-task change. Each change is written over netlink (the plane's writer) and, \
         for comparison, as the same edits through `nft -f`; medians of seven changes.\n",
        n.services,
        n.tasks_per_service,
        n.frontends,
        n.ruleset_bytes as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "| from empty (`nft -f`) | one task changed, netlink | one task changed, `nft -f` | nothing changed |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let _ = writeln!(
        out,
        "| {:.0} ms | {:.1} ms | {:.1} ms | {:.3} ms |\n",
        n.from_empty_ms, n.one_change_ms, n.one_change_nft_ms, n.unchanged_ms
    );
}

fn soak(out: &mut String, s: &SoakResults) {
    let _ = writeln!(out, "## Soak: {} minutes of churn\n", s.minutes);
    run_line(out, "Measured", &s.run);
    let rate = s
        .samples
        .last()
        .map_or(0.0, |l| l.task_changes as f64 / s.minutes.max(1) as f64);
    let _ = writeln!(
        out,
        "One agent (the build `mesh-bench soak --mesh` was given) under rolling updates \
         without pause: a task is added, and once it is healthy (3 s at most) the task it \
         replaces is removed, then a second's pause, {rate:.0} task changes a minute on \
         average. One backend of four is down for 5 of every 30 steps, so its task flaps \
         unhealthy and back. Two clients make HTTP requests through the published port \
         without pause, and a one-datagram UDP flow starts every 10 ms. Memory (VmRSS) and \
         open descriptors are read from /proc every minute, and the heap (in use, and free \
         but kept by the allocator) from the agent's `mesh_heap_*` metrics.\n"
    );
    // Minute 0 is read as the clients start, before any churn; the comparison starts
    // once it runs.
    let warm: Vec<&crate::soak::Sample> = s.samples.iter().filter(|x| x.minute >= 1).collect();
    let (Some(first), Some(last)) = (warm.first(), warm.last()) else {
        return;
    };
    let max_rss = warm.iter().map(|x| x.rss_kib).max().unwrap_or(0);
    let max_fds = warm.iter().map(|x| x.fds).max().unwrap_or(0);
    let min_rss = warm.iter().map(|x| x.rss_kib).min().unwrap_or(0);
    let min_fds = warm.iter().map(|x| x.fds).min().unwrap_or(0);
    let _ = writeln!(
        out,
        "| | minute {} | minute {} | lowest | highest |",
        first.minute, last.minute
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    let mib = |k: u64| k as f64 / 1024.0;
    let _ = writeln!(
        out,
        "| RSS | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
        mib(first.rss_kib),
        mib(last.rss_kib),
        mib(min_rss),
        mib(max_rss)
    );
    let heap = |f: fn(&crate::soak::Sample) -> Option<u64>| -> Option<[u64; 4]> {
        let all: Vec<u64> = warm.iter().filter_map(|x| f(x)).collect();
        Some([f(first)?, f(last)?, *all.iter().min()?, *all.iter().max()?])
    };
    for (name, row) in [
        ("heap in use", heap(|x| x.heap_in_use_kib)),
        (
            "heap free (kept by the allocator)",
            heap(|x| x.heap_free_kib),
        ),
    ] {
        if let Some([a, b, lo, hi]) = row {
            let _ = writeln!(
                out,
                "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
                mib(a),
                mib(b),
                mib(lo),
                mib(hi)
            );
        }
    }
    let _ = writeln!(
        out,
        "| descriptors | {} | {} | {} | {} |",
        first.fds, last.fds, min_fds, max_fds
    );
    // Task tombstones are kept 30 minutes, so the heap may grow until then; what it
    // does after is the leak test.
    let half = warm.iter().find(|x| x.minute >= s.minutes / 2);
    if let (Some(h), Some(a), Some(b)) = (
        half,
        half.and_then(|h| h.heap_in_use_kib),
        last.heap_in_use_kib,
    ) && last.minute > h.minute
    {
        let per_min = (b as f64 - a as f64) / (last.minute - h.minute) as f64;
        let _ = writeln!(
            out,
            "\nHeap in use from minute {} to minute {}: {:.1} to {:.1} MiB, {:+.1} KiB a minute.",
            h.minute,
            last.minute,
            mib(a),
            mib(b),
            per_min
        );
    }
    let _ = writeln!(
        out,
        "\n{} task changes, {} API calls of the churn that failed or timed out, and {} HTTP \
         requests ({} failed). About 200 of the descriptors \
         are the UDP flows alive at any time (one socket each, until their idle timeout). \
         A failed request is one that reached a backend's accept queue just before the \
         backend closed its listener: the kernel had completed the handshake, so the \
         proxy's connect succeeded and the reset came after the request was forwarded, \
         when no L4 proxy can retry it.\n",
        last.task_changes, last.api_errors, last.requests, last.failed_requests
    );
    let _ = writeln!(out, "![soak](plots/soak.png)\n");
}

pub fn write(dir: &Path, bench_dir: &Path, inputs: &Inputs) -> Result<()> {
    let mut out = String::new();
    let _ = writeln!(out, "# mesh benchmark results\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run.sh` (see bench/README.md for the method and how to rerun). \
         Absolute figures on a shared 2-core VM are noise; the ratios, taken in one interleaved run, \
         are the result.\n"
    );
    if let Some(d) = &inputs.dataplane {
        dataplane(&mut out, d);
    }
    let optimisations = bench_dir.join("OPTIMISATIONS.md");
    if let Ok(text) = std::fs::read_to_string(&optimisations) {
        out.push_str(&text);
        out.push('\n');
    }
    if let Some(d) = &inputs.dns {
        dns(&mut out, d);
    }
    if let Some(g) = &inputs.gossip {
        gossip(&mut out, g);
    }
    if let Some(a) = &inputs.api {
        api(&mut out, a);
    }
    if let Some(w) = &inputs.withdrawal {
        withdrawal(&mut out, w);
    }
    // The chaos table is written by scripts/chaos.sh --long, already in Markdown: it
    // comes from the integration tests, not from a bench run.
    if let Ok(text) = std::fs::read_to_string(dir.join("chaos.md")) {
        let _ = writeln!(out, "## Chaos suite (`scripts/chaos.sh --long`)\n");
        out.push_str(&text);
        out.push('\n');
    }
    if let Some(s) = &inputs.soak {
        soak(&mut out, s);
    }
    if let Some(n) = &inputs.nft_scale {
        nft_scale(&mut out, n);
    }
    let results = bench_dir.join("RESULTS.md");
    std::fs::write(&results, out).with_context(|| format!("write {}", results.display()))?;
    eprintln!("wrote {} (from {})", results.display(), dir.display());
    Ok(())
}
