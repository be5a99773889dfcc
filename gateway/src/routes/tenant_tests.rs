//! Keys and tenants through the router with a fake pool: who may call what,
//! every route that names a session answering `404` for another tenant's,
//! and the quotas with their codes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request};
use axum::Router;
use ember_pool::config::PoolConfig;
use ember_pool::pool::Pool;
use ember_service::keys::{self, KeyStore};
use ember_service::quotas::Quotas;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;
use crate::config::Limits;
use crate::functions::Functions;
use crate::testing::FakeAgents;

struct Tenants {
    app: Router,
    _dir: tempfile::TempDir,
    alice: String,
    bob: String,
    root: String,
    /// A key with small quotas.
    tight: String,
}

fn tenants_with(defaults: Quotas) -> Tenants {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    let alice = keys::create(&path, "alice", false, Quotas::default()).unwrap();
    let bob = keys::create(&path, "bob", false, Quotas::default()).unwrap();
    let root = keys::create(&path, "root", true, Quotas::default()).unwrap();
    let tight = Quotas {
        sessions: Some(1),
        paused_sessions: Some(0),
        concurrent_calls: Some(1),
        ..Quotas::default()
    };
    let tight = keys::create(&path, "tight", false, tight).unwrap();
    let pool = PoolConfig {
        min_size: 1,
        max_size: 6,
        target_free: 1,
        claim_timeout: Duration::from_secs(2),
        max_host_cpu: None,
        session_dir: Some(dir.path().join("sessions")),
        ..PoolConfig::default()
    };
    let pool = Pool::start(FakeAgents::default(), pool, 256);
    let state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default())
        .with_keys(Arc::new(KeyStore::open(&path).unwrap()), defaults);
    Tenants { app: router(state), _dir: dir, alice, bob, root, tight }
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
    fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

