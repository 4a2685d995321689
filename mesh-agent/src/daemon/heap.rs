//! What the allocator holds, next to `process_resident_memory_bytes`: memory in use
//! by live allocations, and memory the allocator keeps free. RSS alone cannot tell a
//! leak (in-use grows) from a heap that fragments or keeps freed pages (in-use flat,
//! free grows); the soak in `bench/` samples both.
//!
//! And a minute's trim of that free memory. glibc gives back only the top of its main
//! arena by itself; the pages freed in the middle of an arena, and in the per-thread
//! arenas that tokio's workers use, stay resident. In the soak, a burst of load left
//! 30 MB free and resident, and RSS grew with every burst while the memory in use
//! stayed at 15–18 MB.

use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Opts};
use tokio_util::sync::CancellationToken;

pub struct HeapCollector {
    in_use: IntGauge,
    free: IntGauge,
}

impl HeapCollector {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            in_use: IntGauge::with_opts(Opts::new(
                "mesh_heap_in_use_bytes",
                "Bytes of live heap allocations (glibc mallinfo2: arena in use plus mmapped blocks)",
            ))?,
            free: IntGauge::with_opts(Opts::new(
                "mesh_heap_free_bytes",
                "Bytes the allocator holds free in its arenas, not given back to the kernel",
            ))?,
        })
    }
}

impl Collector for HeapCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.in_use
            .desc()
            .into_iter()
            .chain(self.free.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some((in_use, free)) = heap() {
            self.in_use.set(i64::try_from(in_use).unwrap_or(i64::MAX));
            self.free.set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        self.in_use
            .collect()
            .into_iter()
            .chain(self.free.collect())
            .collect()
    }
}

pub const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Returns the allocator's free pages to the kernel every `period`, until `stop`.
/// malloc_trim walks every arena under its lock, so it runs on the blocking pool,
/// not on a worker.
pub async fn trim_every(period: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes a size and touches only the allocator's own state,
    // under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// (in use, free) in bytes. mallinfo2 sums every arena, under each arena's lock; a
/// scrape calls it once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> Option<(usize, usize)> {
    // SAFETY: mallinfo2 takes no arguments, returns a plain struct by value, and is
    // thread-safe (glibc 2.33+; Debian 12 ships 2.36).
    let m = unsafe { libc::mallinfo2() };
    Some((m.uordblks.saturating_add(m.hblkhd), m.fordblks))
}

/// Another allocator (musl) reports nothing; the gauges stay at 0.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> Option<(usize, usize)> {
    None
}
