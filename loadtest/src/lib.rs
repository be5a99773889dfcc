//! `ember-loadtest`: drives `ember serve` with oha through declared
//! scenarios, measures baselines in the same run (a cold VM per request,
//! bwrap per request, the bare host), and writes a report with plots.
#![forbid(unsafe_code)]

pub mod http;
pub mod oha;
pub mod plot;
pub mod report;
pub mod run;
pub mod sampler;
pub mod saturation;
pub mod scenario;
pub mod servers;

use std::path::PathBuf;

use anyhow::Context as _;

use run::{Options, Report, Runner};
use servers::EmberServer;

fn seconds(v: Option<&toml::Value>, default: f64) -> f64 {
    v.and_then(|v| v.as_str())
        .and_then(|s| humantime::parse_duration(s).ok())
        .map_or(default, |d| d.as_secs_f64())
}

/// Run everything and write the report; the list of targets missed (the
/// hard ones fail the run whatever the flags, see `report::Check`).
pub async fn run_all(opts: Options) -> anyhow::Result<Vec<report::Check>> {
    std::fs::create_dir_all(&opts.out)?;
    let cfg: toml::Table = toml::from_str(&std::fs::read_to_string(&opts.config)?)?;
    let pool = cfg.get("pool").and_then(|p| p.as_table()).cloned().unwrap_or_default();
    let min_size = pool.get("min_size").and_then(|v| v.as_integer()).unwrap_or(2) as u64;
    let idle = seconds(pool.get("idle_timeout"), 300.0);
    let sizer = seconds(pool.get("sizer_interval"), 1.0);
    let limits = cfg.get("limits").and_then(|p| p.as_table()).cloned().unwrap_or_default();
    // Unset: the gateway's default (`gateway::config::Limits`).
    let max_queue_wait = seconds(limits.get("max_queue_wait"), 8.0);

    let ember = EmberServer::start(&opts.ember, &opts.config, &opts.images, &opts.out.join("ember.log"))?;
    eprintln!("[loadtest] ember serve on {}", ember.addr);
    let runner = Runner {
        opts: &opts,
        min_size,
        ember_pid: ember.pid(),
        rest_within: std::time::Duration::from_secs_f64(idle + sizer + 30.0),
    };
    let mut scenarios = Vec::new();
    for s in &opts.scenarios {
        scenarios.push(runner.scenario(ember.addr, s).await.with_context(|| format!("scenario {}", s.name))?);
    }
    ember.stop()?;
    run::cold_vm_baselines(&opts, &mut scenarios, &opts.out.join("ember-cold.log")).await?;

    let report = Report {
        profile: opts.profile,
        started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: machine(),
        min_size,
        idle_timeout_secs: idle,
        sizer_interval_secs: sizer,
        max_queue_wait_secs: max_queue_wait,
        scenarios,
    };
    let checks = report::checks(&report);
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "report": report, "checks": checks,
        }))?,
    )?;
    std::fs::write(opts.out.join("report.md"), report::markdown(&report, &checks))?;
    plot::latency(&report, &opts.out.join("latency.svg"))?;
    plot::pool(&report, &opts.out.join("pool.svg"))?;
    plot::baselines(&report, &opts.out.join("baselines.svg"))?;
    eprintln!("[loadtest] report: {}", opts.out.join("report.md").display());
    Ok(checks.into_iter().filter(|c| !c.met).collect())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{n} x {cpu}")
}

/// The repository root (this crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
