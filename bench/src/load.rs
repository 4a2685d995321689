//! The load generator, run inside the client namespace; prints one JSON `LoadResult`.
//!
//! Closed-loop workloads (CRR, RR, UDP) run `conc` loops for warm-up plus `secs` and
//! count what completes after the warm-up. The latency workload is open-loop: a
//! scheduler thread releases connections on a fixed timetable, and each latency is
//! measured from the time the connection was due, not from when it was sent, so a
//! stalled LB shows as latency instead of silently lowering the offered rate.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub const MSG: usize = 64;
/// Open-loop connections in flight beyond this are counted as errors, not started.
const MAX_IN_FLIGHT: usize = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Kind {
    Crr,
    Rr,
    Udp,
    Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// (percentile, µs) points for the CDF plot.
    pub cdf: Vec<(f64, f64)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Operations completed after the warm-up.
    pub ops: u64,
    /// Including the warm-up: what the LB's CPU time is divided by.
    pub total_ops: u64,
    pub errors: u64,
    pub secs: f64,
    pub rate: f64,
    pub latency: Option<Latency>,
}

pub struct Params {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub conc: usize,
    pub secs: f64,
    pub warmup: f64,
    /// Connections per second, for `Latency`.
    pub rate: f64,
}

#[derive(Default)]
struct Counts {
    ops: Cell<u64>,
    total: Cell<u64>,
    errors: Cell<u64>,
}

pub fn run(p: &Params) -> Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if p.kind == Kind::Latency {
        return open_loop(&rt, p);
    }
    let counts = Rc::new(Counts::default());
    let start = Instant::now();
    let warm = start + Duration::from_secs_f64(p.warmup);
    let end = warm + Duration::from_secs_f64(p.secs);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut loops = Vec::new();
        for i in 0..p.conc {
            let c = counts.clone();
            let addr = p.addr;
            loops.push(match p.kind {
                Kind::Crr => tokio::task::spawn_local(crr_loop(addr, warm, end, c)),
                Kind::Rr => tokio::task::spawn_local(rr_loop(addr, warm, end, c)),
                Kind::Udp => tokio::task::spawn_local(udp_loop(addr, warm, end, c, i)),
                Kind::Latency => unreachable!("handled above"),
            });
        }
        for l in loops {
            let _ = l.await;
        }
    });
    let secs = p.secs;
    Ok(LoadResult {
        ops: counts.ops.get(),
        total_ops: counts.total.get(),
        errors: counts.errors.get(),
        secs,
        rate: counts.ops.get() as f64 / secs,
        latency: None,
    })
}

fn done(c: &Counts, warm: Instant) {
    c.total.set(c.total.get() + 1);
    if Instant::now() >= warm {
        c.ops.set(c.ops.get() + 1);
    }
}

async fn failed(c: &Counts) {
    c.errors.set(c.errors.get() + 1);
    // A refusing target must not turn the client into a spinning CPU hog.
    tokio::time::sleep(Duration::from_millis(1)).await;
}

async fn transaction(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; MSG];
    s.write_all(&[b'x'; MSG]).await?;
    s.read_exact(&mut buf).await?;
    Ok(())
}

async fn crr_loop(addr: SocketAddr, warm: Instant, end: Instant, c: Rc<Counts>) {
    while Instant::now() < end {
        match transaction(addr).await {
            Ok(()) => done(&c, warm),
            Err(_) => failed(&c).await,
        }
    }
}

async fn rr_loop(addr: SocketAddr, warm: Instant, end: Instant, c: Rc<Counts>) {
    let mut buf = [0u8; MSG];
    while Instant::now() < end {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            failed(&c).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        while Instant::now() < end {
            let r = async {
                s.write_all(&[b'x'; MSG]).await?;
                s.read_exact(&mut buf).await
            };
            match r.await {
                Ok(_) => done(&c, warm),
                Err(_) => {
                    failed(&c).await;
                    break;
                }
            }
        }
    }
}

