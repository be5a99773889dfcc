//! A fake pool backend for router tests: each "VM" is a scripted agent
//! speaking the real wire protocol over `tokio::io::duplex`, so the real
//! `AgentClient` is in the path. Nothing runs on the host.
//!
//! With `real_agent_in`, each VM is instead the real guest agent (the
//! `ember-guest-agent` library) serving a workspace of its own under that
//! directory as the current user: the file routes run against the agent's
//! own system calls.
//!
//! Shell commands the fake understands: `echo TEXT`, `sleep` (until
//! cancelled or timed out), `flood N` (N bytes, limited like the agent),
//! `hostile-flood N` (N bytes ignoring the limit, as a guest root could),
//! `binary` (bytes 0..=255), `stdin` (echoes stdin), `crash` (the agent
//! dies), `exit N`. Anything else exits 0 silently. An argv whose program
//! is `missing` fails to spawn.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_channel::AgentClient;
use ember_pool::pool::{Backend, PoolError};
use ember_wire::{
    decode, encode, Command, ErrorCode, ErrorReply, ExecRequest, ExitStatus, FrameDecoder, Request,
    RequestBody, Response, ResponseBody, Stream, MAX_FRAME_LEN,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

use crate::invocation::AgentVm;

/// What the fake agents saw, across all VMs.
#[derive(Debug, Default)]
pub struct Log {
    pub execs: Vec<ExecRequest>,
    pub files: BTreeMap<String, Vec<u8>>,
    pub cancels: u64,
    pub resets: u64,
    pub scrubs: u64,
    pub alive: u64,
    /// (VM, policy) of every connect, and VMs disconnected, in order.
    pub connects: Vec<(String, ember_net::Policy)>,
    pub disconnects: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeAgents {
    pub log: Arc<Mutex<Log>>,
    /// Paused VMs by directory.
    pub paused: Arc<Mutex<BTreeMap<std::path::PathBuf, FakeVm>>>,
    pub next: Arc<AtomicU64>,
    pub create_delay: Duration,
    /// Put before VM ids (one image's pool: `data-fake-0`).
    pub prefix: &'static str,
    /// Serve each VM by the real agent, its workspace a directory of its
    /// own in here.
    pub real_agent_in: Option<std::path::PathBuf>,
}

pub struct FakeVm {
    id: String,
    agent: Arc<AgentClient>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

impl AgentVm for FakeVm {
    fn agent(&self) -> &AgentClient {
        &self.agent
    }
    fn id(&self) -> &str {
        &self.id
    }
}

impl FakeAgents {
    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for FakeAgents {
    type Vm = FakeVm;

    async fn create(&self) -> Result<FakeVm, PoolError> {
        tokio::time::sleep(self.create_delay).await;
        let (host, guest) = tokio::io::duplex(1 << 16);
        let id = format!("{}fake-{}", self.prefix, self.next.fetch_add(1, Ordering::SeqCst));
        let task = match &self.real_agent_in {
            Some(root) => tokio::spawn(real_agent(root.join(&id), guest)),
            None => tokio::spawn(serve(guest, Arc::clone(&self.log))),
        };
        self.log().alive += 1;
        Ok(FakeVm { id, agent: Arc::new(AgentClient::new(host)), task })
    }

    fn recycles(&self) -> bool {
        true
    }

    async fn reset(&self, _vm: &mut FakeVm) -> Result<(), PoolError> {
        self.log().resets += 1;
        Ok(())
    }

    fn scrubs(&self) -> bool {
        true
    }

    async fn scrub(&self, _vm: &mut FakeVm) -> Result<(), PoolError> {
        self.log().scrubs += 1;
        Ok(())
    }

    async fn connect(
        &self,
        vm: &FakeVm,
        policy: &ember_net::Policy,
    ) -> Result<ember_pool::pool::NetTimings, PoolError> {
        self.log().connects.push((vm.id.clone(), policy.clone()));
        Ok(ember_pool::pool::NetTimings::default())
    }

    async fn disconnect(&self, vm: &FakeVm) {
        self.log().disconnects.push(vm.id.clone());
    }

    async fn destroy(&self, vm: FakeVm) {
        vm.task.abort();
        self.log().alive -= 1;
    }

    fn healthy(&self, vm: &mut FakeVm) -> bool {
        !vm.task.is_finished()
    }

    fn vm_id(vm: &FakeVm) -> &str {
        &vm.id
    }

    fn pauses(&self) -> bool {
        true
    }

    async fn pause(&self, vm: FakeVm, dir: &std::path::Path) -> Result<(), PoolError> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(dir.to_path_buf(), vm);
        Ok(())
    }

    async fn resume(&self, dir: &std::path::Path) -> Result<FakeVm, PoolError> {
        let vm = self.paused.lock().unwrap_or_else(|p| p.into_inner()).remove(dir);
        vm.ok_or_else(|| PoolError::Pause(format!("nothing paused in {}", dir.display())))
    }

    async fn fork(&self, _vm: &FakeVm, dir: &std::path::Path) -> Result<(), PoolError> {
        let copy = self.create().await?;
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(dir.to_path_buf(), copy);
        Ok(())
    }

    async fn copy_paused(&self, _from: &std::path::Path, to: &std::path::Path) -> Result<(), PoolError> {
        let copy = self.create().await?;
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).insert(to.to_path_buf(), copy);
        Ok(())
    }

    fn can_resume(&self, dir: &std::path::Path) -> bool {
        self.paused.lock().unwrap_or_else(|p| p.into_inner()).contains_key(dir)
    }

    fn handle(vm: &FakeVm) -> ember_pool::pool::VmHandle {
        ember_pool::pool::VmHandle { agent: Some(Arc::clone(&vm.agent)), ..Default::default() }
    }
}

/// The real agent, serving `workspace` as the current user.
async fn real_agent(workspace: std::path::PathBuf, stream: tokio::io::DuplexStream) {
    if std::fs::create_dir_all(&workspace).is_err() {
        return;
    }
    let mut layout = ember_guest_agent::GuestLayout::guest();
    layout.scratch_dirs = vec![workspace.clone()];
    layout.workspace = workspace;
    layout.user = None;
    let Ok(reaper) = ember_guest_agent::Reaper::start(ember_guest_agent::ReapMode::Registered) else {
        return;
    };
    let agent = Arc::new(ember_guest_agent::Agent::unconfined(layout, reaper));
    let _ = ember_guest_agent::serve(agent, stream).await;
}

type Out = mpsc::UnboundedSender<Response>;

async fn serve(stream: tokio::io::DuplexStream, log: Arc<Mutex<Log>>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Response>();
    let writer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let Ok(frame) = encode(&r) else { continue };
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = vec![0u8; 1 << 16];
    let mut running: BTreeMap<u64, mpsc::UnboundedSender<()>> = BTreeMap::new();
    'conn: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Some(frame) = dec.next_frame() {
            let Ok(req) = frame.and_then(|b| decode::<Request>(&b)) else { continue };
            let reply = |body| {
                let _ = tx.send(Response { id: req.id, body });
            };
            match req.body {
                RequestBody::Exec(mut e) => {
                    // Like the agent: the files first; one refused fails the request.
                    if let Err(err) = write_files(&log, std::mem::take(&mut e.files)) {
                        reply(ResponseBody::Error(err));
                        continue;
                    }
                    log.lock().unwrap_or_else(|p| p.into_inner()).execs.push(e.clone());
                    if e.command == Command::Shell("crash".into()) {
                        break 'conn;
                    }
                    let (cancel_tx, cancel_rx) = mpsc::unbounded_channel();
                    running.insert(req.id, cancel_tx);
                    tokio::spawn(exec(req.id, e, tx.clone(), cancel_rx));
                }
                RequestBody::Cancel { target } => {
                    log.lock().unwrap_or_else(|p| p.into_inner()).cancels += 1;
                    if let Some(c) = running.remove(&target) {
                        let _ = c.send(());
                    }
                }
                RequestBody::WriteFiles { files } => match write_files(&log, files) {
                    Ok(()) => reply(ResponseBody::Ok),
                    Err(err) => reply(ResponseBody::Error(err)),
                },
                _ => reply(ResponseBody::Ok),
            }
        }
    }
    writer.abort();
}

