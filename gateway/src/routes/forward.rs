//! One-shot calls in a cluster: a call this node has no VM ready for goes to
//! a better member ([`ember_cluster::placement`]), once, streamed both ways,
//! signed with the cluster's secret so that the member runs it without
//! forwarding it again (one hop at most). A 429 or an unreachable member
//! moves to the second choice once; a failure after the request was sent is
//! never retried (a command has effects): `502 node_lost`. Answers carry
//! `X-Ember-Node`, where the call ran.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use ember_cluster::placement::{self, Here, Placement, Target};
use ember_cluster::Membership;
use ember_pool::pool::Backend;
use hmac::{Hmac, Mac};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use crate::error::ApiError;
use crate::state::AppState;

/// Set on a forwarded request: `<node>;<unix seconds>;<hex HMAC-SHA256>`.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-ember-forwarded-by");
/// Set on an answer: the node the call ran on.
pub const NODE: HeaderName = HeaderName::from_static("x-ember-node");
/// How old a signature may be (clocks of a cluster's hosts agree this well).
const MAX_SKEW: u64 = 30;
/// Connecting to a member; past this it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Forwarding's state: the cluster, a pooled HTTP client, and the calls
/// sent to each member not answered yet.
pub struct Forwarder<B: Backend> {
    pub state: AppState<B>,
    pub member: Arc<Membership>,
    secret: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Body>,
    inflight: DashMap<String, usize>,
    seed: AtomicU64,
}

impl<B: Backend> std::fmt::Debug for Forwarder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").field("node", &self.member.node()).finish_non_exhaustive()
    }
}

impl<B: Backend> Forwarder<B> {
    /// `None` without a secret: unsigned node-to-node requests are never
    /// made (nor taken), so the node runs every call itself.
    pub fn new(state: AppState<B>, member: Arc<Membership>) -> Option<Arc<Self>> {
        let secret = member.config().secret.clone()?;
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(http);
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
        Some(Arc::new(Self {
            state,
            member,
            secret,
            client,
            inflight: DashMap::new(),
            seed: AtomicU64::new(seed),
        }))
    }

    fn sign(&self, path: &str) -> String {
        sign(&self.secret, self.member.node(), unix_now(), path)
    }

    /// Whether `value` is a member's valid signature for `path`.
    pub fn verify(&self, value: &str, path: &str) -> bool {
        verify(&self.secret, value, path, unix_now())
    }

    fn pick(&self, n: usize) -> usize {
        // xorshift: placement's sampling needs no more.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        (x % n.max(1) as u64) as usize
    }

    /// Send `body` with `parts` to `target`; `Err` when it could not be
    /// sent at all (the next member may be tried), else the answer.
    async fn send(
        &self,
        target: &Target,
        parts: &axum::http::request::Parts,
        body: Bytes,
    ) -> Result<Response, String> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("http://{}{path}", target.addr).parse().map_err(|e| format!("{e}"))?;
        let mut req = axum::http::Request::builder().method(parts.method.clone()).uri(uri);
        for (k, v) in &parts.headers {
            if k != header::HOST && k != header::CONNECTION && k != FORWARDED_BY {
                req = req.header(k, v);
            }
        }
        let signed = self.sign(parts.uri.path());
        let req = req
            .header(FORWARDED_BY, HeaderValue::from_str(&signed).map_err(|e| e.to_string())?)
            .body(Body::from(body))
            .map_err(|e| e.to_string())?;
        *self.inflight.entry(target.node.clone()).or_insert(0) += 1;
        let sent = self.client.request(req).await;
        if let Some(mut n) = self.inflight.get_mut(&target.node) {
            *n = n.saturating_sub(1);
        }
        match sent {
            Ok(resp) => Ok(resp.map(Body::new)),
            // Not connected: nothing ran there.
            Err(e) if e.is_connect() => Err(format!("{}: {e}", target.node)),
            Err(e) => Ok(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "node_lost",
                format!(
                    "node {} failed during the call ({e}); it is not retried, as the command may have run",
                    target.node
                ),
            )
            .into_response()),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hmac_of(secret: &str, node: &str, ts: u64, path: &str) -> Option<Hmac<Sha256>> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    m.update(format!("{node}\n{ts}\n{path}").as_bytes());
    Some(m)
}

/// `<node>;<ts>;<hex HMAC-SHA256(secret, node \n ts \n path)>`.
pub fn sign(secret: &str, node: &str, ts: u64, path: &str) -> String {
    let mac = hmac_of(secret, node, ts, path)
        .map(|m| m.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>())
        .unwrap_or_default();
    format!("{node};{ts};{mac}")
}

