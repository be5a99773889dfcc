//! The HTTP API (described in `openapi.yaml`). Every route answers errors
//! through [`ApiError`]; unknown paths and methods too.

mod files;
pub mod forward;
mod info;
mod ports;
mod processes;
mod run;
mod sandbox_plane;
mod sessions;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::Router;
use ember_pool::pool::Backend;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::invocation::AgentVm;
use crate::state::AppState;

/// Header that pins calls to a session's workspace VM.
pub const SESSION_HEADER: &str = "x-ember-session";
/// Response header carrying the invocation id.
pub const INVOCATION_HEADER: &str = "x-ember-invocation";
pub const NDJSON: &str = "application/x-ndjson";

/// A 200 whose body is NDJSON, each chunk as `rx` gives it, until the
/// sender is dropped. The task feeding `rx` sees the client go away as a
/// closed channel (`Sender::closed`).
pub(crate) fn ndjson(rx: tokio::sync::mpsc::Receiver<axum::body::Bytes>) -> Response {
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(axum::body::Body::from_stream(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(NDJSON));
    resp
}

/// Every route as (method, path), in `openapi.yaml`'s spelling.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/run"),
    ("POST", "/mcp"),
    ("GET", "/mcp"),
    ("DELETE", "/mcp"),
    ("GET", "/v1/pool"),
    ("GET", "/v1/cluster"),
    ("GET", "/v1/images"),
    ("GET", "/v1/sessions"),
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions/{key}"),
    ("DELETE", "/v1/sessions/{key}"),
    ("POST", "/v1/sessions/{key}/timeout"),
    ("POST", "/v1/sessions/{key}/pause"),
    ("POST", "/v1/sessions/{key}/resume"),
    ("POST", "/v1/sessions/{key}/fork"),
    ("GET", "/v1/sessions/{key}/processes"),
    ("POST", "/v1/sessions/{key}/processes"),
    ("GET", "/v1/sessions/{key}/processes/{pid}"),
    ("GET", "/v1/sessions/{key}/processes/{pid}/output"),
    ("POST", "/v1/sessions/{key}/processes/{pid}/stdin"),
    ("DELETE", "/v1/sessions/{key}/processes/{pid}/stdin"),
    ("POST", "/v1/sessions/{key}/processes/{pid}/signal"),
    ("POST", "/v1/sessions/{key}/processes/{pid}/resize"),
    ("GET", "/v1/sessions/{key}/files/{path}"),
    ("PUT", "/v1/sessions/{key}/files/{path}"),
    ("POST", "/v1/sessions/{key}/files/{path}"),
    ("DELETE", "/v1/sessions/{key}/files/{path}"),
    ("PUT", "/v1/sessions/{key}/network"),
    ("GET", "/v1/sessions/{key}/ports/{port}"),
    ("GET", "/v1/sessions/{key}/ports/{port}/{path}"),
    ("POST", "/v1/sessions/{key}/ports/{port}/{path}"),
    ("PUT", "/v1/sessions/{key}/ports/{port}/{path}"),
    ("PATCH", "/v1/sessions/{key}/ports/{port}/{path}"),
    ("DELETE", "/v1/sessions/{key}/ports/{port}/{path}"),
    ("GET", "/v1/functions"),
    ("POST", "/v1/functions/{name}"),
];

/// The router with what the state knows of keys and no hosts or origins
/// allowed beyond loopback.
pub fn router<B: Backend>(state: AppState<B>) -> Router
where
    B::Vm: AgentVm,
{
    let access = crate::auth::Access {
        keys: state.keys.clone(),
        e2b: Some(Default::default()),
        mcp: Some(Default::default()),
        ..Default::default()
    };
    router_with(state, access)
}

