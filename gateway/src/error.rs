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

pub use ember_service::ErrorBody;

#[derive(Serialize)]
struct Body {
    error: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    /// A 400 `invalid_request`: a value the request got wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// What goes under `"error"`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code.into(), message: self.message.clone() }
    }

    /// The whole JSON body, `{"error": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(Body { error: self.body() }).unwrap_or_default()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let bytes = serde_json::to_vec(&Body { error: self.body() }).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = (self.status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ember_service::Error::from(e).into()
    }
}

/// A service error as an HTTP answer: the kind picks the status.
impl From<ember_service::Error> for ApiError {
    fn from(e: ember_service::Error) -> Self {
        let status = StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, code: e.code, message: e.message, retry_after: e.retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_channel::AgentError;
    use ember_wire::ErrorCode;
    use std::time::Duration;

    #[test]
    fn pool_errors_map_to_their_statuses() {
        let cases = [
            (
                PoolError::Exhausted {
                    why: ember_pool::pool::Refusal::WouldWait { max_queue_wait: Duration::from_secs(2) },
                    in_use: 1,
                    booting: 0,
                    limit: 1,
                    queued: 1,
                    waited: Duration::ZERO,
                    retry_after: Duration::from_millis(2100),
                },
                429,
                Some(3),
            ),
            (PoolError::SessionLimit { limit: 2 }, 429, Some(5)),
            (PoolError::Draining, 503, Some(5)),
            (PoolError::SessionLost { key: "k".into(), reason: "r".into() }, 410, None),
            (PoolError::SessionExists { key: "k".into() }, 409, None),
            (PoolError::Create("x".into()), 503, None),
            (PoolError::Network("x".into()), 503, None),
        ];
        for (e, status, retry) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.retry_after), (status, retry), "{a}");
        }
    }

    #[test]
    fn agent_errors_map_to_statuses_and_say_whether_the_vm_broke() {
        let remote = |code| AgentError::Remote(ember_wire::ErrorReply::new(code, "m"));
        let cases = [
            (remote(ErrorCode::BadRequest), 400, false),
            (remote(ErrorCode::SpawnFailed), 422, false),
            (remote(ErrorCode::Internal), 502, true),
            (AgentError::TooManyInFlight { limit: 64 }, 429, false),
            (AgentError::OutputPastLimit { sent: 9, limit: 1 }, 502, true),
            (AgentError::Overflow { buffered: 9, limit: 1 }, 502, true),
            (AgentError::Disconnected, 502, true),
            (AgentError::Timeout { what: "hello", after: Duration::from_secs(1) }, 502, true),
        ];
        let fs = |errno| {
            let e = std::io::Error::from_raw_os_error(errno);
            AgentError::Remote(ember_wire::ErrorReply::io("p", &e))
        };
        let cases = cases.into_iter().chain([
            (fs(nix::libc::ENOENT), 404, false),
            (fs(nix::libc::EACCES), 403, false),
            (fs(nix::libc::EROFS), 403, false),
            (fs(nix::libc::ENOTEMPTY), 409, false),
            (fs(nix::libc::EEXIST), 409, false),
            (fs(nix::libc::ENOSPC), 507, false),
            (fs(nix::libc::EISDIR), 400, false),
        ]);
        for (e, status, broken) in cases {
            let (e, b) = ember_service::Error::from_agent("vm-1", e);
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), b), (status, broken), "{a}");
        }
        let j = ApiError::bad_request("x").to_json();
        assert_eq!(j, serde_json::json!({"error": {"code": "bad_request", "message": "x"}}));
    }
}
