//! The E2B control plane through Ember's router with a fake pool: what the
//! SDKs require of each answer (status, fields, E2B's error shape).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use ember_pool::config::PoolConfig;
use ember_pool::pool::Pool;
use ember_service::keys::{self, KeyStore};
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;
use crate::config::Limits;
use crate::functions::Functions;
use crate::testing::FakeAgents;

fn app(dir: &std::path::Path, keyed: bool) -> (Router, Option<String>) {
    let pool = PoolConfig {
        min_size: 1,
        max_size: 4,
        target_free: 1,
        claim_timeout: Duration::from_secs(2),
        max_host_cpu: None,
        session_dir: Some(dir.join("sessions")),
        ..PoolConfig::default()
    };
    let pool = Pool::start(FakeAgents::default(), pool, 256);
    let mut state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default());
    let mut key = None;
    if keyed {
        let path = dir.join("keys.json");
        key = Some(keys::create(&path, "team", false, Default::default()).unwrap());
        state = state.with_keys(Arc::new(KeyStore::open(&path).unwrap()), Default::default());
    }
    (router(state), key)
}

async fn call(
    app: &Router,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value, HeaderMap) {
    let mut req = Request::builder().method(method).uri(path).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let v =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    (parts.status.as_u16(), v, parts.headers)
}

/// An E2B error body: `{"code": <int>, "message": <str>}`, the code the status.
fn e2b_error(status: u16, v: &Value) {
    assert_eq!(v["code"], status, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

#[tokio::test]
async fn a_sandbox_is_created_shown_listed_timed_paused_resumed_and_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path(), false);
    let (status, created, _) = call(
        &app,
        None,
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "timeout": 120, "metadata": {"run": "r1"}, "envVars": {"FOO": "bar"}})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    for field in ["templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"] {
        assert!(created[field].is_string(), "{field} in {created}");
    }
    assert_eq!(created["envdVersion"], "0.5.7");
    let id = created["sandboxID"].as_str().unwrap().to_string();
    assert!(crate::routes::e2b_id_ok(&id), "{id}");

    let (status, d, _) = call(&app, None, "GET", &format!("/sandboxes/{id}"), None).await;
    assert_eq!(status, 200, "{d}");
    for field in ["templateID", "sandboxID", "clientID", "startedAt", "endAt", "envdVersion", "state"] {
        assert!(d[field].is_string(), "{field} in {d}");
    }
    for field in ["cpuCount", "memoryMB", "diskSizeMB"] {
        assert!(d[field].is_number(), "{field} in {d}");
    }
    assert_eq!((d["state"].as_str(), d["metadata"].clone()), (Some("running"), json!({"run": "r1"})));
    let started = humantime::parse_rfc3339(d["startedAt"].as_str().unwrap()).unwrap();
    let end = humantime::parse_rfc3339(d["endAt"].as_str().unwrap()).unwrap();
    let life = end.duration_since(started).unwrap().as_secs();
    assert!((118..=121).contains(&life), "end - start = {life} s");

    // A second sandbox with other metadata; the listing filters by both.
    let (_, other, _) = call(&app, None, "POST", "/sandboxes", Some(json!({"templateID": "base"}))).await;
    let (status, all, _) = call(&app, None, "GET", "/v2/sandboxes", None).await;
    assert_eq!((status, all.as_array().map(Vec::len)), (200, Some(2)));
    let (_, some, _) = call(&app, None, "GET", "/v2/sandboxes?metadata=run%3Dr1&state=running", None).await;
    assert_eq!(
        some.as_array().map(|a| a.iter().map(|s| s["sandboxID"].clone()).collect::<Vec<_>>()),
        Some(vec![json!(id)])
    );

    let (status, _, _) =
        call(&app, None, "POST", &format!("/sandboxes/{id}/timeout"), Some(json!({"timeout": 600}))).await;
    assert_eq!(status, 204);
    let (_, d2, _) = call(&app, None, "GET", &format!("/sandboxes/{id}"), None).await;
    assert!(d2["endAt"].as_str() > d["endAt"].as_str(), "{d2}");

    assert_eq!(call(&app, None, "POST", &format!("/sandboxes/{id}/pause"), Some(json!({}))).await.0, 204);
    let (status, v, _) = call(&app, None, "POST", &format!("/sandboxes/{id}/pause"), Some(json!({}))).await;
    assert_eq!(status, 409);
    e2b_error(409, &v);
    let (_, paused, _) = call(&app, None, "GET", "/v2/sandboxes?state=paused", None).await;
    assert_eq!(paused.as_array().map(Vec::len), Some(1));
    let (status, resumed, _) =
        call(&app, None, "POST", &format!("/v2/sandboxes/{id}/connect"), Some(json!({"timeout": 60}))).await;
    assert_eq!((status, resumed["sandboxID"].as_str()), (201, Some(id.as_str())));
    assert_eq!(resumed["envdAccessToken"], created["envdAccessToken"], "the token survives a pause");
    let (status, _, _) = call(&app, None, "POST", &format!("/sandboxes/{id}/connect"), None).await;
    assert_eq!(status, 200, "connecting a running sandbox");

    let (status, m, _) = call(&app, None, "GET", &format!("/sandboxes/{id}/metrics"), None).await;
    assert_eq!((status, m), (200, json!([])));
    assert_eq!(call(&app, None, "DELETE", &format!("/sandboxes/{id}"), None).await.0, 204);
    for (method, path) in [
        ("DELETE", format!("/sandboxes/{id}")),
        ("GET", format!("/sandboxes/{id}")),
        ("POST", format!("/v2/sandboxes/{id}/connect")),
    ] {
        let (status, v, _) = call(&app, None, method, &path, Some(json!({}))).await;
        assert_eq!(status, 404, "{method} {path}");
        e2b_error(404, &v);
    }
    let other = other["sandboxID"].as_str().unwrap();
    assert_eq!(call(&app, None, "DELETE", &format!("/sandboxes/{other}"), None).await.0, 204);
}

