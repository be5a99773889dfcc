//! The control plane: E2B's REST API over Ember's sessions. A sandbox is a
//! session of the key's tenant whose key is the sandbox id (a lowercase DNS
//! label); a template is an image (`base` is `base-sudo`: E2B's root and sudo). Its envd
//! access token and template live in the session's metadata under `e2b.`
//! names, which the E2B view never shows, so a paused sandbox keeps them
//! across a restart of the server.
//!
//! Errors are E2B's shape, `{"code": <status>, "message"}`: the generated
//! client parses every documented error body before the SDK looks at the
//! status, and Ember's own shape makes it raise `KeyError`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_net::RawPolicy;
use ember_pool::pool::Backend;
use ember_service::api::{SessionRequest, TimeoutRequest};
use ember_service::sessions::Session;
use ember_service::{AppState, Caller, Kind};
use serde::{Deserialize, Serialize};

/// The envd version Ember's emulation answers as (the SDKs gate features on it).
pub const ENVD_VERSION: &str = "0.5.7";
/// A sandbox's lifetime when create names none (E2B's default).
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Metadata names Ember keeps for itself on a sandbox's session.
pub const TOKEN_KEY: &str = "e2b.token";
pub const TEMPLATE_KEY: &str = "e2b.template";
/// What `clientID` says (E2B's scheduler node; here, this server).
const CLIENT_ID: &str = "ember";

/// An E2B-shaped error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u32>,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None }
    }

    pub fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
    }
}

impl From<ember_service::Error> for E2bError {
    fn from(e: ember_service::Error) -> Self {
        let status = match e.kind {
            Kind::Invalid | Kind::Unsupported | Kind::Unprocessable => StatusCode::BAD_REQUEST,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound | Kind::Gone => StatusCode::NOT_FOUND,
            Kind::NotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Busy => StatusCode::TOO_MANY_REQUESTS,
            Kind::VmFailed => StatusCode::BAD_GATEWAY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        };
        Self { status, message: format!("{} ({})", e.message, e.code), retry_after: e.retry_after }
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.status.as_u16(), "message": self.message });
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        resp
    }
}

type Answer<T> = Result<T, E2bError>;

/// Whether a path is the control plane's (for refusals in E2B's shape).
pub fn is_control_path(path: &str) -> bool {
    path == "/sandboxes" || path.starts_with("/sandboxes/") || path.starts_with("/v2/sandboxes")
}

/// A new sandbox id: 20 of `[a-z0-9]`, a DNS label.
pub fn new_id() -> String {
    let raw = uuid::Uuid::new_v4().as_u128();
    let mut n = raw;
    let mut s = String::with_capacity(20);
    for _ in 0..20 {
        let d = (n % 36) as u32;
        n /= 36;
        s.push(char::from_digit(d, 36).unwrap_or('0'));
    }
    s
}

/// A new envd access token.
pub fn new_token() -> String {
    format!("{:032x}{:032x}", uuid::Uuid::new_v4().as_u128(), uuid::Uuid::new_v4().as_u128())
}

/// `POST /v2/sandboxes` (and `/sandboxes`): what the SDKs send.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub timeout: Option<u64>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// Snake case in the v2 body, as the SDKs send it.
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
}

/// What create and connect answer.
#[derive(Debug, Serialize)]
pub struct Created {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    #[serde(rename = "envdVersion")]
    pub envd_version: &'static str,
    #[serde(rename = "envdAccessToken")]
    pub envd_access_token: Option<String>,
    #[serde(rename = "trafficAccessToken")]
    pub traffic_access_token: Option<String>,
    pub domain: Option<String>,
    pub alias: Option<String>,
}

/// `GET /sandboxes/{id}` and each entry of a listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Detail {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: &'static str,
    pub alias: Option<String>,
    pub started_at: String,
    pub end_at: String,
    pub envd_version: &'static str,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: &'static str,
    pub metadata: BTreeMap<String, String>,
    pub domain: Option<String>,
}

/// How the E2B front end is set up (`[e2b]`).
#[derive(Debug, Clone)]
pub struct E2bConfig {
    /// Template name → image name; a template not here names an image.
    pub templates: BTreeMap<String, String>,
    /// What `domain` says (the SDK builds `<port>-<id>.<domain>` hosts).
    pub domain: Option<String>,
    /// vCPUs a sandbox's VM has (for `cpuCount`).
    pub cpu_count: u32,
}

