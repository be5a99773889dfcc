//! `GET /v1/sessions`, `DELETE /v1/sessions/{key}` and
//! `PUT /v1/sessions/{key}/network`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Every image's sessions, each with its image.
pub async fn list<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let mut all = Vec::new();
    for (image, pool) in state.pools.iter() {
        for s in pool.sessions() {
            let mut v = json!(s);
            if let Some(o) = v.as_object_mut() {
                o.insert("image".into(), json!(image));
            }
            all.push(v);
        }
    }
    Json(json!({"sessions": all})).into_response()
}

/// End a session and destroy its VM (after a call in progress finishes).
pub async fn end<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    if let Err(e) = crate::api::check_session_key(&key) {
        return e.into_response();
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
    body: axum::body::Bytes,
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
        pool.backend().connect(&lease, &policy).await?;
        Ok::<_, ApiError>(raw)
    };
    match changed.await {
        Ok(raw) => Json(json!({"session": key, "network": raw})).into_response(),
        Err(e) => e.into_response(),
    }
}
