//! Background processes of a session: started by `spawn`, they outlive the
//! request and the host connection. Each keeps its newest output in a
//! bounded buffer (byte offsets count everything it ever wrote, so a reader
//! knows what it missed); any number of readers `attach` at any time, get
//! the buffer and then live output until the exit. stdin stays open on
//! request; signals go to the process group. A process's leftovers are
//! killed with it when it exits, as a call's are.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ember_wire::{
    ErrorCode, ErrorReply, ExecRequest, ExitStatus, ProcessInfo, PtySize, Response, ResponseBody,
    SpawnRequest, Stream,
};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt as _;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::cgroup::ExecCgroup;
use crate::Agent;

/// Exited processes kept for listing and replay, beyond the running ones.
const KEEP_EXITED: usize = 32;
/// How long a write to a process's stdin may wait for it to read.
const STDIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading what a process's leftovers still write after it exited.
const LEFTOVER_DRAIN: Duration = Duration::from_millis(100);

/// Every background process of this guest, by pid.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<BTreeMap<u32, Arc<Proc>>>,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    tag: Option<String>,
    command: ember_wire::Command,
    started_unix_ms: u64,
    out: Mutex<Output>,
    changed: Notify,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    stdin_open: std::sync::atomic::AtomicBool,
    /// The master of its terminal and the terminal's size, if it has one.
    pty: Option<TerminalSide>,
}

/// A terminal's master and its size.
type TerminalSide = (OwnedFd, Mutex<PtySize>);

/// A process's output buffer: chunks at absolute byte offsets.
#[derive(Debug, Default)]
struct Output {
    chunks: VecDeque<(u64, Stream, Vec<u8>)>,
    buffered: usize,
    limit: usize,
    /// Bytes written so far (the offset of the next one).
    end: u64,
    exit: Option<ExitStatus>,
}

impl Output {
    fn push(&mut self, stream: Stream, mut data: Vec<u8>) {
        self.end += data.len() as u64;
        if data.len() > self.limit {
            // Only its newest `limit` bytes can be kept.
            data.drain(..data.len() - self.limit);
        }
        let at = self.end - data.len() as u64;
        self.buffered += data.len();
        self.chunks.push_back((at, stream, data));
        // Drop the oldest bytes past the limit, cutting into the oldest
        // chunk where needed, so exactly the newest `limit` bytes stay.
        while self.buffered > self.limit {
            let excess = self.buffered - self.limit;
            let Some(front) = self.chunks.front_mut() else { break };
            if front.2.len() <= excess {
                self.buffered -= front.2.len();
                self.chunks.pop_front();
            } else {
                front.2.drain(..excess);
                front.0 += excess as u64;
                self.buffered -= excess;
            }
        }
    }

    /// Where the buffer starts (everything before it was dropped).
    fn start(&self) -> u64 {
        self.chunks.front().map_or(self.end, |c| c.0)
    }

    /// For a reader at `cursor`: bytes it missed, the chunks it gets, its
    /// new cursor.
    fn since(&self, cursor: u64) -> (u64, Vec<(Stream, Vec<u8>)>, u64) {
        let dropped = self.start().saturating_sub(cursor);
        let mut out = Vec::new();
        for (at, stream, data) in &self.chunks {
            let end = at + data.len() as u64;
            if end <= cursor {
                continue;
            }
            let skip = cursor.saturating_sub(*at) as usize;
            out.push((*stream, data[skip..].to_vec()));
        }
        (dropped, out, self.end)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(code: ErrorCode, msg: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, msg)
}

impl Processes {
    fn get(&self, pid: u32) -> Result<Arc<Proc>, ErrorReply> {
        lock(&self.table)
            .get(&pid)
            .cloned()
            .ok_or_else(|| err(ErrorCode::NotFound, format!("no process {pid}")))
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        lock(&self.table).values().map(|p| p.info()).collect()
    }

    /// Forget every process (a reset kills them with the user's cgroups).
    pub fn clear(&self) {
        lock(&self.table).clear();
    }

    fn running(&self) -> usize {
        lock(&self.table).values().filter(|p| lock(&p.out).exit.is_none()).count()
    }

