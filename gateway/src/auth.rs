//! Who a request is, before any route runs.
//!
//! With keys (the keys file has or had one), a request carries its key as
//! `Authorization: Bearer KEY` or `X-API-Key: KEY`; missing or unknown is a
//! `401` with `WWW-Authenticate`, a tenant key on an admin route a `403`.
//! Without keys the server is on loopback and open, so what a browser could
//! make of it is refused instead: a `Host` that is not a loopback name (DNS
//! rebinding) or one the config allows, and an `Origin` that is neither the
//! server itself nor allowed (a cross-site request), are `403`s.
//! `/healthz` and `/readyz` need nothing. The route handlers read the
//! [`Caller`] this leaves in the request's extensions.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ember_service::keys::{KeyStore, Principal};
use ember_service::Caller;

use crate::error::ApiError;

/// Paths anyone may ask.
const PUBLIC: &[&str] = &["/healthz", "/readyz"];
/// Paths only an admin key may ask.
const ADMIN: &[&str] = &["/metrics", "/v1/pool", "/v1/cluster"];

/// What the middleware checks against.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// `None`: no keys file; every request is `Caller::Open`.
    pub keys: Option<Arc<KeyStore>>,
    /// Host names (without port) allowed besides loopback ones while no
    /// key is needed (`[gateway] allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) a browser may call from while no
    /// key is needed (`[gateway] allowed_origins`).
    pub allowed_origins: Vec<String>,
    /// The E2B-compatible API (`[e2b]`), when on: its control plane's
    /// refusals take E2B's error shape, which its SDKs parse.
    pub e2b: Option<std::sync::Arc<ember_e2b::control::E2bConfig>>,
    /// The MCP endpoint (`[mcp]`), when on.
    pub mcp: Option<std::sync::Arc<ember_mcp::McpConfig>>,
    /// This node's membership of a cluster (`[cluster]`), when on.
    pub cluster: Option<std::sync::Arc<ember_cluster::Membership>>,
}

/// Why a request is refused before any route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `401` with `WWW-Authenticate`: no key, or not a valid one.
    Unauthorized { code: &'static str, message: &'static str },
    /// `403`: a key without the right, or a Host/Origin an open server refuses.
    Forbidden { code: &'static str, message: String },
}

fn unauthorized(code: &'static str, message: &'static str) -> Refusal {
    Refusal::Unauthorized { code, message }
}

fn forbidden(code: &'static str, message: String) -> Refusal {
    Refusal::Forbidden { code, message }
}

impl Refusal {
    /// The same refusal in E2B's shape, `{"code": <status>, "message"}`.
    pub fn into_e2b_response(self) -> Response {
        let (status, message) = match self {
            Refusal::Unauthorized { message, .. } => (StatusCode::UNAUTHORIZED, message.to_string()),
            Refusal::Forbidden { message, .. } => (StatusCode::FORBIDDEN, message),
        };
        let mut resp = ember_e2b::control::E2bError::new(status, message).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ember\""));
        }
        resp
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized { code, message } => {
                let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"ember\""));
                resp
            }
            Refusal::Forbidden { code, message } => {
                ApiError::new(StatusCode::FORBIDDEN, code, message).into_response()
            }
        }
    }
}

/// The key a request carries, if any: `Authorization: Bearer` or `X-API-Key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    bearer
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim))
        .filter(|k| !k.is_empty())
}

/// `Host`'s name without its port (`[::1]:8080` → `::1`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
}

/// A name that can only mean this machine.
pub fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Access {
    /// Whether an open server takes a request with these headers; the
    /// refusal otherwise.
    fn check_browser_rules(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(host) = host {
            let name = host_name(host);
            if !is_loopback_name(name) && !self.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(name)) {
                return Err(forbidden(
                    "host_not_allowed",
                    format!(
                        "Host {host:?} is not a loopback name; without API keys Ember answers only loopback \
                         names and [gateway] allowed_hosts"
                    ),
                ));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let own = host.is_some_and(|h| {
                origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(h)
            });
            if !own && !self.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
                return Err(forbidden(
                    "origin_not_allowed",
                    format!("Origin {origin:?} is not allowed; add it to [gateway] allowed_origins"),
                ));
            }
        }
        Ok(())
    }

    /// The caller of a request with these headers, or the refusal.
    pub fn caller(&self, path: &str, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let Some(keys) = self.keys.as_ref().filter(|k| k.required()) else {
            self.check_browser_rules(headers)?;
            return Ok(Caller::Open);
        };
        let Some(secret) = presented_key(headers) else {
            return Err(unauthorized(
                "unauthorized",
                "this server needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
            ));
        };
        let Some(principal) = keys.authenticate(secret) else {
            return Err(unauthorized("invalid_key", "the API key is not valid (unknown or revoked)"));
        };
        let caller = Caller::Key(principal);
        if ADMIN.contains(&path) && !caller.is_admin() {
            return Err(forbidden("admin_only", format!("{path} needs an admin key")));
        }
        Ok(caller)
    }
}

