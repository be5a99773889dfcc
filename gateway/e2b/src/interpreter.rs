//! The code interpreter (port 49999: `e2b-code-interpreter`'s `run_code`
//! and contexts), served by Ember itself rather than by a Jupyter server in
//! the image: a context is a background process of the session, a
//! persistent Python (`interpreter.py`) that runs cells in one namespace,
//! with the last expression's value as the main result, matplotlib figures
//! as PNG results, errors with name, value and traceback, and a count of
//! executions. Its process carries the tag `e2b-ctx-<id>`, which is the
//! only registry: a paused and resumed sandbox, or a restarted server, finds
//! its contexts again by listing processes. `POST /execute` answers NDJSON
//! as E2B's server does; cells of one context run one at a time.

use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use ember_channel::ExecEvent;
use ember_pool::pool::Backend;
use ember_service::api::ProcessRequest;
use ember_service::processes::Processes;
use ember_service::AppState;
use serde::Deserialize;

use crate::sandbox::Found;

/// The driver each context runs.
const DRIVER: &str = include_str!("interpreter.py");
/// What marks the driver's own lines (anything else on its stdout is a
/// child process's output).
const MARK: &str = "\u{1e}EMBER ";
const TAG_PREFIX: &str = "e2b-ctx-";
/// A context's id: what `run_code` gets when it names none.
const DEFAULT_CONTEXT: &str = "default";
/// The most bytes of a request body (a cell of code).
pub const MAX_BODY: usize = 4 << 20;

/// A refusal: its status and words (E2B's server answers plain text).
type Fail = (StatusCode, String);

fn error(status: StatusCode, message: impl Into<String>) -> Fail {
    (status, message.into())
}

