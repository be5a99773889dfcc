//! Driving `oha` and reading its JSON summary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::scenario::Phase;

/// What one oha run measured. Latencies in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub statuses: BTreeMap<u16, u64>,
    /// Transport errors (no HTTP status), by message.
    pub errors: BTreeMap<String, u64>,
}

impl Run {
    /// Counts, rate and percentiles of latencies (ms) measured by our own
    /// client over `took`.
    pub fn set_latencies(&mut self, mut lat: Vec<f64>, took: std::time::Duration) {
        lat.sort_by(f64::total_cmp);
        self.requests = lat.len() as u64;
        self.rps = lat.len() as f64 / took.as_secs_f64().max(1e-9);
        self.p50_ms = crate::run::percentile(&lat, 50.0);
        self.p95_ms = crate::run::percentile(&lat, 95.0);
        self.p99_ms = crate::run::percentile(&lat, 99.0);
        self.max_ms = lat.last().copied().unwrap_or(0.0);
    }

    pub fn non_2xx(&self) -> u64 {
        self.statuses.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(_, n)| n).sum::<u64>()
            + self.errors.values().sum::<u64>()
    }
}

/// The oha binary and how it is asked for JSON, found once.
#[derive(Debug, Clone)]
pub struct Oha {
    path: PathBuf,
    /// Newer oha say `--output-format json`, older ones `--json`.
    json_flag: Vec<String>,
}

impl Oha {
    /// `oha` on PATH or in ~/.cargo/bin; installed with `cargo install` if
    /// missing (about five minutes; `--locked`, or it fails to build).
    pub fn ensure_installed() -> anyhow::Result<Self> {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let candidates = [PathBuf::from("oha"), home.join(".cargo/bin/oha")];
        let works = |c: &Path| {
            std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success())
        };
        let path = match candidates.iter().find(|c| works(c)) {
            Some(c) => c.clone(),
            None => {
                eprintln!("[loadtest] installing oha (cargo install oha --locked, ~5 min)");
                let st = std::process::Command::new("cargo")
                    .args(["install", "--locked", "--quiet", "oha"])
                    .status()?;
                anyhow::ensure!(st.success(), "cargo install oha failed");
                home.join(".cargo/bin/oha")
            }
        };
        let help =
            std::process::Command::new(&path).arg("--help").output().map(|o| o.stdout).unwrap_or_default();
        let json_flag = if String::from_utf8_lossy(&help).contains("--output-format") {
            vec!["--output-format".into(), "json".into()]
        } else {
            vec!["--json".into()]
        };
        Ok(Self { path, json_flag })
    }
}

#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub url: String,
    pub body: &'a str,
    pub content_type: &'a str,
}

/// Run oha for one phase (or `slice` of it) against `target`.
pub async fn run(
    oha: &Oha,
    target: &Target<'_>,
    phase: &Phase,
    slice: Option<Duration>,
) -> anyhow::Result<Run> {
    let mut args: Vec<String> = vec!["--no-tui".into(), "-m".into(), "POST".into()];
    args.extend(oha.json_flag.iter().cloned());
    args.extend(["-c".into(), phase.concurrency.to_string()]);
    args.extend([
        "-H".into(),
        format!("content-type: {}", target.content_type),
        "-d".into(),
        target.body.into(),
    ]);
    match (slice.or(phase.duration), phase.requests) {
        // -w: requests in flight at the deadline finish and count; without
        // it oha aborts them and reports errors the server never made.
        (Some(d), _) => args.extend(["-z".into(), format!("{}ms", d.as_millis()), "-w".into()]),
        (None, Some(n)) => args.extend(["-n".into(), n.to_string()]),
        (None, None) => anyhow::bail!("a phase needs a duration or a number of requests"),
    }
    if let Some(q) = phase.rate {
        args.extend(["-q".into(), format!("{q}")]);
    }
    args.push(target.url.clone());
    let out = tokio::process::Command::new(&oha.path).args(&args).output().await.context("running oha")?;
    anyhow::ensure!(out.status.success(), "oha failed: {}", String::from_utf8_lossy(&out.stderr));
    parse(&out.stdout)
        .with_context(|| format!("reading oha's output: {}", String::from_utf8_lossy(&out.stdout)))
}

fn secs_to_ms(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0) * 1000.0
}

pub fn parse(json: &[u8]) -> anyhow::Result<Run> {
    let v: serde_json::Value = serde_json::from_slice(json)?;
    let summary = &v["summary"];
    let pct = &v["latencyPercentiles"];
    let mut statuses = BTreeMap::new();
    if let Some(m) = v["statusCodeDistribution"].as_object() {
        for (k, n) in m {
            statuses.insert(k.parse()?, n.as_u64().unwrap_or(0));
        }
    }
    let mut errors = BTreeMap::new();
    if let Some(m) = v["errorDistribution"].as_object() {
        for (k, n) in m {
            errors.insert(k.clone(), n.as_u64().unwrap_or(0));
        }
    }
    Ok(Run {
        requests: statuses.values().sum::<u64>() + errors.values().sum::<u64>(),
        rps: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: secs_to_ms(&pct["p50"]),
        p95_ms: secs_to_ms(&pct["p95"]),
        p99_ms: secs_to_ms(&pct["p99"]),
        max_ms: secs_to_ms(&summary["slowest"]),
        statuses,
        errors,
    })
}

/// Merge runs (slices of one phase): counts add up; percentiles are the
/// request-weighted mean of the slices' (an approximation, said so in the
/// report), the maximum is the maximum.
pub fn merge(runs: &[Run]) -> Run {
    let total: u64 = runs.iter().map(|r| r.requests).sum();
    let w = |f: fn(&Run) -> f64| {
        if total == 0 {
            0.0
        } else {
            runs.iter().map(|r| f(r) * r.requests as f64).sum::<f64>() / total as f64
        }
    };
    let mut out = Run {
        requests: total,
        rps: runs.iter().map(|r| r.rps).sum::<f64>() / runs.len().max(1) as f64,
        p50_ms: w(|r| r.p50_ms),
        p95_ms: w(|r| r.p95_ms),
        p99_ms: w(|r| r.p99_ms),
        max_ms: runs.iter().map(|r| r.max_ms).fold(0.0, f64::max),
        ..Run::default()
    };
    for r in runs {
        for (k, n) in &r.statuses {
            *out.statuses.entry(*k).or_default() += n;
        }
        for (k, n) in &r.errors {
            *out.errors.entry(k.clone()).or_default() += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ohas_json_summary() {
        let json = br#"{"summary":{"successRate":1.0,"total":2.0,"slowest":0.05,"fastest":0.01,
            "average":0.02,"requestsPerSec":9.5},"latencyPercentiles":{"p50":0.02,"p95":0.04,"p99":0.05},
            "statusCodeDistribution":{"200":18,"429":1},"errorDistribution":{"connection closed":1}}"#;
        let r = parse(json).unwrap();
        assert_eq!(r.requests, 20);
        assert_eq!(r.non_2xx(), 2);
        assert!((r.p50_ms - 20.0).abs() < 1e-9 && (r.max_ms - 50.0).abs() < 1e-9);
        let m = merge(&[r.clone(), r]);
        assert_eq!((m.requests, m.statuses[&200]), (40, 36));
    }
}