    fn insert(&self, proc: Arc<Proc>) {
        let mut t = lock(&self.table);
        t.insert(proc.pid, proc);
        let exited: Vec<u32> = t.values().filter(|p| lock(&p.out).exit.is_some()).map(|p| p.pid).collect();
        for pid in exited.iter().take(exited.len().saturating_sub(KEEP_EXITED)) {
            t.remove(pid);
        }
    }
}

impl Proc {
    fn info(&self) -> ProcessInfo {
        let out = lock(&self.out);
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            command: self.command.clone(),
            started_unix_ms: self.started_unix_ms,
            exit: out.exit.clone(),
            output_bytes: out.end,
            stdin_open: self.stdin_open.load(std::sync::atomic::Ordering::Relaxed),
            pty: self.pty.as_ref().map(|(_, size)| *lock(size)),
        }
    }
}

/// Start `req` in the background; its pid.
pub async fn spawn(agent: &Agent, id: u64, req: SpawnRequest) -> Result<u32, ErrorReply> {
    if agent.processes.running() >= req.max_processes as usize {
        return Err(err(
            ErrorCode::Conflict,
            format!("{} background processes are running, the limit", req.max_processes),
        ));
    }
    let mut exec = ExecRequest::new(req.command.clone());
    exec.env = req.env.clone();
    exec.cwd = req.cwd.clone();
    exec.pids_limit = req.pids_limit;
    let terminal = req.pty.map(open_terminal).transpose()?;
    let mut cmd = crate::exec::build_command(agent, &exec, terminal.is_some())?;
    if let Some(t) = &terminal {
        cmd.stdin(t.slave_stdio()?).stdout(t.slave_stdio()?).stderr(t.slave_stdio()?);
    }
    let cgroup: Option<ExecCgroup> = match &agent.cgroups {
        Some(cgs) => Some(
            cgs.create(&format!("proc-{id}-{}", std::process::id()), req.pids_limit.or(Some(1024)))
                .map_err(|e| err(ErrorCode::Internal, format!("cannot create cgroup: {e}")))?,
        ),
        None => None,
    };
    let spawned =
        crate::exec::spawn_exec(agent, cmd, cgroup.as_ref(), terminal.is_some()).and_then(
            |s| match terminal {
                // The terminal stands in for all three pipes.
                Some(t) => t.attach(s, req.pty.unwrap_or(PtySize { cols: 80, rows: 24 })),
                None => Ok((s, None)),
            },
        );
    let (mut spawned, pty) = match spawned {
        Ok(s) => s,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ = cg.destroy().await;
            }
            return Err(e);
        }
    };
    let pid = spawned.pid as u32;
    let started_unix_ms =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let stdin = if req.stdin || pty.is_some() { spawned.stdin.take() } else { None };
    let proc = Arc::new(Proc {
        pid,
        tag: req.tag,
        command: req.command,
        started_unix_ms,
        out: Mutex::new(Output { limit: req.buffer_bytes.max(1) as usize, ..Output::default() }),
        changed: Notify::new(),
        stdin_open: std::sync::atomic::AtomicBool::new(stdin.is_some()),
        stdin: tokio::sync::Mutex::new(stdin),
        pty,
    });
    agent.processes.insert(Arc::clone(&proc));
    let (stdout, stderr, exit) = (spawned.stdout, spawned.stderr, spawned.exit);
    let child = spawned._child;
    tokio::spawn(async move {
        let _child = child;
        pump(proc, stdout, stderr, exit, cgroup).await;
    });
    Ok(pid)
}

