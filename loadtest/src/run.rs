//! Running the scenarios against Ember and the baselines.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::oha::{self, Run, Target};
use crate::sampler::{Sample, Sampler};
use crate::scenario::{Kind, Phase, Profile, Scenario};
use crate::servers::{BaselineServer, EmberServer, Sandbox};

#[derive(Debug)]
pub struct Options {
    pub profile: Profile,
    pub repo: PathBuf,
    pub ember: PathBuf,
    pub images: PathBuf,
    pub oha: oha::Oha,
    pub out: PathBuf,
    pub config: PathBuf,
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    pub name: &'static str,
    pub run: Run,
    /// Baseline p50 over Ember's p50: how many times slower the baseline is.
    pub ratio_p50: f64,
}

/// Gateway overhead per request: client latency minus the command's run
/// time inside the VM (`duration_us`), and its two parts from the server's
/// `Server-Timing` header.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    /// Client latency minus the server's `vm` time: HTTP both ways, JSON,
    /// the claim, the gateway's own work.
    pub http_gateway_p50_ms: f64,
    /// The server's `vm` time minus the agent's `run` time: the agent
    /// channel both ways and the agent's work around the command.
    pub vm_channel_p50_ms: f64,
    /// A bare `GET /healthz` on the same server with the same spacing: what
    /// HTTP alone costs, the floor under `http_gateway_p50_ms`.
    pub http_floor_p50_ms: f64,
    /// Giving the VM its network (calls that ask for one), from
    /// `Server-Timing`: total p50/p95 and its steps' p50.
    pub net: Option<NetOverhead>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetOverhead {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub rules_p50_ms: f64,
    pub resolver_p50_ms: f64,
    pub configure_p50_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Slice {
    /// Seconds since the scenario started (end of the slice).
    pub t: f64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub description: String,
    pub kind: Kind,
    pub ember: Run,
    pub warm_hit_ratio: Option<f64>,
    pub overhead: Option<Overhead>,
    pub baselines: Vec<Baseline>,
    pub pool: Vec<Sample>,
    pub latency: Vec<Slice>,
    /// Step: warm-hit ratio from the end of the first phase to the end.
    pub warm_hit_after_first_step: Option<f64>,
    /// Step: seconds from the end of the load until the pool was back at
    /// min_size (none: not within the wait).
    pub back_to_min_secs: Option<f64>,
    /// Saturation: one entry per concurrency level.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<crate::saturation::Level>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload: Option<crate::saturation::Overload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub profile: Profile,
    pub started: String,
    pub machine: String,
    pub min_size: u64,
    pub idle_timeout_secs: f64,
    pub sizer_interval_secs: f64,
    /// `limits.max_queue_wait` of the server's configuration (the overload
    /// bound is it + 1 s).
    pub max_queue_wait_secs: f64,
    pub scenarios: Vec<ScenarioReport>,
}

/// The `p`th percentile of sorted values (nearest rank).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

async fn warm_counters(addr: SocketAddr) -> (f64, f64) {
    let text = crate::http::metrics(addr).await.unwrap_or_default();
    (
        crate::http::metric(&text, "ember_warm_hits_total").unwrap_or(0.0),
        crate::http::metric(&text, "ember_warm_misses_total").unwrap_or(0.0),
    )
}

fn hit_ratio(before: (f64, f64), after: (f64, f64)) -> Option<f64> {
    let (h, m) = (after.0 - before.0, after.1 - before.1);
    (h + m > 0.0).then(|| h / (h + m))
}

/// Wait until the last load's calls are gone: nothing claimed, resetting
/// or waiting (the pool may still be larger than at rest).
async fn wait_for_drain(addr: SocketAddr, within: Duration) {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(p) = crate::http::get_json(addr, "/v1/pool").await {
            let n = |k: &str| p["vms"][k].as_u64().unwrap_or(0);
            if n("claimed") == 0 && n("resetting") == 0 && p["waiters"].as_u64() == Some(0) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the pool is back at rest: `min_size` ready, nothing claimed
/// or booting, the sizer's target at `min_size`.
async fn wait_for_rest(addr: SocketAddr, min_size: u64, within: Duration) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(p) = crate::http::get_json(addr, "/v1/pool").await {
            let n = |k: &str| p["vms"][k].as_u64().unwrap_or(0);
            let at_rest = n("claimed") == 0
                && n("booting") == 0
                && n("resetting") == 0
                && n("ready") == min_size
                && p["target"].as_u64() == Some(min_size);
            if at_rest {
                return Some(started.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

#[derive(Debug)]
pub struct Runner<'a> {
    pub opts: &'a Options,
    pub min_size: u64,
    /// `ember serve`, whose process tree's CPU is what a call costs.
    pub ember_pid: u32,
    pub rest_within: Duration,
}

impl Runner<'_> {
    fn target<'s>(&self, addr: SocketAddr, s: &'s Scenario) -> Target<'s> {
        Target { url: format!("http://{addr}{}", s.path), body: &s.body, content_type: &s.content_type }
    }

    pub async fn scenario(&self, ember: SocketAddr, s: &Scenario) -> anyhow::Result<ScenarioReport> {
        let profile = self.opts.profile;
        eprintln!("[loadtest] {}: {}", s.name, s.description);
        // A burst, a step and a first call start from a pool at rest (back
        // at min_size: idle_timeout after the last load); the others only
        // from one with no call or queue left of the last scenario.
        if matches!(s.kind, Kind::Burst | Kind::Step | Kind::FirstCall) {
            wait_for_rest(ember, self.min_size, self.rest_within).await;
        } else {
            wait_for_drain(ember, Duration::from_secs(60)).await;
        }
        for i in 0..s.warm_up {
            let headers = [("content-type", s.content_type.as_str())];
            let a = crate::http::request(ember, "POST", &s.path, &headers, &s.body, Duration::from_secs(600))
                .await?;
            anyhow::ensure!(a.status == 200, "{}: warm-up request {i} answered {}", s.name, a.status);
        }
        let before = warm_counters(ember).await;
        let started = Instant::now();
        let sampler = matches!(s.kind, Kind::Step | Kind::Burst)
            .then(|| Sampler::start(ember, Duration::from_millis(250), started));
        let mut latency = Vec::new();
        let mut after_first = None;
        let mut runs = Vec::new();
        let mut levels = Vec::new();
        let mut overload = None;
        let target = self.target(ember, s);
        match s.kind {
            Kind::Saturation | Kind::ClosedLoop => {
                for phase in &s.phases_for(profile) {
                    let level = self.level(ember, s, phase).await?;
                    runs.push(level.ember.clone());
                    levels.push(level);
                    // Each level starts with the queue of the last one gone.
                    wait_for_drain(ember, Duration::from_secs(30)).await;
                }
            }
            Kind::Overload => {
                let phase = s.phases[0].scaled(profile);
                let secs = phase.duration.unwrap_or(Duration::from_secs(5));
                let b = warm_counters(ember).await;
                let mut o = crate::saturation::overload(
                    ember,
                    &s.path,
                    &s.body,
                    &s.content_type,
                    phase.concurrency,
                    secs,
                )
                .await;
                o.warm_hit_ratio = hit_ratio(b, warm_counters(ember).await);
                runs.push(Run {
                    requests: o.requests,
                    rps: o.requests as f64 / o.secs,
                    p50_ms: o.ok_p50_ms,
                    p99_ms: o.ok_p99_ms,
                    statuses: o.statuses.clone(),
                    ..Run::default()
                });
                overload = Some(o);
            }
            Kind::Sessions => runs.push(self.sessions(ember, s).await?),
            Kind::FirstCall => runs.push(self.first_calls(ember, s).await?),
            Kind::Step => {
                let slice = match profile {
                    Profile::Quick => Duration::from_secs(1),
                    Profile::Full => Duration::from_secs(2),
                };
                for (i, phase) in s.phases.iter().enumerate() {
                    let phase = phase.scaled(profile);
                    let mut left = phase.duration.unwrap_or(slice);
                    while !left.is_zero() {
                        let d = left.min(slice);
                        let r = oha::run(&self.opts.oha, &target, &phase, Some(d)).await?;
                        latency.push(Slice {
                            t: started.elapsed().as_secs_f64(),
                            rate: r.rps,
                            p50_ms: r.p50_ms,
                            p95_ms: r.p95_ms,
                        });
                        runs.push(r);
                        left -= d;
                    }
                    if i == 0 {
                        after_first = Some(warm_counters(ember).await);
                    }
                }
            }
            Kind::Steady | Kind::Burst => {
                for phase in &s.phases {
                    runs.push(oha::run(&self.opts.oha, &target, &phase.scaled(profile), None).await?);
                }
            }
        }
        let load_ended = started.elapsed().as_secs_f64();
        let after = warm_counters(ember).await;
        let back_to_min_secs = if s.kind == Kind::Step {
            let t = wait_for_rest(ember, self.min_size, self.rest_within).await;
            eprintln!("[loadtest] {}: pool back at min_size after {t:?} s", s.name);
            t
        } else {
            None
        };
        let pool = sampler.map(Sampler::finish).unwrap_or_default();
        let ember_run = oha::merge(&runs);
        let overhead = if s.kind == Kind::Steady && s.path == "/v1/run" {
            Some(self.overhead(ember, s).await?)
        } else {
            None
        };
        let mut baselines = Vec::new();
        if let (Kind::Steady, Some(cmd)) = (s.kind, &s.host_command) {
            let cwd = self.opts.repo.join(s.host_cwd.as_deref().unwrap_or("."));
            for sandbox in [Sandbox::Bwrap, Sandbox::Host] {
                let server = BaselineServer::start(sandbox, cmd, &cwd, &s.host_stdin).await?;
                let t = self.target(server.addr, s);
                let mut rs = Vec::new();
                for phase in &s.phases {
                    rs.push(oha::run(&self.opts.oha, &t, &phase.scaled(profile), None).await?);
                }
                let run = oha::merge(&rs);
                baselines.push(Baseline {
                    name: sandbox.name(),
                    ratio_p50: run.p50_ms / ember_run.p50_ms,
                    run,
                });
            }
        }
        eprintln!(
            "[loadtest] {}: {} requests, p50 {:.1} ms, p95 {:.1} ms, {} not 2xx (load ended at {load_ended:.1}s)",
            s.name,
            ember_run.requests,
            ember_run.p50_ms,
            ember_run.p95_ms,
            ember_run.non_2xx()
        );
        Ok(ScenarioReport {
            name: s.name.clone(),
            description: s.description.clone(),
            kind: s.kind,
            warm_hit_ratio: hit_ratio(before, after),
            warm_hit_after_first_step: after_first.and_then(|a| hit_ratio(a, after)),
            ember: ember_run,
            overhead,
            baselines,
            pool,
            latency,
            back_to_min_secs,
            levels,
            overload,
        })
    }

    /// One saturation level: oha closed-loop at the phase's concurrency,
    /// the CPU the server's process tree used meanwhile, then bwrap.
    async fn level(
        &self,
        ember: SocketAddr,
        s: &Scenario,
        phase: &Phase,
    ) -> anyhow::Result<crate::saturation::Level> {
        let before = warm_counters(ember).await;
        let cpu0 = crate::saturation::tree_cpu_seconds(self.ember_pid);
        let run = oha::run(&self.opts.oha, &self.target(ember, s), phase, None).await?;
        let cpu = crate::saturation::tree_cpu_seconds(self.ember_pid) - cpu0;
        let warm_hit_ratio = hit_ratio(before, warm_counters(ember).await);
        // Per call served: refusals cost little, and are not calls.
        let answered = run.statuses.get(&200).copied().unwrap_or(0);
        let cpu_ms_per_call = (answered > 0).then(|| cpu * 1000.0 / answered as f64);
        let bwrap = match &s.host_command {
            Some(cmd) => {
                let cwd = self.opts.repo.join(s.host_cwd.as_deref().unwrap_or("."));
                let server = BaselineServer::start(Sandbox::Bwrap, cmd, &cwd, &s.host_stdin).await?;
                Some(oha::run(&self.opts.oha, &self.target(server.addr, s), phase, None).await?)
            }
            None => None,
        };
        eprintln!(
            "[loadtest] {} c={}: {:.1} req/s, p50 {:.0} ms, p99 {:.0} ms, {:?}, cpu/call {:.0} ms{}",
            s.name,
            phase.concurrency,
            run.rps,
            run.p50_ms,
            run.p99_ms,
            run.statuses,
            cpu_ms_per_call.unwrap_or(0.0),
            bwrap
                .as_ref()
                .map(|b| format!(", bwrap {:.1} req/s p50 {:.0} ms", b.rps, b.p50_ms))
                .unwrap_or_default()
        );
        Ok(crate::saturation::Level {
            concurrency: phase.concurrency,
            ember: run,
            warm_hit_ratio,
            cpu_ms_per_call,
            bwrap,
        })
    }

    /// Calls one at a time, each after the image's pool has shrunk to no
    /// VM at all (its `idle_timeout` passed): each claim restores a VM from
    /// the image's template while the caller waits.
    async fn first_calls(&self, ember: SocketAddr, s: &Scenario) -> anyhow::Result<Run> {
        let image = s.image.as_deref().context("a first-call scenario names its image")?;
        let rounds = match self.opts.profile {
            Profile::Quick => 1,
            Profile::Full => s.phases[0].requests.unwrap_or(5),
        };
        let started = Instant::now();
        let (mut lat, mut run) = (Vec::new(), Run::default());
        for round in 0..rounds {
            let empty = async {
                loop {
                    if let Ok(p) = crate::http::get_json(ember, "/v1/pool").await {
                        let vms = &p["images"][image]["vms"];
                        let total: u64 = ["ready", "booting", "claimed", "resetting", "sessions"]
                            .iter()
                            .map(|k| vms[*k].as_u64().unwrap_or(1))
                            .sum();
                        if total == 0 && p["images"][image]["target"] == 0 {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            tokio::time::timeout(self.rest_within.max(Duration::from_secs(120)), empty).await.map_err(
                |_| anyhow::anyhow!("{}: the pool of {image} never emptied (round {round})", s.name),
            )?;
            let t = Instant::now();
            let headers = [("content-type", s.content_type.as_str())];
            let a = crate::http::request(ember, "POST", &s.path, &headers, &s.body, Duration::from_secs(120))
                .await;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            match a {
                Ok(a) => *run.statuses.entry(a.status).or_default() += 1,
                Err(_) => *run.errors.entry("transport".into()).or_default() += 1,
            }
        }
        run.set_latencies(lat, started.elapsed());
        Ok(run)
    }

    /// Closed-loop clients, one session key each.
    async fn sessions(&self, ember: SocketAddr, s: &Scenario) -> anyhow::Result<Run> {
        let phase = s.phases[0].scaled(self.opts.profile);
        let until = Instant::now() + phase.duration.unwrap_or(Duration::from_secs(5));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..phase.concurrency {
            let (path, body) = (s.path.clone(), s.body.clone());
            tasks.push(tokio::spawn(async move {
                let key = format!("loadtest-{i}");
                let headers = [("x-ember-session", key.as_str()), ("content-type", "application/json")];
                let mut out = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r =
                        crate::http::request(ember, "POST", &path, &headers, &body, Duration::from_secs(60))
                            .await;
                    out.push((t.elapsed().as_secs_f64() * 1000.0, r.map(|a| a.status).ok()));
                }
                let del = format!("/v1/sessions/{key}");
                let _ = crate::http::request(ember, "DELETE", &del, &[], "", Duration::from_secs(30)).await;
                out
            }));
        }
        let mut lat = Vec::new();
        let mut run = Run::default();
        for t in tasks {
            for (ms, status) in t.await? {
                lat.push(ms);
                match status {
                    Some(st) => *run.statuses.entry(st).or_default() += 1,
                    None => *run.errors.entry("transport".into()).or_default() += 1,
                }
            }
        }
        run.set_latencies(lat, started.elapsed());
        Ok(run)
    }

    /// Sequential probes: client latency minus in-VM run time, split by
    /// `Server-Timing`; then as many bare `GET /healthz` for the HTTP floor.
    async fn overhead(&self, ember: SocketAddr, s: &Scenario) -> anyhow::Result<Overhead> {
        let n = match self.opts.profile {
            Profile::Quick => 5,
            Profile::Full => 40,
        };
        let (mut v, mut http_gateway, mut vm_channel) = (Vec::new(), Vec::new(), Vec::new());
        let mut net: Vec<[f64; 4]> = Vec::new();
        for _ in 0..n {
            // Let the last VM's reset finish: measure a call, not a queue.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = Instant::now();
            let headers = [("content-type", s.content_type.as_str())];
            let a = crate::http::request(ember, "POST", &s.path, &headers, &s.body, Duration::from_secs(60))
                .await?;
            let total = t.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(a.status == 200, "overhead probe: HTTP {}: {:?}", a.status, a.body);
            let guest = a.json()?["duration_us"].as_f64().unwrap_or(0.0) / 1000.0;
            v.push(total - guest);
            let (vm, run) = (a.server_timing("vm"), a.server_timing("run"));
            let (vm, run) = vm.zip(run).context("overhead probe: no Server-Timing vm/run")?;
            http_gateway.push(total - vm);
            vm_channel.push(vm - run);
            if let Some(n) = a.server_timing("net") {
                let part = |k: &str| a.server_timing(k).unwrap_or(0.0);
                net.push([n, part("net-rules"), part("net-dns"), part("net-guest")]);
            }
        }
        let mut floor = Vec::new();
        for _ in 0..n {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = Instant::now();
            let a = crate::http::request(ember, "GET", "/healthz", &[], "", Duration::from_secs(10)).await?;
            anyhow::ensure!(a.status == 200, "healthz probe: HTTP {}", a.status);
            floor.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        for s in [&mut v, &mut http_gateway, &mut vm_channel, &mut floor] {
            s.sort_by(f64::total_cmp);
        }
        Ok(Overhead {
            samples: v.len(),
            p50_ms: percentile(&v, 50.0),
            p95_ms: percentile(&v, 95.0),
            http_gateway_p50_ms: percentile(&http_gateway, 50.0),
            vm_channel_p50_ms: percentile(&vm_channel, 50.0),
            http_floor_p50_ms: percentile(&floor, 50.0),
            net: (!net.is_empty()).then(|| {
                let col = |i: usize| {
                    let mut c: Vec<f64> = net.iter().map(|r| r[i]).collect();
                    c.sort_by(f64::total_cmp);
                    c
                };
                NetOverhead {
                    p50_ms: percentile(&col(0), 50.0),
                    p95_ms: percentile(&col(0), 95.0),
                    rules_p50_ms: percentile(&col(1), 50.0),
                    resolver_p50_ms: percentile(&col(2), 50.0),
                    configure_p50_ms: percentile(&col(3), 50.0),
                }
            }),
        })
    }
}

/// The cold-VM baseline: a server with the pool disabled, a few requests
/// per scenario (each one boots a VM).
pub async fn cold_vm_baselines(
    opts: &Options,
    reports: &mut [ScenarioReport],
    log: &Path,
) -> anyhow::Result<()> {
    let wanted: Vec<&Scenario> = opts.scenarios.iter().filter(|s| s.cold_vm).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&opts.config)?;
    let cold_cfg = opts.out.join("ember-cold.toml");
    // The same configuration with no warm pool: a cold VM per request.
    let mut doc: toml::Table = toml::from_str(&text)?;
    if let Some(toml::Value::Table(p)) = doc.get_mut("pool") {
        p.insert("enabled".into(), toml::Value::Boolean(false));
        p.insert("min_size".into(), toml::Value::Integer(0));
        // Cold: a boot per request, not a restore from a template.
        p.insert("replenish".into(), toml::Value::String("boot".into()));
    }
    std::fs::write(&cold_cfg, toml::to_string(&doc)?)?;
    eprintln!("[loadtest] cold-VM baseline (pool disabled)");
    let server = EmberServer::start(&opts.ember, &cold_cfg, &opts.images, log)?;
    let n = match opts.profile {
        Profile::Quick => 2,
        Profile::Full => 8,
    };
    let phase = Phase { duration: None, requests: Some(n), rate: None, concurrency: 2 };
    let by_name: BTreeMap<&str, &Scenario> = wanted.iter().map(|s| (s.name.as_str(), *s)).collect();
    for r in reports.iter_mut() {
        let Some(s) = by_name.get(r.name.as_str()) else { continue };
        let t = Target {
            url: format!("http://{}{}", server.addr, s.path),
            body: &s.body,
            content_type: &s.content_type,
        };
        let run = oha::run(&opts.oha, &t, &phase, None).await?;
        eprintln!("[loadtest] {} on cold VMs: p50 {:.0} ms", s.name, run.p50_ms);
        r.baselines.insert(0, Baseline { name: "cold-vm", ratio_p50: run.p50_ms / r.ember.p50_ms, run });
    }
    server.stop()
}
