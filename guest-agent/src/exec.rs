//! Running one user command: spawn it confined, stream its output back in
//! chunks, enforce the timeout and output cap, and kill its whole process
//! tree when it times out, is cancelled or (by default) once it exits.

use std::collections::BTreeMap;
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
use crate::forkserver::{self, ForkServer};
use crate::Agent;

pub(crate) const CHUNK: usize = 32 * 1024;
/// With `kill_leftovers = false`, how long to keep reading output that a
/// background process still holds open after the command itself exited.
const LEFTOVER_DRAIN: Duration = Duration::from_millis(100);
pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

/// The environment every command starts with, then the image's, then the
/// request's own.
fn command_env(agent: &Agent, req: &ExecRequest) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), agent.layout.workspace.display().to_string());
    env.insert("USER".to_string(), "ember".to_string());
    env.insert("LANG".to_string(), "C.UTF-8".to_string());
    env.extend(agent.layout.image_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Check the request's environment and working directory; the directory
/// the command starts in.
fn check_request(agent: &Agent, req: &ExecRequest) -> Result<PathBuf, ErrorReply> {
    let bad = |m: String| ErrorReply::new(ErrorCode::BadRequest, m);
    if req.env.keys().any(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
        return Err(bad("environment variable names must be non-empty and contain no '=' or NUL".into()));
    }
    let cwd = req.cwd.as_deref().map(PathBuf::from).unwrap_or_else(|| agent.layout.workspace.clone());
    let cwd = if cwd.is_relative() { agent.layout.workspace.join(cwd) } else { cwd };
    if !cwd.is_dir() {
        return Err(bad(format!("working directory {} does not exist", cwd.display())));
    }
    Ok(cwd)
}

/// The command for `req`, in a process group of its own; with
/// `own_session` the caller makes it a session leader instead (a terminal's
/// process: its group is its session's).
pub(crate) fn build_command(
    agent: &Agent,
    req: &ExecRequest,
    own_session: bool,
) -> Result<Command, ErrorReply> {
    let bad = |m: String| ErrorReply::new(ErrorCode::BadRequest, m);
    let cwd = check_request(agent, req)?;
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
        WireCommand::Python(py) => {
            let mut c = Command::new(resolve_program("python3"));
            c.arg(&py.path).args(&py.args);
            c
        }
    };
    cmd.env_clear().envs(command_env(agent, req)).current_dir(cwd);
    if !own_session {
        // setsid() refuses a process group leader, so not both.
        cmd.process_group(0);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

/// Whether a Python command can be forked from the pre-warmed server: it
/// must be up, and the request must not set what only an interpreter's
/// start-up reads (`PYTHON*` variables, the locale).
fn fork_server_for<'a>(agent: &'a Agent, req: &ExecRequest) -> Option<&'a ForkServer> {
    if !matches!(req.command, WireCommand::Python(_)) {
        return None;
    }
    let startup_env = |k: &String| k.starts_with("PYTHON") || k == "LANG" || k.starts_with("LC_");
    if req.env.keys().any(startup_env) {
        return None;
    }
    agent.forkserver.as_ref().filter(|s| s.ready() && s.alive())
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
    // Checked before a cgroup exists, so a bad request leaves nothing behind.
    let how = match fork_server_for(agent, req) {
        Some(server) => How::Fork(server, check_request(agent, req)?),
        None => How::Exec(build_command(agent, req, false)?),
    };
    let cgroup: Option<ExecCgroup> = match &agent.cgroups {
        Some(cgs) => Some(
            cgs.create(&format!("exec-{id}-{}", std::process::id()), req.pids_limit.or(Some(1024)))
                .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("cannot create cgroup: {e}")))?,
        ),
        None => None,
    };
    let spawned = match how {
        How::Fork(server, cwd) => spawn_forked(agent, server, req, cwd, cgroup.as_ref()).await,
        How::Exec(cmd) => spawn_exec(agent, cmd, cgroup.as_ref(), false),
    };
    let Spawned { pid, stdin, mut stdout, mut stderr, exit: mut exit_rx, _child } = match spawned {
        Ok(s) => s,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ = cg.destroy().await;
            }
            return Err(e);
        }
    };
    let pgid = Pid::from_raw(pid);
    let kill_tree = |cg: &Option<ExecCgroup>| {
        if let Some(cg) = cg {
            let _ = cg.kill();
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(pgid, Signal::SIGKILL);
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
    finish(&mut status, exit, started.elapsed());
    Ok(status)
}

/// Fill in how a process ended and how long it took.
pub(crate) fn finish(status: &mut ExitStatus, exit: Option<WaitStatus>, took: Duration) {
    match exit {
        Some(WaitStatus::Exited(_, code)) => status.code = Some(code),
        Some(WaitStatus::Signaled(_, sig, _)) => status.signal = Some(sig as i32),
        _ => {}
    }
    status.duration_ms = took.as_millis() as u64;
    status.duration_us = took.as_micros() as u64;
}

/// How a command starts: forked from the pre-warmed Python (in this
/// working directory), or executed.
enum How<'a> {
    Fork(&'a ForkServer, PathBuf),
    Exec(Command),
}

/// A started command: its pid (and process group), our ends of its pipes,
/// and its exit status to come.
pub(crate) struct Spawned {
    pub(crate) pid: i32,
    pub(crate) stdin: Option<pipe::Sender>,
    pub(crate) stdout: Option<pipe::Receiver>,
    pub(crate) stderr: Option<pipe::Receiver>,
    pub(crate) exit: tokio::sync::oneshot::Receiver<WaitStatus>,
    /// Keeps std's handle of an executed child (its pipes were taken).
    pub(crate) _child: Option<std::process::Child>,
}

pub(crate) fn spawn_exec(
    agent: &Agent,
    mut cmd: Command,
    cgroup: Option<&ExecCgroup>,
    terminal: bool,
) -> Result<Spawned, ErrorReply> {
    crate::sys::confine_child(&mut cmd, cgroup.map(|c| c.procs_fd()), agent.layout.user, terminal);
    let (mut child, exit) = agent
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| ErrorReply::new(ErrorCode::SpawnFailed, format!("cannot start command: {e}")))?;
    let pid = child.id() as i32;
    let pipes = (|| -> std::io::Result<_> {
        let stdin = child.stdin.take().map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s))).transpose()?;
        let stdout =
            child.stdout.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s))).transpose()?;
        let stderr =
            child.stderr.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s))).transpose()?;
        Ok((stdin, stdout, stderr))
    })();
    match pipes {
        Ok((stdin, stdout, stderr)) => Ok(Spawned { pid, stdin, stdout, stderr, exit, _child: Some(child) }),
        Err(e) => {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            Err(ErrorReply::new(ErrorCode::Internal, format!("cannot set up pipes: {e}")))
        }
    }
}