/// The tenant a response was for, for the request counter.
#[derive(Debug, Clone)]
pub struct TenantLabel(pub String);

/// The middleware: refuse, or leave the [`Caller`] for the routes.
pub async fn authenticate(State(access): State<Arc<Access>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if PUBLIC.contains(&path) {
        req.extensions_mut().insert(Caller::Open);
        return next.run(req).await;
    }
    match access.caller(path, req.headers()) {
        Ok(caller) => {
            let tenant = TenantLabel(caller.label().to_string());
            req.extensions_mut().insert(caller);
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(tenant);
            resp
        }
        Err(refusal) if access.e2b.is_some() && ember_e2b::control::is_control_path(path) => {
            refusal.into_e2b_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// A caller for tests and tools: the key `name`, admin or not.
pub fn principal(name: &str, admin: bool) -> Caller {
    Caller::Key(Arc::new(Principal { name: Arc::from(name), admin, quotas: Default::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn status(r: Result<Caller, Refusal>) -> u16 {
        r.map_or_else(|refusal| refusal.into_response().status().as_u16(), |_| 200)
    }

    #[test]
    fn keys_come_from_either_header() {
        assert_eq!(presented_key(&headers(&[("authorization", "Bearer abc")])), Some("abc"));
        assert_eq!(presented_key(&headers(&[("authorization", "bearer  abc ")])), Some("abc"));
        assert_eq!(presented_key(&headers(&[("x-api-key", "xyz")])), Some("xyz"));
        assert_eq!(presented_key(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(presented_key(&headers(&[("x-api-key", "")])), None);
    }

    #[test]
    fn an_open_server_answers_loopback_names_and_its_own_origin_only() {
        let open = Access { allowed_hosts: vec!["ember.internal".into()], ..Access::default() };
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "LOCALHOST",
            "app.localhost",
            "ember.internal:80",
        ] {
            assert_eq!(status(open.caller("/v1/run", &headers(&[("host", host)]))), 200, "{host}");
        }
        for host in ["evil.example:8080", "127.0.0.1.evil.example", "192.168.1.5:8080", "[::2]:80"] {
            assert_eq!(status(open.caller("/v1/run", &headers(&[("host", host)]))), 403, "{host}");
        }
        let same = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")]);
        assert_eq!(status(open.caller("/v1/run", &same)), 200);
        let cross = headers(&[("host", "127.0.0.1:8080"), ("origin", "https://evil.example")]);
        assert_eq!(status(open.caller("/v1/run", &cross)), 403);
        let allowed = Access { allowed_origins: vec!["https://app.example".into()], ..Access::default() };
        let listed = headers(&[("host", "127.0.0.1:8080"), ("origin", "https://app.example")]);
        assert_eq!(status(allowed.caller("/v1/run", &listed)), 200);
    }

    #[test]
    fn with_keys_a_request_needs_one_and_admin_routes_an_admin_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let tenant = ember_service::keys::create(&path, "alice", false, Default::default()).unwrap();
        let admin = ember_service::keys::create(&path, "root", true, Default::default()).unwrap();
        let access = Access { keys: Some(Arc::new(KeyStore::open(&path).unwrap())), ..Access::default() };
        let none =
            access.caller("/v1/run", &headers(&[("host", "ember.example")])).unwrap_err().into_response();
        assert_eq!(none.status(), 401);
        assert_eq!(none.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"ember\"");
        let bad =
            access.caller("/v1/run", &headers(&[("x-api-key", "ember_nope")])).unwrap_err().into_response();
        assert_eq!(bad.status(), 401);
        let bearer = format!("Bearer {tenant}");
        let c = access
            .caller("/v1/run", &headers(&[("authorization", &bearer), ("host", "ember.example")]))
            .unwrap();
        assert_eq!(c.tenant(), Some("alice"));
        assert_eq!(status(access.caller("/metrics", &headers(&[("authorization", &bearer)]))), 403);
        assert_eq!(status(access.caller("/v1/pool", &headers(&[("x-api-key", &tenant)]))), 403);
        assert_eq!(status(access.caller("/v1/pool", &headers(&[("x-api-key", &admin)]))), 200);
    }
}
