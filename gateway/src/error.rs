//! The one place errors become HTTP answers: a status and a JSON body
//! `{"error": {"code", "message"}}`, so every route fails the same way.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_pool::pool::PoolError;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, machine-readable: `bad_request`, `pool_exhausted`, ...
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn busy(code: &'static str, message: impl Into<String>, retry_after: u32) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message) }
    }

    pub fn draining() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "the server is shutting down")
        }
    }

    pub fn vm_failed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "vm_failed", message)
    }

    /// The JSON body alone (NDJSON streams end with it after a 200).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: Inner { code: self.code, message: &self.message } };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = (self.status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        let msg = e.to_string();
        match e {
            PoolError::Exhausted { retry_after, .. } => {
                // Whole seconds, rounded up, at least one.
                let secs = u32::try_from(retry_after.as_millis().div_ceil(1000)).unwrap_or(u32::MAX).max(1);
                Self::busy("pool_exhausted", msg, secs)
            }
            PoolError::SessionLimit { .. } => Self::busy("session_limit", msg, 5),
            PoolError::Draining => Self::draining(),
            PoolError::SessionLost { .. } => Self::new(StatusCode::GONE, "session_lost", msg),
            PoolError::Create(_) | PoolError::Reset { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "vm_unavailable", msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pool_errors_map_to_their_statuses() {
        let cases = [
            (
                PoolError::Exhausted {
                    in_use: 1,
                    booting: 0,
                    limit: 1,
                    waited: Duration::ZERO,
                    retry_after: Duration::from_millis(2100),
                },
                429,
                Some(3),
            ),
            (PoolError::SessionLimit { limit: 2 }, 429, Some(5)),
            (PoolError::Draining, 503, Some(5)),
            (PoolError::SessionLost { key: "k".into(), reason: "r".into() }, 410, None),
            (PoolError::Create("x".into()), 503, None),
        ];
        for (e, status, retry) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.retry_after), (status, retry), "{a}");
        }
    }
}
