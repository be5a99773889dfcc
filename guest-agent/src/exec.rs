//! Running one user command: spawn it confined, stream its output back in
//! chunks, enforce the timeout and output cap, and kill its whole process
//! tree when it times out, is cancelled or (by default) once it exits.

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_wire::{
    Command as WireCommand, ErrorCode, ErrorReply, ExecRequest, ExitStatus, Response, ResponseBody, Stream,
};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cgroup::ExecCgroup;
use crate::Agent;

const CHUNK: usize = 32 * 1024;
/// With `kill_leftovers = false`, how long to keep reading output that a
/// background process still holds open after the command itself exited.
const LEFTOVER_DRAIN: Duration = Duration::from_millis(100);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Write `req`'s files, run it and send its output and exit status (or an
/// error) as replies to request `id`.
pub async fn run(
    agent: &Agent,
    id: u64,
    mut req: ExecRequest,
    out: mpsc::Sender<Response>,
    cancel: CancellationToken,
) {
    let files = std::mem::take(&mut req.files);
    if !files.is_empty() {
        if let Err(e) = crate::files::write_files(&agent.layout, files).await {
            let _ = out.send(Response { id, body: ResponseBody::Error(e) }).await;
            return;
        }
    }
    let body = match run_inner(agent, id, &req, &out, cancel).await {
        Ok(status) => ResponseBody::Exit(status),
        Err(e) => ResponseBody::Error(e),
    };
    let _ = out.send(Response { id, body }).await;
}

fn build_command(agent: &Agent, req: &ExecRequest) -> Result<Command, ErrorReply> {
    let bad = |m: String| ErrorReply::new(ErrorCode::BadRequest, m);
    let mut cmd = match &req.command {
        WireCommand::Argv(argv) => {
            let (prog, args) = argv.split_first().ok_or_else(|| bad("argv is empty".into()))?;
            if prog.is_empty() {
                return Err(bad("argv[0] is empty".into()));
            }
            let mut c = Command::new(resolve_program(prog));
            c.args(args);
            c
        }
        WireCommand::Shell(script) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(script);
            c
        }
    };
    if req.env.keys().any(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(bad("environment variable names must be non-empty and contain no '=' or NUL".into()));
    }
    let cwd = req.cwd.as_deref().map(PathBuf::from).unwrap_or_else(|| agent.layout.workspace.clone());
    let cwd = if cwd.is_relative() { agent.layout.workspace.join(cwd) } else { cwd };
    if !cwd.is_dir() {
        return Err(bad(format!("working directory {} does not exist", cwd.display())));
    }
    cmd.env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", &agent.layout.workspace)
        .env("USER", "ember")
        .env("LANG", "C.UTF-8")
        .envs(&req.env)
        .current_dir(cwd)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// `Command` searches the agent's PATH, not the child's: resolve names here
/// against the PATH the command will see.
fn resolve_program(prog: &str) -> PathBuf {
    if prog.contains('/') {
        return PathBuf::from(prog);
    }
    DEFAULT_PATH
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(prog))
}

