//! Host side of the agent protocol: many requests in flight on one stream,
//! replies routed to their callers by request id. Generic over the stream,
//! so tests speak to a real agent session through `tokio::io::duplex`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_wire::{
    decode, encode, Configure, ErrorCode, ErrorReply, ExecRequest, ExitStatus, FileSpec, FrameDecoder,
    HelloReply, Request, RequestBody, Response, ResponseBody, Stream, MAX_FRAME_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the reader passes to a request's waiter.
#[derive(Debug)]
enum Delivery {
    Body(ResponseBody),
    /// The agent sent more than the host buffers for one request while its
    /// caller was not reading: the request is over, the VM suspect.
    Overflow {
        buffered: usize,
    },
}

/// One request in flight: where its replies go, and the output bytes
/// delivered but not yet taken by its caller.
#[derive(Debug, Clone)]
struct PendingCall {
    tx: mpsc::UnboundedSender<Delivery>,
    buffered: Arc<std::sync::atomic::AtomicUsize>,
}

type Pending = Arc<Mutex<HashMap<u64, PendingCall>>>;

/// Output bytes the host holds for one request whose caller has not read
/// them yet (a slow HTTP client, say). Past it the request fails and the
/// VM is treated as broken: the host trusts no guest to pace itself.
pub const MAX_BUFFERED_PER_REQUEST: usize = 8 << 20;

/// Requests in flight on one connection (a session's concurrent calls and
/// their control requests); more are refused, not queued.
pub const MAX_IN_FLIGHT: usize = 64;

/// Stray error replies (no request id) kept for [`AgentClient::next_stray_error`];
/// more are dropped.
const MAX_STRAY: usize = 16;

/// Deadlines of the agent's control requests: a hung or hostile agent costs
/// one VM, never a stuck claim.
#[derive(Debug, Clone, Copy)]
pub struct CallTimeouts {
    /// hello, configure, shutdown.
    pub quick: Duration,
    /// reset, scrub, write_files, detach/attach of the scratch disk (slow
    /// storage such as zfs-fuse needs seconds).
    pub slow: Duration,
}

impl Default for CallTimeouts {
    fn default() -> Self {
        Self { quick: Duration::from_secs(15), slow: Duration::from_secs(60) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent connection closed")]
    Disconnected,
    #[error("agent protocol error: {0}")]
    Protocol(String),
    #[error("agent refused the request ({:?}): {}", .0.code, .0.message)]
    Remote(ErrorReply),
    #[error("agent did not answer {what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("agent sent {buffered} bytes for one request faster than they were read (limit {limit})")]
    Overflow { buffered: usize, limit: usize },
    #[error("{limit} requests are in flight on this VM's channel, the limit")]
    TooManyInFlight { limit: usize },
    #[error("agent sent {sent} bytes of output, past the request's limit of {limit}")]
    OutputPastLimit { sent: u64, limit: u64 },
    #[error("agent channel I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl AgentError {
    /// Whether the VM can no longer be trusted after this error (its
    /// holder destroys it): the one place that says so. A refusal the
    /// agent chose (a bad request, a command that cannot start, no such
    /// process or file, a state that does not allow it, a closed port) and
    /// the host's own in-flight bound leave it be; a hang-up, a timeout,
    /// garbage, a flood or the agent's own failure doom it.
    pub fn dooms_vm(&self) -> bool {
        match self {
            AgentError::Remote(r) => !matches!(
                r.code,
                ErrorCode::BadRequest
                    | ErrorCode::SpawnFailed
                    | ErrorCode::NotFound
                    | ErrorCode::Conflict
                    | ErrorCode::Unreachable
            ),
            AgentError::TooManyInFlight { .. } => false,
            _ => true,
        }
    }
}

/// A connection to one guest agent. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentClient {
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    /// Error replies the agent could not tie to a request (id 0).
    stray: tokio::sync::Mutex<mpsc::Receiver<ErrorReply>>,
    timeouts: CallTimeouts,
    /// Set when the reader ends (hang-up, garbage): calls fail at once.
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_id: AtomicU64,
    /// Whether the last command sent was a Python script: the reset's
    /// warm-up then warms the Python path (see `pool::vm_backend::warm_up`).
    last_exec_python: std::sync::atomic::AtomicBool,
    /// The VM's bulk lane, when it has one: uploads go that way.
    lane: std::sync::OnceLock<Arc<super::lane::BulkLane>>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Output and status of a finished command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// One event of a running command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output {
        stream: Stream,
        data: Vec<u8>,
    },
    /// An attached background process's output this reader missed.
    Dropped {
        bytes: u64,
    },
    Exit(ExitStatus),
}

