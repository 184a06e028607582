//! Latency samples, percentiles and medians.
//!
//! Latencies are kept as raw nanosecond samples (no histogram buckets), so percentiles are exact
//! nearest-rank values. Each recorder holds at most `MAX_SAMPLES`; past that it keeps every
//! n-th sample (a fixed stride that doubles each time the buffer fills), so memory stays bounded
//! on a fast run and the sample stays spread over the whole window.

use std::time::Duration;

/// Samples one recorder keeps (8 MiB of u64).
const MAX_SAMPLES: usize = 1 << 20;

/// Latency samples of one thread (or of many, after `merge`).
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u64>,
    /// Keep one sample in `stride`.
    stride: u64,
    seen: u64,
}

impl Latencies {
    pub fn new() -> Latencies {
        Latencies {
            samples: Vec::new(),
            stride: 1,
            seen: 0,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        self.seen += 1;
        // The stride is a power of two (1, then doubled), so a mask picks every stride-th.
        if self.seen & (self.stride.max(1) - 1) != 0 {
            return;
        }
        if self.samples.len() >= MAX_SAMPLES {
            // Keep every other sample and halve the rate from here on.
            let mut i = 0;
            self.samples.retain(|_| {
                i += 1;
                i % 2 == 0
            });
            self.stride = self.stride.max(1) * 2;
        }
        self.samples
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Latencies) {
        self.seen += other.seen;
        self.samples.extend(other.samples);
        self.stride = self.stride.max(other.stride);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Nearest-rank percentiles in microseconds, one per entry of `ps` (each in 0..=100).
    /// `None` when no sample was taken.
    pub fn percentiles_us(&mut self, ps: &[f64]) -> Option<Vec<f64>> {
        if self.samples.is_empty() {
            return None;
        }
        self.samples.sort_unstable();
        Some(
            ps.iter()
                .map(|&p| nearest_rank(&self.samples, p) as f64 / 1_000.0)
                .collect(),
        )
    }
}

/// The nearest-rank percentile `p` (0..=100) of sorted, non-empty `sorted`.
pub fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    // The epsilon keeps 99.9% of 1000 at rank 999: 0.999 * 1000 is 999.0000000000001 in f64.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Median of `values` (mean of the two middle values for an even count); NaNs are ignored.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_matches_definition() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(nearest_rank(&v, 50.0), 500);
        assert_eq!(nearest_rank(&v, 99.0), 990);
        assert_eq!(nearest_rank(&v, 99.9), 999);
        assert_eq!(nearest_rank(&v, 100.0), 1000);
        assert_eq!(nearest_rank(&v, 0.0), 1);
        assert_eq!(nearest_rank(&[7], 99.9), 7);
    }

    #[test]
    fn median_odd_even_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn recorder_stays_bounded() {
        let mut l = Latencies::new();
        for i in 0..(3 * MAX_SAMPLES as u64) {
            l.record(Duration::from_nanos(i));
        }
        assert!(l.len() <= MAX_SAMPLES);
        let p = l.percentiles_us(&[50.0]).expect("samples");
        // The kept samples still span the whole run: the median sits near the middle.
        let mid = 1.5 * MAX_SAMPLES as f64 / 1_000.0;
        assert!(
            (p[0] - mid).abs() < mid * 0.05,
            "median {} vs {}",
            p[0],
            mid
        );
    }
}
