//! One host connection: decode frames, run each request as its own task,
//! write replies through one writer. Generic over the stream, so tests drive
//! it through `tokio::io::duplex`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ember_wire::{
    decode, encode, encode_head_for, encode_split, ErrorCode, ErrorReply, FrameDecoder, FrameError,
    HelloReply, Request, RequestBody, Response, ResponseBody, Stream, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::streams::{FileOp, Streams};
use crate::Agent;

/// Requests one connection may have in flight at once.
pub const MAX_IN_FLIGHT: usize = 256;

pub(crate) enum Outgoing {
    Frame(Response),
    /// Request `id`'s `output` (stdout) frame with `piece`'s bytes, written
    /// from where they are.
    Piece {
        id: u64,
        piece: crate::streams::Piece,
    },
    /// Flush, then power the guest off.
    PowerOff,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionStats {
    pub bytes_read: u64,
}

/// Serve one connection until the host closes it. Commands still running
/// when it closes are killed.
pub async fn serve<S>(agent: Arc<Agent>, stream: S) -> std::io::Result<SessionStats>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(64);
    let power_off = agent.power_off_on_shutdown;
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            match msg {
                Outgoing::Frame(resp) => {
                    // Bulk bytes are written from where they lie, after their header.
                    if write_frame(&mut wr, resp.id, encode_split(&resp)).await.is_err() {
                        break;
                    }
                }
                Outgoing::Piece { id, piece } => {
                    let output = ResponseBody::Output { stream: Stream::Stdout, data: Vec::new() };
                    let head = encode_head_for(&Response { id, body: output }, piece.bytes().len());
                    if write_frame(&mut wr, id, head.map(|h| (h, piece.bytes()))).await.is_err() {
                        break;
                    }
                }
                Outgoing::PowerOff => {
                    let _ = wr.flush().await;
                    if power_off {
                        crate::setup::power_off();
                    }
                }
            }
        }
    });

    let inflight: Arc<Mutex<HashMap<u64, CancellationToken>>> = Arc::default();
    let streams = Streams::new(tx.clone());
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = vec![0u8; 64 * 1024];
    let mut stats = SessionStats { bytes_read: 0 };
    let (resp_tx, mut resp_rx) = mpsc::channel::<Response>(64);
    // Replies from request tasks funnel into the writer.
    let fwd_tx = tx.clone();
    let forwarder = tokio::spawn(async move {
        while let Some(r) = resp_rx.recv().await {
            if fwd_tx.send(Outgoing::Frame(r)).await.is_err() {
                break;
            }
        }
    });

    let result = loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        stats.bytes_read += n as u64;
        decoder.push(&buf[..n]);
        while let Some(frame) = decoder.next_frame_with(parse_request) {
            let parsed = frame.map_err(|e| (0, e)).and_then(|r| r);
            let req = match parsed {
                Ok(r) => r,
                Err((id, e)) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        _ => ErrorCode::BadFrame,
                    };
                    tracing::warn!(error = %e, "bad frame from host");
                    let body = ResponseBody::Error(ErrorReply::new(code, e.to_string()));
                    let _ = resp_tx.send(Response { id, body }).await;
                    continue;
                }
            };
            dispatch(&agent, req, &resp_tx, &tx, &inflight, &streams).await;
        }
    };

    for token in inflight.lock().unwrap_or_else(|p| p.into_inner()).values() {
        token.cancel();
    }
    drop(resp_tx);
    drop(tx);
    let _ = forwarder.await;
    writer.abort();
    result.map(|()| stats)
}

/// Write one encoded frame: its header, then its bulk bytes from where
/// they are; an encoding failure is request `id`'s error instead.
async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    id: u64,
    encoded: Result<(Vec<u8>, &[u8]), FrameError>,
) -> std::io::Result<()> {
    match encoded {
        Ok((head, bulk)) => {
            wr.write_all(&head).await?;
            wr.write_all(bulk).await
        }
        Err(e) => {
            let body = ResponseBody::Error(ErrorReply::new(ErrorCode::Internal, e.to_string()));
            wr.write_all(&encode(&Response { id, body }).unwrap_or_default()).await
        }
    }
}

/// Parse a frame body; on failure keep the request id if it can be read, so
/// the host can match the error to its request.
fn parse_request(body: &[u8]) -> Result<Request, (u64, FrameError)> {
    decode::<Request>(body).map_err(|e| (ember_wire::frame_id(body).unwrap_or(0), e))
}

async fn dispatch(
    agent: &Arc<Agent>,
    req: Request,
    resp: &mpsc::Sender<Response>,
    out: &mpsc::Sender<Outgoing>,
    inflight: &Arc<Mutex<HashMap<u64, CancellationToken>>>,
    streams: &Streams,
) {
    let id = req.id;
    let reply_now = |body| Response { id, body };
    match req.body {
        RequestBody::Hello { nonce } => {
            let hello = HelloReply {
                nonce,
                protocol: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                uptime_ms: crate::setup::uptime_ms(),
                python_ready: agent.forkserver.as_ref().map(|s| s.ready() && s.alive()),
            };
            let _ = resp.send(reply_now(ResponseBody::Hello(hello))).await;
        }
        RequestBody::Cancel { target } => {
            if let Some(t) = inflight.lock().unwrap_or_else(|p| p.into_inner()).get(&target) {
                t.cancel();
            }
            let _ = resp.send(reply_now(ResponseBody::Ok)).await;
        }
        RequestBody::Shutdown {} => {
            let _ = out.send(Outgoing::Frame(reply_now(ResponseBody::Ok))).await;
            let _ = out.send(Outgoing::PowerOff).await;
        }
        RequestBody::Credit { target, bytes } => streams.credit(target, bytes),
        body => {
            let token = CancellationToken::new();
            if let Err(msg) = register(inflight, id, &token) {
                let e = ErrorReply::new(ErrorCode::BadRequest, msg);
                let _ = resp.send(reply_now(ResponseBody::Error(e))).await;
                return;
            }
            let agent = Arc::clone(agent);
            let resp = resp.clone();
            let inflight = Arc::clone(inflight);
            let streams = streams.clone();
            tokio::spawn(async move {
                run_request(&agent, &streams, id, body, &resp, token).await;
                inflight.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            });
        }
    }
}