impl Default for E2bConfig {
    fn default() -> Self {
        let templates = BTreeMap::from([
            // E2B's base sandbox lets code `sudo apt-get install` and write
            // anywhere: the image with a writable root and passwordless sudo.
            ("base".to_string(), "base-sudo".to_string()),
            // e2b-code-interpreter's default template: the image with numpy,
            // pandas and matplotlib; port 49999 is served by Ember itself.
            ("code-interpreter-v1".to_string(), "python-data".to_string()),
        ]);
        Self { templates, domain: None, cpu_count: 1 }
    }
}

impl E2bConfig {
    /// The image a template names.
    pub fn image_of<'a>(&'a self, template: &'a str) -> &'a str {
        self.templates.get(template).map_or(template, String::as_str)
    }
}

/// What every control-plane handler works with: Ember's state, `[e2b]` and
/// the caller (the key's tenant), taken from the request in one extractor.
pub struct Control<B: Backend> {
    state: AppState<B>,
    config: Arc<E2bConfig>,
    caller: Caller,
}

impl<B: Backend> std::fmt::Debug for Control<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("caller", &self.caller.label()).finish()
    }
}

impl<B: Backend> axum::extract::FromRequestParts<AppState<B>> for Control<B> {
    type Rejection = E2bError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState<B>,
    ) -> Result<Self, E2bError> {
        let internal =
            |what: &str| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("no {what} (a bug)"));
        let config =
            parts.extensions.get::<Arc<E2bConfig>>().cloned().ok_or_else(|| internal("[e2b] config"))?;
        let caller = parts.extensions.get::<Caller>().cloned().ok_or_else(|| internal("caller"))?;
        Ok(Self { state: state.clone(), config, caller })
    }
}

impl<B: Backend> Control<B> {
    fn detail(&self, s: &Session) -> Detail {
        let md = &s.info.metadata;
        let memory_mb = self.state.pools.get(Some(&s.image)).map_or(0, |(_, p)| p.vm_memory_mb());
        let disk_mb = self.state.image_info.get(&s.image).map_or(0, |i| u64::from(i.disk_mb));
        Detail {
            template_id: md.get(TEMPLATE_KEY).cloned().unwrap_or_else(|| s.image.clone()),
            sandbox_id: s.info.key.clone(),
            client_id: CLIENT_ID,
            alias: md.get(TEMPLATE_KEY).cloned(),
            started_at: s.info.created.clone(),
            end_at: s.info.expires.clone().unwrap_or_else(|| s.info.idle_expires.clone()),
            envd_version: ENVD_VERSION,
            cpu_count: self.config.cpu_count,
            memory_mb,
            disk_size_mb: disk_mb,
            state: s.info.state,
            metadata: user_metadata(md),
            domain: self.config.domain.clone(),
        }
    }

    fn created(&self, s: &Session) -> Created {
        let md = &s.info.metadata;
        let template = md.get(TEMPLATE_KEY).cloned().unwrap_or_else(|| s.image.clone());
        Created {
            alias: Some(template.clone()),
            template_id: template,
            sandbox_id: s.info.key.clone(),
            client_id: CLIENT_ID,
            envd_version: ENVD_VERSION,
            envd_access_token: md.get(TOKEN_KEY).cloned(),
            traffic_access_token: None,
            domain: self.config.domain.clone(),
        }
    }
}

