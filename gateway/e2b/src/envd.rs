//! envd's `process.Process` service over a session's background processes
//! (`ember_service::processes`): a command the SDK starts is a background
//! process of the session (its pid the real guest pid), so a client that
//! goes away does not kill it and output it made before anyone attached is
//! replayed from its buffer. `Connect-Timeout-Ms` is the command's deadline:
//! past it, it is killed (SIGKILL to its group).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ember_channel::ExecEvent;
use ember_pool::pool::Backend;
use ember_service::api::{ProcessRequest, PtyRequest};
use ember_service::processes::Processes;
use ember_service::{AppState, Kind};
use serde::{Deserialize, Serialize};

use crate::connect::{self, Code, RpcError};
use crate::sandbox::Found;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Seconds without output before a keepalive, unless the client says.
const DEFAULT_KEEPALIVE_SECS: u64 = 50;
/// The most a unary request body may hold (a `SendInput` of stdin).
pub const MAX_UNARY_BODY: usize = connect::MAX_ENVELOPE;

/// An Ember failure as a Connect error.
pub fn rpc_error(e: ember_service::Error) -> RpcError {
    let code = match e.kind {
        Kind::Invalid | Kind::Unsupported | Kind::Unprocessable => Code::InvalidArgument,
        Kind::Forbidden => Code::PermissionDenied,
        Kind::NotFound | Kind::Gone => Code::NotFound,
        Kind::Conflict if e.code == "file_exists" || e.code == "session_exists" => Code::AlreadyExists,
        Kind::Conflict | Kind::NotAllowed => Code::FailedPrecondition,
        Kind::TooLarge | Kind::Busy | Kind::NoSpace => Code::ResourceExhausted,
        Kind::VmFailed | Kind::Unavailable => Code::Unavailable,
    };
    RpcError::new(code, e.message)
}

/// A unary answer: 200 with the message, or the error's status and JSON.
pub fn unary<T: Serialize>(r: Result<T, RpcError>) -> Response {
    match r {
        Ok(m) => axum::Json(m).into_response(),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, axum::Json(e.to_json())).into_response()
        }
    }
}

/// A stream's answer: 200, `application/connect+json`, the envelopes `rx`
/// gives; the sender writes the end-of-stream itself.
fn stream(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(connect::STREAM_CONTENT_TYPE));
    resp
}

