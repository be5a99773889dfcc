//! A session's background processes: start, list, show, follow the output
//! (NDJSON, replayed from the process's buffer, any number of readers at
//! once), stdin, EOF and signals. They use the session's agent connection
//! without holding its VM, so a call running in the session does not block
//! them, nor they it; each use counts as activity of the session.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use ember_pool::pool::Backend;
use serde_json::json;

use super::run::{line, EventLines};
use crate::api::{ProcessRequest, PtyRequest, SignalRequest, StreamEvent};
use crate::error::ApiError;
use crate::state::AppState;

fn parse_pid(raw: &str) -> Result<u32, ApiError> {
    raw.parse().map_err(|_| ApiError::invalid(format!("pid {raw:?} is not a process id")))
}

type Answer<T> = Result<T, ApiError>;

pub async fn start<B: Backend>(
    State(state): State<AppState<B>>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<(StatusCode, Json<serde_json::Value>)> {
    let req: ProcessRequest = super::parse_json(&body)?;
    let info = state.processes(&key).await?.start(req).await?;
    Ok((StatusCode::CREATED, Json(shown(&info))))
}

pub async fn list<B: Backend>(
    State(state): State<AppState<B>>,
    Path(key): Path<String>,
) -> Answer<Json<serde_json::Value>> {
    let all = state.processes(&key).await?.list().await?;
    Ok(Json(json!({ "processes": all.iter().map(shown).collect::<Vec<_>>() })))
}

pub async fn show<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<Json<serde_json::Value>> {
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&key).await?;
    Ok(Json(shown(&processes.get(pid).await?)))
}

/// A process as the API shows it.
fn shown(p: &ember_wire::ProcessInfo) -> serde_json::Value {
    let (cmd, argv) = match &p.command {
        ember_wire::Command::Shell(c) => (Some(c.clone()), None),
        ember_wire::Command::Argv(a) => (None, Some(a.clone())),
        ember_wire::Command::Python(py) => (None, Some(vec!["python3".to_string(), py.path.clone()])),
    };
    let started = std::time::UNIX_EPOCH + std::time::Duration::from_millis(p.started_unix_ms);
    json!({
        "pid": p.pid,
        "tag": p.tag,
        "cmd": cmd,
        "argv": argv,
        "started": humantime::format_rfc3339_millis(started).to_string(),
        "state": if p.exit.is_some() { "exited" } else { "running" },
        "exit_code": p.exit.as_ref().and_then(|e| e.code),
        "signal": p.exit.as_ref().and_then(|e| e.signal),
        "output_bytes": p.output_bytes,
        "stdin_open": p.stdin_open,
        "pty": p.pty.map(|t| json!({ "cols": t.cols, "rows": t.rows })),
    })
}

/// NDJSON: a `dropped` line if older output was lost, the buffered output,
/// live output, then the `exit` line. A client that goes away detaches;
/// the process goes on.
pub async fn output<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<Response> {
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&key).await?;
    let mut handle = processes.attach(pid).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut lines = EventLines::default();
        let mut pending = Vec::new();
        let mut next = tokio::select! {
            ev = handle.next() => ev,
            _ = tx.closed() => return,
        };
        loop {
            let ended = match next {
                Ok(ev) => lines.push(ev, &mut pending),
                Err(e) => {
                    pending.push(StreamEvent::Error { error: processes.failed(e).body() });
                    true
                }
            };
            for ev in pending.drain(..) {
                if tx.send(line(&ev)).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            next = tokio::select! {
                ev = handle.next() => ev,
                _ = tx.closed() => return,
            };
        }
    });
    Ok(super::ndjson(rx))
}

/// The body's bytes go to the process's stdin as they are.
pub async fn stdin<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    control(state, key, pid, Ok(Control::Stdin(body.to_vec(), false))).await
}

/// Close the process's stdin (EOF).
pub async fn close_stdin<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<StatusCode> {
    control(state, key, pid, Ok(Control::Stdin(Vec::new(), true))).await
}

/// `{"signal": "TERM"}` (a name or a number) to the process's group.
pub async fn signal<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    let what = super::parse_json::<SignalRequest>(&body).and_then(|r| Ok(r.check()?)).map(Control::Signal);
    control(state, key, pid, what).await
}

/// `{"cols": C, "rows": R}`: the process's terminal's new size (409 if it
/// has none).
pub async fn resize<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    let what = super::parse_json::<PtyRequest>(&body).and_then(|r| Ok(r.check()?)).map(Control::Resize);
    control(state, key, pid, what).await
}

/// What a control route does to a process.
enum Control {
    Stdin(Vec<u8>, bool),
    Signal(i32),
    Resize(ember_wire::PtySize),
}

/// Check the request, then do it to process `pid` of session `key`: 204.
async fn control<B: Backend>(
    state: AppState<B>,
    key: String,
    pid: String,
    what: Result<Control, ApiError>,
) -> Answer<StatusCode> {
    let what = what?;
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&key).await?;
    match what {
        Control::Stdin(data, eof) => processes.stdin(pid, data, eof).await?,
        Control::Signal(sig) => processes.signal(pid, sig).await?,
        Control::Resize(t) => processes.resize(pid, t).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}
