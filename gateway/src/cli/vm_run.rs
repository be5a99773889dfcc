//! `ember vm run`: one command in one fresh VM.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ember_channel::ExecEvent;
use ember_vm::VmHost;
use ember_wire::{Command, ExecRequest, Stream};

use super::VmOpts;

/// Largest stdin `vm run` forwards to the guest.
const MAX_STDIN: u64 = 16 << 20;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmOpts,
    /// Kill the command (and everything it started) after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Bytes of output passed back; the rest is dropped.
    #[arg(long, default_value_t = 16 << 20)]
    pub output_limit: u64,
    /// Environment for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Print boot timings to stderr.
    #[arg(long)]
    pub timings: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let stdin = read_stdin()?;
    let host = VmHost::new(args.vm.config()?, false)?;
    let vm = host.boot().await.context("booting the VM")?;
    if args.timings {
        let t = vm.timings();
        eprintln!(
            "ember: {} booted in {} ms (prepare {} ms, guest uptime {} ms, channel {}, accel {})",
            vm.id(),
            t.total_ms,
            t.prepare_ms,
            t.guest_uptime_ms,
            vm.channel(),
            vm.accel().name()
        );
    }
    let mut req = ExecRequest::new(Command::Argv(args.command));
    req.timeout_ms = args.timeout.as_millis().try_into().unwrap_or(u64::MAX);
    req.output_limit = args.output_limit;
    req.stdin = stdin;
    req.env = args.env.into_iter().collect();

    let outcome = tokio::select! {
        r = stream_exec(&vm, req) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    vm.shutdown().await;
    let status = outcome?;
    if status.timed_out {
        eprintln!("ember: command timed out after {:?}", args.timeout);
        return Ok(ExitCode::from(124));
    }
    if status.truncated {
        eprintln!("ember: output truncated at {} bytes", args.output_limit);
    }
    Ok(match (status.code, status.signal) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(128u8.saturating_add(u8::try_from(sig).unwrap_or(0))),
        _ => ExitCode::FAILURE,
    })
}

async fn stream_exec(vm: &ember_vm::Vm, req: ExecRequest) -> anyhow::Result<ember_wire::ExitStatus> {
    let mut h = vm.agent().exec(req).await?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        match h.next().await? {
            ExecEvent::Output { stream: Stream::Stdout, data } => {
                out.write_all(&data)?;
                out.flush()?;
            }
            ExecEvent::Output { stream: Stream::Stderr, data } => {
                err.write_all(&data)?;
            }
            ExecEvent::Dropped { .. } => {}
            ExecEvent::Exit(st) => return Ok(st),
        }
    }
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut buf = Vec::new();
    stdin.lock().take(MAX_STDIN + 1).read_to_end(&mut buf)?;
    anyhow::ensure!(buf.len() as u64 <= MAX_STDIN, "stdin is larger than {MAX_STDIN} bytes");
    Ok(buf)
}
