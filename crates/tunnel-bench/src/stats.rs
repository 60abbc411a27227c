//! Latency summaries.

use std::time::Duration;

use serde::Serialize;

/// Percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) n: usize,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) mean_ms: f64,
}

impl Latency {
    pub(crate) fn of(samples: &[Duration]) -> Latency {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        // Nearest-rank percentile: the smallest sample with at least p% of samples at or below.
        let pct = |p: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            v[rank.clamp(1, n) - 1]
        };
        Latency {
            n,
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: v.last().copied().unwrap_or(f64::NAN),
            mean_ms: if n == 0 {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / n as f64
            },
        }
    }

    /// `p50 / p90 / p99 / max` in ms.
    pub(crate) fn line(&self) -> String {
        format!(
            "{} / {} / {} / {} ms",
            ms(self.p50_ms),
            ms(self.p90_ms),
            ms(self.p99_ms),
            ms(self.max_ms)
        )
    }
}

pub(crate) fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&s);
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(l.n, 100);
    }
}