fn register(
    inflight: &Mutex<HashMap<u64, CancellationToken>>,
    id: u64,
    token: &CancellationToken,
) -> Result<(), String> {
    let mut map = inflight.lock().unwrap_or_else(|p| p.into_inner());
    if map.contains_key(&id) {
        return Err(format!("request id {id} is already in flight"));
    }
    if map.len() >= MAX_IN_FLIGHT {
        return Err(format!("more than {MAX_IN_FLIGHT} requests in flight"));
    }
    map.insert(id, token.clone());
    Ok(())
}

async fn run_request(
    agent: &Agent,
    streams: &Streams,
    id: u64,
    body: RequestBody,
    resp: &mpsc::Sender<Response>,
    token: CancellationToken,
) {
    let done = |r: Result<(), ErrorReply>| Response {
        id,
        body: match r {
            Ok(()) => ResponseBody::Ok,
            Err(e) => ResponseBody::Error(e),
        },
    };
    match body {
        RequestBody::Exec(req) => crate::exec::run(agent, id, req, resp.clone(), token).await,
        RequestBody::WriteFiles { files } => {
            let _ = resp.send(done(crate::files::write_files(&agent.layout, files).await)).await;
        }
        RequestBody::Configure(cfg) => {
            let _ = resp.send(done(crate::configure::configure(agent, cfg).await)).await;
        }
        RequestBody::Reset {} => {
            agent.processes.clear();
            let _ = resp.send(done(crate::reset::reset(agent).await)).await;
        }
        RequestBody::DetachScratch {} => {
            let _ = resp.send(done(crate::reset::detach_scratch(agent).await)).await;
        }
        RequestBody::AttachScratch {} => {
            let _ = resp.send(done(crate::reset::attach_scratch(agent).await)).await;
        }
        RequestBody::Scrub {} => {
            agent.processes.clear();
            let _ = resp.send(done(crate::scrub::scrub(agent).await)).await;
        }
        RequestBody::Spawn(req) => {
            let body = match crate::process::spawn(agent, id, req).await {
                Ok(pid) => ResponseBody::Spawned { pid },
                Err(e) => ResponseBody::Error(e),
            };
            let _ = resp.send(Response { id, body }).await;
        }
        RequestBody::Processes {} => {
            let body = ResponseBody::Processes { processes: agent.processes.list() };
            let _ = resp.send(Response { id, body }).await;
        }
        RequestBody::Attach { pid } => crate::process::attach(agent, id, pid, resp.clone(), token).await,
        RequestBody::Stdin { pid, data, eof } => {
            let _ = resp.send(done(crate::process::stdin(agent, pid, data, eof).await)).await;
        }
        RequestBody::Signal { pid, signal } => {
            let _ = resp.send(done(crate::process::signal(agent, pid, signal))).await;
        }
        RequestBody::Resize { pid, cols, rows } => {
            let _ = resp.send(done(crate::process::resize(agent, pid, cols, rows))).await;
        }
        RequestBody::Connect { port } => streams.connect(id, port, resp.clone(), token).await,
        RequestBody::ReadFile { path } => {
            streams.file(&agent.layout, id, (path, FileOp::Read), resp.clone(), token).await
        }
        RequestBody::WriteFile { path } => {
            streams.file(&agent.layout, id, (path, FileOp::Write), resp.clone(), token).await
        }
        RequestBody::Send { target, data, eof } => {
            let _ = resp.send(done(streams.send(target, data, eof).await)).await;
        }
        RequestBody::LaneWrite { target, at, lane_at, len } => {
            let _ = resp.send(done(streams.lane_write(agent, target, (at, lane_at, len)).await)).await;
        }
        RequestBody::Stat { path } => {
            let _ = resp.send(entries(id, crate::fs::stat(&agent.layout, path).await)).await;
        }
        RequestBody::List { path, depth, limit } => {
            let _ = resp.send(entries(id, crate::fs::list(&agent.layout, path, depth, limit).await)).await;
        }
        RequestBody::Mkdir { path, parents } => {
            let _ = resp.send(entries(id, crate::fs::mkdir(&agent.layout, path, parents).await)).await;
        }
        RequestBody::Rename { from, to, overwrite } => {
            let _ = resp.send(entries(id, crate::fs::rename(&agent.layout, from, to, overwrite).await)).await;
        }
        RequestBody::Remove { path, recursive, missing_ok } => {
            let _ =
                resp.send(done(crate::fs::remove(&agent.layout, path, recursive, missing_ok).await)).await;
        }
        RequestBody::Hello { .. }
        | RequestBody::Cancel { .. }
        | RequestBody::Shutdown {}
        | RequestBody::Credit { .. } => {}
    }
}

/// The reply to a filesystem request.
fn entries(id: u64, answer: crate::fs::Answer) -> Response {
    let body = match answer {
        Ok((entries, truncated)) => ResponseBody::Entries { entries, truncated },
        Err(e) => ResponseBody::Error(e),
    };
    Response { id, body }
}
