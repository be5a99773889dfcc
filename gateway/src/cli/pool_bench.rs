//! `ember pool bench`: a real pool through a burst and a steady phase, per
//! reset mode. Prints claim (hit) latency, reset and replenish times,
//! warm-hit ratio and peak memory of the VMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use ember_channel::shell;
use ember_pool::config::ResetMode;
use ember_pool::pool::Pool;
use ember_pool::pool::VmBackend;
use ember_vm::VmHost;
use serde::Serialize;
use tokio::time::Instant;

use super::stats::{ms, stats, Stats};

#[derive(Debug, Args)]
pub struct PoolBenchArgs {
    /// Configuration file ([pool], [vm]); defaults otherwise.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, env = "EMBER_IMAGES", default_value_os_t = ember_image::default_images_dir())]
    pub images: PathBuf,
    /// Reset modes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values = ["snapshot", "destroy"])]
    pub modes: Vec<ResetMode>,
    /// Claims issued at once in the burst phase.
    #[arg(long, default_value_t = 6)]
    pub burst: usize,
    /// Requests per second in the steady phase.
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Length of the steady phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub steady: Duration,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default)]
struct Samples {
    claim_hit: Vec<f64>,
    claim_miss: Vec<f64>,
    release: Vec<f64>,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ModeReport {
    mode: ResetMode,
    channel: String,
    storage: String,
    requests: usize,
    errors: usize,
    claim_hit: Option<Stats>,
    claim_miss: Option<Stats>,
    reset: Option<Stats>,
    /// The storage step of a rollback (file rewrite or `zfs rollback`).
    rollback: Option<Stats>,
    /// Making a VM's writable disk (copy, clone or overlay), within create.
    disk: Option<Stats>,
    replenish_cold_boot: Option<Stats>,
    replenish_restore: Option<Stats>,
    /// Where a reset's time and CPU went, step by step.
    reset_steps: Vec<StepReport>,
    warm_hit_ratio: f64,
    peak_vms: usize,
    peak_memory_mb: f64,
}

#[derive(Debug, Serialize)]
struct StepReport {
    step: &'static str,
    wall: Option<Stats>,
    /// Mean CPU milliseconds of the VM's QEMU (and helper) in this step.
    cpu_ms_mean: f64,
}

/// One report per step name, in the order the steps run.
fn step_reports(resets: &[Vec<ember_vm::Step>]) -> Vec<StepReport> {
    let mut names: Vec<&'static str> = Vec::new();
    for s in resets.iter().flatten() {
        if !names.contains(&s.name) {
            names.push(s.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let of: Vec<_> = resets.iter().flatten().filter(|s| s.name == name).collect();
            StepReport {
                step: name,
                wall: stats(of.iter().map(|s| ms(s.wall)).collect()),
                cpu_ms_mean: of.iter().map(|s| s.cpu * 1000.0).sum::<f64>() / of.len().max(1) as f64,
            }
        })
        .collect()
}

pub async fn run(args: PoolBenchArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::config::load_or_exit(args.config.as_deref(), &args.images);
    let mut reports = Vec::new();
    for &mode in &args.modes {
        let mut pool_cfg = cfg.pool.clone();
        pool_cfg.reset = mode;
        let mut vm_cfg = cfg.vm.clone();
        if mode == ResetMode::Rollback {
            vm_cfg.scratch = ember_vm::ScratchKind::RawCopy;
        }
        let host = VmHost::new(vm_cfg, mode == ResetMode::Snapshot)?;
        let storage = host.open_storage().await?.name();
        let backend = VmBackend::new(Arc::clone(&host), mode, pool_cfg.replenish)
            .map_err(anyhow::Error::msg)?
            .keeping_timings();
        let pool = Pool::start(backend, pool_cfg.clone(), cfg.vm.memory_mb);
        if !args.json {
            eprintln!("[{}] warming up to {} VMs over {}", mode.name(), pool_cfg.min_size, host.channel());
        }
        let warm_deadline = Instant::now() + Duration::from_secs(300);
        while pool.status().ready < pool_cfg.min_size {
            anyhow::ensure!(Instant::now() < warm_deadline, "the pool never warmed up: {:?}", pool.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = pool.status().counters;
        let samples = Arc::new(Mutex::new(Samples::default()));
        let (peak_tx, peak) = memory_sampler();

        let mut tasks = Vec::new();
        for _ in 0..args.burst {
            tasks.push(tokio::spawn(one_request(pool.clone(), Arc::clone(&samples))));
        }
        for t in tasks.drain(..) {
            let _ = t.await;
        }
        if !args.json {
            eprintln!(
                "[{}] burst of {} done; steady {} req/s for {:?}",
                mode.name(),
                args.burst,
                args.rate,
                args.steady
            );
        }
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < args.steady {
            tasks.push(tokio::spawn(one_request(pool.clone(), Arc::clone(&samples))));
            n += 1;
            tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / args.rate)).await;
        }
        for t in tasks {
            let _ = t.await;
        }
        let _ = peak_tx.send(true);
        let (peak_vms, peak_mb) = peak.await.unwrap_or_default();
        let after = pool.status().counters;
        let timings = pool.backend().timings();
        pool.shutdown().await;
        host.close().await;

        let s = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
        let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
        reports.push(ModeReport {
            mode,
            channel: host.channel().to_string(),
            storage: storage.to_string(),
            requests: s.claim_hit.len() + s.claim_miss.len() + s.errors.len(),
            errors: s.errors.len(),
            claim_hit: stats(s.claim_hit),
            claim_miss: stats(s.claim_miss),
            reset: stats(timings.reset.iter().map(|d| ms(*d)).collect()),
            rollback: stats(timings.rollback.iter().map(|d| ms(*d)).collect()),
            disk: stats(timings.disk.iter().map(|d| ms(*d)).collect()),
            replenish_cold_boot: stats(timings.create.iter().map(|d| ms(*d)).collect()),
            replenish_restore: stats(timings.restore.iter().map(|d| ms(*d)).collect()),
            reset_steps: step_reports(&timings.reset_steps),
            warm_hit_ratio: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            peak_vms,
            peak_memory_mb: peak_mb,
        });
        for e in s.errors.iter().take(3) {
            eprintln!("[{}] error: {e}", mode.name());
        }
    }
    print(&reports, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// claim -> run `true` -> release, timing the claim and the release.
async fn one_request(pool: Pool<VmBackend>, samples: Arc<Mutex<Samples>>) {
    let t = Instant::now();
    let lease = match pool.claim().await {
        Ok(l) => l,
        Err(e) => {
            samples.lock().unwrap_or_else(|p| p.into_inner()).errors.push(e.to_string());
            return;
        }
    };
    let claim = ms(t.elapsed());
    let warm = lease.warm();
    let ran = lease.agent().run(shell("true")).await;
    let t = Instant::now();
    lease.release().await;
    let release = ms(t.elapsed());
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
    if warm {
        s.claim_hit.push(claim);
    } else {
        s.claim_miss.push(claim);
    }
    s.release.push(release);
    if let Err(e) = ran {
        s.errors.push(e.to_string());
    }
}

/// Sample the proportional memory (PSS) of our child processes (QEMU and
/// helpers) until told to stop; returns the peak count and MiB.
fn memory_sampler() -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<(usize, f64)>) {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let (mut peak_n, mut peak_kb) = (0usize, 0u64);
        loop {
            let (n, kb) = children_pss_kb();
            peak_n = peak_n.max(n);
            peak_kb = peak_kb.max(kb);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = rx.wait_for(|s| *s) => break,
            }
        }
        (peak_n, peak_kb as f64 / 1024.0)
    });
    (tx, task)
}