/// Read a process's output into its buffer until it exits, then end it.
async fn pump(
    proc: Arc<Proc>,
    mut stdout: Option<pipe::Receiver>,
    mut stderr: Option<pipe::Receiver>,
    mut exit_rx: tokio::sync::oneshot::Receiver<WaitStatus>,
    cgroup: Option<ExecCgroup>,
) {
    let started = tokio::time::Instant::now();
    let mut buf_out = vec![0u8; crate::exec::CHUNK];
    let mut buf_err = vec![0u8; crate::exec::CHUNK];
    let mut exit: Option<WaitStatus> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let take =
        |proc: &Proc, stream, r: std::io::Result<usize>, buf: &[u8], pipe: &mut Option<pipe::Receiver>| {
            match r {
                Ok(0) | Err(_) => *pipe = None,
                Ok(n) => {
                    lock(&proc.out).push(stream, buf[..n].to_vec());
                    proc.changed.notify_waiters();
                }
            }
        };
    loop {
        if exit.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            r = crate::exec::read_opt(&mut stdout, &mut buf_out) => take(&proc, Stream::Stdout, r, &buf_out, &mut stdout),
            r = crate::exec::read_opt(&mut stderr, &mut buf_err) => take(&proc, Stream::Stderr, r, &buf_err, &mut stderr),
            st = &mut exit_rx, if exit.is_none() => {
                exit = Some(st.unwrap_or(WaitStatus::StillAlive));
                drain_until = Some(tokio::time::Instant::now() + LEFTOVER_DRAIN);
            }
            _ = sleep_opt(drain_until) => break,
        }
    }
    // Its leftovers go with it.
    match cgroup {
        Some(cg) => {
            let _ = cg.destroy().await;
        }
        None => {
            let _ = killpg(Pid::from_raw(proc.pid as i32), Signal::SIGKILL);
        }
    }
    *proc.stdin.lock().await = None;
    proc.stdin_open.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut status = ExitStatus::default();
    crate::exec::finish(&mut status, exit, started.elapsed());
    lock(&proc.out).exit = Some(status);
    proc.changed.notify_waiters();
}

