//! `ember vm bench`: cold boot to agent-ready per channel and init mode,
//! and the round trip of `true` on a booted VM. Prints p50/p95.

use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use ember_channel::ChannelChoice;
use ember_channel::ChannelKind;
use ember_vm::VmHost;
use ember_vm::{InitMode, VmConfig};
use ember_wire::{Command, ExecRequest};
use serde::Serialize;

use super::stats::{stats, Stats};
use super::VmOpts;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Cold boots per channel and init mode.
    #[arg(long, default_value_t = 5)]
    pub boots: usize,
    /// `true` round trips per channel.
    #[arg(long, default_value_t = 50)]
    pub execs: usize,
    /// Channels to measure (comma-separated); default: each that runs here.
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<ChannelChoice>,
    /// Init modes to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values = ["fast", "full"])]
    pub init_modes: Vec<InitMode>,
    /// Also measure exec round trips on a VM restored from a template
    /// (serial channel only), as the pool's VMs are.
    #[arg(long)]
    pub restored: bool,
    /// Pause between round trips (the guest goes idle, as between calls).
    #[arg(long, default_value = "0s")]
    pub gap: humantime::Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct BootRow {
    channel: String,
    init_mode: InitMode,
    accel: String,
    boot_to_agent: Stats,
    guest_uptime: Stats,
}

#[derive(Debug, Serialize)]
struct ExecRow {
    channel: String,
    /// `cold` (booted the kernel) or `restored` (from a template).
    start: &'static str,
    true_round_trip: Stats,
    in_guest: Stats,
    /// Round trip minus the in-guest run time: channel and agent around it.
    around_exec: Stats,
    /// A `hello` round trip: the channel and the agent's dispatch alone.
    hello: Stats,
    /// A `hello` after `--gap` with nothing running: waking an idle guest.
    idle_hello: Option<Stats>,
}

