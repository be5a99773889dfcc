//! The session routes: open (`POST /v1/sessions`), list, show, extend
//! (`POST /v1/sessions/{key}/timeout`), end (`DELETE`), change the network
//! (`PUT /v1/sessions/{key}/network`), pause, resume and fork. Each parses
//! its request and calls the service's session operation
//! (`ember_service::sessions`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ember_pool::pool::Backend;
use ember_service::sessions::Session;
use serde_json::json;

use crate::api::{SessionRequest, TimeoutRequest};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Extension;
use ember_service::Caller;

type Answer<T> = Result<T, ApiError>;

/// Every image's sessions, each with its image.
pub async fn list<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
) -> Json<serde_json::Value> {
    Json(json!({"sessions": state.sessions(&caller)}))
}

/// Open a session now: its VM is claimed (and given its network) before
/// the answer, so the first call finds it running.
pub async fn open<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<(StatusCode, Json<Session>)> {
    let req: SessionRequest =
        if body.is_empty() { SessionRequest::default() } else { super::parse_json(&body)? };
    Ok((StatusCode::CREATED, Json(state.open_session(&caller, req).await?)))
}

/// One session as it is now, with its live figures.
pub async fn show<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Answer<Json<Session>> {
    Ok(Json(state.session(&caller, &key)?))
}

/// Set when the session ends: `timeout` from now.
pub async fn timeout<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<Json<Session>> {
    caller.session_key(&key)?;
    let req: TimeoutRequest = super::parse_json(&body)?;
    Ok(Json(state.extend_session(&caller, &key, req)?))
}

/// End a session and destroy its VM (after a call in progress finishes).
pub async fn end<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Answer<StatusCode> {
    state.end_session(&caller, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Change a live session's network: the new rules hold from the next packet
/// of every connection, open ones included (waits for a call in progress).
pub async fn network<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<Json<serde_json::Value>> {
    caller.session_key(&key)?;
    let raw: ember_net::RawPolicy = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body: {e}: send \"none\", \"open\" or {{\"egress\": {{\"allow\": [...], \"deny\": [...]}}}}"
        ))
    })?;
    state.set_session_network(&caller, &key, &raw).await?;
    Ok(Json(json!({"session": key, "network": raw})))
}

/// Pause a session: its VM is saved to disk and ended (after a call in
/// progress finishes); the next use resumes it.
pub async fn pause<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Answer<Json<Session>> {
    Ok(Json(state.pause_session(&caller, &key).await?))
}

/// Resume a paused session now (any call to it does too).
pub async fn resume<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Answer<Json<Session>> {
    Ok(Json(state.resume_session(&caller, &key).await?))
}

/// Fork a session: a new one (`{"key": ...}`, a UUID if absent) with the
/// same memory, processes, files and settings, running when there is room.
pub async fn fork<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Answer<(StatusCode, Json<Session>)> {
    caller.session_key(&key)?;
    let req: crate::api::ForkRequest =
        if body.is_empty() { Default::default() } else { super::parse_json(&body)? };
    Ok((StatusCode::CREATED, Json(state.fork_session(&caller, &key, req.key).await?)))
}