/// Record `files`, refusing any path that contains "refused".
fn write_files(log: &Mutex<Log>, files: Vec<ember_wire::FileSpec>) -> Result<(), ErrorReply> {
    if files.iter().any(|f| f.path.contains("refused")) {
        return Err(ErrorReply::new(ErrorCode::BadRequest, "path refused"));
    }
    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
    for f in files {
        l.files.insert(f.path, f.content);
    }
    Ok(())
}

async fn exec(id: u64, e: ExecRequest, tx: Out, mut cancel: mpsc::UnboundedReceiver<()>) {
    let send = |body| {
        let _ = tx.send(Response { id, body });
    };
    let out = |stream, data: Vec<u8>| send(ResponseBody::Output { stream, data });
    let started = tokio::time::Instant::now();
    let mut status = ExitStatus { code: Some(0), ..Default::default() };
    match &e.command {
        Command::Argv(argv) if argv.first().is_some_and(|a| a == "missing") => {
            send(ResponseBody::Error(ErrorReply::new(ErrorCode::SpawnFailed, "missing: not found")));
            return;
        }
        Command::Argv(_) | Command::Python(_) => {}
        Command::Shell(line) => {
            let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match word {
                "echo" => out(Stream::Stdout, format!("{rest}\n").into_bytes()),
                "stdin" => out(Stream::Stdout, e.stdin.clone()),
                "binary" => out(Stream::Stdout, (0..=255).collect()),
                "exit" => status.code = rest.parse().ok(),
                "nap" => tokio::time::sleep(Duration::from_millis(rest.parse().unwrap_or(0))).await,
                "flood" => {
                    let total: u64 = rest.parse().unwrap_or(0);
                    let kept = total.min(e.output_limit);
                    for chunk in 0..kept.div_ceil(1000) {
                        let n = (kept - chunk * 1000).min(1000) as usize;
                        out(Stream::Stdout, vec![b'x'; n]);
                    }
                    // One budget for both streams, as the agent's.
                    let room = (e.output_limit - kept).min(5) as usize;
                    out(Stream::Stderr, b"done\n"[..room].to_vec());
                    status.truncated = total + 5 > e.output_limit;
                }
                "hostile-flood" => {
                    let total: u64 = rest.parse().unwrap_or(0);
                    for chunk in 0..total.div_ceil(64_000) {
                        let n = (total - chunk * 64_000).min(64_000) as usize;
                        out(Stream::Stdout, vec![b'x'; n]);
                    }
                }
                "sleep" => {
                    let limit = Duration::from_millis(e.timeout_ms);
                    tokio::select! {
                        _ = cancel.recv() => {
                            status = ExitStatus { signal: Some(9), cancelled: true, ..Default::default() };
                        }
                        _ = tokio::time::sleep(limit) => {
                            status = ExitStatus { signal: Some(9), timed_out: true, ..Default::default() };
                        }
                    }
                }
                _ => {}
            }
        }
    }
    status.duration_us = started.elapsed().as_micros() as u64;
    status.duration_ms = status.duration_us / 1000;
    send(ResponseBody::Exit(status));
}