#[derive(Debug, Serialize)]
struct Report {
    initrd_bytes: u64,
    boots: Vec<BootRow>,
    execs: Vec<ExecRow>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let base = args.vm.config()?;
    let initrd_bytes = std::fs::metadata(&base.images.initrd)?.len();
    let channels = if args.channels.is_empty() { available_channels(&base) } else { args.channels.clone() };
    let mut report = Report { initrd_bytes, boots: Vec::new(), execs: Vec::new() };
    for &channel in &channels {
        for &mode in &args.init_modes {
            let mut cfg = base.clone();
            cfg.channel = channel;
            cfg.init_mode = mode;
            let host = VmHost::new(cfg, false)?;
            let accel = host.accel().await;
            let (mut boot, mut uptime) = (Vec::new(), Vec::new());
            for i in 0..args.boots {
                let vm = host.boot().await?;
                let t = vm.timings();
                boot.push(t.total_ms as f64);
                uptime.push(t.guest_uptime_ms as f64);
                if !args.json {
                    eprintln!(
                        "boot {}/{} {} {:?}: {} ms",
                        i + 1,
                        args.boots,
                        host.channel(),
                        mode,
                        t.total_ms
                    );
                }
                let measure_exec = mode == InitMode::Fast && i + 1 == args.boots && args.execs > 0;
                if measure_exec {
                    report.execs.push(exec_round_trips(&vm, "cold", &args).await?);
                }
                vm.shutdown().await;
            }
            if args.restored
                && mode == InitMode::Fast
                && host.channel() == ChannelKind::Serial
                && args.execs > 0
            {
                let template = host.make_template().await?;
                let vm = host.restore(&template).await?;
                let row = exec_round_trips(&vm, "restored", &args).await;
                vm.shutdown().await;
                report.execs.push(row?);
            }
            if let (Some(b), Some(u)) = (stats(boot), stats(uptime)) {
                report.boots.push(BootRow {
                    channel: host.channel().to_string(),
                    init_mode: mode,
                    accel: accel.name().into(),
                    boot_to_agent: b,
                    guest_uptime: u,
                });
            }
        }
    }
    print_report(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

fn available_channels(cfg: &VmConfig) -> Vec<ChannelChoice> {
    let host = ember_channel::HostChannels::probe(&cfg.vhost_device_vsock);
    let mut v = Vec::new();
    if host.vhost_vsock {
        v.push(ChannelChoice::Vsock);
    }
    if host.vhost_device_vsock {
        v.push(ChannelChoice::HybridVsock);
    }
    v.push(ChannelChoice::Serial);
    v
}

async fn exec_round_trips(
    vm: &ember_vm::Vm,
    start: &'static str,
    args: &BenchArgs,
) -> anyhow::Result<ExecRow> {
    let (mut rtt, mut guest, mut around, mut hello) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut idle_hello = Vec::new();
    // One warm-up run: the first exec pays for cold page cache.
    let req = ExecRequest::new(Command::Argv(vec!["true".into()]));
    vm.agent().run(req.clone()).await?;
    for _ in 0..args.execs {
        if !args.gap.is_zero() {
            tokio::time::sleep(*args.gap).await;
            let t = Instant::now();
            vm.agent().hello(7).await?;
            idle_hello.push(t.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(*args.gap).await;
        }
        let t = Instant::now();
        let out = vm.agent().run(req.clone()).await?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        rtt.push(ms);
        guest.push(out.status.duration_us as f64 / 1000.0);
        around.push(ms - out.status.duration_us as f64 / 1000.0);
        anyhow::ensure!(out.status.code == Some(0), "`true` failed: {:?}", out.status);
        let t = Instant::now();
        vm.agent().hello(7).await?;
        hello.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(ExecRow {
        channel: vm.channel().to_string(),
        start,
        true_round_trip: stats(rtt).ok_or_else(|| anyhow::anyhow!("no samples"))?,
        in_guest: stats(guest).ok_or_else(|| anyhow::anyhow!("no samples"))?,
        around_exec: stats(around).ok_or_else(|| anyhow::anyhow!("no samples"))?,
        hello: stats(hello).ok_or_else(|| anyhow::anyhow!("no samples"))?,
        idle_hello: stats(idle_hello),
    })
}

fn print_report(r: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!("initrd: {} bytes ({:.2} MiB)", r.initrd_bytes, r.initrd_bytes as f64 / 1048576.0);
    println!("\ncold boot to agent-ready (host wall clock, ms)");
    println!(
        "{:<14} {:<6} {:<5} {:>4} {:>8} {:>8} {:>8}",
        "channel", "init", "accel", "n", "p50", "p95", "guest p50"
    );
    for b in &r.boots {
        println!(
            "{:<14} {:<6} {:<5} {:>4} {:>8.0} {:>8.0} {:>8.0}",
            b.channel,
            format!("{:?}", b.init_mode).to_lowercase(),
            b.accel,
            b.boot_to_agent.n,
            b.boot_to_agent.p50_ms,
            b.boot_to_agent.p95_ms,
            b.guest_uptime.p50_ms
        );
    }
    println!("\nexec round trip of `true` on a booted VM (ms)");
    println!(
        "{:<14} {:<9} {:>4} {:>8} {:>8} {:>12} {:>16} {:>10} {:>15}",
        "channel",
        "start",
        "n",
        "p50",
        "p95",
        "in-guest p50",
        "around exec p50",
        "hello p50",
        "idle hello p50"
    );
    for e in &r.execs {
        println!(
            "{:<14} {:<9} {:>4} {:>8.1} {:>8.1} {:>12.1} {:>16.2} {:>10.2} {:>15}",
            e.channel,
            e.start,
            e.true_round_trip.n,
            e.true_round_trip.p50_ms,
            e.true_round_trip.p95_ms,
            e.in_guest.p50_ms,
            e.around_exec.p50_ms,
            e.hello.p50_ms,
            e.idle_hello.as_ref().map_or("-".into(), |s| format!("{:.2}", s.p50_ms)),
        );
    }
    Ok(())
}
