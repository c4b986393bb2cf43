//! Lock-free fixed-bucket histograms for `/metrics`.
//!
//! Hand-written rather than taken from a generic metrics crate: an
//! observation is one bucket search over a short static slice plus two
//! relaxed atomic adds, with no allocation, no lock and no label lookup, so
//! recording on the append and commit paths costs next to nothing. Buckets
//! are stored per bucket (not cumulative) and made cumulative when a
//! snapshot is taken, which happens only on a scrape.

use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in nanoseconds: 10 µs to 1 s (what an append or an
/// `fdatasync` takes, from page-cache speed to a struggling disk).
pub const LATENCY_BUCKETS_NS: &[u64] = &[
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Records per WAL sync (group-commit batch size).
pub const BATCH_RECORD_BUCKETS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// Bytes per WAL sync.
pub const BATCH_BYTE_BUCKETS: &[u64] = &[
    256,
    1024,
    4096,
    16 * 1024,
    64 * 1024,
    256 * 1024,
    1024 * 1024,
    4 * 1024 * 1024,
    16 * 1024 * 1024,
];

/// A histogram of `u64` observations over fixed upper bounds (inclusive,
/// Prometheus `le` semantics), with an implicit `+Inf` bucket.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One counter per bound, then the `+Inf` bucket.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    /// `bounds` must be ascending.
    pub fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    #[inline]
    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Records a duration in nanoseconds (saturating at `u64::MAX`).
    #[inline]
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A cumulative snapshot; `unit` converts observations to the exported
    /// base unit (1e-9 for nanoseconds to seconds, 1.0 for counts).
    pub fn snapshot(&self, name: &'static str, help: &'static str, unit: f64) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.bounds.len());
        let mut acc = 0u64;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.buckets[i].load(Ordering::Relaxed);
            buckets.push((*b as f64 * unit, acc));
        }
        acc += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            name,
            help,
            buckets,
            count: acc,
            sum: self.sum.load(Ordering::Relaxed) as f64 * unit,
        }
    }
}

/// A histogram as exported: cumulative counts per upper bound (the `+Inf`
/// bucket is `count`).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub name: &'static str,
    pub help: &'static str,
    /// `(upper bound, observations <= bound)`, ascending.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations land in the first bucket whose bound is >= the value,
    /// and the snapshot is cumulative with `count` covering `+Inf`.
    #[test]
    fn buckets_are_inclusive_and_cumulative() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 2, 10, 11, 100, 101, 5000] {
            h.observe(v);
        }
        let s = h.snapshot("x", "x", 1.0);
        assert_eq!(s.buckets, vec![(1.0, 2), (10.0, 4), (100.0, 6)]);
        assert_eq!(s.count, 8);
        assert_eq!(s.sum, (1 + 2 + 10 + 11 + 100 + 101 + 5000) as f64);
    }
}