impl Tenants {
    async fn call(&self, key: Option<&str>, method: &str, path: &str, body: &str) -> Answer {
        let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let resp = self.app.clone().oneshot(req.body(Body::from(body.to_string())).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer { status: parts.status.as_u16(), headers: parts.headers, body }
    }
}

/// A request for every route that names a session, with a body it accepts.
fn session_routes(key: &str) -> Vec<(&'static str, String, &'static str)> {
    ROUTES
        .iter()
        .filter(|(_, p)| p.contains("{key}"))
        .map(|(m, p)| {
            let path = p
                .replace("{key}", key)
                .replace("{pid}", "1")
                .replace("{port}", "8000")
                .replace("{path}", "f.txt");
            let body = match (*m, *p) {
                (_, p) if p.ends_with("/timeout") => r#"{"timeout": "60s"}"#,
                (_, p) if p.ends_with("/network") => r#""none""#,
                ("POST", "/v1/sessions/{key}/processes") => r#"{"cmd": "true"}"#,
                (_, p) if p.ends_with("/signal") => r#"{"signal": "TERM"}"#,
                (_, p) if p.ends_with("/resize") => r#"{"cols": 80, "rows": 24}"#,
                (_, p) if p.ends_with("/stdin") => "x",
                ("PUT", _) => "x",
                _ => "",
            };
            (*m, path, body)
        })
        .collect()
}

#[tokio::test]
async fn without_a_key_a_keyed_server_answers_401_and_health_needs_none() {
    let t = tenants_with(Quotas::default());
    for (m, p) in [("POST", "/v1/run"), ("GET", "/v1/sessions"), ("GET", "/v1/images"), ("GET", "/nowhere")] {
        let a = t.call(None, m, p, "{}").await;
        assert_eq!((a.status, a.code().as_str()), (401, "unauthorized"), "{m} {p}");
        assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"ember\"");
    }
    let a = t.call(Some("ember_not-a-key"), "GET", "/v1/sessions", "").await;
    assert_eq!((a.status, a.code().as_str()), (401, "invalid_key"));
    assert_eq!(t.call(None, "GET", "/healthz", "").await.status, 200);
    assert_ne!(t.call(None, "GET", "/readyz", "").await.status, 401);
    // Admin routes: 403 for a tenant key, 200 for an admin key.
    for p in ["/v1/pool", "/metrics"] {
        let a = t.call(Some(&t.alice), "GET", p, "").await;
        assert_eq!((a.status, a.code().as_str()), (403, "admin_only"), "{p}");
        assert_eq!(t.call(Some(&t.root), "GET", p, "").await.status, 200, "{p}");
    }
    let a = t.call(Some(&t.alice), "POST", "/v1/run", r#"{"cmd": "echo hi"}"#).await;
    assert_eq!((a.status, a.json()["stdout"].as_str()), (200, Some("hi\n")));
    // X-API-Key works as well as a bearer token.
    let req = Request::get("/v1/sessions").header("x-api-key", &t.bob).body(Body::empty()).unwrap();
    assert_eq!(t.app.clone().oneshot(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn another_tenants_session_is_a_404_on_every_route_that_names_one() {
    let t = tenants_with(Quotas::default());
    let opened = t.call(Some(&t.alice), "POST", "/v1/sessions", r#"{"key": "demo"}"#).await;
    assert_eq!(opened.status, 201, "{:?}", opened.json());
    assert_eq!(opened.json()["key"], "demo");
    assert!(opened.json().get("tenant").is_none(), "a tenant is not told its own name");

    for (m, path, body) in session_routes("demo") {
        let a = t.call(Some(&t.bob), m, &path, body).await;
        assert_eq!(a.status, 404, "bob {m} {path}: {}", String::from_utf8_lossy(&a.body));
        assert!(!String::from_utf8_lossy(&a.body).contains("alice"), "{m} {path}");
        // Nor may bob name it qualified.
        let a = t.call(Some(&t.bob), m, &path.replace("/demo", "/alice+demo"), body).await;
        assert_eq!(a.status, 400, "bob {m} {path} qualified");
    }
    // Alice's session is untouched by all that (bob's DELETE was a 404).
    let a = t.call(Some(&t.alice), "GET", "/v1/sessions/demo", "").await;
    assert_eq!((a.status, a.json()["state"].as_str()), (200, Some("running")));

    // Bob lists nothing; his own "demo" is another session.
    assert_eq!(t.call(Some(&t.bob), "GET", "/v1/sessions", "").await.json()["sessions"], json!([]));
    let bobs = t.call(Some(&t.bob), "POST", "/v1/sessions", r#"{"key": "demo"}"#).await;
    assert_eq!(bobs.status, 201);
    assert_ne!(bobs.json()["vm_id"], opened.json()["vm_id"]);
    // A call with the session header runs in the caller's own session.
    let hdr = |key: &str| {
        Request::post("/v1/run")
            .header("authorization", format!("Bearer {key}"))
            .header(SESSION_HEADER, "demo")
            .body(Body::from(r#"{"cmd": "true"}"#))
            .unwrap()
    };
    for (key, session) in [(&t.alice, &opened), (&t.bob, &bobs)] {
        let resp = t.app.clone().oneshot(hdr(key)).await.unwrap();
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["vm_id"], session.json()["vm_id"], "{body}");
    }

    // The admin sees both, with their tenants, and names alice's qualified.
    let all = t.call(Some(&t.root), "GET", "/v1/sessions", "").await.json();
    let mut seen: Vec<(String, String)> = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["tenant"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
        .collect();
    seen.sort();
    assert_eq!(seen, [("alice".into(), "alice+demo".into()), ("bob".into(), "bob+demo".into())]);
    let a = t.call(Some(&t.root), "GET", "/v1/sessions/alice+demo", "").await;
    assert_eq!((a.status, a.json()["tenant"].as_str()), (200, Some("alice")));
    assert_eq!(t.call(Some(&t.root), "GET", "/v1/sessions/demo", "").await.status, 404, "root's own demo");
    assert_eq!(t.call(Some(&t.root), "DELETE", "/v1/sessions/alice+demo", "").await.status, 204);
    assert_eq!(t.call(Some(&t.alice), "GET", "/v1/sessions/demo", "").await.status, 404);
}

#[tokio::test]
async fn quotas_refuse_with_their_code_and_free_when_work_ends() {
    let t = tenants_with(Quotas::default());
    let k = Some(t.tight.as_str());
    assert_eq!(t.call(k, "POST", "/v1/sessions", r#"{"key": "one"}"#).await.status, 201);
    let a = t.call(k, "POST", "/v1/sessions", r#"{"key": "two"}"#).await;
    assert_eq!((a.status, a.code().as_str()), (429, "quota_sessions"));
    assert!(a.headers.contains_key("retry-after"));
    // A first call with a new session header would open one: refused too.
    let req = Request::post("/v1/run")
        .header("authorization", format!("Bearer {}", t.tight))
        .header(SESSION_HEADER, "three")
        .body(Body::from(r#"{"cmd": "true"}"#))
        .unwrap();
    assert_eq!(t.app.clone().oneshot(req).await.unwrap().status(), 429);
    // No paused session allowed.
    let a = t.call(k, "POST", "/v1/sessions/one/pause", "").await;
    assert_eq!((a.status, a.code().as_str()), (429, "quota_paused_sessions"));
    // Other tenants are not limited by it.
    assert_eq!(t.call(Some(&t.alice), "POST", "/v1/sessions", r#"{"key": "two"}"#).await.status, 201);
    // Ending the session frees the place.
    assert_eq!(t.call(k, "DELETE", "/v1/sessions/one", "").await.status, 204);
    assert_eq!(t.call(k, "POST", "/v1/sessions", r#"{"key": "two"}"#).await.status, 201);

    // One call at a time: a second one while the first runs is refused.
    let app = t.app.clone();
    let key = t.tight.clone();
    let long = tokio::spawn(async move {
        let req = Request::post("/v1/run")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(r#"{"cmd": "nap 500"}"#))
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let a = t.call(k, "POST", "/v1/run", r#"{"cmd": "true"}"#).await;
    assert_eq!((a.status, a.code().as_str()), (429, "quota_calls"));
    assert_eq!(long.await.unwrap(), 200);
    assert_eq!(t.call(k, "POST", "/v1/run", r#"{"cmd": "true"}"#).await.status, 200, "freed when it ended");

    // Per-tenant series.
    let m = String::from_utf8(t.call(Some(&t.root), "GET", "/metrics", "").await.body.to_vec()).unwrap();
    for line in [
        r#"ember_quota_refusals_total{tenant="tight",quota="quota_sessions"} 2"#,
        r#"ember_quota_refusals_total{tenant="tight",quota="quota_paused_sessions"} 1"#,
        r#"ember_quota_refusals_total{tenant="tight",quota="quota_calls"} 1"#,
        r#"ember_tenant_sessions{tenant="tight",state="running"} 1"#,
        r#"ember_tenant_sessions{tenant="alice",state="running"} 1"#,
        r#"ember_tenant_requests_total{tenant="tight",status="429"} 4"#,
    ] {
        assert!(m.contains(line), "no {line} in\n{m}");
    }
}

#[tokio::test]
async fn default_quotas_apply_to_keys_that_set_none() {
    let t = tenants_with(Quotas { calls_per_second: Some(1.0), burst: Some(2), ..Quotas::default() });
    let k = Some(t.alice.as_str());
    for _ in 0..2 {
        assert_eq!(t.call(k, "POST", "/v1/run", r#"{"cmd": "true"}"#).await.status, 200);
    }
    let a = t.call(k, "POST", "/v1/run", r#"{"cmd": "true"}"#).await;
    assert_eq!((a.status, a.code().as_str()), (429, "quota_rate"));
    assert_eq!(a.headers["retry-after"], "1");
    // Bob's bucket is his own.
    assert_eq!(t.call(Some(&t.bob), "POST", "/v1/run", r#"{"cmd": "true"}"#).await.status, 200);
}

#[tokio::test]
async fn two_opens_at_once_cannot_both_pass_a_session_quota() {
    let t = tenants_with(Quotas::default());
    let open = |key: &'static str| {
        let app = t.app.clone();
        let auth = format!("Bearer {}", t.tight);
        tokio::spawn(async move {
            let req = Request::post("/v1/sessions")
                .header("authorization", auth)
                .header("content-type", "application/json")
                .body(Body::from(format!(r#"{{"key": "{key}"}}"#)))
                .unwrap();
            app.oneshot(req).await.unwrap().status().as_u16()
        })
    };
    let (a, b) = (open("x"), open("y"));
    let mut got = [a.await.unwrap(), b.await.unwrap()];
    got.sort_unstable();
    assert_eq!(got, [201, 429]);
}

#[tokio::test]
async fn a_long_call_in_one_session_does_not_hold_up_the_tenants_others() {
    let t = tenants_with(Quotas::default());
    let k = Some(t.alice.as_str());
    assert_eq!(t.call(k, "POST", "/v1/sessions", r#"{"key": "busy"}"#).await.status, 201);
    let app = t.app.clone();
    let key = t.alice.clone();
    let long = tokio::spawn(async move {
        let req = Request::post("/v1/run")
            .header("authorization", format!("Bearer {key}"))
            .header(SESSION_HEADER, "busy")
            .body(Body::from(r#"{"cmd": "nap 1500"}"#))
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A second call queued behind it in the same session...
    let app = t.app.clone();
    let key = t.alice.clone();
    let queued = tokio::spawn(async move {
        let req = Request::post("/v1/run")
            .header("authorization", format!("Bearer {key}"))
            .header(SESSION_HEADER, "busy")
            .body(Body::from(r#"{"cmd": "true"}"#))
            .unwrap();
        app.oneshot(req).await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...while another session of the tenant opens at once.
    let started = tokio::time::Instant::now();
    assert_eq!(t.call(k, "POST", "/v1/sessions", r#"{"key": "other"}"#).await.status, 201);
    assert!(started.elapsed() < Duration::from_millis(1000), "waited {:?}", started.elapsed());
    assert_eq!(long.await.unwrap(), 200);
    assert_eq!(queued.await.unwrap(), 200);
}
