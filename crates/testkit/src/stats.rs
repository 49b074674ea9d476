//! Percentiles of measured samples, for the benchmarks and the conformance tool: one
//! definition (nearest rank) everywhere.

use serde::Serialize;

/// Nearest-rank percentile of sorted samples (`q` in 0..=1); NaN when there are none.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    let rank = (q * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A summary of samples (any unit).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub p25: f64,
    pub median: f64,
    pub p75: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// The summary of `samples`; every figure is NaN (and `n` 0) when there are none.
    pub fn of(samples: &[f64]) -> Summary {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let mean = if s.is_empty() {
            f64::NAN
        } else {
            s.iter().sum::<f64>() / s.len() as f64
        };
        Summary {
            n: s.len(),
            min: s.first().copied().unwrap_or(f64::NAN),
            p25: nearest_rank(&s, 0.25),
            median: nearest_rank(&s, 0.5),
            p75: nearest_rank(&s, 0.75),
            p99: nearest_rank(&s, 0.99),
            max: s.last().copied().unwrap_or(f64::NAN),
            mean,
        }
    }

    /// `median unit (IQR p25–p75, min …, max …, n=…)` with `digits` decimals.
    pub fn display(&self, unit: &str, digits: usize) -> String {
        format!(
            "{:.d$} {unit} (IQR {:.d$}–{:.d$}, min {:.d$}, max {:.d$}, n={})",
            self.median,
            self.p25,
            self.p75,
            self.min,
            self.max,
            self.n,
            d = digits
        )
    }
}

/// Milliseconds of a duration, rounded to microseconds (for JSON output).
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&samples);
        assert_eq!(s.n, 100);
        assert_eq!((s.min, s.p25, s.median), (1.0, 25.0, 50.0));
        assert_eq!((s.p75, s.p99, s.max, s.mean), (75.0, 99.0, 100.0, 50.5));
        let one = Summary::of(&[7.0]);
        assert_eq!((one.median, one.p99), (7.0, 7.0));
        let odd = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((odd.min, odd.median, odd.max), (1.0, 3.0, 5.0));
        let none = Summary::of(&[]);
        assert_eq!(none.n, 0);
        assert!(none.median.is_nan());
    }

    #[test]
    fn ms_rounds_to_microseconds() {
        assert_eq!(ms(std::time::Duration::from_nanos(1_234_567)), 1.235);
    }
}
