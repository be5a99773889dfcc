//! The E2B-compatible front end. The unchanged `e2b` SDKs (Python, JS) talk
//! to two planes, both on Ember's listener:
//!
//! - the **control plane** (`/sandboxes`, `/v2/sandboxes`, with the API
//!   key): a sandbox is an Ember session of the key's tenant, a template an
//!   Ember image;
//! - the **sandbox plane**, chosen before any path routing by the
//!   `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers or a
//!   `Host: <port>-<id>.<domain>` header: port 49983 is an emulation of
//!   E2B's in-sandbox daemon (envd: Connect RPCs over the session's
//!   processes and files), any other port Ember's port proxy.
//!
//! `connect.rs` is the Connect protocol's JSON framing, without I/O.
#![forbid(unsafe_code)]

pub mod connect;
pub mod control;
pub mod envd;
pub mod files;
pub mod fs;
pub mod interpreter;
pub mod route;
pub mod sandbox;
pub mod watch;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_pool::pool::Backend;
use ember_service::AppState;

/// `GET`/`POST /files` for envd of sandbox `id`, its body streamed (the
/// token or a signed URL is checked there).
pub async fn envd_files<B: Backend>(
    state: &AppState<B>,
    id: &str,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    match sandbox::find_for_port(state, id) {
        Ok(found) => files::handle(state, &found, method, query, headers, body).await,
        Err(refused) => refused.into_response(),
    }
}

/// A `/files` request that names no sandbox but is signed
/// ([`files::signed`]; a signed URL made on a shared `E2B_SANDBOX_URL`):
/// served for the sandbox whose token signed it, else a 401.
pub async fn signed_files<B: Backend>(
    state: &AppState<B>,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    let q: files::Query = match serde_urlencoded::from_str(query.unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return files::error(StatusCode::BAD_REQUEST, format!("query: {e}")),
    };
    let op = if method == Method::GET { "read" } else { "write" };
    match sandbox::signed_by(state, op, &q) {
        Some(id) => envd_files(state, &id, method, query, headers, body).await,
        None => files::error(StatusCode::UNAUTHORIZED, "no sandbox's access token signed this URL"),
    }
}

/// A request for the code interpreter (port 49999) of sandbox `id`: no
/// token (E2B's SDK sends none on `/contexts`), the random id reaches it.
pub async fn code_interpreter<B: Backend>(
    state: &AppState<B>,
    id: &str,
    method: &Method,
    path: &str,
    body: Bytes,
) -> Response {
    match sandbox::find_for_port(state, id) {
        Ok(found) => interpreter::handle(state, &found, method, path, body).await,
        Err(refused) => refused.into_response(),
    }
}

/// `process.Process/StreamInput` for envd of sandbox `id`: a client
/// stream, its body read as it comes.
pub async fn envd_stream_input<B: Backend>(
    state: &AppState<B>,
    id: &str,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Response {
    match sandbox::find(state, id, headers) {
        Ok(found) => envd::stream_input(state, &found, body).await,
        Err(refused) => refused.into_response(),
    }
}

/// A request for envd (port 49983) of sandbox `id`: the sandbox and token
/// checked, then the RPC or the plain route its path names.
pub async fn envd<B: Backend>(
    state: &AppState<B>,
    id: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    // `/health` answers whether the sandbox runs, without a token.
    if path == "/health" {
        return match sandbox::find(state, id, headers) {
            Ok(_) | Err(sandbox::Refused::BadToken) => StatusCode::NO_CONTENT.into_response(),
            Err(refused) => refused.into_response(),
        };
    }
    let found = match sandbox::find(state, id, headers) {
        Ok(f) => f,
        Err(refused) => return refused.into_response(),
    };
    if method != Method::POST {
        return envd::unary::<()>(Err(connect::RpcError::new(
            connect::Code::Unimplemented,
            format!("{method} {path}"),
        )));
    }
    if let Some(rpc) = path.strip_prefix("/process.Process/") {
        return envd::process(state, &found, rpc, headers, body).await;
    }
    if let Some(rpc) = path.strip_prefix("/filesystem.Filesystem/") {
        return fs::filesystem(state, &found, rpc, headers, body).await;
    }
    envd::unary::<()>(Err(connect::RpcError::new(
        connect::Code::Unimplemented,
        format!("{path} is not implemented by Ember's envd yet"),
    )))
}
