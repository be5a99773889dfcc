//! The E2B sandbox plane, decided before any route (a guest app behind the
//! port proxy may have paths of Ember's own): a request naming a sandbox
//! (`E2b-Sandbox-Id`, or `Host: <port>-<id>.<domain>`) goes to envd's
//! emulation for port 49983 and to the session's port proxy for any other;
//! everything else goes on to Ember's routes. It needs no API key (the
//! SDKs send none there): envd checks the sandbox's access token. A
//! `/files` request with a signature and no sandbox (a signed URL made on a
//! shared `E2B_SANDBOX_URL`) goes to the sandbox whose token signed it.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ember_e2b::route::{self, SandboxTarget};
use ember_pool::pool::Backend;
use http_body_util::BodyExt as _;

use crate::state::AppState;

fn e2b_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({"code": status.as_u16(), "message": message}))).into_response()
}

pub async fn sandbox_plane<B: Backend>(
    State(state): State<AppState<B>>,
    req: Request,
    next: Next,
) -> Response {
    let target = match route::target(req.headers()) {
        Ok(Some(t)) => t,
        Ok(None) if req.uri().path() == "/files" && ember_e2b::files::signed(req.uri().query()) => {
            // A signed URL on a shared E2B_SANDBOX_URL names no sandbox.
            let (parts, body) = req.into_parts();
            return ember_e2b::signed_files(&state, &parts.method, parts.uri.query(), &parts.headers, body)
                .await;
        }
        Ok(None) => return next.run(req).await,
        Err(msg) => return e2b_error(StatusCode::BAD_REQUEST, msg),
    };
    let SandboxTarget { id, port } = target;
    if port == route::ENVD_PORT && req.uri().path() == "/files" {
        let (parts, body) = req.into_parts();
        return ember_e2b::envd_files(&state, &id, &parts.method, parts.uri.query(), &parts.headers, body)
            .await;
    }
    if port == route::ENVD_PORT && req.uri().path() == "/process.Process/StreamInput" {
        let (parts, body) = req.into_parts();
        return ember_e2b::envd_stream_input(&state, &id, &parts.headers, body).await;
    }
    if port == route::ENVD_PORT {
        let (parts, body) = req.into_parts();
        let limited = http_body_util::Limited::new(body, ember_e2b::envd::MAX_UNARY_BODY);
        let body = match limited.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return e2b_error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
        };
        return ember_e2b::envd(&state, &id, &parts.method, parts.uri.path(), &parts.headers, body).await;
    }
    if port == route::CODE_INTERPRETER_PORT {
        let (parts, body) = req.into_parts();
        let limited = http_body_util::Limited::new(body, ember_e2b::interpreter::MAX_BODY);
        let body = match limited.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return e2b_error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")),
        };
        return ember_e2b::code_interpreter(&state, &id, &parts.method, parts.uri.path(), body).await;
    }
    let found = match ember_e2b::sandbox::find_for_port(&state, &id) {
        Ok(f) => f,
        Err(refused) => return refused.into_response(),
    };
    let path = req.uri().path().trim_start_matches('/').to_string();
    let req = req.map(Body::new);
    super::ports::proxy(state, found.caller, found.key, port.to_string(), path, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}
