//! `/v1/sessions/{key}/ports/{port}/{path...}`: a reverse proxy to
//! `127.0.0.1:{port}` inside the session's guest, any method, bodies
//! streamed both ways, WebSocket (any `Upgrade`) carried through. Each
//! request opens its own TCP connection in the guest over the agent
//! channel, so it works with no guest network at all.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ember_pool::pool::Backend;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;

use crate::error::ApiError;
use crate::state::AppState;
use axum::Extension;
use ember_service::Caller;

/// Hop-by-hop headers (RFC 9110 7.6.1): never forwarded as they are.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub async fn root<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, port)): Path<(String, String)>,
    req: Request,
) -> Response {
    proxy(state, caller, key, port, String::new(), req).await.unwrap_or_else(IntoResponse::into_response)
}

pub async fn path<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, port, path)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    proxy(state, caller, key, port, path, req).await.unwrap_or_else(IntoResponse::into_response)
}

fn parse_port(raw: &str) -> Result<u16, ApiError> {
    match raw.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(crate::error::ApiError::invalid(format!("port {raw:?} must be a number from 1 to 65535"))),
    }
}

fn bad_gateway(code: &'static str, msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, code, msg)
}

pub(crate) async fn proxy<B: Backend>(
    state: AppState<B>,
    caller: Caller,
    key: String,
    port: String,
    path: String,
    mut req: Request,
) -> Result<Response, ApiError> {
    let port = parse_port(&port)?;
    // A body declared too large is refused before anything opens; one
    // that grows past the limit is cut (the guest server sees it end).
    let limit = state.limits.max_upload_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .or_else(|| axum::body::HttpBody::size_hint(req.body()).exact());
    if declared.is_some_and(|n| n > limit) {
        return Err(super::files::too_large(limit));
    }
    let upgrade = wants_upgrade(req.headers());
    let incoming_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let target = target_uri(&path, req.uri())?;
    let keyed = matches!(caller, Caller::Key(_));
    let out = outgoing(req, target, port, upgrade, limit, keyed)?;
    let stream = state.connect_port(&caller, &key, port).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| bad_gateway("port_error", format!("port {port}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "proxied connection ended with an error");
        }
    });
    let wait = state.limits.default_timeout;
    let mut resp = match tokio::time::timeout(wait, sender.send_request(out)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(bad_gateway("port_error", format!("port {port} in the guest: {e}"))),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "port_timeout",
                format!("port {port} sent no response head within {wait:?} (limits.default_timeout)"),
            ))
        }
    };
    if let Some((_, pool)) = state.pools.with_session(&key) {
        pool.touch_session(&key);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(theirs) = incoming_upgrade {
            let ours = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(theirs, ours));
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, parts.status == StatusCode::SWITCHING_PROTOCOLS);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Whether the client asks to switch protocols (a WebSocket, say).
fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// `/{path}?{query}` as the guest server sees it.
fn target_uri(path: &str, uri: &Uri) -> Result<Uri, ApiError> {
    let mut t = format!("/{path}");
    if let Some(q) = uri.query() {
        t.push('?');
        t.push_str(q);
    }
    t.parse().map_err(|e| crate::error::ApiError::invalid(format!("path {t:?}: {e}")))
}

/// The request for the guest server: the caller's method, headers (less
/// hop-by-hop ones, but an upgrade's own) and body (at most `max_body`
/// bytes, streamed).
fn outgoing(
    req: Request,
    target: Uri,
    port: u16,
    upgrade: bool,
    max_body: u64,
    keyed: bool,
) -> Result<hyper::Request<Body>, ApiError> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if keyed {
        strip_ember_key(&mut parts.headers);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("127.0.0.1:{port}")) {
        parts.headers.insert(header::HOST, host);
    }
    parts.uri = target;
    parts.version = axum::http::Version::HTTP_11;
    let limited = http_body_util::Limited::new(body, max_body as usize);
    Ok(hyper::Request::from_parts(parts, Body::new(limited.map_err(axum::Error::new))))
}

/// The guest never sees the caller's Ember key: the header that carried it
/// goes (the one `auth::presented_key` read: a bearer `Authorization`
/// first, else `X-API-Key`). Without keys nothing is Ember's to strip.
fn strip_ember_key(h: &mut HeaderMap) {
    let bearer = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer ")));
    if bearer {
        h.remove(header::AUTHORIZATION);
    } else {
        h.remove("x-api-key");
    }
}

/// Drop hop-by-hop headers and those `Connection` names; an upgrade keeps
/// `Connection: upgrade` and its `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| t != "upgrade" && t != "close" && t != "keep-alive")
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let kept = h.get(header::UPGRADE).cloned();
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
    if upgrade {
        if let Some(u) = kept {
            h.insert(header::UPGRADE, u);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// Carry bytes both ways between the caller's upgraded connection and the
/// guest server's until either side closes.
async fn splice(theirs: hyper::upgrade::OnUpgrade, ours: hyper::upgrade::OnUpgrade) {
    let (a, b) = match tokio::try_join!(theirs, ours) {
        Ok(ab) => ab,
        Err(e) => {
            tracing::debug!(error = %e, "an upgrade through the port proxy failed");
            return;
        }
    };
    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(error = %e, "an upgraded proxied connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ember_key_never_reaches_the_guest() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer ember_secret"));
        h.insert("x-api-key", HeaderValue::from_static("guest-app-key"));
        strip_ember_key(&mut h);
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h["x-api-key"], "guest-app-key", "the key came as the bearer: X-API-Key is the guest's");
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwdw=="));
        h.insert("x-api-key", HeaderValue::from_static("ember_secret"));
        strip_ember_key(&mut h);
        assert!(h.get("x-api-key").is_none());
        assert_eq!(h[header::AUTHORIZATION], "Basic dXNlcjpwdw==");
    }

    #[test]
    fn hop_by_hop_headers_go_and_an_upgrade_keeps_its_own() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret, Upgrade"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("2"));
        assert!(wants_upgrade(&h));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(h.get("x-secret").is_none());
    }

    #[test]
    fn ports_and_targets_are_checked() {
        assert_eq!(parse_port("8000").unwrap(), 8000);
        for bad in ["0", "65536", "-1", "http", ""] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        let uri: Uri = "/v1/sessions/s/ports/80/a/b?x=1&y=2".parse().unwrap();
        assert_eq!(target_uri("a/b", &uri).unwrap(), "/a/b?x=1&y=2");
        assert_eq!(target_uri("", &"/v1/sessions/s/ports/80".parse().unwrap()).unwrap(), "/");
    }
}