/// A stream that ends at once with `error` (HTTP 200: the JS SDK reads
/// errors only from the end of the stream).
fn failed_stream(error: RpcError) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.try_send(connect::end_stream(Some(&error)));
    stream(rx)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessConfig {
    pub cmd: String,
    pub args: Vec<String>,
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Pty {
    pub size: Size,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    pub process: ProcessConfig,
    pub pty: Option<Pty>,
    pub tag: Option<String>,
    pub stdin: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Selector {
    pub pid: Option<u32>,
    pub tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Selected {
    pub process: Selector,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Input {
    pub stdin: Option<String>,
    pub pty: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendInput {
    pub process: Selector,
    pub input: Input,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SendSignal {
    pub process: Selector,
    pub signal: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Update {
    pub process: Selector,
    pub pty: Option<Pty>,
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, RpcError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| RpcError::new(Code::InvalidArgument, format!("request: {e}")))
}

/// The pid a selector names (a tag is looked up among the processes).
async fn pid_of(p: &Processes, s: &Selector) -> Result<u32, RpcError> {
    if let Some(pid) = s.pid {
        return Ok(pid);
    }
    let Some(tag) = &s.tag else { return Err(RpcError::new(Code::InvalidArgument, "no process named")) };
    let all = p.list().await.map_err(rpc_error)?;
    all.iter()
        .find(|i| i.tag.as_deref() == Some(tag) && i.exit.is_none())
        .map(|i| i.pid)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("process with tag {tag:?} not found")))
}

/// The session's processes for `found`.
async fn processes<B: Backend>(state: &AppState<B>, found: &Found) -> Result<Processes, RpcError> {
    state.processes(&found.caller, &found.key).await.map_err(rpc_error)
}

/// `process.Process/*`.
pub async fn process<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    method: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    match method {
        "Start" => start(state, found, headers, &body).await,
        "Connect" => connect_to(state, found, headers, &body).await,
        "List" => unary(list(state, found).await),
        "SendInput" => unary(send_input(state, found, &body).await),
        "CloseStdin" => unary(close_stdin(state, found, &body).await),
        "SendSignal" => unary(send_signal(state, found, &body).await),
        "Update" => unary(update(state, found, &body).await),
        other => unary::<()>(Err(RpcError::new(Code::Unimplemented, format!("process.Process/{other}")))),
    }
}

pub(crate) fn keepalive(headers: &HeaderMap) -> Duration {
    let secs = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(DEFAULT_KEEPALIVE_SECS);
    Duration::from_secs(secs.min(3600))
}

async fn start<B: Backend>(state: &AppState<B>, found: &Found, headers: &HeaderMap, body: &[u8]) -> Response {
    let started = async {
        let msg = connect::single_message(body)?;
        let req: StartRequest = parse(&msg)?;
        let deadline = connect::timeout_ms(headers.get("connect-timeout-ms").and_then(|v| v.to_str().ok()))?;
        if req.process.cmd.is_empty() {
            return Err(RpcError::new(Code::InvalidArgument, "process.cmd is empty"));
        }
        let mut argv = vec![req.process.cmd];
        argv.extend(req.process.args);
        let pty = req.pty.map(|p| PtyRequest { cols: p.size.cols, rows: p.size.rows });
        let spawn = ProcessRequest {
            argv: Some(argv),
            env: req.process.envs,
            cwd: req.process.cwd,
            // A terminal's stdin is always open; otherwise as asked.
            stdin: pty.is_some() || req.stdin.unwrap_or(false),
            tag: req.tag,
            pty,
            ..ProcessRequest::default()
        };
        let p = processes(state, found).await?;
        let info = p.start(spawn).await.map_err(rpc_error)?;
        let handle = p.attach(info.pid).await.map_err(rpc_error)?;
        if let Some(ms) = deadline.filter(|ms| *ms > 0) {
            // The command's own deadline, whoever is attached.
            let (p, pid) = (p.clone(), info.pid);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if p.get(pid).await.is_ok_and(|i| i.exit.is_none()) {
                    let _ = p.signal(pid, nix::sys::signal::Signal::SIGKILL as i32).await;
                }
            });
        }
        Ok((info.pid, info.pty.is_some(), handle))
    };
    match started.await {
        Ok((pid, pty, handle)) => follow(pid, pty, handle, keepalive(headers)),
        Err(e) => failed_stream(e),
    }
}

async fn connect_to<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let attached = async {
        let msg = connect::single_message(body)?;
        let req: Selected = parse(&msg)?;
        let p = processes(state, found).await?;
        let pid = pid_of(&p, &req.process).await?;
        let info = p.get(pid).await.map_err(|e| match e.kind {
            Kind::NotFound => RpcError::new(Code::NotFound, format!("process with pid {pid} not found")),
            _ => rpc_error(e),
        })?;
        let handle = p.attach(pid).await.map_err(rpc_error)?;
        Ok((pid, info.pty.is_some(), handle))
    };
    match attached.await {
        Ok((pid, pty, handle)) => follow(pid, pty, handle, keepalive(headers)),
        Err(e) => failed_stream(e),
    }
}

/// The start event, the process's output as data events (keepalives in
/// the silences), its end, then the end of the stream. A client that goes
/// away detaches; the process goes on.
fn follow(pid: u32, pty: bool, mut handle: ember_channel::ExecHandle, every: Duration) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let send = |m: serde_json::Value| {
            let tx = tx.clone();
            async move { tx.send(connect::envelope(&m)).await.is_ok() }
        };
        if !send(serde_json::json!({"event": {"start": {"pid": pid}}})).await {
            return;
        }
        loop {
            let next = tokio::select! {
                e = handle.next() => e,
                () = tokio::time::sleep(every) => {
                    if !send(serde_json::json!({"event": {"keepalive": {}}})).await {
                        return;
                    }
                    continue;
                }
                () = tx.closed() => return,
            };
            match next {
                Ok(ExecEvent::Output { stream, data }) => {
                    let kind = match (pty, stream) {
                        (true, _) => "pty",
                        (false, ember_wire::Stream::Stdout) => "stdout",
                        (false, ember_wire::Stream::Stderr) => "stderr",
                    };
                    if !send(serde_json::json!({"event": {"data": {kind: B64.encode(&data)}}})).await {
                        return;
                    }
                }
                Ok(ExecEvent::Dropped { .. }) => {}
                Ok(ExecEvent::Exit(status)) => {
                    let _ = send(serde_json::json!({"event": {"end": end_event(&status)}})).await;
                    let _ = tx.send(connect::end_stream(None)).await;
                    return;
                }
                Err(e) => {
                    let error = RpcError::new(Code::Unavailable, format!("the process's output: {e}"));
                    let _ = tx.send(connect::end_stream(Some(&error))).await;
                    return;
                }
            }
        }
    });
    stream(rx)
}