/// Fork the command from the pre-warmed Python server.
async fn spawn_forked(
    agent: &Agent,
    server: &ForkServer,
    req: &ExecRequest,
    cwd: PathBuf,
    cgroup: Option<&ExecCgroup>,
) -> Result<Spawned, ErrorReply> {
    let internal =
        |what: &str, e: std::io::Error| ErrorReply::new(ErrorCode::Internal, format!("{what}: {e}"));
    let WireCommand::Python(py) = &req.command else {
        return Err(ErrorReply::new(ErrorCode::Internal, "not a python command"));
    };
    let env = command_env(agent, req);
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from);
    let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) =
        (|| Ok::<_, std::io::Error>((pipe()?, pipe()?, pipe()?)))()
            .map_err(|e| internal("cannot make pipes", e))?;
    let spec = forkserver::Spec {
        path: &py.path,
        args: &py.args,
        env: &env,
        cwd: &cwd,
        uid: agent.layout.user.map(|u| u.0),
        gid: agent.layout.user.map(|u| u.1),
        cgroup: cgroup.is_some(),
    };
    let forked = server
        .fork(&spec, [in_r, out_w, err_w], cgroup.map(|c| c.procs_fd()))
        .await
        .map_err(|e| internal("the python fork server failed", e))?;
    let ours = (|| -> std::io::Result<_> {
        Ok((
            pipe::Sender::from_owned_fd(in_w)?,
            pipe::Receiver::from_owned_fd(out_r)?,
            pipe::Receiver::from_owned_fd(err_r)?,
        ))
    })();
    match ours {
        Ok((stdin, stdout, stderr)) => Ok(Spawned {
            pid: forked.pid,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
            exit: forked.exit,
            _child: None,
        }),
        Err(e) => {
            let _ = nix::sys::signal::kill(Pid::from_raw(forked.pid), Signal::SIGKILL);
            Err(internal("cannot set up pipes", e))
        }
    }
}

pub(crate) async fn read_opt(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
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
