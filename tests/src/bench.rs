//! What the benchmarks share: the durability modes they compare, and latency arithmetic.

use std::time::Duration;

use nvlog::Durability;

/// A durability mode as the benchmarks' `--modes` flags name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Durable once copied into the mapping.
    Process,
    /// Durable once msync(MS_SYNC) returned.
    Power,
}

impl Mode {
    /// The name reports and configs use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Process => "process",
            Mode::Power => "power",
        }
    }

    /// The NVLog's durability.
    pub fn durability(self) -> Durability {
        match self {
            Mode::Process => Durability::Process,
            Mode::Power => Durability::Power,
        }
    }
}

/// A duration in nanoseconds, saturating.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds as microseconds, for reports.
#[allow(clippy::cast_precision_loss)]
pub fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Nearest-rank percentile of sorted latencies, `per_mille` of 1000; 0 for no samples.
pub fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 500), 50);
        assert_eq!(percentile(&sorted, 990), 99);
        assert_eq!(percentile(&sorted, 1000), 100);
        assert_eq!(percentile(&[7], 990), 7);
        assert_eq!(percentile(&[], 500), 0);
    }
}
