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

use super::run::{line, EventLines};
use crate::api::{ProcessList, ProcessRequest, ProcessView, PtyRequest, SignalRequest, StreamEvent};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Extension;
use ember_service::Caller;

fn parse_pid(raw: &str) -> Result<u32, ApiError> {
    raw.parse().map_err(|_| ApiError::invalid(format!("pid {raw:?} is not a process id")))
}

type Answer<T> = Result<T, ApiError>;

pub async fn start<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<(StatusCode, Json<ProcessView>)> {
    let req: ProcessRequest = super::parse_json(&body)?;
    let info = state.processes(&caller, &key).await?.start(req).await?;
    Ok((StatusCode::CREATED, Json(ProcessView::from(&info))))
}

pub async fn list<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Answer<Json<ProcessList>> {
    let all = state.processes(&caller, &key).await?.list().await?;
    Ok(Json(ProcessList { processes: all.iter().map(ProcessView::from).collect() }))
}

pub async fn show<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<Json<ProcessView>> {
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&caller, &key).await?;
    Ok(Json(ProcessView::from(&processes.get(pid).await?)))
}

/// NDJSON: a `dropped` line if older output was lost, the buffered output,
/// live output, then the `exit` line. A client that goes away detaches;
/// the process goes on.
pub async fn output<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<Response> {
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&caller, &key).await?;
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
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    control(state, caller, key, pid, Ok(Control::Stdin(body.to_vec(), false))).await
}

/// Close the process's stdin (EOF).
pub async fn close_stdin<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
) -> Answer<StatusCode> {
    control(state, caller, key, pid, Ok(Control::Stdin(Vec::new(), true))).await
}

/// `{"signal": "TERM"}` (a name or a number) to the process's group.
pub async fn signal<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    let what = super::parse_json::<SignalRequest>(&body).and_then(|r| Ok(r.check()?)).map(Control::Signal);
    control(state, caller, key, pid, what).await
}

/// `{"cols": C, "rows": R}`: the process's terminal's new size (409 if it
/// has none).
pub async fn resize<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, pid)): Path<(String, String)>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<StatusCode> {
    let what = super::parse_json::<PtyRequest>(&body).and_then(|r| Ok(r.check()?)).map(Control::Resize);
    control(state, caller, key, pid, what).await
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
    caller: Caller,
    key: String,
    pid: String,
    what: Result<Control, ApiError>,
) -> Answer<StatusCode> {
    let what = what?;
    let pid = parse_pid(&pid)?;
    let processes = state.processes(&caller, &key).await?;
    match what {
        Control::Stdin(data, eof) => processes.stdin(pid, data, eof).await?,
        Control::Signal(sig) => processes.signal(pid, sig).await?,
        Control::Resize(t) => processes.resize(pid, t).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}