/// The router, requests checked against `access` first; with
/// `access.e2b`, the E2B-compatible API too.
pub fn router_with<B: Backend>(state: AppState<B>, access: crate::auth::Access) -> Router
where
    B::Vm: AgentVm,
{
    let e2b = access.e2b.clone();
    let with_e2b = e2b.is_some();
    // One forwarder for every route it serves (its unanswered-forward counts are shared).
    let forwarder = access.cluster.clone().and_then(|m| forward::Forwarder::new(state.clone(), m));
    let ember = Router::new()
        .route("/healthz", get(info::healthz::<B>))
        .route("/readyz", get(info::readyz::<B>))
        .route("/metrics", get(info::metrics::<B>))
        .route("/v1/run", {
            let run = post(run::run::<B>);
            // In a cluster with a secret: a call this node has no VM ready for
            // goes to a member that has.
            match forwarder.clone() {
                Some(f) => run.layer(axum::middleware::from_fn_with_state(f, forward::one_shot::<B>)),
                None => run,
            }
        })
        .route("/v1/pool", get(info::pool::<B>))
        .route(
            "/v1/cluster",
            get({
                let cluster = access.cluster.clone();
                move || info::cluster(cluster.clone())
            }),
        )
        .route("/v1/images", get(info::images::<B>))
        .route("/v1/sessions", get(sessions::list::<B>).post(sessions::open::<B>))
        .route("/v1/sessions/{key}", get(sessions::show::<B>).delete(sessions::end::<B>))
        .route("/v1/sessions/{key}/timeout", post(sessions::timeout::<B>))
        .route("/v1/sessions/{key}/pause", post(sessions::pause::<B>))
        .route("/v1/sessions/{key}/resume", post(sessions::resume::<B>))
        .route("/v1/sessions/{key}/fork", post(sessions::fork::<B>))
        .route("/v1/sessions/{key}/processes", get(processes::list::<B>).post(processes::start::<B>))
        .route("/v1/sessions/{key}/processes/{pid}", get(processes::show::<B>))
        .route("/v1/sessions/{key}/processes/{pid}/output", get(processes::output::<B>))
        .route(
            "/v1/sessions/{key}/processes/{pid}/stdin",
            post(processes::stdin::<B>).delete(processes::close_stdin::<B>),
        )
        .route("/v1/sessions/{key}/processes/{pid}/signal", post(processes::signal::<B>))
        .route("/v1/sessions/{key}/processes/{pid}/resize", post(processes::resize::<B>))
        .route(
            "/v1/sessions/{key}/files/{*path}",
            get(files::get::<B>).put(files::put::<B>).post(files::post::<B>).delete(files::delete::<B>),
        )
        .route("/v1/sessions/{key}/network", put(sessions::network::<B>))
        .route("/v1/sessions/{key}/ports/{port}", any(ports::root::<B>))
        .route("/v1/sessions/{key}/ports/{port}/", any(ports::root::<B>))
        .route("/v1/sessions/{key}/ports/{port}/{*path}", any(ports::path::<B>))
        .route("/v1/functions", get(info::functions::<B>))
        .route("/v1/functions/{name}", {
            let call = post(run::function::<B>);
            // A function's calls go where its warm VMs are (or to its home).
            match forwarder.clone() {
                Some(f) => call.layer(axum::middleware::from_fn_with_state(f, forward::one_shot::<B>)),
                None => call,
            }
        });
    let ember = match access.mcp.clone() {
        Some(config) => {
            ember.nest_service("/mcp", ember_mcp::service(state.clone(), config, state.drain_token()))
        }
        None => ember,
    };
    let all = match e2b {
        Some(config) => ember.merge(ember_e2b::control::routes::<B>().layer(axum::Extension(config))),
        None => ember,
    };
    let all = all
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(std::sync::Arc::new(access), crate::auth::authenticate));
    // The sandbox plane goes round the key check (envd checks its token).
    let all = if with_e2b {
        all.layer(axum::middleware::from_fn_with_state(state.clone(), sandbox_plane::sandbox_plane::<B>))
    } else {
        all
    };
    all.layer(axum::middleware::from_fn_with_state(state.clone(), count_requests::<B>))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the server hit a bug")
                .into_response()
        }))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn count_requests<B: Backend>(State(state): State<AppState<B>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    let route = route.as_deref().unwrap_or("unmatched");
    state.metrics.request(route, &method, resp.status().as_u16());
    if let Some(crate::auth::TenantLabel(tenant)) = resp.extensions().get() {
        state.metrics.tenant_request(tenant, resp.status().as_u16());
    }
    resp
}

/// A request body of at most `limits.max_body_bytes` (a JSON 413 past it,
/// like every error).
pub(crate) struct LimitedBody(pub axum::body::Bytes);

impl<B: Backend> axum::extract::FromRequest<AppState<B>> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState<B>) -> Result<Self, ApiError> {
        run::read_body(req, state.limits.max_body_bytes).await.map(LimitedBody)
    }
}

/// A JSON request body: `invalid_json` if it is not JSON, `invalid_request`
/// if it is not the expected shape (the field named).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() { "invalid_json" } else { "invalid_request" };
        ApiError::new(StatusCode::BAD_REQUEST, code, format!("request body: {e}"))
    })
}

/// Whether the caller asked for an NDJSON stream.
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)))
}

#[cfg(test)]
pub(crate) fn e2b_id_ok(id: &str) -> bool {
    ember_e2b::route::valid_id(id)
}

/// The session key from the header, if any.
fn session_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(SESSION_HEADER) else { return Ok(None) };
    let key = v.to_str().map_err(|_| ApiError::bad_request("X-Ember-Session must be ASCII"))?;
    // Checked as the caller names it (an admin may qualify it with a tenant).
    Ok(Some(key.to_string()))
}

#[cfg(test)]
mod e2b_tests;
#[cfg(test)]
mod tenant_tests;
#[cfg(test)]
mod tests;