async fn run_inner(
    agent: &Agent,
    id: u64,
    req: &ExecRequest,
    out: &mpsc::Sender<Response>,
    cancel: CancellationToken,
) -> Result<ExitStatus, ErrorReply> {
    let started = Instant::now();
    let mut cmd = build_command(agent, req)?;
    let cgroup: Option<ExecCgroup> = match &agent.cgroups {
        Some(cgs) => Some(
            cgs.create(&format!("exec-{id}-{}", std::process::id()), req.pids_limit.or(Some(1024)))
                .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("cannot create cgroup: {e}")))?,
        ),
        None => None,
    };
    crate::sys::confine_child(&mut cmd, cgroup.as_ref().map(|c| c.procs_fd()), agent.layout.user);

    let spawned = agent.reaper.spawn(&mut cmd);
    let (mut child, mut exit_rx) = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ = cg.destroy().await;
            }
            return Err(ErrorReply::new(ErrorCode::SpawnFailed, format!("cannot start command: {e}")));
        }
    };
    let pgid = Pid::from_raw(child.id() as i32);
    let kill_tree = |cg: &Option<ExecCgroup>| {
        if let Some(cg) = cg {
            let _ = cg.kill();
        }
        let _ = killpg(pgid, Signal::SIGKILL);
    };

    let pipes = (|| -> std::io::Result<_> {
        let stdin = child.stdin.take().map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s))).transpose()?;
        let stdout =
            child.stdout.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s))).transpose()?;
        let stderr =
            child.stderr.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s))).transpose()?;
        Ok((stdin, stdout, stderr))
    })();
    let (stdin, mut stdout, mut stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            kill_tree(&cgroup);
            return Err(ErrorReply::new(ErrorCode::Internal, format!("cannot set up pipes: {e}")));
        }
    };
    let stdin_task = stdin.map(|mut w| {
        let data = req.stdin.clone();
        tokio::spawn(async move {
            // EPIPE when the command does not read its input is fine.
            let _ = w.write_all(&data).await;
        })
    });

    let mut status = ExitStatus::default();
    let mut budget = req.output_limit;
    let mut exit: Option<WaitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let deadline = started + Duration::from_millis(req.timeout_ms);
    let mut buf_out = vec![0u8; CHUNK];
    let mut buf_err = vec![0u8; CHUNK];

    loop {
        if exit.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            r = read_opt(&mut stdout, &mut buf_out) => {
                forward(id, Stream::Stdout, r, &buf_out, &mut stdout, &mut budget, &mut status, out).await;
            }
            r = read_opt(&mut stderr, &mut buf_err) => {
                forward(id, Stream::Stderr, r, &buf_err, &mut stderr, &mut budget, &mut status, out).await;
            }
            st = &mut exit_rx, if exit.is_none() => {
                exit = Some(st.map_err(|_| ErrorReply::new(ErrorCode::Internal, "reaper went away"))?);
                if req.kill_leftovers {
                    kill_tree(&cgroup);
                } else {
                    drain_until = Some(Instant::now() + LEFTOVER_DRAIN);
                }
            }
            _ = tokio::time::sleep_until(deadline), if exit.is_none() && !status.timed_out => {
                status.timed_out = true;
                kill_tree(&cgroup);
            }
            _ = cancel.cancelled(), if exit.is_none() && !status.cancelled => {
                status.cancelled = true;
                kill_tree(&cgroup);
            }
            _ = sleep_opt(drain_until) => break,
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    if let Some(cg) = cgroup {
        if req.kill_leftovers || !cg.populated() {
            cg.destroy()
                .await
                .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("cannot remove cgroup: {e}")))?;
        } else if let Some(cgs) = &agent.cgroups {
            cgs.linger(cg);
        }
    }
    if let Some(cgs) = &agent.cgroups {
        cgs.sweep();
    }
    match exit {
        Some(WaitStatus::Exited(_, code)) => status.code = Some(code),
        Some(WaitStatus::Signaled(_, sig, _)) => status.signal = Some(sig as i32),
        _ => {}
    }
    let took = started.elapsed();
    status.duration_ms = took.as_millis() as u64;
    status.duration_us = took.as_micros() as u64;
    Ok(status)
}

async fn read_opt(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    id: u64,
    stream: Stream,
    read: std::io::Result<usize>,
    buf: &[u8],
    pipe: &mut Option<pipe::Receiver>,
    budget: &mut u64,
    status: &mut ExitStatus,
    out: &mpsc::Sender<Response>,
) {
    let n = match read {
        Ok(0) | Err(_) => {
            *pipe = None;
            return;
        }
        Ok(n) => n,
    };
    let keep = (n as u64).min(*budget) as usize;
    if keep < n {
        status.truncated = true;
    }
    *budget -= keep as u64;
    if keep > 0 {
        let data = buf[..keep].to_vec();
        // If the host is gone the session cancels us; output is then moot.
        let _ = out.send(Response { id, body: ResponseBody::Output { stream, data } }).await;
    }
}