/// envd's end event: `exitCode` -1 for a signal (Go's `ExitCode()`),
/// `status` as Go's `ProcessState.String()` writes it.
pub fn end_event(status: &ember_wire::ExitStatus) -> serde_json::Value {
    match (status.code, status.signal) {
        (Some(code), _) => {
            let mut end = serde_json::json!({"exitCode": code, "exited": true, "status": format!("exit status {code}")});
            if code != 0 {
                end["error"] = serde_json::json!(format!("exit status {code}"));
            }
            end
        }
        (None, sig) => {
            let name =
                sig.and_then(|s| nix::sys::signal::Signal::try_from(s).ok()).map_or("killed", signal_word);
            serde_json::json!({"exitCode": -1, "exited": false, "status": format!("signal: {name}")})
        }
    }
}

fn signal_word(s: nix::sys::signal::Signal) -> &'static str {
    use nix::sys::signal::Signal::*;
    match s {
        SIGKILL => "killed",
        SIGTERM => "terminated",
        SIGINT => "interrupt",
        SIGHUP => "hangup",
        SIGPIPE => "broken pipe",
        SIGSEGV => "segmentation fault",
        SIGABRT => "aborted",
        _ => s.as_str(),
    }
}

/// `StreamInput` (client stream): a `start` naming the process, then
/// `data` envelopes written to its stdin as they arrive (not when the
/// request ends), keepalives skipped; answered with one empty message and
/// the end of the stream. Its body is read as it comes, each envelope
/// bounded like any other.
pub async fn stream_input<B: Backend>(state: &AppState<B>, found: &Found, body: Body) -> Response {
    let fed = async {
        let p = processes(state, found).await?;
        let mut decoder = connect::Decoder::default();
        let mut pid = None;
        let mut frames = body.into_data_stream();
        use futures_util::StreamExt as _;
        while let Some(chunk) = frames.next().await {
            let chunk =
                chunk.map_err(|e| RpcError::new(Code::InvalidArgument, format!("request body: {e}")))?;
            decoder.push(&chunk);
            while let Some(env) = decoder.next_envelope()? {
                let connect::Envelope::Message(m) = env else { return Ok(()) };
                let v: serde_json::Value = serde_json::from_slice(&m)
                    .map_err(|e| RpcError::new(Code::InvalidArgument, format!("message: {e}")))?;
                if let Some(start) = v.get("start") {
                    let sel: Selector = serde_json::from_value(start["process"].clone()).unwrap_or_default();
                    pid = Some(pid_of(&p, &sel).await?);
                } else if let Some(data) = v.get("data") {
                    let pid = pid.ok_or_else(|| RpcError::new(Code::InvalidArgument, "data before start"))?;
                    let input: Input = serde_json::from_value(data["input"].clone()).unwrap_or_default();
                    let bytes = match (&input.stdin, &input.pty) {
                        (Some(s), _) => decode("input.stdin", s)?,
                        (None, Some(t)) => decode("input.pty", t)?,
                        (None, None) => continue,
                    };
                    p.stdin(pid, bytes, false).await.map_err(rpc_error)?;
                }
            }
        }
        Ok(())
    };
    let result: Result<(), RpcError> = fed.await;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    match result {
        Ok(()) => {
            let _ = tx.try_send(connect::envelope(&serde_json::json!({})));
            let _ = tx.try_send(connect::end_stream(None));
        }
        Err(e) => {
            let _ = tx.try_send(connect::end_stream(Some(&e)));
        }
    }
    stream(rx)
}

