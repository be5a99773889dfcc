//! Samples `/v1/pool` while a scenario runs: the time series behind the
//! "pool size against request rate" plot.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the scenario started.
    pub t: f64,
    pub ready: u64,
    pub claimed: u64,
    pub booting: u64,
    pub resetting: u64,
    pub target: u64,
    /// Claims per second over the pool's short window.
    pub rate: f64,
}

#[derive(Debug)]
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub fn start(addr: SocketAddr, every: Duration, since: Instant) -> Self {
        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        let out = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            loop {
                if let Ok(p) = crate::http::get_json(addr, "/v1/pool").await {
                    let n = |k: &str| p["vms"][k].as_u64().unwrap_or(0);
                    let s = Sample {
                        t: since.elapsed().as_secs_f64(),
                        ready: n("ready"),
                        claimed: n("claimed"),
                        booting: n("booting"),
                        resetting: n("resetting"),
                        target: p["target"].as_u64().unwrap_or(0),
                        rate: p["rates"]["short_per_sec"].as_f64().unwrap_or(0.0),
                    };
                    out.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self { samples, task }
    }

    pub fn finish(self) -> Vec<Sample> {
        self.task.abort();
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
