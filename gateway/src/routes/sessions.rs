//! `GET /v1/sessions` and `DELETE /v1/sessions/{key}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

pub async fn list<B: Backend>(State(state): State<AppState<B>>) -> Response {
    Json(json!({"sessions": state.pool.sessions()})).into_response()
}

/// End a session and destroy its VM (after a call in progress finishes).
pub async fn end<B: Backend>(State(state): State<AppState<B>>, Path(key): Path<String>) -> Response {
    if let Err(e) = crate::api::check_session_key(&key) {
        return e.into_response();
    }
    if state.pool.end_session(&key).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError::not_found(format!("no session {key:?}")).into_response()
    }
}
