//! The sandbox plane's side of a request: which session a sandbox id names
//! (whatever its tenant: ids are random and unique), whether the request's
//! `X-Access-Token` is that sandbox's envd token (compared in constant
//! time; the API key is never sent here), and the caller to act as: the
//! tenant's own key, so its quotas hold and nothing reaches past it.

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ember_pool::pool::Backend;
use ember_service::keys::Principal;
use ember_service::{AppState, Caller};

use crate::control::TOKEN_KEY;

/// A sandbox the request may act on.
#[derive(Debug, Clone)]
pub struct Found {
    /// The caller to act as (the sandbox's tenant).
    pub caller: Caller,
    /// The session's key as that caller names it (the sandbox id).
    pub key: String,
}

/// Why a sandbox-plane request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No such sandbox (or it ended, or its key was revoked).
    NotFound(String),
    /// Its `X-Access-Token` is missing or not the sandbox's.
    BadToken,
}

impl IntoResponse for Refused {
    /// A missing sandbox is what the SDKs recognise as "the sandbox is
    /// gone": 502 with "was not found" in the message
    /// (`SandboxNotRunningException`, `is_running() == false`).
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Refused::NotFound(id) => (StatusCode::BAD_GATEWAY, format!("The sandbox {id} was not found")),
            Refused::BadToken => {
                (StatusCode::UNAUTHORIZED, "the X-Access-Token is not this sandbox's".to_string())
            }
        };
        let body = serde_json::json!({ "code": status.as_u16(), "message": message });
        (status, axum::Json(body)).into_response()
    }
}

/// The envd token a request carries.
fn token(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-access-token").and_then(|v| v.to_str().ok()).map(str::trim)
}

fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Sandbox `id`'s session if the request may use it: `Err` is the answer.
/// A wrong or missing token is a 401, told apart from a missing sandbox.
pub fn find<B: Backend>(state: &AppState<B>, id: &str, headers: &HeaderMap) -> Result<Found, Refused> {
    find_checked(state, id, Some(headers))
}

/// The sandbox whose access token signed a `/files` URL that names no
/// sandbox: the SDKs' `download_url`/`upload_url` on a shared
/// `E2B_SANDBOX_URL` carry only the path, the operation and the signature.
/// Each sandbox's token is tried (a SHA-256 each, no `/proc` read); a
/// signature matches one token only, unless SHA-256 collides.
pub fn signed_by<B: Backend>(state: &AppState<B>, op: &str, q: &crate::files::Query) -> Option<String> {
    let (sig, path) = (q.signature.as_deref()?, q.path.as_deref()?);
    let user = q.username.as_deref().unwrap_or("");
    state.pools.iter().flat_map(|(_, pool)| pool.sessions_labelled(TOKEN_KEY)).find_map(|(key, token)| {
        let want = crate::files::signature(path, op, user, &token, q.signature_expiration);
        same(sig, &want).then(|| match key.split_once(ember_service::tenant::SEPARATOR) {
            Some((_, id)) => id.to_string(),
            None => key,
        })
    })
}

/// Sandbox `id` for a request to one of its own ports (not envd's): E2B
/// sends no token there (the code interpreter's `/contexts` has none); the
/// random 20-character id is what reaches it, as on E2B.
pub fn find_for_port<B: Backend>(state: &AppState<B>, id: &str) -> Result<Found, Refused> {
    find_checked(state, id, None)
}

fn find_checked<B: Backend>(
    state: &AppState<B>,
    id: &str,
    headers: Option<&HeaderMap>,
) -> Result<Found, Refused> {
    let suffix = format!("{}{id}", ember_service::tenant::SEPARATOR);
    // The keys first (no /proc read per session), then the one session's info.
    let hit = state.pools.iter().find_map(|(_, pool)| {
        let key = pool.session_keys().into_iter().find(|k| k == id || k.ends_with(&suffix))?;
        pool.session_info(&key)
    });
    let Some(info) = hit else { return Err(Refused::NotFound(id.into())) };
    let Some(expected) = info.metadata.get(TOKEN_KEY) else { return Err(Refused::NotFound(id.into())) };
    if headers.is_some_and(|h| !token(h).is_some_and(|t| same(t, expected))) {
        return Err(Refused::BadToken);
    }
    let caller = match ember_service::tenant::tenant_of(&info.key) {
        None => Caller::Open,
        Some(tenant) => {
            // The tenant's key as it is now: a revoked key's sandboxes are gone.
            let principal = state.keys.as_ref().and_then(|k| k.principal(tenant));
            match principal {
                Some(p) => Caller::Key(Arc::new(Principal { admin: false, ..(*p).clone() })),
                None => return Err(Refused::NotFound(id.into())),
            }
        }
    };
    Ok(Found { caller, key: id.to_string() })
}