/// A running command. Dropping it before the exit event cancels the
/// command in the guest (its whole process tree is killed).
#[derive(Debug)]
pub struct ExecHandle {
    id: u64,
    rx: mpsc::UnboundedReceiver<Delivery>,
    buffered: Arc<std::sync::atomic::AtomicUsize>,
    out: mpsc::Sender<Vec<u8>>,
    finished: bool,
    /// The request's output limit, enforced here too: bytes past it are
    /// dropped (and the exit marked truncated); many past it end the call.
    limit: u64,
    received: u64,
    truncated: bool,
}

/// Output past the limit that is dropped quietly before the call is ended
/// as a protocol violation (the agent's own cap is exact; this is slack).
const OUTPUT_SLACK: u64 = 64 << 10;

/// Where a client's request ids start: a random point, not 1. A VM
/// restored from a snapshot (a resumed session) still holds the requests
/// that were in flight when it was saved, under the old client's ids, and
/// over virtio-serial the agent cannot tell the new connection from the
/// old one: ids from 1 again would collide with them ("request id N is
/// already in flight"). Below 2^52, so counting up never wraps.
fn first_request_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (random >> 12) | 1
}

impl AgentClient {
    pub fn new<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::with_timeouts(stream, CallTimeouts::default())
    }

    pub fn with_timeouts<S>(stream: S, timeouts: CallTimeouts) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
        let pending: Pending = Arc::default();
        let (stray_tx, stray_rx) = mpsc::channel(MAX_STRAY);
        let writer = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let pend = Arc::clone(&pending);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader_closed = Arc::clone(&closed);
        let reader = tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                let mut broken = false;
                while let Some(frame) = decoder.next_frame() {
                    match frame.and_then(|b| decode::<Response>(&b)) {
                        Ok(resp) => route(&pend, &stray_tx, resp),
                        Err(e) => {
                            // Our agent never sends one: the guest is not to
                            // be trusted. Hang up; every waiter learns it.
                            tracing::warn!(error = %e, "undecodable frame from the agent; closing its channel");
                            broken = true;
                            break;
                        }
                    }
                }
                if broken {
                    break;
                }
            }
            // Dropping every sender wakes every waiter with Disconnected.
            let mut map = pend.lock().unwrap_or_else(|p| p.into_inner());
            reader_closed.store(true, Ordering::SeqCst);
            map.clear();
        });
        Self {
            out,
            pending,
            stray: tokio::sync::Mutex::new(stray_rx),
            timeouts,
            closed,
            next_id: AtomicU64::new(first_request_id()),
            last_exec_python: std::sync::atomic::AtomicBool::new(false),
            lane: std::sync::OnceLock::new(),
            tasks: [reader, writer],
        }
    }

    /// Send uploads over `lane` (the VM's bulk lane disk) from now on.
    pub fn attach_lane(&self, lane: Arc<super::lane::BulkLane>) {
        let _ = self.lane.set(lane);
    }

    async fn start(
        &self,
        body: RequestBody,
    ) -> Result<(u64, PendingCall, mpsc::UnboundedReceiver<Delivery>), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Request { id, body }).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let call = PendingCall { tx, buffered: Arc::default() };
        {
            let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if self.closed.load(Ordering::SeqCst) {
                return Err(AgentError::Disconnected);
            }
            if map.len() >= MAX_IN_FLIGHT {
                return Err(AgentError::TooManyInFlight { limit: MAX_IN_FLIGHT });
            }
            map.insert(id, call.clone());
        }
        if self.out.send(frame).await.is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(AgentError::Disconnected);
        }
        Ok((id, call, rx))
    }

    /// Send a request and wait, at most `within`, for its single reply.
    async fn call(
        &self,
        what: &'static str,
        within: Duration,
        body: RequestBody,
    ) -> Result<ResponseBody, AgentError> {
        let (id, _, mut rx) = self.start(body).await?;
        let reply = tokio::time::timeout(within, rx.recv()).await;
        if reply.is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        match reply.map_err(|_| AgentError::Timeout { what, after: within })? {
            Some(Delivery::Body(ResponseBody::Error(e))) => Err(AgentError::Remote(e)),
            Some(Delivery::Body(r)) => Ok(r),
            Some(Delivery::Overflow { buffered }) => {
                Err(AgentError::Overflow { buffered, limit: MAX_BUFFERED_PER_REQUEST })
            }
            None => Err(AgentError::Disconnected),
        }
    }

    async fn call_ok(
        &self,
        what: &'static str,
        within: Duration,
        body: RequestBody,
    ) -> Result<(), AgentError> {
        match self.call(what, within, body).await? {
            ResponseBody::Ok => Ok(()),
            other => Err(AgentError::Protocol(format!("expected ok to {what}, got {other:?}"))),
        }
    }

    pub async fn hello(&self, nonce: u64) -> Result<HelloReply, AgentError> {
        match self.call("hello", self.timeouts.quick, RequestBody::Hello { nonce }).await? {
            ResponseBody::Hello(h) if h.nonce == nonce => Ok(h),
            other => Err(AgentError::Protocol(format!("bad hello reply {other:?}"))),
        }
    }

    /// Whether the last command sent was a Python script.
    pub fn last_exec_was_python(&self) -> bool {
        self.last_exec_python.load(Ordering::Relaxed)
    }

    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, AgentError> {
        self.last_exec_python.store(matches!(req.command, ember_wire::Command::Python(_)), Ordering::Relaxed);
        let limit = req.output_limit;
        self.stream(RequestBody::Exec(req), limit).await
    }

    /// Start a request answered by output frames then an exit.
    async fn stream(&self, body: RequestBody, limit: u64) -> Result<ExecHandle, AgentError> {
        let (id, call, rx) = self.start(body).await?;
        Ok(ExecHandle {
            id,
            rx,
            buffered: call.buffered,
            out: self.out.clone(),
            finished: false,
            limit,
            received: 0,
            truncated: false,
        })
    }

    /// Start a background process (it outlives this call); its pid.
    pub async fn spawn(&self, req: ember_wire::SpawnRequest) -> Result<u32, AgentError> {
        match self.call("spawn", self.timeouts.quick, RequestBody::Spawn(req)).await? {
            ResponseBody::Spawned { pid } => Ok(pid),
            other => Err(AgentError::Protocol(format!("expected spawned, got {other:?}"))),
        }
    }

    /// The background processes, running and exited (bounded: the reply is
    /// one frame).
    pub async fn processes(&self) -> Result<Vec<ember_wire::ProcessInfo>, AgentError> {
        match self.call("processes", self.timeouts.quick, RequestBody::Processes {}).await? {
            ResponseBody::Processes { processes } => Ok(processes),
            other => Err(AgentError::Protocol(format!("expected processes, got {other:?}"))),
        }
    }

    /// Follow a background process's output: what its buffer holds, then
    /// live output, then its exit. Dropping the handle detaches.
    pub async fn attach(&self, pid: u32) -> Result<ExecHandle, AgentError> {
        // Streamed through, never collected: bounded per read by the
        // channel's buffer, not in total.
        self.stream(RequestBody::Attach { pid }, u64::MAX).await
    }

    pub async fn stdin(&self, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), AgentError> {
        self.call_ok("stdin", self.timeouts.quick, RequestBody::Stdin { pid, data, eof }).await
    }

    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), AgentError> {
        self.call_ok("signal", self.timeouts.quick, RequestBody::Signal { pid, signal }).await
    }

    /// Set a background process's terminal size.
    pub async fn resize(&self, pid: u32, cols: u16, rows: u16) -> Result<(), AgentError> {
        self.call_ok("resize", self.timeouts.quick, RequestBody::Resize { pid, cols, rows }).await
    }

    /// Run a command to completion and collect its output.
    pub async fn run(&self, req: ExecRequest) -> Result<ExecOutput, AgentError> {
        let mut h = self.exec(req).await?;
        let mut out = ExecOutput::default();
        loop {
            match h.next().await? {
                ExecEvent::Output { stream: Stream::Stdout, data } => out.stdout.extend(data),
                ExecEvent::Output { stream: Stream::Stderr, data } => out.stderr.extend(data),
                ExecEvent::Dropped { .. } => {}
                ExecEvent::Exit(st) => {
                    out.status = st;
                    return Ok(out);
                }
            }
        }
    }

    pub async fn write_files(&self, files: Vec<FileSpec>) -> Result<(), AgentError> {
        self.call_ok("write_files", self.timeouts.slow, RequestBody::WriteFiles { files }).await
    }

    pub async fn configure(&self, cfg: Configure) -> Result<(), AgentError> {
        self.call_ok("configure", self.timeouts.quick, RequestBody::Configure(cfg)).await
    }

    pub async fn reset(&self) -> Result<(), AgentError> {
        self.call_ok("reset", self.timeouts.slow, RequestBody::Reset {}).await
    }

    pub async fn scrub(&self) -> Result<(), AgentError> {
        self.call_ok("scrub", self.timeouts.slow, RequestBody::Scrub {}).await
    }

    pub async fn detach_scratch(&self) -> Result<(), AgentError> {
        self.call_ok("detach_scratch", self.timeouts.slow, RequestBody::DetachScratch {}).await
    }

    pub async fn attach_scratch(&self) -> Result<(), AgentError> {
        self.call_ok("attach_scratch", self.timeouts.slow, RequestBody::AttachScratch {}).await
    }

    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.call_ok("shutdown", self.timeouts.quick, RequestBody::Shutdown {}).await
    }

    /// Close the connection now (its socket is dropped with the I/O tasks).
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Write raw bytes to the channel (tests of the agent's frame handling).
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), AgentError> {
        self.out.send(bytes).await.map_err(|_| AgentError::Disconnected)
    }

    /// The next error reply that carried no request id.
    pub async fn next_stray_error(&self, within: Duration) -> Result<ErrorReply, AgentError> {
        let mut rx = self.stray.lock().await;
        let next = tokio::time::timeout(within, rx.recv());
        match next.await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(AgentError::Disconnected),
            Err(_) => Err(AgentError::Timeout { what: "a stray error", after: within }),
        }
    }
}

