//! `POST /v1/run` and `POST /v1/functions/{name}`: read and check the
//! request, run it, answer with one JSON result or an NDJSON stream.

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_channel::ExecEvent;
use ember_pool::pool::Backend;
use ember_wire::Stream;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use tracing::Instrument as _;

use super::{session_key, wants_stream, INVOCATION_HEADER};
use crate::api::{
    check_image, parse_timeout, Invocation, Lang, Program, RunRequest, StreamEvent, Utf8Chunker,
};
use crate::error::ApiError;
use crate::invocation::{self, AgentVm, Running};
use crate::state::AppState;
use axum::Extension;
use ember_service::Caller;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunQuery {
    /// The body is code in this language (instead of a JSON request).
    lang: Option<String>,
    timeout: Option<String>,
    image: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionQuery {
    timeout: Option<String>,
}

fn query<T: serde::de::DeserializeOwned + Default>(req: &Request) -> Result<T, ApiError> {
    if req.uri().query().is_none_or(str::is_empty) {
        return Ok(T::default());
    }
    Query::<T>::try_from_uri(req.uri())
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("query string: {}", e.body_text())))
}

/// The whole body, refused with 413 past `limit` bytes.
pub(super) async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

fn is_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let ct = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if ct == "application/json" || (ct.starts_with("application/") && ct.ends_with("+json")) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "content-type {ct:?}: send JSON (application/json), or the code itself with ?lang=python|sh|bash"
        ),
    ))
}

fn parse_run_request(body: &[u8]) -> Result<RunRequest, ApiError> {
    super::parse_json(body)
}

/// `POST /v1/run`.
pub async fn run<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Response
where
    B::Vm: AgentVm,
{
    let id = uuid::Uuid::new_v4().to_string();
    let prepared = async {
        let q: RunQuery = query(&req)?;
        let headers = req.headers().clone();
        let session = session_key(&headers)?;
        let inv = match q.lang {
            Some(lang) => {
                let lang: Lang = lang.parse().map_err(ApiError::bad_request)?;
                let timeout = parse_timeout(q.timeout.as_deref(), &state.limits)?;
                let body = read_body(req, state.limits.max_body_bytes).await?;
                let code = String::from_utf8(body.to_vec())
                    .map_err(|_| ApiError::bad_request("the code in the body is not UTF-8"))?;
                let mut inv = Invocation::new(Program::Code { lang, code }, timeout);
                inv.image = check_image(q.image)?;
                inv
            }
            None => {
                if q.timeout.is_some() || q.image.is_some() {
                    return Err(ApiError::bad_request(
                        "?timeout and ?image go with ?lang; put them in the JSON body",
                    ));
                }
                is_json(&headers)?;
                let body = read_body(req, state.limits.max_body_bytes).await?;
                parse_run_request(&body)?.validate(&state.limits)?
            }
        };
        Ok::<_, ApiError>((headers, session, inv))
    };
    match prepared.await {
        Ok((headers, session, inv)) => invoke(state, caller, id, &headers, session, inv).await,
        Err(e) => with_id(e.into_response(), &id),
    }
}

/// `POST /v1/functions/{name}`: the body is the function's input.
pub async fn function<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: Request,
) -> Response
where
    B::Vm: AgentVm,
{
    let id = uuid::Uuid::new_v4().to_string();
    let prepared = async {
        let f = state.functions.get(&name).ok_or_else(|| {
            ApiError::not_found(format!("no function named {name:?} (see GET /v1/functions)"))
        })?;
        let q: FunctionQuery = query(&req)?;
        let headers = req.headers().clone();
        let session = session_key(&headers)?;
        let timeout = match (q.timeout.as_deref(), f.timeout()) {
            (None, Some(t)) => t,
            (raw, _) => parse_timeout(raw, &state.limits)?,
        };
        let body = read_body(req, state.limits.max_body_bytes).await?;
        Ok::<_, ApiError>((headers, session, f.invocation(body.to_vec(), timeout)))
    };
    match prepared.await {
        Ok((headers, session, inv)) => invoke(state, caller, id, &headers, session, inv).await,
        Err(e) => with_id(e.into_response(), &id),
    }
}

/// `X-Ember-Session-Create: false`: a call for a session that does not
/// exist is a 404 instead of opening it (for a client that must know when
/// its session ended). `true` or no header: the first call opens it.
fn opens_session(headers: &HeaderMap) -> Result<bool, ApiError> {
    match headers.get("x-ember-session-create").map(|v| v.to_str().map(str::trim)) {
        None => Ok(true),
        Some(Ok(v)) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(Ok(v)) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(ApiError::invalid("X-Ember-Session-Create must be true or false")),
    }
}

