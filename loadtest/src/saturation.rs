//! At and past capacity: a sweep of closed-loop concurrency levels (oha,
//! as users drive Ember), with CPU per call and a bwrap baseline at the
//! same levels, and an overload step driven by this crate's own client,
//! because it must see each answer's status, latency and `Retry-After`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::oha::Run;
use crate::run::percentile;

/// One concurrency level of a saturation sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: u32,
    pub ember: Run,
    pub warm_hit_ratio: Option<f64>,
    /// CPU of `ember serve` and every process under it (QEMU, helpers)
    /// over the level, per request answered with 200.
    pub cpu_ms_per_call: Option<f64>,
    /// The same command in a bwrap sandbox per request, same level.
    pub bwrap: Option<Run>,
}

/// The overload step.
#[derive(Debug, Clone, Serialize)]
pub struct Overload {
    pub concurrency: u32,
    pub secs: f64,
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    /// Latency of the 200 answers.
    pub ok_p50_ms: f64,
    pub ok_p99_ms: f64,
    /// 429 answers that had no `Retry-After`.
    pub refused_without_retry_after: u64,
    /// `GET /healthz` probes every 200 ms during the step.
    pub healthz_ok: u64,
    pub healthz_failed: u64,
    pub healthz_max_ms: f64,
    pub warm_hit_ratio: Option<f64>,
}

/// CPU seconds used so far by `pid`, every live process below it, and the
/// children it has reaped (VMs destroyed meanwhile: their CPU moved to
/// their parent's `cutime`). Grandchildren reaped by others are missed.
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let parent = ember_sys::procfs::parents();
    let below = |mut p: u32| loop {
        if p == pid {
            return true;
        }
        match parent.get(&p) {
            Some(&pp) if pp != 0 && pp != p => p = pp,
            _ => return false,
        }
    };
    let live: f64 =
        parent.keys().filter(|p| below(**p)).filter_map(|p| ember_sys::procfs::cpu_seconds(*p)).sum();
    live + ember_sys::procfs::reaped_children_cpu_seconds(pid).unwrap_or(0.0)
}

/// `concurrency` closed-loop clients for `secs`, with `/healthz` probed
/// alongside. Each request has a 30 s bound.
pub async fn overload(
    addr: SocketAddr,
    path: &str,
    body: &str,
    content_type: &str,
    concurrency: u32,
    secs: Duration,
) -> Overload {
    let until = Instant::now() + secs;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let (path, body, ct) = (path.to_string(), body.to_string(), content_type.to_string());
        clients.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let r = crate::http::request(
                    addr,
                    "POST",
                    &path,
                    &[("content-type", &ct)],
                    &body,
                    Duration::from_secs(30),
                )
                .await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                match r {
                    Ok(a) => {
                        let retry = a.headers.contains_key("retry-after");
                        // A refused client backs off as Retry-After asks,
                        // within the step.
                        if a.status == 429 {
                            let wait = a
                                .headers
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                .unwrap_or(1);
                            tokio::time::sleep(
                                Duration::from_secs(wait)
                                    .min(until.saturating_duration_since(Instant::now())),
                            )
                            .await;
                        }
                        out.push((ms, Some(a.status), retry));
                    }
                    Err(_) => out.push((ms, None, false)),
                }
            }
            out
        }));
    }
    let health = tokio::spawn(async move {
        let (mut ok, mut failed, mut max_ms) = (0u64, 0u64, 0f64);
        while Instant::now() < until {
            let t = Instant::now();
            match crate::http::request(addr, "GET", "/healthz", &[], "", Duration::from_secs(2)).await {
                Ok(a) if a.status == 200 => ok += 1,
                _ => failed += 1,
            }
            max_ms = max_ms.max(t.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (ok, failed, max_ms)
    });
    let mut statuses = BTreeMap::new();
    let (mut ok_lat, mut transport, mut no_retry, mut n) = (Vec::new(), 0, 0, 0);
    for c in clients {
        for (ms, status, retry) in c.await.unwrap_or_default() {
            n += 1;
            match status {
                Some(s) => {
                    *statuses.entry(s).or_insert(0) += 1;
                    if s == 200 {
                        ok_lat.push(ms);
                    }
                    if s == 429 && !retry {
                        no_retry += 1;
                    }
                }
                None => transport += 1,
            }
        }
    }
    ok_lat.sort_by(f64::total_cmp);
    let (healthz_ok, healthz_failed, healthz_max_ms) = health.await.unwrap_or((0, 1, 0.0));
    Overload {
        concurrency,
        secs: started.elapsed().as_secs_f64(),
        requests: n,
        statuses,
        transport_errors: transport,
        ok_p50_ms: percentile(&ok_lat, 50.0),
        ok_p99_ms: percentile(&ok_lat, 99.0),
        refused_without_retry_after: no_retry,
        healthz_ok,
        healthz_failed,
        healthz_max_ms,
        warm_hit_ratio: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_tree_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(tree_cpu_seconds(std::process::id()) >= 0.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.0);
    }
}