async fn udp_loop(addr: SocketAddr, warm: Instant, end: Instant, c: Rc<Counts>, i: usize) {
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0").await else {
        return failed(&c).await;
    };
    if sock.connect(addr).await.is_err() {
        return failed(&c).await;
    }
    let mut buf = [0u8; 2048];
    let msg = [i as u8; MSG];
    while Instant::now() < end {
        if sock.send(&msg).await.is_err() {
            failed(&c).await;
            continue;
        }
        // A lost datagram costs one timeout and counts as an error.
        match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
            Ok(Ok(n)) if n == MSG => done(&c, warm),
            _ => c.errors.set(c.errors.get() + 1),
        }
    }
}

fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

fn open_loop(rt: &tokio::runtime::Runtime, p: &Params) -> Result<LoadResult> {
    if !p.rate.is_finite() || p.rate <= 0.0 {
        bail!(
            "--rate must be a positive number of connections per second, not {}",
            p.rate
        );
    }
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?,
    ));
    let total = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let period = Duration::from_secs_f64(1.0 / p.rate);
    let start = Instant::now() + Duration::from_millis(10);
    let warm = start + Duration::from_secs_f64(p.warmup);
    let end = warm + Duration::from_secs_f64(p.secs);
    let handle = rt.handle().clone();
    let scheduler = {
        let (hist, total, errors, in_flight, addr) = (
            hist.clone(),
            total.clone(),
            errors.clone(),
            in_flight.clone(),
            p.addr,
        );
        std::thread::spawn(move || {
            // The default 50 µs slack would smear every release time.
            set_timer_slack_ns(1);
            let mut due = start;
            while due < end {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    errors.fetch_add(1, Ordering::Relaxed);
                } else {
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let (hist, total, errors, in_flight) = (
                        hist.clone(),
                        total.clone(),
                        errors.clone(),
                        in_flight.clone(),
                    );
                    let intended = due;
                    handle.spawn(async move {
                        let ok = transaction(addr).await.is_ok();
                        let took = intended.elapsed();
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        total.fetch_add(1, Ordering::Relaxed);
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        } else if intended >= warm {
                            let us = took.as_micros().max(1) as u64;
                            let _ = hist.lock().unwrap().record(us);
                        }
                    });
                }
                due += period;
            }
        })
    };
    rt.block_on(async {
        while !scheduler.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the stragglers finish (or fail) so they are counted, not dropped.
        let drain_until = Instant::now() + Duration::from_secs(10);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let _ = scheduler.join();
    let h = hist.lock().unwrap();
    let q = |pct: f64| h.value_at_quantile(pct / 100.0) as f64;
    let cdf = CDF_POINTS.iter().map(|pct| (*pct, q(*pct))).collect();
    Ok(LoadResult {
        ops: h.len(),
        total_ops: total.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs: p.secs,
        rate: h.len() as f64 / p.secs,
        latency: Some(Latency {
            p50_us: q(50.0),
            p99_us: q(99.0),
            p999_us: q(99.9),
            max_us: h.max() as f64,
            cdf,
        }),
    })
}

const CDF_POINTS: &[f64] = &[
    0.0, 1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 92.5, 95.0,
    97.0, 98.0, 99.0, 99.5, 99.7, 99.9, 99.95, 99.99, 100.0,
];

/// Waits until an echo and an HTTP request both succeed through `echo`/`http`: the
/// target is up and has a healthy backend.
pub fn probe(echo: SocketAddr, http: SocketAddr, udp: bool, deadline: Duration) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let until = Instant::now() + deadline;
        let mut last = String::new();
        while Instant::now() < until {
            match probe_once(echo, http, udp).await {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("target not ready after {deadline:?}: {last}")
    })
}

async fn probe_once(echo: SocketAddr, http: SocketAddr, udp: bool) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(1), transaction(echo))
        .await
        .context("echo timed out")?
        .with_context(|| format!("echo via {echo}"))?;
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(http))
        .await
        .context("http connect timed out")??;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
        .await
        .context("http response timed out")??;
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!(
            "http via {http}: unexpected response {:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    if udp {
        let sock = UdpSocket::bind("0.0.0.0:0").await?;
        sock.connect(echo).await?;
        sock.send(b"probe").await?;
        let mut b = [0u8; 16];
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut b))
            .await
            .context("udp echo timed out")??;
    }
    Ok(())
}