const SERVER_TIMING: header::HeaderName = header::HeaderName::from_static("server-timing");

fn with_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(INVOCATION_HEADER, v);
    }
    resp
}

async fn invoke<B: Backend>(
    state: AppState<B>,
    caller: Caller,
    id: String,
    headers: &HeaderMap,
    session: Option<String>,
    mut inv: Invocation,
) -> Response
where
    B::Vm: AgentVm,
{
    match opens_session(headers) {
        Ok(open) => inv.open_session = open,
        Err(e) => return with_id(e.into_response(), &id),
    }
    let span = tracing::info_span!(
        "invocation",
        id = %id,
        vm = tracing::field::Empty,
        image = tracing::field::Empty,
        session = session.as_deref(),
        tenant = caller.label()
    );
    let resp = if wants_stream(headers) {
        match invocation::start(&state, &caller, id.clone(), session, inv).instrument(span.clone()).await {
            Ok(running) => stream(running, span),
            Err(e) => ApiError::from(e).into_response(),
        }
    } else {
        match invocation::run(&state, &caller, id.clone(), session, inv).instrument(span).await {
            Ok(result) => {
                let timing = HeaderValue::from_str(&result.timing.header_value());
                let mut resp = axum::Json(result).into_response();
                if let Ok(v) = timing {
                    resp.headers_mut().insert(SERVER_TIMING, v);
                }
                resp
            }
            Err(e) => ApiError::from(e).into_response(),
        }
    };
    with_id(resp, &id)
}

/// Turns agent events into NDJSON events, keeping each stream's UTF-8
/// characters whole across chunks.
#[derive(Default)]
pub(super) struct EventLines {
    out: Utf8Chunker,
    err: Utf8Chunker,
}

impl EventLines {
    /// Add `ev`'s lines to `to`; whether it was the last (the exit).
    pub(super) fn push(&mut self, ev: ExecEvent, to: &mut Vec<StreamEvent>) -> bool {
        match ev {
            ExecEvent::Output { stream: Stream::Stdout, data } => {
                to.extend(self.out.push(data).map(StreamEvent::Stdout))
            }
            ExecEvent::Output { stream: Stream::Stderr, data } => {
                to.extend(self.err.push(data).map(StreamEvent::Stderr))
            }
            ExecEvent::Dropped { bytes } => to.push(StreamEvent::Dropped { bytes }),
            ExecEvent::Exit(st) => {
                to.extend(self.out.finish().map(StreamEvent::Stdout));
                to.extend(self.err.finish().map(StreamEvent::Stderr));
                to.push(StreamEvent::Exit {
                    exit_code: st.code,
                    signal: st.signal,
                    timed_out: st.timed_out,
                    truncated: st.truncated,
                    duration_ms: st.duration_ms,
                    duration_us: st.duration_us,
                });
                return true;
            }
        }
        false
    }
}

pub(super) fn line(ev: &StreamEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// Answer 200 with NDJSON lines as the command produces output. A task
/// drives the command; if the client goes away, the task sees the stream
/// closed and drops the invocation (killing the command, resetting the VM).
fn stream<B: Backend>(mut running: Running<B>, span: tracing::Span) -> Response
where
    B::Vm: AgentVm,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let started = StreamEvent::Started {
        id: running.id.clone(),
        vm_id: running.vm_id.clone(),
        warm: running.warm,
        image: running.image.clone(),
    };
    let task = async move {
        let mut lines = EventLines::default();
        let mut pending = vec![started];
        loop {
            for ev in pending.drain(..) {
                if tx.send(line(&ev)).await.is_err() {
                    tracing::info!("client went away; cancelling the command");
                    return;
                }
            }
            let next = tokio::select! {
                ev = running.next() => ev,
                _ = tx.closed() => {
                    tracing::info!("client went away; cancelling the command");
                    return;
                }
            };
            let ended = match next {
                Ok(ev) => lines.push(ev, &mut pending),
                Err(e) => {
                    pending.push(StreamEvent::Error { error: e.body() });
                    true
                }
            };
            if ended {
                break;
            }
        }
        for ev in pending {
            if tx.send(line(&ev)).await.is_err() {
                break;
            }
        }
    };
    tokio::spawn(task.instrument(span));
    super::ndjson(rx)
}