fn route(pending: &Pending, stray: &mpsc::Sender<ErrorReply>, resp: Response) {
    let terminal = !matches!(
        resp.body,
        ResponseBody::Output { .. } | ResponseBody::Dropped { .. } | ResponseBody::Connected {}
    );
    let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
    let call = if terminal { map.remove(&resp.id) } else { map.get(&resp.id).cloned() };
    match (call, resp.body) {
        (Some(call), ResponseBody::Output { stream, data }) => {
            let buffered = call.buffered.fetch_add(data.len(), Ordering::Relaxed) + data.len();
            if buffered > MAX_BUFFERED_PER_REQUEST {
                // Ends the request: nothing more is delivered for it.
                call.buffered.fetch_sub(data.len(), Ordering::Relaxed);
                map.remove(&resp.id);
                let _ = call.tx.send(Delivery::Overflow { buffered });
            } else {
                let _ = call.tx.send(Delivery::Body(ResponseBody::Output { stream, data }));
            }
        }
        (Some(call), body) => {
            let _ = call.tx.send(Delivery::Body(body));
        }
        (None, ResponseBody::Error(e)) => {
            // Kept for tests of the agent's frame handling; a flood of them
            // is dropped past a few.
            let _ = stray.try_send(e);
        }
        (None, _) => tracing::debug!(id = resp.id, "reply for no pending request dropped"),
    }
}

