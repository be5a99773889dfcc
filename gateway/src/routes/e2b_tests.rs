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
    (e2b_router(state), key)
}

/// The router with `[e2b]` as shipped, except that `base` names the one
/// image these pools serve (`default`; shipped, it is `base-sudo`).
fn e2b_router<B: Backend>(state: AppState<B>) -> Router
where
    B::Vm: AgentVm,
{
    let mut e2b = ember_e2b::control::E2bConfig::default();
    e2b.templates.insert("base".into(), "default".into());
    let access =
        crate::auth::Access { keys: state.keys.clone(), e2b: Some(Arc::new(e2b)), ..Default::default() };
    router_with(state, access)
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
async fn a_listing_pages_with_x_next_token() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _) = app(dir.path(), false);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, c, _) = call(&app, None, "POST", "/v2/sandboxes", Some(json!({"templateID": "base"}))).await;
        ids.push(c["sandboxID"].as_str().unwrap().to_string());
    }
    let (mut seen, mut token) = (Vec::new(), None::<String>);
    loop {
        let path = match &token {
            None => "/v2/sandboxes?limit=2".to_string(),
            Some(t) => format!("/v2/sandboxes?limit=2&nextToken={t}"),
        };
        let (status, page, headers) = call(&app, None, "GET", &path, None).await;
        assert_eq!(status, 200);
        seen.extend(page.as_array().unwrap().iter().map(|s| s["sandboxID"].as_str().unwrap().to_string()));
        match headers.get("x-next-token") {
            Some(t) => token = Some(t.to_str().unwrap().to_string()),
            None => break,
        }
        assert!(seen.len() < 10, "paging does not end");
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every sandbox once");
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

/// envd's RPCs through Ember's router against the real guest agent over
/// `duplex` (its own processes and system calls, on this host as this
/// user: only harmless commands here), decoded as the SDKs decode them.
mod envd_on_the_real_agent {
    use axum::body::Bytes;
    use base64::Engine as _;
    use ember_e2b::connect::{self, Decoder, Envelope};

    use super::*;

    struct Sandbox {
        app: Router,
        id: String,
        token: String,
        _dir: tempfile::TempDir,
    }

    async fn sandbox() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let agents = FakeAgents { real_agent_in: Some(dir.path().join("vms")), ..FakeAgents::default() };
        let pool = PoolConfig {
            min_size: 1,
            max_size: 2,
            target_free: 1,
            max_host_cpu: None,
            ..PoolConfig::default()
        };
        let pool = Pool::start(agents, pool, 256);
        let state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default());
        let app = e2b_router(state);
        let (status, created, _) =
            call(&app, None, "POST", "/v2/sandboxes", Some(json!({"templateID": "base"}))).await;
        assert_eq!(status, 201, "{created}");
        let id = created["sandboxID"].as_str().unwrap().to_string();
        let token = created["envdAccessToken"].as_str().unwrap().to_string();
        Sandbox { app, id, token, _dir: dir }
    }

    impl Sandbox {
        fn req(&self, path: &str, content_type: &str) -> axum::http::request::Builder {
            Request::post(path)
                .header("e2b-sandbox-id", &self.id)
                .header("e2b-sandbox-port", "49983")
                .header("x-access-token", &self.token)
                .header("content-type", content_type)
        }

        /// A unary RPC: its status and JSON.
        async fn unary(&self, rpc: &str, body: Value) -> (u16, Value) {
            let req =
                self.req(&format!("/{rpc}"), "application/json").body(Body::from(body.to_string())).unwrap();
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }

        /// A server stream: its messages and the end-of-stream's JSON.
        async fn stream(&self, rpc: &str, body: Value, timeout_ms: Option<u64>) -> (Vec<Value>, Value) {
            let mut req = self.req(&format!("/{rpc}"), connect::STREAM_CONTENT_TYPE);
            if let Some(ms) = timeout_ms {
                req = req.header("connect-timeout-ms", ms.to_string());
            }
            let resp = self
                .app
                .clone()
                .oneshot(req.body(Body::from(connect::envelope(&body))).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(
                resp.headers()["content-type"],
                connect::STREAM_CONTENT_TYPE,
                "exactly, no parameters"
            );
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let mut d = Decoder::default();
            d.push(&bytes);
            let (mut messages, mut end) = (Vec::new(), None);
            while let Some(e) = d.next_envelope().unwrap() {
                match e {
                    Envelope::Message(m) => messages.push(serde_json::from_slice(&m).unwrap()),
                    Envelope::End(m) => end = Some(serde_json::from_slice(&m).unwrap()),
                }
            }
            assert_eq!(d.leftover(), 0);
            (messages, end.expect("no end-of-stream frame (the JS SDK needs it)"))
        }
    }

    fn output(events: &[Value], kind: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        events
            .iter()
            .filter_map(|e| e["event"]["data"][kind].as_str())
            .map(|s| String::from_utf8(b64.decode(s).unwrap()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn process_rpcs_stream_start_output_end_and_the_end_of_stream() {
        let sb = sandbox().await;
        let start = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 3"]}});
        let (events, end) = sb.stream("process.Process/Start", start, None).await;
        assert!(
            events[0]["event"]["start"]["pid"].as_u64().is_some_and(|p| p > 0),
            "start first: {events:?}"
        );
        assert_eq!((output(&events, "stdout"), output(&events, "stderr")), ("out\n".into(), "err\n".into()));
        let last = &events.last().unwrap()["event"]["end"];
        assert_eq!(
            (last["exitCode"].as_i64(), last["exited"].as_bool()),
            (Some(3), Some(true)),
            "{events:?}"
        );
        assert_eq!(end, json!({}));

        // A deadline kills it: exit code -1, as envd reports a signal.
        let slow = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 30"]}});
        let t = std::time::Instant::now();
        let (events, _) = sb.stream("process.Process/Start", slow, Some(300)).await;
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(events.last().unwrap()["event"]["end"]["exitCode"], -1, "{events:?}");

        // Background: listed while it runs, reached by Connect, fed stdin.
        let cat = json!({"process": {"cmd": "cat", "args": []}, "stdin": true});
        let app = sb.app.clone();
        let req = sb
            .req("/process.Process/Start", connect::STREAM_CONTENT_TYPE)
            .body(Body::from(connect::envelope(&cat)))
            .unwrap();
        let pending = tokio::spawn(async move {
            app.oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes()
        });
        let pid = loop {
            let (_, list) = sb.unary("process.Process/List", json!({})).await;
            if let Some(p) =
                list["processes"].as_array().and_then(|a| a.iter().find(|p| p["config"]["cmd"] == "cat"))
            {
                break p["pid"].as_u64().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let hi = base64::engine::general_purpose::STANDARD.encode("hi\n");
        assert_eq!(
            sb.unary("process.Process/SendInput", json!({"process": {"pid": pid}, "input": {"stdin": hi}}))
                .await
                .0,
            200
        );
        assert_eq!(sb.unary("process.Process/CloseStdin", json!({"process": {"pid": pid}})).await.0, 200);
        let bytes = pending.await.unwrap();
        assert!(String::from_utf8_lossy(&bytes).contains(&hi), "cat echoed its stdin");
        let (status, v) = sb
            .unary("process.Process/SendSignal", json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}))
            .await;
        assert_eq!((status, v["code"].as_str()), (404, Some("not_found")), "an exited process");
        let (events, end) =
            sb.stream("process.Process/Connect", json!({"process": {"pid": 999_999}}), None).await;
        assert!(events.is_empty());
        assert_eq!(end["error"]["code"], "not_found", "errors travel inside the stream");
    }

    #[tokio::test]
    async fn stream_input_feeds_stdin_as_it_comes() {
        let sb = sandbox().await;
        let cat = json!({"process": {"cmd": "cat", "args": []}, "stdin": true, "tag": "fed"});
        let app = sb.app.clone();
        let req = sb
            .req("/process.Process/Start", connect::STREAM_CONTENT_TYPE)
            .body(Body::from(connect::envelope(&cat)))
            .unwrap();
        let pending = tokio::spawn(async move {
            app.oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes()
        });
        let b64 = base64::engine::general_purpose::STANDARD;
        // The request body arrives in pieces, the start naming the process by its tag.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(tokio_stream_of(rx));
        let app = sb.app.clone();
        let req = sb.req("/process.Process/StreamInput", connect::STREAM_CONTENT_TYPE).body(body).unwrap();
        let answer = tokio::spawn(async move {
            app.oneshot(req).await.unwrap().into_body().collect().await.unwrap().to_bytes()
        });
        loop {
            let (_, list) = sb.unary("process.Process/List", json!({})).await;
            if list["processes"].as_array().is_some_and(|a| a.iter().any(|p| p["tag"] == "fed")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = connect::envelope(&json!({"start": {"process": {"tag": "fed"}}}));
        tx.send(Ok(start)).await.unwrap();
        for piece in ["one ", "two\n"] {
            let m = connect::envelope(&json!({"data": {"input": {"stdin": b64.encode(piece)}}}));
            tx.send(Ok(m)).await.unwrap();
        }
        tx.send(Ok(connect::end_stream(None))).await.unwrap();
        drop(tx);
        let answered = answer.await.unwrap();
        assert!(answered.ends_with(b"\x02\x00\x00\x00\x02{}"), "{answered:?}");
        let (_, list) = sb.unary("process.Process/List", json!({})).await;
        let pid =
            list["processes"].as_array().unwrap().iter().find(|p| p["tag"] == "fed").unwrap()["pid"].clone();
        sb.unary("process.Process/CloseStdin", json!({"process": {"pid": pid}})).await;
        let out = pending.await.unwrap();
        assert!(
            String::from_utf8_lossy(&out).contains(&b64.encode("one two\n"))
                || String::from_utf8_lossy(&out).contains(&b64.encode("one ")),
            "{out:?}"
        );
    }

    fn tokio_stream_of(
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
    }

    #[tokio::test]
    async fn filesystem_rpcs_and_files_on_the_agents_system_calls() {
        let sb = sandbox().await;
        let (status, made) = sb.unary("filesystem.Filesystem/MakeDir", json!({"path": "d/e"})).await;
        assert_eq!((status, made["entry"]["type"].as_str()), (200, Some("FILE_TYPE_DIRECTORY")), "{made}");
        assert_eq!(
            sb.unary("filesystem.Filesystem/MakeDir", json!({"path": "d/e"})).await.1["code"],
            "already_exists"
        );

        let up = sb
            .req("/files?path=d/e/f.txt", "application/octet-stream")
            .body(Body::from("twelve bytes"))
            .unwrap();
        let resp = sb.app.clone().oneshot(up).await.unwrap();
        assert_eq!(resp.status(), 200);
        let written: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(written[0]["name"], "f.txt");

        let (_, stat) = sb.unary("filesystem.Filesystem/Stat", json!({"path": "d/e/f.txt"})).await;
        assert_eq!(
            (stat["entry"]["size"].as_str(), stat["entry"]["type"].as_str()),
            (Some("12"), Some("FILE_TYPE_FILE"))
        );
        let (_, listed) = sb.unary("filesystem.Filesystem/ListDir", json!({"path": "d", "depth": 2})).await;
        let names: Vec<_> =
            listed["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["e", "f.txt"]);
        let (status, moved) = sb
            .unary("filesystem.Filesystem/Move", json!({"source": "d/e/f.txt", "destination": "d/g.txt"}))
            .await;
        assert_eq!((status, moved["entry"]["name"].as_str()), (200, Some("g.txt")));
        let get = Request::get("/files?path=d/g.txt")
            .header("e2b-sandbox-id", &sb.id)
            .header("x-access-token", &sb.token)
            .body(Body::empty())
            .unwrap();
        let resp = sb.app.clone().oneshot(get).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "twelve bytes");
        assert_eq!(sb.unary("filesystem.Filesystem/Remove", json!({"path": "d"})).await.0, 200);
        assert_eq!(
            sb.unary("filesystem.Filesystem/Remove", json!({"path": "d"})).await.0,
            200,
            "missing is fine"
        );
        let (status, v) = sb.unary("filesystem.Filesystem/Stat", json!({"path": "d"})).await;
        assert_eq!((status, v["code"].as_str()), (404, Some("not_found")));
    }

    #[tokio::test]
    async fn the_sandbox_plane_checks_sandbox_token_and_headers() {
        let sb = sandbox().await;
        let get = |id: &str, token: Option<&str>, path: &str| {
            let mut r = Request::get(path).header("e2b-sandbox-id", id);
            if let Some(t) = token {
                r = r.header("x-access-token", t);
            }
            r.body(Body::empty()).unwrap()
        };
        let status = |r: Request<Body>| {
            let app = sb.app.clone();
            async move {
                let resp = app.oneshot(r).await.unwrap();
                let s = resp.status().as_u16();
                (s, resp.into_body().collect().await.unwrap().to_bytes())
            }
        };
        assert_eq!(status(get(&sb.id, None, "/health")).await.0, 204);
        let (s, body) = status(get("nosuchsandbox", Some(&sb.token), "/health")).await;
        assert!(s == 502 && String::from_utf8_lossy(&body).contains("was not found"), "{s}");
        assert_eq!(status(get(&sb.id, Some("wrong"), "/files?path=x")).await.0, 401);
        assert_eq!(status(get(&sb.id, None, "/files?path=x")).await.0, 401);
        assert_eq!(status(get("Not_An_Id", None, "/health")).await.0, 400);
        // A signed URL stands in for the token.
        let sig = ember_e2b::files::signature("x", "read", "", &sb.token, None)
            .replace('+', "%2B")
            .replace('/', "%2F");
        let (s, _) = status(get(&sb.id, None, &format!("/files?path=x&signature={sig}"))).await;
        assert_eq!(s, 404, "signed, and the file is missing");
        // Without any sandbox header (a signed URL on a shared
        // E2B_SANDBOX_URL): the sandbox whose token signed it.
        let bare = |q: &str| Request::get(format!("/files?{q}")).body(Body::empty()).unwrap();
        let (s, _) = status(bare(&format!("path=x&signature={sig}"))).await;
        assert_eq!(s, 404, "found by its signature, and the file is missing");
        let (s, body) = status(bare("path=x&signature=v1_forged")).await;
        assert!(s == 401 && String::from_utf8_lossy(&body).contains("signed"), "{s}");
        // Signed for reading, not writing: no sandbox's token signed a write.
        let (s, _) =
            status(Request::post(format!("/files?path=x&signature={sig}")).body(Body::empty()).unwrap())
                .await;
        assert_eq!(s, 401);
        // Without a signature, `/files` is not the sandbox plane's.
        assert_eq!(status(bare("path=x")).await.0, 404);
    }
}
