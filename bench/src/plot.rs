//! PNG plots for RESULTS.md: the data plane as ratios to direct, the latency CDF at
//! the fixed rate, DNS QPS, and gossip convergence against cluster size.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::dataplane::{DataplaneResults, Workload};
use crate::dns::DnsResults;
use crate::gossip::{GossipResults, LOSSES};
use crate::report::Inputs;
use crate::soak::SoakResults;
use crate::stats::Spread;
use crate::targets::Target;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// One per target of `Target::ORDER`, in that order (the array's length is checked by
/// the compiler against it).
const COLORS: [RGBColor; Target::ORDER.len()] = [
    RGBColor(90, 90, 90),
    RGBColor(158, 202, 225),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(188, 189, 34),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
    RGBColor(214, 39, 40),
    RGBColor(255, 152, 150),
    RGBColor(44, 160, 44),
];

fn color(t: Target) -> RGBColor {
    COLORS[Target::ORDER.iter().position(|x| *x == t).unwrap_or(0)]
}

fn register_font() -> Result<()> {
    let bytes = std::fs::read(FONT)
        .with_context(|| format!("read {FONT} (apt-get install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

pub fn all(dir: &Path, inputs: &Inputs) -> Result<()> {
    register_font()?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if let Some(d) = &inputs.dataplane {
        ratios(&dir.join("dataplane-ratios.png"), d)?;
        latency_cdf(&dir.join("latency-cdf.png"), d)?;
    }
    if let Some(d) = &inputs.dns {
        dns(&dir.join("dns-qps.png"), d)?;
    }
    if let Some(g) = &inputs.gossip {
        gossip(&dir.join("gossip.png"), g)?;
    }
    if let Some(s) = &inputs.soak {
        soak(&dir.join("soak.png"), s)?;
    }
    Ok(())
}

/// The agent's memory (RSS and, where sampled, heap in use, MiB, left axis) and
/// descriptors (right axis) per minute.
fn soak(path: &Path, s: &SoakResults) -> Result<()> {
    let minutes = s.samples.last().map_or(1, |x| x.minute.max(1)) as f64;
    let rss_top = s.samples.iter().map(|x| x.rss_kib).max().unwrap_or(1) as f64 / 1024.0 * 1.3;
    let fd_top = s.samples.iter().map(|x| x.fds).max().unwrap_or(1) as f64 * 1.3;
    let root = BitMapBackend::new(path, (800, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Soak: agent memory and descriptors under churn",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .right_y_label_area_size(55)
        .build_cartesian_2d(0f64..minutes, 0f64..rss_top.max(1.0))
        .map_err(err)?
        .set_secondary_coord(0f64..minutes, 0f64..fd_top.max(1.0));
    chart
        .configure_mesh()
        .x_desc("minutes")
        .y_desc("RSS (MiB)")
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("open descriptors")
        .draw()
        .map_err(err)?;
    let rss: Vec<(f64, f64)> = s
        .samples
        .iter()
        .map(|x| (x.minute as f64, x.rss_kib as f64 / 1024.0))
        .collect();
    let fds: Vec<(f64, f64)> = s
        .samples
        .iter()
        .map(|x| (x.minute as f64, x.fds as f64))
        .collect();
    let heap: Vec<(f64, f64)> = s
        .samples
        .iter()
        .filter_map(|x| Some((x.minute as f64, x.heap_in_use_kib? as f64 / 1024.0)))
        .collect();
    let (c1, c2, c3) = (COLORS[2], COLORS[3], COLORS[1]);
    chart
        .draw_series(LineSeries::new(rss, c1.stroke_width(2)))
        .map_err(err)?
        .label("RSS")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c1.stroke_width(2)));
    if !heap.is_empty() {
        chart
            .draw_series(LineSeries::new(heap, c3.stroke_width(2)))
            .map_err(err)?
            .label("heap in use")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c3.stroke_width(2)));
    }
    chart
        .draw_secondary_series(LineSeries::new(fds, c2.stroke_width(2)))
        .map_err(err)?
        .label("descriptors")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c2.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn short(w: Workload) -> &'static str {
    match w {
        Workload::Crr32 => "CRR c32",
        Workload::Crr128 => "CRR c128",
        Workload::Rr => "RR c1",
        Workload::Stream1 => "STREAM 1",
        Workload::Stream4 => "STREAM 4",
        Workload::Latency => "p99 (lower=better)",
        Workload::Udp => "UDP RR",
    }
}

fn ratios(path: &Path, d: &DataplaneResults) -> Result<()> {
    let workloads: Vec<Workload> = Workload::ALL
        .into_iter()
        .filter(|w| d.summary.iter().any(|s| s.workload == *w))
        .collect();
    let proxies: Vec<Target> = Target::ORDER
        .into_iter()
        .filter(|t| *t != Target::Direct && d.summary.iter().any(|s| s.target == *t))
        .collect();
    let top = d
        .summary
        .iter()
        .filter_map(|s| s.vs_direct)
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput and p99 as a ratio to direct (median of repetitions)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..workloads.len() as f64, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(workloads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < workloads.len() {
                short(workloads[i]).to_string()
            } else {
                String::new()
            }
        })
        .y_desc("÷ direct")
        .draw()
        .map_err(err)?;
    for (k, t) in proxies.iter().enumerate() {
        let bars: Vec<_> = workloads
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let r = d
                    .summary
                    .iter()
                    .find(|s| s.workload == *w && s.target == *t)?
                    .vs_direct?;
                let width = 0.7 / proxies.len() as f64;
                let x0 = i as f64 + 0.15 + k as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.92, r)],
                    color(*t).filled(),
                ))
            })
            .collect();
        let c = color(*t);
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(t.to_string())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .draw_series(LineSeries::new(
            [(0.0, 1.0), (workloads.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Percentile → "nines" (50 → 0.3, 90 → 1, 99 → 2, 99.9 → 3), capped at 4.
fn nines(p: f64) -> f64 {
    (-(1.0 - p / 100.0).max(1e-4).log10()).min(4.0)
}

fn latency_cdf(path: &Path, d: &DataplaneResults) -> Result<()> {
    let mut lines = Vec::new();
    for t in Target::ORDER {
        let ls = d.latencies(t);
        let Some(first) = ls.first() else { continue };
        let points: Vec<(f64, f64)> = first
            .cdf
            .iter()
            .enumerate()
            .filter(|(_, (p, _))| *p >= 1.0)
            .map(|(i, (p, _))| {
                let v: Vec<f64> = ls
                    .iter()
                    .filter_map(|l| l.cdf.get(i).map(|c| c.1))
                    .collect();
                (nines(*p), Spread::of(&v).map_or(1.0, |s| s.median.max(1.0)))
            })
            .collect();
        lines.push((t, points));
    }
    if lines.is_empty() {
        return Ok(());
    }
    let max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(10.0f64, f64::max)
        * 1.5;
    let min = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(f64::MAX, f64::min)
        * 0.7;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "CRR latency at {:.0} conn/s, open loop (median over repetitions)",
                d.latency_rate.unwrap_or(0.0)
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..4f64, (min.max(1.0)..max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            _ => "p99.99".into(),
        })
        .y_desc("µs from the intended send time")
        .draw()
        .map_err(err)?;
    for (t, points) in lines {
        let c = color(t);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(err)?
            .label(t.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn dns(path: &Path, d: &DnsResults) -> Result<()> {
    let top = d.summary.iter().map(|s| s.qps.max).fold(1.0f64, f64::max) * 1.15 / 1000.0;
    let root = BitMapBackend::new(path, (800, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = d.summary.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "DNS: thousand queries per second on one core (median, min–max)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(err)?;
    let names: Vec<&str> = d.summary.iter().map(|s| s.server.name()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < names.len() {
                names[i].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("kQPS")
        .draw()
        .map_err(err)?;
    for (i, s) in d.summary.iter().enumerate() {
        let c = if i == 0 { COLORS[2] } else { COLORS[0] };
        let x = i as f64;
        chart
            .draw_series([Rectangle::new(
                [(x + 0.2, 0.0), (x + 0.8, s.qps.median / 1000.0)],
                c.filled(),
            )])
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                [(x + 0.5, s.qps.min / 1000.0), (x + 0.5, s.qps.max / 1000.0)],
                BLACK.stroke_width(2),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)
}

fn gossip(path: &Path, g: &GossipResults) -> Result<()> {
    let max_nodes = g.rows.iter().map(|r| r.nodes).max().unwrap_or(10) as f64;
    let top = g.rows.iter().map(|r| r.p99_ms).max().unwrap_or(1000) as f64 / 1000.0 * 1.2;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Task change → every host: p99 (solid) and p50 (dashed)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((50f64..max_nodes * 2.0).log_scale(), 0f64..top.max(1.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("hosts")
        .y_desc("seconds")
        .draw()
        .map_err(err)?;
    for (k, loss) in LOSSES.iter().enumerate() {
        let c = COLORS[k + 1];
        let rows: Vec<_> = g
            .rows
            .iter()
            .filter(|r| (r.loss - loss).abs() < 1e-9)
            .collect();
        let p99: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.nodes as f64, r.p99_ms as f64 / 1000.0))
            .collect();
        let p50: Vec<(f64, f64)> = rows
            .iter()
            .map(|r| (r.nodes as f64, r.p50_ms as f64 / 1000.0))
            .collect();
        chart
            .draw_series(LineSeries::new(p99, c.stroke_width(2)))
            .map_err(err)?
            .label(format!("{:.0}% loss", loss * 100.0))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(p50, 6, 4, c.stroke_width(1)))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