impl ExecHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        loop {
            if self.finished {
                return Err(AgentError::Protocol("exec already finished".into()));
            }
            let delivery = self.rx.recv().await;
            if let Some(Delivery::Body(ResponseBody::Output { data, .. })) = &delivery {
                self.buffered.fetch_sub(data.len(), Ordering::Relaxed);
            }
            match delivery {
                Some(Delivery::Body(ResponseBody::Output { stream, mut data })) => {
                    let before = self.received;
                    self.received += data.len() as u64;
                    if self.received <= self.limit {
                        return Ok(ExecEvent::Output { stream, data });
                    }
                    self.truncated = true;
                    if self.received > self.limit.saturating_add(OUTPUT_SLACK) {
                        self.finished = true;
                        let _ = self.cancel().await;
                        return Err(AgentError::OutputPastLimit { sent: self.received, limit: self.limit });
                    }
                    data.truncate(self.limit.saturating_sub(before) as usize);
                    if !data.is_empty() {
                        return Ok(ExecEvent::Output { stream, data });
                    }
                }
                Some(Delivery::Body(ResponseBody::Dropped { bytes })) => {
                    return Ok(ExecEvent::Dropped { bytes });
                }
                Some(Delivery::Body(ResponseBody::Exit(mut st))) => {
                    self.finished = true;
                    st.truncated |= self.truncated;
                    return Ok(ExecEvent::Exit(st));
                }
                Some(Delivery::Body(ResponseBody::Error(e))) => {
                    self.finished = true;
                    return Err(AgentError::Remote(e));
                }
                Some(Delivery::Body(other)) => {
                    self.finished = true;
                    return Err(AgentError::Protocol(format!("unexpected reply to exec: {other:?}")));
                }
                Some(Delivery::Overflow { buffered }) => {
                    self.finished = true;
                    let _ = self.cancel().await;
                    return Err(AgentError::Overflow { buffered, limit: MAX_BUFFERED_PER_REQUEST });
                }
                None => {
                    self.finished = true;
                    return Err(AgentError::Disconnected);
                }
            }
        }
    }

    /// Ask the agent to kill the command; its exit event still follows.
    pub async fn cancel(&self) -> Result<(), AgentError> {
        let frame = cancel_frame(self.id)?;
        self.out.send(frame).await.map_err(|_| AgentError::Disconnected)
    }
}

fn cancel_frame(target: u64) -> Result<Vec<u8>, AgentError> {
    // Cancels use id 0: their "ok" reply is not awaited by anyone.
    encode(&Request { id: 0, body: RequestBody::Cancel { target } })
        .map_err(|e| AgentError::Protocol(e.to_string()))
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if !self.finished {
            if let Ok(frame) = cancel_frame(self.id) {
                let _ = self.out.try_send(frame);
            }
        }
    }
}

mod fs;
#[cfg(test)]
mod hostile;
mod streams;
pub use fs::{DirWatch, Listing};
pub use streams::{FileUpload, UPLOAD_PIECE};