fn children_pss_kb() -> (usize, u64) {
    let me = std::process::id().to_string();
    let mut qemus = 0;
    let mut kb = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
        if rest.split_whitespace().nth(1) != Some(me.as_str()) {
            continue;
        }
        if stat.contains("(qemu-system-x86") {
            qemus += 1;
        }
        let rollup = std::fs::read_to_string(entry.path().join("smaps_rollup")).unwrap_or_default();
        kb += rollup
            .lines()
            .find(|l| l.starts_with("Pss:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (qemus, kb)
}

fn print(reports: &[ModeReport], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
        return Ok(());
    }
    let f = |s: &Option<Stats>| {
        s.as_ref().map(|s| format!("{:.2} / {:.2}", s.p50_ms, s.p95_ms)).unwrap_or("-".into())
    };
    for r in reports {
        println!(
            "\nreset = {} (channel {}, storage {}): {} requests, {} errors",
            r.mode.name(),
            r.channel,
            r.storage,
            r.requests,
            r.errors
        );
        println!("  {:<34} {}", "claim, hit (p50 / p95 ms)", f(&r.claim_hit));
        println!("  {:<34} {}", "claim, miss (p50 / p95 ms)", f(&r.claim_miss));
        println!("  {:<34} {}", "reset (p50 / p95 ms)", f(&r.reset));
        println!("  {:<34} {}", "  of which storage rollback", f(&r.rollback));
        for step in &r.reset_steps {
            let label = format!("  step {} (p50 / p95 ms)", step.step);
            println!("  {:<34} {}, CPU {:.0} ms mean", label, f(&step.wall), step.cpu_ms_mean);
        }
        println!("  {:<34} {}", "make a VM's disk (p50 / p95 ms)", f(&r.disk));
        println!("  {:<34} {}", "replenish by cold boot (p50 / p95)", f(&r.replenish_cold_boot));
        if let (Some(b), Some(r)) = (&r.replenish_cold_boot, &r.replenish_restore) {
            println!("  {:<34} {:.1}x", "restore speed-up (p50)", b.p50_ms / r.p50_ms);
        }
        println!("  {:<34} {}", "replenish by restore (p50 / p95)", f(&r.replenish_restore));
        println!("  {:<34} {:.1}%", "warm-hit ratio", r.warm_hit_ratio * 100.0);
        println!("  {:<34} {} VMs, {:.0} MiB PSS", "peak", r.peak_vms, r.peak_memory_mb);
    }
    Ok(())
}