async fn list<B: Backend>(state: &AppState<B>, found: &Found) -> Result<serde_json::Value, RpcError> {
    let p = processes(state, found).await?;
    let all = p.list().await.map_err(rpc_error)?;
    let running: Vec<serde_json::Value> = all
        .iter()
        .filter(|i| i.exit.is_none())
        .map(|i| {
            let (cmd, args) = match &i.command {
                ember_wire::Command::Argv(a) => {
                    (a.first().cloned().unwrap_or_default(), a[1.min(a.len())..].to_vec())
                }
                ember_wire::Command::Shell(c) => ("/bin/sh".to_string(), vec!["-c".to_string(), c.clone()]),
                ember_wire::Command::Python(py) => ("python3".to_string(), vec![py.path.clone()]),
            };
            let mut v = serde_json::json!({"config": {"cmd": cmd, "args": args, "envs": {}}, "pid": i.pid});
            if let Some(t) = &i.tag {
                v["tag"] = serde_json::json!(t);
            }
            v
        })
        .collect();
    Ok(serde_json::json!({ "processes": running }))
}

fn decode(field: &str, b64: &str) -> Result<Vec<u8>, RpcError> {
    B64.decode(b64).map_err(|e| RpcError::new(Code::InvalidArgument, format!("{field}: {e}")))
}

async fn send_input<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: SendInput = parse(body)?;
    let data = match (&req.input.stdin, &req.input.pty) {
        (Some(s), _) => decode("input.stdin", s)?,
        (None, Some(p)) => decode("input.pty", p)?,
        (None, None) => Vec::new(),
    };
    let p = processes(state, found).await?;
    let pid = pid_of(&p, &req.process).await?;
    p.stdin(pid, data, false).await.map_err(rpc_error)?;
    Ok(serde_json::json!({}))
}

async fn close_stdin<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: Selected = parse(body)?;
    let p = processes(state, found).await?;
    let pid = pid_of(&p, &req.process).await?;
    p.stdin(pid, Vec::new(), true).await.map_err(rpc_error)?;
    Ok(serde_json::json!({}))
}

async fn send_signal<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: SendSignal = parse(body)?;
    let sig = match req.signal.as_str() {
        "SIGNAL_SIGKILL" => nix::sys::signal::Signal::SIGKILL,
        "SIGNAL_SIGTERM" => nix::sys::signal::Signal::SIGTERM,
        other => return Err(RpcError::new(Code::InvalidArgument, format!("signal {other:?}"))),
    };
    let p = processes(state, found).await?;
    let pid = pid_of(&p, &req.process).await?;
    // An exited process is not found, as envd says of it.
    match p.get(pid).await {
        Ok(i) if i.exit.is_none() => {}
        _ => return Err(RpcError::new(Code::NotFound, format!("process with pid {pid} not found"))),
    }
    p.signal(pid, sig as i32).await.map_err(rpc_error)?;
    Ok(serde_json::json!({}))
}

async fn update<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: Update = parse(body)?;
    let p = processes(state, found).await?;
    let pid = pid_of(&p, &req.process).await?;
    if let Some(pty) = req.pty {
        let size = PtyRequest { cols: pty.size.cols, rows: pty.size.rows }.check().map_err(rpc_error)?;
        p.resize(pid, size).await.map_err(rpc_error)?;
    }
    Ok(serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_as_envd_writes_them() {
        let exit = |code, signal| ember_wire::ExitStatus { code, signal, ..Default::default() };
        assert_eq!(
            end_event(&exit(Some(0), None)),
            serde_json::json!({"exitCode": 0, "exited": true, "status": "exit status 0"})
        );
        let e = end_event(&exit(Some(3), None));
        assert_eq!(
            (e["exitCode"].clone(), e["error"].clone()),
            (serde_json::json!(3), serde_json::json!("exit status 3"))
        );
        let k = end_event(&exit(None, Some(9)));
        assert_eq!(k, serde_json::json!({"exitCode": -1, "exited": false, "status": "signal: killed"}));
        assert_eq!(end_event(&exit(None, Some(15)))["status"], "signal: terminated");
    }

    #[test]
    fn ember_errors_become_connect_codes() {
        let e = |kind, code| rpc_error(ember_service::Error::new(kind, code, "m")).code;
        assert_eq!(e(Kind::NotFound, "not_found"), Code::NotFound);
        assert_eq!(e(Kind::Conflict, "file_exists"), Code::AlreadyExists);
        assert_eq!(e(Kind::Conflict, "process_state"), Code::FailedPrecondition);
        assert_eq!(e(Kind::Busy, "quota_calls"), Code::ResourceExhausted);
        assert_eq!(e(Kind::VmFailed, "vm_failed"), Code::Unavailable);
    }
}
