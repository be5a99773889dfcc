//! The session routes: open (`POST /v1/sessions`), list, show, extend
//! (`POST /v1/sessions/{key}/timeout`), end (`DELETE`) and change the
//! network (`PUT /v1/sessions/{key}/network`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::{Backend, SessionInfo};
use serde_json::json;

use crate::api::{SessionRequest, TimeoutRequest};
use crate::error::ApiError;
use crate::state::AppState;

/// A session as the API shows it: its pool's view, its image and state.
fn shown(info: SessionInfo, image: &str) -> serde_json::Value {
    let mut v = json!(info);
    if let Some(o) = v.as_object_mut() {
        o.insert("image".into(), json!(image));
    }
    v
}

/// Every image's sessions, each with its image.
pub async fn list<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let mut all = Vec::new();
    for (image, pool) in state.pools.iter() {
        all.extend(pool.sessions().into_iter().map(|s| shown(s, image)));
    }
    Json(json!({"sessions": all})).into_response()
}

/// Open a session now: its VM is claimed (and given its network) before
/// the answer, so the first call finds it running.
pub async fn open<B: Backend>(
    State(state): State<AppState<B>>,
    super::LimitedBody(body): super::LimitedBody,
) -> Response {
    let opened = async {
        if state.is_draining() {
            return Err(ApiError::draining());
        }
        let req: SessionRequest =
            if body.is_empty() { SessionRequest::default() } else { super::parse_json(&body)? };
        let (_, default) = state.pools.get(None)?;
        let s = req.check(&state.limits, default.config().session_max_lifetime)?;
        let (image, pool) = state.pools.get(s.image.as_deref())?;
        if let Some(want) = s.memory_mb.filter(|m| *m > pool.vm_memory_mb()) {
            return Err(crate::error::ApiError::invalid(format!(
                "memory_mb {want} exceeds the {} MiB of image {image:?}'s VMs (set [pool.images.{image}] memory_mb)",
                pool.vm_memory_mb()
            )));
        }
        if let Some((_, policy)) = &s.network {
            crate::invocation::check_network_enabled(&state, policy)?;
        }
        if let Some((other, _)) = state.pools.with_session(&s.key) {
            return Err(ApiError::conflict(
                "session_exists",
                format!("session {:?} already exists (image {other:?})", s.key),
            ));
        }
        let mut info = pool.open(&s.key, s.spec).await?;
        if let Some((raw, policy)) = &s.network {
            let connected = async {
                let lease = pool.session(&s.key).await?;
                lease.connect(policy).await?;
                Ok::<_, ApiError>(())
            };
            if let Err(e) = connected.await {
                pool.end_session(&s.key).await;
                return Err(e);
            }
            info = pool.session_info(&s.key).unwrap_or(info);
            tracing::info!(session = %s.key, network = ?raw, "session connected");
        }
        let mut v = shown(info, image);
        if let (Some(o), Some((raw, _))) = (v.as_object_mut(), &s.network) {
            o.insert("network".into(), json!(raw));
        }
        Ok::<_, ApiError>(v)
    };
    match opened.await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// One session as it is now, with its live figures.
pub async fn show<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    if let Err(e) = crate::api::check_session_key(&key) {
        return ApiError::from(e).into_response();
    }
    match state.pools.with_session(&key).and_then(|(image, pool)| Some((image, pool.session_info(&key)?))) {
        Some((image, info)) => Json(shown(info, image)).into_response(),
        None => ApiError::not_found(format!("no session {key:?}")).into_response(),
    }
}

/// Set when the session ends: `timeout` from now.
pub async fn timeout<B: Backend>(
    State(state): State<AppState<B>>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Response {
    let extended = async {
        crate::api::check_session_key(&key)?;
        let req: TimeoutRequest = super::parse_json(&body)?;
        let Some((image, pool)) = state.pools.with_session(&key) else {
            return Err(ApiError::not_found(format!("no session {key:?}")));
        };
        let lifetime = req.check(pool.config().session_max_lifetime)?;
        let info = pool
            .set_session_lifetime(&key, lifetime)
            .ok_or_else(|| ApiError::not_found(format!("no session {key:?}")))?;
        Ok(shown(info, image))
    };
    match extended.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// End a session and destroy its VM (after a call in progress finishes).
pub async fn end<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    if let Err(e) = crate::api::check_session_key(&key) {
        return ApiError::from(e).into_response();
    }
    let Some((_, pool)) = state.pools.with_session(&key) else {
        return ApiError::not_found(format!("no session {key:?}")).into_response();
    };
    if pool.end_session(&key).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError::not_found(format!("no session {key:?}")).into_response()
    }
}

/// Change a live session's network: the new rules hold from the next packet
/// of every connection, open ones included (waits for a call in progress).
pub async fn network<B: Backend>(
    State(state): State<AppState<B>>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Response {
    let changed = async {
        crate::api::check_session_key(&key)?;
        let raw: ember_vm::net::RawPolicy = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "body: {e}: send \"none\", \"open\" or {{\"egress\": {{\"allow\": [...], \"deny\": [...]}}}}"
            ))
        })?;
        let policy = crate::api::check_network(&raw, &state.limits)?;
        crate::invocation::check_network_enabled(&state, &policy)?;
        let Some((_, pool)) = state.pools.with_session(&key) else {
            return Err(ApiError::not_found(format!("no session {key:?}")));
        };
        let lease = pool.session(&key).await?;
        lease.connect(&policy).await?;
        Ok::<_, ApiError>(raw)
    };
    match changed.await {
        Ok(raw) => Json(json!({"session": key, "network": raw})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Pause a session: its VM is saved to disk and ended (after a call in
/// progress finishes); the next use resumes it.
pub async fn pause<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    transition(state, key, true).await
}

/// Resume a paused session now (any call to it does too).
pub async fn resume<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    transition(state, key, false).await
}

async fn transition<B: Backend>(state: AppState<B>, key: String, pause: bool) -> Response {
    let done = async {
        crate::api::check_session_key(&key)?;
        let Some((image, pool)) = state.pools.with_session(&key) else {
            return Err(ApiError::not_found(format!("no session {key:?}")));
        };
        let info = if pause { pool.pause_session(&key).await? } else { pool.resume_session(&key).await? };
        Ok::<_, ApiError>(shown(info, image))
    };
    match done.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Fork a session: a new one (`{"key": ...}`, a UUID if absent) with the
/// same memory, processes, files and settings, running when there is room.
pub async fn fork<B: Backend>(
    State(state): State<AppState<B>>,
    Path(key): Path<String>,
    super::LimitedBody(body): super::LimitedBody,
) -> Response {
    let forked = async {
        crate::api::check_session_key(&key)?;
        let req: crate::api::ForkRequest =
            if body.is_empty() { Default::default() } else { super::parse_json(&body)? };
        let child = match req.key {
            Some(k) => {
                crate::api::check_session_key(&k)?;
                k
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let Some((image, pool)) = state.pools.with_session(&key) else {
            return Err(ApiError::not_found(format!("no session {key:?}")));
        };
        if let Some((other, _)) = state.pools.with_session(&child) {
            return Err(ApiError::conflict(
                "session_exists",
                format!("session {child:?} already exists (image {other:?})"),
            ));
        }
        let info = pool.fork_session(&key, &child).await?;
        Ok::<_, ApiError>(shown(info, image))
    };
    match forked.await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}