#[tokio::test]
async fn control_plane_errors_are_e2b_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let (app, key) = app(dir.path(), true);
    // No key: 401 as E2B writes it (the SDK raises AuthenticationException).
    let (status, v, headers) =
        call(&app, None, "POST", "/v2/sandboxes", Some(json!({"templateID": "base"}))).await;
    assert_eq!(status, 401);
    e2b_error(401, &v);
    assert!(headers.contains_key("www-authenticate"));
    // Ember's own routes keep Ember's shape.
    let (status, v, _) = call(&app, None, "GET", "/v1/sessions", None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("unauthorized")));
    let k = key.as_deref();
    let (status, v, _) = call(&app, k, "POST", "/v2/sandboxes", Some(json!({"templateID": "no-such"}))).await;
    assert_eq!(status, 404);
    e2b_error(404, &v);
    assert!(v["message"].as_str().unwrap().contains("no-such"));
    let (status, v, _) = call(&app, k, "POST", "/v2/sandboxes", Some(json!({"template": "base"}))).await;
    assert_eq!(status, 400);
    e2b_error(400, &v);
    for path in ["/sandboxes/Bad_Id", "/sandboxes/nosuchsandbox"] {
        let (status, v, _) = call(&app, k, "GET", path, None).await;
        assert_eq!(status, 404, "{path}");
        e2b_error(404, &v);
    }
    let (status, v, _) = call(&app, k, "GET", "/sandboxes/abc/logs", None).await;
    assert_eq!(status, 501);
    e2b_error(501, &v);
    // A tenant's sandbox is its own.
    let (_, created, _) = call(&app, k, "POST", "/v2/sandboxes", Some(json!({"templateID": "base"}))).await;
    let id = created["sandboxID"].as_str().unwrap();
    assert_eq!(call(&app, k, "GET", &format!("/sandboxes/{id}"), None).await.0, 200);
}