/// Whether `value` signs `path` with `secret`, made within [`MAX_SKEW`] of `now`.
pub fn verify(secret: &str, value: &str, path: &str, now: u64) -> bool {
    let mut parts = value.split(';');
    let (Some(node), Some(ts), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(ts) = ts.parse::<u64>() else { return false };
    if now.abs_diff(ts) > MAX_SKEW {
        return false;
    }
    let given: Option<Vec<u8>> = (mac.len() % 2 == 0)
        .then(|| (0..mac.len()).step_by(2).map(|i| u8::from_str_radix(mac.get(i..i + 2)?, 16).ok()).collect())
        .flatten();
    // Constant-time, by the hmac crate.
    match (hmac_of(secret, node, ts, path), given) {
        (Some(m), Some(g)) => m.verify_slice(&g).is_ok(),
        _ => false,
    }
}

/// The image a `/v1/run` body or query names (the default when none).
fn image_of(query: Option<&str>, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ImageOnly {
        image: Option<String>,
    }
    let from_query = query.and_then(|q| {
        serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "image")
            .map(|(_, v)| v)
    });
    from_query.or_else(|| serde_json::from_slice::<ImageOnly>(body).ok().and_then(|i| i.image))
}

fn with_node(mut resp: Response, node: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(node) {
        resp.headers_mut().insert(NODE, v);
    }
    resp
}

fn is_session_call(headers: &HeaderMap) -> bool {
    headers.contains_key("x-ember-session")
}

/// The middleware on `/v1/run`: here, or forwarded.
pub async fn one_shot<B: Backend>(State(f): State<Arc<Forwarder<B>>>, req: Request, next: Next) -> Response {
    let me = f.member.node().to_string();
    let forwarded = req.headers().get(FORWARDED_BY).and_then(|v| v.to_str().ok()).map(str::to_string);
    let local = forwarded.is_some_and(|v| f.verify(&v, req.uri().path()))
        || is_session_call(req.headers())
        || f.member.fenced();
    if local {
        return with_node(next.run(req).await, &me);
    }
    let (parts, body) = req.into_parts();
    let limit = f.state.limits.max_body_bytes;
    let body = match http_body_util::BodyExt::collect(http_body_util::Limited::new(body, limit)).await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body exceeds the limit of {limit} bytes"),
            )
            .into_response()
        }
    };
    // A function's calls: its image, and its warm set (the caller's).
    let function = parts.uri.path().strip_prefix("/v1/functions/").map(str::to_string);
    let (image, set) = match &function {
        Some(name) => {
            let image = f.state.functions.get(name).and_then(|func| func.image.clone());
            let caller = parts.extensions.get::<ember_service::Caller>();
            (image, caller.map(|c| c.function_set(name)))
        }
        None => (image_of(parts.uri.query(), &body), None),
    };
    let (here, warm_here) = match f.state.pools.get(image.as_deref()) {
        Ok((_, pool)) => {
            let s = pool.status();
            let used = s.ready + s.booting + s.claimed + s.resetting + s.sessions;
            let warm = set.as_ref().and_then(|k| s.warm_sets.get(k).copied()).unwrap_or(0);
            (Here { ready: s.ready, free: pool.config().max_size.saturating_sub(used) }, warm)
        }
        // An image this node does not serve: its own error, here.
        Err(_) => (Here { ready: 1, free: 0 }, 0),
    };
    let image_name = image.unwrap_or_else(|| f.state.pools.default_name().to_string());
    let view = f.member.view();
    let inflight = |n: &str| f.inflight.get(n).map_or(0, |c| *c);
    let plan = match &set {
        Some(set) => placement::place_function(&view, &me, &image_name, set, here, warm_here, inflight),
        None => placement::place(&view, &me, &image_name, here, inflight, |n| f.pick(n)),
    };
    if let Placement::Forward(targets) = plan {
        for target in &targets {
            match f.send(target, &parts, body.clone()).await {
                // Refused for room there: the second choice, once.
                Ok(resp)
                    if resp.status() == StatusCode::TOO_MANY_REQUESTS
                        && target != targets.last().unwrap_or(target) =>
                {
                    continue
                }
                Ok(resp) => {
                    let node = target.node.clone();
                    let mut resp = resp;
                    if !resp.headers().contains_key(NODE) {
                        resp = with_node(resp, &node);
                    }
                    return resp;
                }
                Err(e) => tracing::warn!(node = %target.node, error = %e, "forwarding failed before sending"),
            }
        }
    }
    with_node(next.run(Request::from_parts(parts, Body::from(body))).await, &me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_path_secret_and_time_only() {
        let s = sign("secret", "n1", 1000, "/v1/run");
        assert!(verify("secret", &s, "/v1/run", 1010));
        assert!(!verify("other", &s, "/v1/run", 1010), "another secret");
        assert!(!verify("secret", &s, "/v1/functions/x", 1010), "another path");
        assert!(!verify("secret", &s, "/v1/run", 1000 + MAX_SKEW + 1), "too old");
        assert!(!verify("secret", &s.replace("n1;", "n2;"), "/v1/run", 1010), "another node");
        for bad in ["", "n1;1000", "n1;x;ab", "n1;1000;zz", "n1;1000;abc", &format!("{s};extra")] {
            assert!(!verify("secret", bad, "/v1/run", 1000), "{bad:?}");
        }
    }

    #[test]
    fn the_image_comes_from_the_query_or_the_body() {
        assert_eq!(image_of(Some("lang=python&image=python-data"), b"print(1)"), Some("python-data".into()));
        assert_eq!(image_of(None, br#"{"cmd": "true", "image": "tiny"}"#), Some("tiny".into()));
        assert_eq!(image_of(None, br#"{"cmd": "true"}"#), None);
        assert_eq!(image_of(Some("lang=sh"), b"not json"), None);
    }
}
