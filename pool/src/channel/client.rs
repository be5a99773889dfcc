//! Host side of the agent protocol: many requests in flight on one stream,
//! replies routed to their callers by request id. Generic over the stream,
//! so tests speak to a real agent session through `tokio::io::duplex`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_wire::{
    decode, encode, Configure, ErrorReply, ExecRequest, ExitStatus, FileSpec, FrameDecoder, HelloReply,
    Request, RequestBody, Response, ResponseBody, Stream, MAX_FRAME_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<ResponseBody>>>>;

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
    #[error("agent channel I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A connection to one guest agent. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AgentClient {
    out: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    /// Error replies the agent could not tie to a request (id 0).
    stray: tokio::sync::Mutex<mpsc::UnboundedReceiver<ErrorReply>>,
    next_id: AtomicU64,
    /// Whether the last command sent was a Python script: the reset's
    /// warm-up then warms the Python path (see `warm::warm_up`).
    last_exec_python: std::sync::atomic::AtomicBool,
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
    Output { stream: Stream, data: Vec<u8> },
    Exit(ExitStatus),
}

/// A running command. Dropping it before the exit event cancels the
/// command in the guest (its whole process tree is killed).
#[derive(Debug)]
pub struct ExecHandle {
    id: u64,
    rx: mpsc::UnboundedReceiver<ResponseBody>,
    out: mpsc::Sender<Vec<u8>>,
    finished: bool,
}

impl AgentClient {
    pub fn new<S>(stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
        let pending: Pending = Arc::default();
        let (stray_tx, stray_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let pend = Arc::clone(&pending);
        let reader = tokio::spawn(async move {
            let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                decoder.push(&buf[..n]);
                while let Some(frame) = decoder.next_frame() {
                    let resp = match frame.and_then(|b| decode::<Response>(&b)) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable frame from agent");
                            continue;
                        }
                    };
                    route(&pend, &stray_tx, resp);
                }
            }
            // Dropping every sender wakes every waiter with Disconnected.
            pend.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Self {
            out,
            pending,
            stray: tokio::sync::Mutex::new(stray_rx),
            next_id: AtomicU64::new(1),
            last_exec_python: std::sync::atomic::AtomicBool::new(false),
            tasks: [reader, writer],
        }
    }

    async fn start(
        &self,
        body: RequestBody,
    ) -> Result<(u64, mpsc::UnboundedReceiver<ResponseBody>), AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&Request { id, body }).map_err(|e| AgentError::Protocol(e.to_string()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        if self.out.send(frame).await.is_err() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(AgentError::Disconnected);
        }
        Ok((id, rx))
    }

    /// Send a request and wait for its single reply.
    async fn call(&self, body: RequestBody) -> Result<ResponseBody, AgentError> {
        let (_, mut rx) = self.start(body).await?;
        match rx.recv().await {
            Some(ResponseBody::Error(e)) => Err(AgentError::Remote(e)),
            Some(r) => Ok(r),
            None => Err(AgentError::Disconnected),
        }
    }

    async fn call_ok(&self, body: RequestBody) -> Result<(), AgentError> {
        match self.call(body).await? {
            ResponseBody::Ok => Ok(()),
            other => Err(AgentError::Protocol(format!("expected ok, got {other:?}"))),
        }
    }

    pub async fn hello(&self, nonce: u64) -> Result<HelloReply, AgentError> {
        match self.call(RequestBody::Hello { nonce }).await? {
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
        let (id, rx) = self.start(RequestBody::Exec(req)).await?;
        Ok(ExecHandle { id, rx, out: self.out.clone(), finished: false })
    }

    /// Run a command to completion and collect its output.
    pub async fn run(&self, req: ExecRequest) -> Result<ExecOutput, AgentError> {
        let mut h = self.exec(req).await?;
        let mut out = ExecOutput::default();
        loop {
            match h.next().await? {
                ExecEvent::Output { stream: Stream::Stdout, data } => out.stdout.extend(data),
                ExecEvent::Output { stream: Stream::Stderr, data } => out.stderr.extend(data),
                ExecEvent::Exit(st) => {
                    out.status = st;
                    return Ok(out);
                }
            }
        }
    }

    pub async fn write_files(&self, files: Vec<FileSpec>) -> Result<(), AgentError> {
        self.call_ok(RequestBody::WriteFiles { files }).await
    }

    pub async fn configure(&self, cfg: Configure) -> Result<(), AgentError> {
        self.call_ok(RequestBody::Configure(cfg)).await
    }

    pub async fn reset(&self) -> Result<(), AgentError> {
        self.call_ok(RequestBody::Reset {}).await
    }

    pub async fn scrub(&self) -> Result<(), AgentError> {
        self.call_ok(RequestBody::Scrub {}).await
    }

    pub async fn detach_scratch(&self) -> Result<(), AgentError> {
        self.call_ok(RequestBody::DetachScratch {}).await
    }

    pub async fn attach_scratch(&self) -> Result<(), AgentError> {
        self.call_ok(RequestBody::AttachScratch {}).await
    }

    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.call_ok(RequestBody::Shutdown {}).await
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

fn route(pending: &Pending, stray: &mpsc::UnboundedSender<ErrorReply>, resp: Response) {
    let terminal = !matches!(resp.body, ResponseBody::Output { .. });
    let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
    let tx = if terminal { map.remove(&resp.id) } else { map.get(&resp.id).cloned() };
    drop(map);
    match (tx, resp.body) {
        (Some(tx), body) => {
            let _ = tx.send(body);
        }
        (None, ResponseBody::Error(e)) => {
            let _ = stray.send(e);
        }
        (None, body) => tracing::debug!(id = resp.id, ?body, "reply for no pending request"),
    }
}

impl ExecHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        if self.finished {
            return Err(AgentError::Protocol("exec already finished".into()));
        }
        match self.rx.recv().await {
            Some(ResponseBody::Output { stream, data }) => Ok(ExecEvent::Output { stream, data }),
            Some(ResponseBody::Exit(st)) => {
                self.finished = true;
                Ok(ExecEvent::Exit(st))
            }
            Some(ResponseBody::Error(e)) => {
                self.finished = true;
                Err(AgentError::Remote(e))
            }
            Some(other) => Err(AgentError::Protocol(format!("unexpected reply to exec: {other:?}"))),
            None => {
                self.finished = true;
                Err(AgentError::Disconnected)
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
