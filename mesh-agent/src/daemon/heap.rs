//! What the allocator holds, next to `process_resident_memory_bytes`: memory in use
//! by live allocations, and memory the allocator keeps free. RSS alone cannot tell a
//! leak (in-use grows) from a heap that fragments or keeps freed pages (in-use flat,
//! free grows); the soak in `bench/` samples both.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Opts};

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

/// (in use, free) in bytes. mallinfo2 sums every arena, under each arena's lock, in
/// microseconds; a scrape calls it once.
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
