//! `GET /v1/sessions` and `DELETE /v1/sessions/{key}`.

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