fn from_service(e: ember_service::Error) -> Fail {
    let status = match e.kind {
        ember_service::Kind::NotFound => StatusCode::NOT_FOUND,
        ember_service::Kind::Busy => StatusCode::TOO_MANY_REQUESTS,
        ember_service::Kind::Invalid => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(status, e.message)
}

/// One context's turn: cells of a context run one at a time.
fn turn(sandbox: &str, context: &str) -> Arc<tokio::sync::Mutex<()>> {
    static TURNS: OnceLock<DashMap<String, Arc<tokio::sync::Mutex<()>>>> = OnceLock::new();
    let all = TURNS.get_or_init(DashMap::new);
    Arc::clone(&all.entry(format!("{sandbox}/{context}")).or_default())
}

fn valid_context(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 40
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The running process of context `id`, if any.
async fn pid_of(p: &Processes, id: &str) -> Result<Option<u32>, Fail> {
    let tag = format!("{TAG_PREFIX}{id}");
    let all = p.list().await.map_err(from_service)?;
    Ok(all.iter().find(|i| i.tag.as_deref() == Some(tag.as_str()) && i.exit.is_none()).map(|i| i.pid))
}

async fn start_context(p: &Processes, id: &str, cwd: Option<String>) -> Result<u32, Fail> {
    let req = ProcessRequest {
        argv: Some(vec!["python3".into(), "-u".into(), "-c".into(), DRIVER.into()]),
        env: [
            ("MPLBACKEND".to_string(), "Agg".to_string()),
            ("PYTHONUNBUFFERED".to_string(), "1".to_string()),
        ]
        .into(),
        cwd,
        stdin: true,
        tag: Some(format!("{TAG_PREFIX}{id}")),
        ..ProcessRequest::default()
    };
    Ok(p.start(req).await.map_err(from_service)?.pid)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NewContext {
    language: Option<String>,
    cwd: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Execute {
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<std::collections::BTreeMap<String, String>>,
}

fn python_only(language: Option<&str>) -> Result<(), Fail> {
    match language {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("language {other:?}: Ember's code interpreter runs Python only"),
        )),
    }
}

fn context_json(id: &str, cwd: &str) -> serde_json::Value {
    serde_json::json!({ "id": id, "language": "python", "cwd": cwd })
}

/// A request to port 49999 of a sandbox.
pub async fn handle<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    method: &Method,
    path: &str,
    body: Bytes,
) -> Response {
    let p = match state.processes(&found.caller, &found.key).await {
        Ok(p) => p,
        Err(e) => return from_service(e).into_response(),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (method.as_str(), segments.as_slice()) {
        ("GET", ["health"]) => Ok(StatusCode::NO_CONTENT.into_response()),
        ("POST", ["execute"]) => execute(&p, &found.key, &body).await,
        ("POST", ["contexts"]) => create(&p, &body).await,
        ("GET", ["contexts"]) => list(&p).await,
        ("DELETE", ["contexts", id]) => remove(&p, id).await,
        ("POST", ["contexts", id, "restart"]) => restart(&p, id).await,
        _ => Err(error(StatusCode::NOT_FOUND, format!("{method} {path}: no such code-interpreter route"))),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn create(p: &Processes, body: &[u8]) -> Result<Response, Fail> {
    let req: NewContext = if body.is_empty() {
        NewContext::default()
    } else {
        serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?
    };
    python_only(req.language.as_deref())?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let cwd = req.cwd.clone().unwrap_or_else(|| "/home/ember".into());
    start_context(p, &id, req.cwd).await?;
    Ok(axum::Json(context_json(&id, &cwd)).into_response())
}

async fn list(p: &Processes) -> Result<Response, Fail> {
    let all = p.list().await.map_err(from_service)?;
    let contexts: Vec<_> = all
        .iter()
        .filter(|i| i.exit.is_none())
        .filter_map(|i| i.tag.as_deref()?.strip_prefix(TAG_PREFIX))
        .map(|id| context_json(id, "/home/ember"))
        .collect();
    Ok(axum::Json(contexts).into_response())
}

async fn remove(p: &Processes, id: &str) -> Result<Response, Fail> {
    let Some(pid) = pid_of(p, id).await? else {
        return Err(error(StatusCode::NOT_FOUND, format!("context {id} not found")));
    };
    p.signal(pid, nix::sys::signal::Signal::SIGKILL as i32).await.map_err(from_service)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restart(p: &Processes, id: &str) -> Result<Response, Fail> {
    remove(p, id).await?;
    for _ in 0..50 {
        if pid_of(p, id).await?.is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    start_context(p, id, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn execute(p: &Processes, sandbox: &str, body: &[u8]) -> Result<Response, Fail> {
    let req: Execute =
        serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, format!("body: {e}")))?;
    python_only(req.language.as_deref())?;
    let context = req.context_id.clone().unwrap_or_else(|| DEFAULT_CONTEXT.to_string());
    if !valid_context(&context) {
        return Err(error(StatusCode::NOT_FOUND, format!("context {context:?} not found")));
    }
    let my_turn = turn(sandbox, &context).lock_owned().await;
    let pid = match pid_of(p, &context).await? {
        Some(pid) => pid,
        None if context == DEFAULT_CONTEXT => start_context(p, &context, None).await?,
        None => return Err(error(StatusCode::NOT_FOUND, format!("context {context} not found"))),
    };
    // Attach first (the output replays from the buffer's start), then send
    // the cell; its events follow its `begin`.
    let mut handle = p.attach(pid).await.map_err(from_service)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let line = serde_json::json!({"id": id, "code": req.code, "env": req.env_vars.unwrap_or_default()});
    p.stdin(pid, format!("{line}\n").into_bytes(), false).await.map_err(from_service)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _turn = my_turn;
        let mut buf = Vec::<u8>::new();
        let mut started = false;
        let send = |v: serde_json::Value| {
            let tx = tx.clone();
            async move { tx.send(Bytes::from(format!("{v}\n"))).await.is_ok() }
        };
        loop {
            let data = match handle.next().await {
                Ok(ExecEvent::Output { data, .. }) => data,
                Ok(ExecEvent::Dropped { .. }) => continue,
                Ok(ExecEvent::Exit(_)) | Err(_) => {
                    let _ = send(serde_json::json!({"type": "error", "name": "ContextDied",
                        "value": "the interpreter ended", "traceback": ""}))
                    .await;
                    return;
                }
            };
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&raw);
                let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
                let Some(json) = text.strip_prefix(MARK) else {
                    if started
                        && !send(serde_json::json!({"type": "stdout", "text": text, "timestamp": now})).await
                    {
                        return;
                    }
                    continue;
                };
                let Ok(mut ev) = serde_json::from_str::<serde_json::Value>(json.trim_end()) else { continue };
                let kind = ev["type"].as_str().map(str::to_string);
                match kind.as_deref() {
                    Some("begin") => started = ev["id"] == id.as_str(),
                    Some("end") if started => {
                        let _ = send(serde_json::json!({"type": "end_of_execution"})).await;
                        return;
                    }
                    Some("stdout" | "stderr") if started => {
                        ev["timestamp"] = serde_json::json!(now);
                        if !send(ev).await {
                            return;
                        }
                    }
                    Some(_) if started && !send(ev).await => return,
                    _ => {}
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(resp)
}
