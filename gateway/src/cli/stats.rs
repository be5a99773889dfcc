//! Percentiles for the benchmarks.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub n: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentiles of samples in milliseconds.
pub fn stats(mut samples: Vec<f64>) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let rank =
        |p: f64| samples[((p / 100.0 * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    Some(Stats {
        n: samples.len(),
        p50_ms: rank(50.0),
        p95_ms: rank(95.0),
        min_ms: samples[0],
        max_ms: samples[samples.len() - 1],
    })
}

pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = stats((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!((s.p50_ms, s.p95_ms, s.min_ms, s.max_ms), (50.0, 95.0, 1.0, 100.0));
        let one = stats(vec![7.0]).unwrap();
        assert_eq!((one.p50_ms, one.p95_ms), (7.0, 7.0));
        assert!(stats(vec![]).is_none());
    }
}