async fn sleep_opt(until: Option<tokio::time::Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Send process `pid`'s output to request `id` until it exits or the host
/// cancels (detaches).
pub async fn attach(
    agent: &Agent,
    id: u64,
    pid: u32,
    out: mpsc::Sender<Response>,
    cancel: CancellationToken,
) {
    let proc = match agent.processes.get(pid) {
        Ok(p) => p,
        Err(e) => {
            let _ = out.send(Response { id, body: ResponseBody::Error(e) }).await;
            return;
        }
    };
    let send = |body| out.send(Response { id, body });
    let mut cursor = 0u64;
    loop {
        let changed = proc.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (dropped, chunks, end, exit) = {
            let o = lock(&proc.out);
            let (dropped, chunks, end) = o.since(cursor);
            (dropped, chunks, end, o.exit.clone())
        };
        cursor = end;
        if dropped > 0 && send(ResponseBody::Dropped { bytes: dropped }).await.is_err() {
            return;
        }
        for (stream, data) in chunks {
            // Bounded by the channel: a slow host slows this reader only.
            if send(ResponseBody::Output { stream, data }).await.is_err() {
                return;
            }
        }
        if let Some(status) = exit {
            let _ = send(ResponseBody::Exit(status)).await;
            return;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = cancel.cancelled() => {
                let detached = err(ErrorCode::Conflict, "detached");
                let _ = send(ResponseBody::Error(detached)).await;
                return;
            }
        }
    }
}

/// Write `data` to process `pid`'s stdin, then close it if `eof`.
pub async fn stdin(agent: &Agent, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), ErrorReply> {
    let proc = agent.processes.get(pid)?;
    let mut guard = proc.stdin.lock().await;
    let Some(w) = guard.as_mut() else {
        return Err(err(ErrorCode::Conflict, format!("process {pid}'s stdin is closed")));
    };
    if !data.is_empty() {
        timed_write(w.write_all(&data), STDIN_TIMEOUT, &format!("process {pid}'s stdin")).await?;
    }
    if eof {
        *guard = None;
        proc.stdin_open.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

/// Set process `pid`'s terminal size.
pub fn resize(agent: &Agent, pid: u32, cols: u16, rows: u16) -> Result<(), ErrorReply> {
    let proc = agent.processes.get(pid)?;
    let Some((master, size)) = &proc.pty else {
        return Err(err(ErrorCode::Conflict, format!("process {pid} has no terminal")));
    };
    if lock(&proc.out).exit.is_some() {
        return Err(err(ErrorCode::Conflict, format!("process {pid} has exited")));
    }
    if cols == 0 || rows == 0 {
        return Err(err(ErrorCode::BadRequest, "a terminal needs at least one column and one row"));
    }
    crate::sys::set_window_size(master, cols, rows)
        .map_err(|e| err(ErrorCode::Internal, format!("resizing process {pid}'s terminal: {e}")))?;
    *lock(size) = PtySize { cols, rows };
    Ok(())
}

/// A new pseudo-terminal of `size`, for one process.
fn open_terminal(size: PtySize) -> Result<Terminal, ErrorReply> {
    if size.cols == 0 || size.rows == 0 {
        return Err(err(ErrorCode::BadRequest, "a terminal needs at least one column and one row"));
    }
    let ws = nix::pty::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&ws), None)
        .map_err(|e| err(ErrorCode::SpawnFailed, format!("cannot open a terminal: {e}")))?;
    Ok(Terminal { master: pty.master, slave: pty.slave })
}

struct Terminal {
    master: OwnedFd,
    slave: OwnedFd,
}

impl Terminal {
    fn slave_stdio(&self) -> Result<std::process::Stdio, ErrorReply> {
        let fd = self.slave.try_clone().map_err(|e| err(ErrorCode::Internal, format!("terminal: {e}")))?;
        Ok(std::process::Stdio::from(fd))
    }

    /// The started process's stdin and output become the master's; the
    /// slave is closed here (the child holds its own), so the master reads
    /// EIO once every process on the terminal is gone.
    fn attach(
        self,
        mut s: crate::exec::Spawned,
        size: PtySize,
    ) -> Result<(crate::exec::Spawned, Option<TerminalSide>), ErrorReply> {
        drop(self.slave);
        let io = |e: std::io::Error| err(ErrorCode::Internal, format!("terminal: {e}"));
        let master = self.master;
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| io(e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| io(e.into()))?;
        // A pty master is no FIFO, hence the unchecked constructors; it
        // polls like one.
        s.stdout =
            Some(pipe::Receiver::from_owned_fd_unchecked(master.try_clone().map_err(io)?).map_err(io)?);
        s.stdin = Some(pipe::Sender::from_owned_fd_unchecked(master.try_clone().map_err(io)?).map_err(io)?);
        s.stderr = None;
        Ok((s, Some((master, Mutex::new(size)))))
    }
}

/// A write to a reader inside the guest that may never read: a conflict
/// naming `what` if it fails or takes longer than `within`.
pub(crate) async fn timed_write(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    within: Duration,
    what: &str,
) -> Result<(), ErrorReply> {
    match tokio::time::timeout(within, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(err(ErrorCode::Conflict, format!("{what}: {e}"))),
        Err(_) => Err(err(ErrorCode::Conflict, format!("{what}: nothing was read for {within:?}"))),
    }
}

/// Send `signal` to process `pid`'s group.
pub fn signal(agent: &Agent, pid: u32, signal: i32) -> Result<(), ErrorReply> {
    let proc = agent.processes.get(pid)?;
    if lock(&proc.out).exit.is_some() {
        return Err(err(ErrorCode::Conflict, format!("process {pid} has exited")));
    }
    let sig =
        Signal::try_from(signal).map_err(|_| err(ErrorCode::BadRequest, format!("no signal {signal}")))?;
    killpg(Pid::from_raw(pid as i32), sig).map_err(|e| err(ErrorCode::Internal, format!("signal {sig}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(chunks: &[(Stream, Vec<u8>)]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.1.clone()).collect()
    }

    #[test]
    fn the_buffer_keeps_the_newest_bytes_and_tells_readers_what_they_missed() {
        let mut o = Output { limit: 10, ..Output::default() };
        o.push(Stream::Stdout, b"0123".to_vec());
        o.push(Stream::Stderr, b"4567".to_vec());
        let (dropped, chunks, end) = o.since(0);
        assert_eq!((dropped, bytes(&chunks), end), (0, b"01234567".to_vec(), 8));
        // Past the limit the oldest bytes go, part of a chunk too.
        o.push(Stream::Stdout, b"89ab".to_vec());
        let (dropped, chunks, end) = o.since(0);
        assert_eq!((dropped, bytes(&chunks), end), (2, b"23456789ab".to_vec(), 12));
        // A reader part-way through a chunk gets its rest.
        let (dropped, chunks, _) = o.since(6);
        assert_eq!((dropped, bytes(&chunks)), (0, b"6789ab".to_vec()));
        assert_eq!(chunks[0].0, Stream::Stderr);
        // A chunk larger than the buffer keeps its tail.
        o.push(Stream::Stdout, b"ABCDEFGHIJKLMNO".to_vec());
        let (dropped, chunks, end) = o.since(12);
        assert_eq!((dropped, bytes(&chunks), end), (5, b"FGHIJKLMNO".to_vec(), 27));
        assert_eq!(o.buffered, 10);
        // Caught up: nothing.
        let (dropped, chunks, _) = o.since(27);
        assert_eq!((dropped, chunks.len()), (0, 0));
    }
}
