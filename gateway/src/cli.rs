//! Command-line interface: `ember serve`, `ember images list|build|import`,
//! `ember keys create|list|revoke`, `ember vm run|bench`, `ember pool bench`.

pub mod images;
pub mod keys;
mod pool_bench;
mod stats;
mod vm_bench;
mod vm_run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ember_channel::ChannelChoice;
use ember_image::ImageSet;
use ember_vm::{AccelChoice, InitMode, VmConfig};

#[derive(Debug, Parser)]
#[command(name = "ember", version, about = "Run code in throw-away microVMs")]
pub struct Cli {
    /// Log more (repeat for more detail); EMBER_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn log_level(&self) -> &'static str {
        match self.verbose {
            // A server logs each invocation; one-shot tools stay quiet.
            0 if matches!(self.command, Command::Serve(_) | Command::Images(_)) => "info",
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API over a warm pool of VMs.
    Serve(crate::serve::ServeArgs),
    /// Work with single VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Work with the warm pool.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// List, build and import guest images.
    #[command(subcommand)]
    Images(images::ImagesCommand),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Run a real pool through a burst and a steady phase; print figures.
    Bench(pool_bench::PoolBenchArgs),
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM, run one command in it, print its output, tear it down.
    Run(vm_run::RunArgs),
    /// Measure cold boot and exec round trips; print p50/p95.
    Bench(vm_bench::BenchArgs),
}

/// VM options shared by the `vm` subcommands.
#[derive(Debug, Clone, Args)]
pub struct VmOpts {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = VmConfig::DEFAULT_MEMORY_MB)]
    pub memory: u32,
    /// Agent channel: auto, vsock, hybrid-vsock, serial.
    #[arg(long, default_value = "auto")]
    pub channel: ChannelChoice,
    /// Guest init: fast (no init system) or full (systemd).
    #[arg(long, default_value = "fast")]
    pub init_mode: InitMode,
    /// Acceleration: auto (probe KVM once), kvm, tcg.
    #[arg(long, default_value = "auto")]
    pub accel: AccelChoice,
    /// The images directory (vmlinuz, initrd.img and a directory per image).
    #[arg(long, env = "EMBER_IMAGES", default_value_os_t = ember_image::default_images_dir())]
    pub images: PathBuf,
    /// The image to boot.
    #[arg(long, default_value = ember_image::DEFAULT_IMAGE)]
    pub image: String,
    /// Give up on a boot after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub boot_timeout: Duration,
}

impl VmOpts {
    pub fn config(&self) -> anyhow::Result<VmConfig> {
        let images = ImageSet::for_image(&self.images, &self.image).map_err(anyhow::Error::msg)?;
        let mut c = VmConfig::with_images(images);
        c.memory_mb = self.memory;
        c.channel = self.channel;
        c.init_mode = self.init_mode;
        c.accel = self.accel;
        c.boot_timeout = self.boot_timeout;
        Ok(c)
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => crate::serve::run(args).await,
        Command::Vm(VmCommand::Run(args)) => vm_run::run(args).await,
        Command::Vm(VmCommand::Bench(args)) => vm_bench::run(args).await,
        Command::Pool(PoolCommand::Bench(args)) => pool_bench::run(args).await,
        Command::Images(cmd) => images::run(cmd).await,
        Command::Keys(cmd) => keys::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {e:#}");
            // Like `docker run`: 125 means ember itself failed.
            ExitCode::from(125)
        }
    }
}