/// Metadata as the caller gave it (without Ember's `e2b.` entries).
fn user_metadata(md: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    md.iter().filter(|(k, _)| !k.starts_with("e2b.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn valid(id: &str) -> Answer<()> {
    if crate::route::valid_id(id) {
        Ok(())
    } else {
        Err(E2bError::not_found(id))
    }
}

/// The session of sandbox `id`, as E2B says "not found".
fn session<B: Backend>(c: &Control<B>, caller: &Caller, id: &str) -> Answer<Session> {
    valid(id)?;
    c.state.session(caller, id).map_err(|e| match e.kind {
        Kind::NotFound | Kind::Invalid => E2bError::not_found(id),
        _ => e.into(),
    })
}

pub async fn create<B: Backend>(
    c: Control<B>,
    body: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Created>)> {
    let caller = c.caller.clone();
    let req: NewSandbox = serde_json::from_slice(&body)
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    let image = c.config.image_of(&req.template_id).to_string();
    if c.state.pools.get(Some(&image)).is_err() {
        return Err(E2bError::new(
            StatusCode::NOT_FOUND,
            format!(
                "template {:?} not found (images: {})",
                req.template_id,
                c.state.pools.names().join(", ")
            ),
        ));
    }
    let timeout = Duration::from_secs(req.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1));
    let mut metadata = user_metadata(&req.metadata);
    metadata.insert(TOKEN_KEY.into(), new_token());
    metadata.insert(TEMPLATE_KEY.into(), req.template_id.clone());
    let lifetime = humantime::format_duration(timeout).to_string();
    let network = match req.allow_internet_access {
        Some(false) => Some(RawPolicy::Word("none".into())),
        _ if c.state.network_enabled => Some(RawPolicy::Word("open".into())),
        _ => None,
    };
    let session = SessionRequest {
        key: Some(new_id()),
        image: Some(image),
        env: req.env_vars,
        network,
        // A sandbox lives its whole timeout however idle it is.
        idle_timeout: Some("off".into()),
        timeout: Some(lifetime),
        metadata,
        ..SessionRequest::default()
    };
    let s = c.state.open_session(&caller, session).await?;
    Ok((StatusCode::CREATED, Json(c.created(&s))))
}

pub async fn get_one<B: Backend>(c: Control<B>, Path(id): Path<String>) -> Answer<Json<Detail>> {
    let caller = c.caller.clone();
    let s = session(&c, &caller, &id)?;
    Ok(Json(c.detail(&s)))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// `k=v&k2=v2`, URL-encoded once more.
    pub metadata: Option<String>,
    /// `running,paused`.
    pub state: Option<String>,
    pub limit: Option<usize>,
    #[serde(rename = "nextToken")]
    pub next_token: Option<String>,
}

pub async fn list<B: Backend>(c: Control<B>, Query(q): Query<ListQuery>) -> Answer<Response> {
    let caller = c.caller.clone();
    let wanted: Vec<(String, String)> = q
        .metadata
        .as_deref()
        .map(|m| {
            m.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
        })
        .unwrap_or_default();
    let states: Option<Vec<&str>> = q.state.as_deref().map(|s| s.split(',').map(str::trim).collect());
    let mut all: Vec<Detail> = c
        .state
        .sessions(&caller)
        .iter()
        .filter(|s| s.info.metadata.contains_key(TOKEN_KEY))
        .map(|s| c.detail(s))
        .filter(|d| wanted.iter().all(|(k, v)| d.metadata.get(k) == Some(v)))
        .filter(|d| states.as_ref().is_none_or(|st| st.contains(&d.state)))
        .collect();
    all.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.sandbox_id.cmp(&b.sandbox_id)));
    // Paging: the token is the (start, id) the next page starts after.
    if let Some(after) = &q.next_token {
        let (at, id) = after.split_once('|').unwrap_or(("", after.as_str()));
        all.retain(|d| (d.started_at.as_str(), d.sandbox_id.as_str()) > (at, id));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let more = all.len() > limit;
    all.truncate(limit);
    let mut resp = Json(&all).into_response();
    if more {
        let cursor = all.last().map(|d| format!("{}|{}", d.started_at, d.sandbox_id));
        if let Some(last) = cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert("x-next-token", last);
        }
    }
    Ok(resp)
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn kill<B: Backend>(c: Control<B>, Path(id): Path<String>) -> Answer<StatusCode> {
    let caller = c.caller.clone();
    session(&c, &caller, &id)?;
    c.state.end_session(&caller, &id).await.map_err(|e| match e.kind {
        Kind::NotFound => E2bError::not_found(&id),
        _ => e.into(),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct SetTimeout {
    pub timeout: u64,
}

pub async fn set_timeout<B: Backend>(
    c: Control<B>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer<StatusCode> {
    let req: SetTimeout = serde_json::from_slice(&body)
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    let caller = c.caller.clone();
    session(&c, &caller, &id)?;
    let timeout = humantime::format_duration(Duration::from_secs(req.timeout.max(1))).to_string();
    c.state.extend_session(&caller, &id, TimeoutRequest { timeout })?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pause<B: Backend>(c: Control<B>, Path(id): Path<String>) -> Answer<StatusCode> {
    let caller = c.caller.clone();
    let s = session(&c, &caller, &id)?;
    if s.info.state == "paused" {
        return Err(E2bError::new(StatusCode::CONFLICT, format!("sandbox {id:?} is already paused")));
    }
    c.state.pause_session(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectBody {
    pub timeout: Option<u64>,
}

/// Resume (201) or find running (200), extending its end, never shortening it.
pub async fn connect<B: Backend>(
    c: Control<B>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Created>)> {
    let caller = c.caller.clone();
    let req: ConnectBody = if body.is_empty() {
        ConnectBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
    };
    let s = session(&c, &caller, &id)?;
    let status = if s.info.state == "paused" {
        c.state.resume_session(&caller, &id).await?;
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if let Some(t) = req.timeout {
        let left = s
            .info
            .expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339(e).ok())
            .map(|end| end.duration_since(std::time::SystemTime::now()).unwrap_or_default());
        if left.is_none_or(|l| l < Duration::from_secs(t)) {
            let timeout = humantime::format_duration(Duration::from_secs(t.max(1))).to_string();
            c.state.extend_session(&caller, &id, TimeoutRequest { timeout })?;
        }
    }
    let s = session(&c, &caller, &id)?;
    Ok((status, Json(c.created(&s))))
}

#[derive(Debug, Default, Deserialize)]
pub struct ForkBody {
    pub count: Option<u32>,
    pub timeout: Option<u64>,
}

/// The most sandboxes one fork call makes.
pub const MAX_FORKS: u32 = 20;

/// `POST /sandboxes/{id}/fork`: `count` copies (memory, processes, files),
/// each answered as create answers, or with the error that stopped it. A
/// fork keeps its parent's envd token (they share an owner).
pub async fn fork<B: Backend>(
    c: Control<B>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer<(StatusCode, Json<Vec<serde_json::Value>>)> {
    let caller = c.caller.clone();
    let req: ForkBody = if body.is_empty() {
        ForkBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?
    };
    let count = req.count.unwrap_or(1);
    if count == 0 || count > MAX_FORKS {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            format!("count {count} must be 1 to {MAX_FORKS}"),
        ));
    }
    session(&c, &caller, &id)?;
    let mut out = Vec::new();
    for _ in 0..count {
        let made = async {
            let child = c.state.fork_session(&caller, &id, Some(new_id())).await?;
            if let Some(t) = req.timeout {
                let timeout = humantime::format_duration(Duration::from_secs(t.max(1))).to_string();
                c.state.extend_session(&caller, &child.info.key, TimeoutRequest { timeout })?;
            }
            Ok::<_, ember_service::Error>(child)
        };
        out.push(match made.await {
            Ok(child) => serde_json::json!({ "sandbox": c.created(&child) }),
            Err(e) => {
                let e = E2bError::from(e);
                serde_json::json!({ "error": { "code": e.status.as_u16(), "message": e.message } })
            }
        });
    }
    Ok((StatusCode::CREATED, Json(out)))
}

/// `GET /sandboxes/{id}/metrics`: no history is kept; an empty list is
/// what the SDKs accept for none.
pub async fn metrics<B: Backend>(
    c: Control<B>,
    Path(id): Path<String>,
) -> Answer<Json<Vec<serde_json::Value>>> {
    let caller = c.caller.clone();
    session(&c, &caller, &id)?;
    Ok(Json(Vec::new()))
}

/// What the control plane answers for E2B calls Ember does not have
/// (templates, snapshots, volumes, logs, ...).
pub async fn unimplemented(uri: axum::http::Uri) -> E2bError {
    E2bError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("{} is not implemented by Ember's E2B front end", uri.path()),
    )
}

/// The control plane's routes, for Ember's router (behind its key check).
pub fn routes<B: Backend>() -> axum::Router<AppState<B>> {
    use axum::routing::{any, get, post};
    axum::Router::new()
        .route("/sandboxes", post(create::<B>).get(list::<B>))
        .route("/v2/sandboxes", post(create::<B>).get(list::<B>))
        .route("/sandboxes/{id}", get(get_one::<B>).delete(kill::<B>))
        .route("/sandboxes/{id}/timeout", post(set_timeout::<B>))
        .route("/sandboxes/{id}/pause", post(pause::<B>))
        .route("/sandboxes/{id}/connect", post(connect::<B>))
        .route("/v2/sandboxes/{id}/connect", post(connect::<B>))
        .route("/sandboxes/{id}/metrics", get(metrics::<B>))
        .route("/sandboxes/{id}/fork", post(fork::<B>))
        .route("/sandboxes/{id}/{*rest}", any(unimplemented))
        .route("/v2/sandboxes/{id}/{*rest}", any(unimplemented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dns_labels_and_errors_are_e2b_shaped() {
        for _ in 0..100 {
            let id = new_id();
            assert_eq!(id.len(), 20);
            assert!(crate::route::valid_id(&id), "{id}");
        }
        assert_ne!(new_id(), new_id());
        let e = E2bError::not_found("abc");
        assert_eq!(e.status, 404);
        assert!(is_control_path("/sandboxes") && is_control_path("/v2/sandboxes/x/connect"));
        assert!(!is_control_path("/v1/sessions") && !is_control_path("/sandboxesx"));
        assert_eq!(decode("run%3D3f91+x"), "run=3f91 x");
        assert_eq!(decode("100%"), "100%");
        let md =
            BTreeMap::from([("e2b.token".to_string(), "t".to_string()), ("k".to_string(), "v".to_string())]);
        assert_eq!(user_metadata(&md).len(), 1);
    }
}
