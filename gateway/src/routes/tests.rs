//! The router with a fake pool: every error path, the limits at their
//! edges, NDJSON framing, sessions, and clients that go away.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use ember_pool::config::PoolConfig;
use ember_pool::pool::Pool;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use super::*;
use crate::config::Limits;
use crate::functions::Functions;
use crate::testing::FakeAgents;

struct Fixture {
    app: Router,
    agents: FakeAgents,
    state: AppState<FakeAgents>,
}

fn pool_config() -> PoolConfig {
    PoolConfig {
        min_size: 1,
        max_size: 4,
        target_free: 1,
        claim_timeout: Duration::from_millis(200),
        max_host_cpu: None,
        ..PoolConfig::default()
    }
}

fn fixture_with(limits: Limits, pool: PoolConfig, functions: Functions) -> Fixture {
    let agents = FakeAgents::default();
    let pool = Pool::start(agents.clone(), pool, 256);
    let state = AppState::new(crate::pools::Pools::single(pool), limits, functions);
    Fixture { app: router(state.clone()), agents, state }
}

fn fixture() -> Fixture {
    fixture_with(Limits::default(), pool_config(), Functions::default())
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    /// An error answer: its status, and the code from its JSON body.
    fn error(&self) -> (u16, String) {
        let j = self.json();
        let code = j["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {j}")).to_string();
        assert!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        (self.status.as_u16(), code)
    }
}

impl Fixture {
    async fn send(&self, req: Request<Body>) -> Answer {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer { status: parts.status, headers: parts.headers, body }
    }

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        self.send(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Request::get(path).body(Body::empty()).unwrap()).await
    }

    async fn wait_until(&self, what: &str, probe: impl Fn(&ember_pool::pool::PoolStatus) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !probe(&self.state.pools.default_pool().status()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.state.pools.default_pool()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_for(&self, what: &str, probe: impl Fn(&crate::testing::Log) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !probe(&self.agents.log()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.agents.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn a_command_runs_and_answers_with_its_result() {
    let f = fixture();
    let a = f.post_json("/v1/run", json!({"cmd": "echo hi"})).await;
    assert_eq!(a.status, 200);
    let j = a.json();
    assert_eq!(j["stdout"], "hi\n");
    assert_eq!(j["stderr"], "");
    assert_eq!(j["exit_code"], 0);
    assert_eq!(j["signal"], Value::Null);
    assert_eq!(j["timed_out"], false);
    assert!(j["vm_id"].as_str().unwrap().starts_with("fake-"));
    assert_eq!(a.headers[INVOCATION_HEADER].to_str().unwrap(), j["id"].as_str().unwrap());
    assert!(j.get("stdout_base64").is_none());
    // A non-zero exit is still a 200.
    let a = f.post_json("/v1/run", json!({"cmd": "exit 3"})).await;
    assert_eq!((a.status.as_u16(), a.json()["exit_code"].as_i64()), (200, Some(3)));
}

/// `name -> ms` from a `Server-Timing` header.
fn server_timing(headers: &HeaderMap) -> std::collections::BTreeMap<String, f64> {
    let v = headers.get("server-timing").expect("a Server-Timing header").to_str().unwrap();
    crate::api::Timing::parse_header(v)
}

#[tokio::test]
async fn server_timing_splits_the_latency() {
    let f = fixture();
    let t = std::time::Instant::now();
    let a = f.post_json("/v1/run", json!({"cmd": "nap 30"})).await;
    let total = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(a.status, 200);
    let st = server_timing(&a.headers);
    assert_eq!(st.keys().collect::<Vec<_>>(), ["claim", "run", "vm"]);
    assert!(st["run"] >= 30.0, "{st:?}");
    // The agent's own figure, in the body too.
    assert!((st["run"] - a.json()["duration_us"].as_f64().unwrap() / 1000.0).abs() < 0.002, "{st:?}");
    assert!(st["vm"] >= st["run"] && st["claim"] >= 0.0, "{st:?}");
    assert!(st["claim"] + st["vm"] <= total, "{st:?} within {total} ms");
    // Errors and streams carry none: there is nothing to split.
    let a = f.post_json("/v1/run", json!({"cmd": ""})).await;
    assert!(a.status.is_client_error() && !a.headers.contains_key("server-timing"));
}

#[tokio::test]
async fn request_fields_reach_the_agent() {
    let f = fixture();
    let a = f
        .post_json(
            "/v1/run",
            json!({"argv": ["stdin"], "stdin": "in", "env": {"A": "1"}, "cwd": "sub", "timeout": "7s",
                   "files": [{"path": "d/x.txt", "content": "x"}, {"path": "y", "content_base64": "/w==", "mode": 493}]}),
        )
        .await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    let log = f.agents.log();
    let e = log.execs.last().unwrap();
    assert_eq!(e.command, ember_wire::Command::Argv(vec!["stdin".into()]));
    assert_eq!((e.stdin.as_slice(), e.cwd.as_deref(), e.timeout_ms), (&b"in"[..], Some("sub"), 7000));
    assert_eq!(e.env.get("A").map(String::as_str), Some("1"));
    assert_eq!((e.output_limit, e.pids_limit), (Limits::default().max_output_bytes, Some(1024)));
    assert!(e.kill_leftovers);
    assert_eq!(log.files["d/x.txt"], b"x");
    assert_eq!(log.files["y"], [0xff]);
}

#[tokio::test]
async fn code_runs_from_json_or_from_a_raw_body() {
    let f = fixture();
    let a = f.post_json("/v1/run", json!({"lang": "python", "code": "print(1)"})).await;
    assert_eq!(a.status, 200);
    let id = a.json()["id"].as_str().unwrap().to_string();
    assert_eq!(f.agents.log().files[&format!("/tmp/.ember/{id}.py")], b"print(1)");

    let a = f
        .send(
            Request::post("/v1/run?lang=sh&timeout=3s")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from("echo raw"))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200);
    let id = a.json()["id"].as_str().unwrap().to_string();
    let log = f.agents.log();
    assert_eq!(log.files[&format!("/tmp/.ember/{id}.sh")], b"echo raw");
    let e = log.execs.last().unwrap();
    assert_eq!(e.command, ember_wire::Command::Argv(vec!["/bin/sh".into(), format!("/tmp/.ember/{id}.sh")]));
    assert_eq!(e.timeout_ms, 3000);
}

#[tokio::test]
async fn every_bad_request_gets_a_json_error_with_the_right_status() {
    let f = fixture();
    let raw = |path: &str, ct: Option<&str>, body: &'static [u8]| {
        let mut b = Request::post(path);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Body::from(body)).unwrap()
    };
    let cases: Vec<(Request<Body>, u16, &str)> = vec![
        (raw("/v1/run", Some("application/json"), b"{\"cmd\": "), 400, "invalid_json"),
        (raw("/v1/run", Some("application/json"), b"[1]"), 400, "invalid_request"),
        (raw("/v1/run", Some("application/json"), b"{\"cmd\":\"x\",\"nope\":1}"), 400, "invalid_request"),
        (
            raw("/v1/run", Some("application/json"), b"{\"cmd\":\"x\",\"timeout\":\"6m\"}"),
            400,
            "invalid_request",
        ),
        (raw("/v1/run", Some("text/plain"), b"echo hi"), 415, "unsupported_media_type"),
        (raw("/v1/run?lang=ruby", None, b"puts 1"), 400, "bad_request"),
        (raw("/v1/run?lang=sh&bogus=1", None, b"true"), 400, "bad_request"),
        (raw("/v1/run?timeout=1s", None, b"{\"cmd\":\"x\"}"), 400, "bad_request"),
        (raw("/v1/run?lang=python", None, b"\xff\xfe"), 400, "bad_request"),
        (raw("/v1/nothing", None, b""), 404, "not_found"),
        (Request::get("/v1/run").body(Body::empty()).unwrap(), 405, "method_not_allowed"),
        (Request::delete("/v1/sessions").body(Body::empty()).unwrap(), 405, "method_not_allowed"),
        (raw("/v1/functions/nope", None, b""), 404, "not_found"),
        (
            Request::post("/v1/run").header("x-ember-session", "bad key").body(Body::from("{}")).unwrap(),
            400,
            "invalid_request",
        ),
        (raw("/v1/run", Some("application/json"), b"{\"argv\":[\"missing\"]}"), 422, "spawn_failed"),
        (
            raw(
                "/v1/run",
                Some("application/json"),
                b"{\"cmd\":\"x\",\"files\":[{\"path\":\"refused\",\"content\":\"\"}]}",
            ),
            400,
            "invalid_request",
        ),
    ];
    for (req, status, code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let a = f.send(req).await;
        assert_eq!(a.error(), (status, code.to_string()), "{what}");
        assert_eq!(a.headers["content-type"], "application/json", "{what}");
    }
    // None of that kept a VM: refused requests give theirs back to be reset.
    f.wait_until("no VM claimed", |s| s.claimed == 0 && s.resetting == 0).await;
}

#[tokio::test]
async fn body_limit_is_exact() {
    let limits = Limits { max_body_bytes: 64, ..Limits::default() };
    let f = fixture_with(limits, pool_config(), Functions::default());
    let body_of = |len: usize| {
        let cmd = "x".repeat(len - r#"{"cmd":""}"#.len());
        json!({ "cmd": cmd })
    };
    assert_eq!(body_of(64).to_string().len(), 64);
    assert_eq!(f.post_json("/v1/run", body_of(64)).await.status, 200);
    assert_eq!(f.post_json("/v1/run", body_of(65)).await.error(), (413, "body_too_large".into()));
    // Without a content-length (chunked), the limit still holds.
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 65]))]);
    let req = Request::post("/v1/run?lang=sh").body(Body::from_stream(stream)).unwrap();
    assert_eq!(f.send(req).await.error(), (413, "body_too_large".into()));
}

#[tokio::test]
async fn output_limit_is_exact_and_non_utf8_output_survives() {
    let limits = Limits { max_output_bytes: 5000, ..Limits::default() };
    let f = fixture_with(limits, pool_config(), Functions::default());
    // `flood N` prints N bytes and "done\n" on stderr: one budget for both.
    let j = f.post_json("/v1/run", json!({"cmd": "flood 4995"})).await.json();
    assert_eq!((j["stdout"].as_str().unwrap().len(), &j["truncated"]), (4995, &json!(false)));
    assert_eq!(j["stderr"], "done\n");
    let j = f.post_json("/v1/run", json!({"cmd": "flood 4996"})).await.json();
    assert_eq!((j["stdout"].as_str().unwrap().len(), &j["truncated"]), (4996, &json!(true)));
    assert_eq!(j["stderr"], "done");

    let j = f.post_json("/v1/run", json!({"cmd": "binary"})).await.json();
    let raw = base64::engine::general_purpose::STANDARD.decode(j["stdout_base64"].as_str().unwrap()).unwrap();
    assert_eq!(raw, (0..=255).collect::<Vec<u8>>());
    assert!(j["stdout"].as_str().unwrap().contains('\u{fffd}'));
}

#[tokio::test]
async fn the_host_enforces_the_output_limit_when_the_guest_does_not() {
    let limits = Limits { max_output_bytes: 5000, ..Limits::default() };
    let f = fixture_with(limits, pool_config(), Functions::default());
    // A little past the limit: cut to it on the host, marked truncated.
    let j = f.post_json("/v1/run", json!({"cmd": "hostile-flood 6000"})).await.json();
    assert_eq!((j["stdout"].as_str().unwrap().len(), &j["truncated"]), (5000, &json!(true)));
    // Far past it: the call fails and the VM that sent it is destroyed.
    let alive = f.agents.log().alive;
    let r = f.post_json("/v1/run", json!({"cmd": "hostile-flood 50000000"})).await;
    assert_eq!(r.error().0, 502, "{:?}", r.json());
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("past the request's limit"),
        "{:?}",
        r.json()
    );
    for _ in 0..100 {
        if f.agents.log().alive < alive || f.state.pools.default_pool().status().counters.destroyed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(f.state.pools.default_pool().status().counters.destroyed >= 1, "the VM was destroyed");
}

#[tokio::test]
async fn a_user_timeout_is_a_200_with_timed_out() {
    let f = fixture();
    let a = f.post_json("/v1/run", json!({"cmd": "sleep", "timeout": "50ms"})).await;
    assert_eq!(a.status, 200);
    assert_eq!((a.json()["timed_out"].as_bool(), a.json()["signal"].as_i64()), (Some(true), Some(9)));
}

fn ndjson_lines(body: &[u8]) -> Vec<Value> {
    assert!(body.ends_with(b"\n"), "NDJSON ends with a newline");
    body.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

#[tokio::test]
async fn ndjson_streams_chunks_then_the_exit() {
    let f = fixture();
    let req = Request::post("/v1/run")
        .header("content-type", "application/json")
        .header("accept", "application/x-ndjson")
        .body(Body::from(json!({"cmd": "flood 2500"}).to_string()))
        .unwrap();
    let a = f.send(req).await;
    assert_eq!((a.status.as_u16(), a.headers["content-type"].to_str().unwrap()), (200, NDJSON));
    let lines = ndjson_lines(&a.body);
    assert_eq!(lines[0]["type"], "started");
    assert_eq!(lines[0]["id"].as_str(), a.headers[INVOCATION_HEADER].to_str().ok());
    let stdout: usize =
        lines.iter().filter(|l| l["type"] == "stdout").map(|l| l["data"].as_str().unwrap().len()).sum();
    assert_eq!(stdout, 2500);
    assert!(lines.iter().filter(|l| l["type"] == "stdout").count() >= 3, "chunks arrive as produced");
    assert_eq!(lines[lines.len() - 2], json!({"type": "stderr", "data": "done\n"}));
    assert_eq!(lines.last().unwrap()["type"], "exit");
    assert_eq!(lines.last().unwrap()["exit_code"], 0);

    // Errors before the start are plain JSON errors; after it, a last line.
    let req = Request::post("/v1/run")
        .header("accept", "application/x-ndjson")
        .body(Body::from(json!({"cmd": "crash"}).to_string()))
        .unwrap();
    let lines = ndjson_lines(&f.send(req).await.body);
    assert_eq!(lines.last().unwrap()["type"], "error");
    assert_eq!(lines.last().unwrap()["error"]["code"], "vm_failed");
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_command_and_the_vm_is_reset() {
    let f = fixture();
    // Streaming: read the first line, then drop the body.
    let req = Request::post("/v1/run")
        .header("accept", "application/x-ndjson")
        .body(Body::from(json!({"cmd": "sleep", "timeout": "60s"}).to_string()))
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"{\"type\":\"started\""));
    drop(body);
    f.wait_for("cancel and reset", |l| l.cancels == 1 && l.resets == 1).await;

    // Plain JSON: the request future is dropped mid-command.
    let app = f.app.clone();
    let call = tokio::spawn(async move {
        let req = Request::post("/v1/run").body(Body::from(json!({"cmd": "sleep"}).to_string())).unwrap();
        app.oneshot(req).await
    });
    f.wait_for("the second command", |l| l.execs.len() == 2).await;
    call.abort();
    f.wait_for("cancel and reset", |l| l.cancels == 2 && l.resets == 2).await;
    assert_eq!(f.state.permits.available_permits(), Limits::default().max_concurrent_requests);
}

#[tokio::test]
async fn a_broken_vm_is_a_502_and_is_replaced() {
    let f = fixture();
    let a = f.post_json("/v1/run", json!({"cmd": "crash"})).await;
    assert_eq!(a.error(), (502, "vm_failed".into()));
    f.wait_until("the broken VM destroyed", |s| s.counters.destroyed == 1).await;
    assert_eq!(f.agents.log().resets, 0, "a broken VM is never reset for reuse");
    assert_eq!(f.post_json("/v1/run", json!({"cmd": "echo ok"})).await.status, 200);
}

#[tokio::test]
async fn concurrency_limit_answers_429_at_its_edge() {
    let limits = Limits { max_concurrent_requests: 2, ..Limits::default() };
    let f = fixture_with(limits, pool_config(), Functions::default());
    let mut held = Vec::new();
    for _ in 0..2 {
        let app = f.app.clone();
        held.push(tokio::spawn(async move {
            let req = Request::post("/v1/run").body(Body::from(json!({"cmd": "sleep"}).to_string())).unwrap();
            app.oneshot(req).await
        }));
    }
    f.wait_for("two running", |l| l.execs.len() == 2).await;
    let a = f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    assert_eq!(a.error(), (429, "too_many_requests".into()));
    assert_eq!(a.headers["retry-after"], "1");
    for h in held {
        h.abort();
    }
    f.wait_for("both cancelled", |l| l.cancels == 2).await;
    assert_eq!(f.post_json("/v1/run", json!({"cmd": "echo x"})).await.status, 200);
}

#[tokio::test]
async fn a_full_pool_answers_429_with_retry_after() {
    let pool = PoolConfig { min_size: 1, max_size: 1, max_waiters: 0, ..pool_config() };
    let f = fixture_with(Limits::default(), pool, Functions::default());
    f.wait_until("the VM ready", |s| s.ready == 1).await;
    let app = f.app.clone();
    let busy = tokio::spawn(async move {
        let req = Request::post("/v1/run").body(Body::from(json!({"cmd": "sleep"}).to_string())).unwrap();
        app.oneshot(req).await
    });
    f.wait_for("the pool's one VM busy", |l| l.execs.len() == 1).await;
    let a = f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    assert_eq!(a.error(), (429, "pool_exhausted".into()));
    assert!(a.headers.contains_key("retry-after"));
    busy.abort();
}

/// Admission by capacity: with one VM busy for ~1 s a cycle and one call
/// queued for it, a call that would queue past `max_queue_wait` is a 429 at
/// once, with the expected wait as Retry-After. (The queued one, with nobody
/// ahead of it, is not refused.)
#[tokio::test]
async fn a_call_that_would_wait_too_long_is_refused_at_once_with_the_expected_wait() {
    let pool = PoolConfig {
        min_size: 1,
        max_size: 1,
        claim_timeout: Duration::from_secs(30),
        max_queue_wait: Some(Duration::from_millis(500)),
        ..pool_config()
    };
    let f = fixture_with(Limits::default(), pool, Functions::default());
    f.wait_until("the VM ready", |s| s.ready == 1).await;
    let call = |cmd: &'static str| {
        let app = f.app.clone();
        tokio::spawn(async move {
            let req = Request::post("/v1/run").body(Body::from(json!({"cmd": cmd}).to_string())).unwrap();
            app.oneshot(req).await
        })
    };
    let busy = call("nap 60000");
    f.wait_for("the pool's one VM busy", |l| l.execs.len() == 1).await;
    let first_in_line = call("echo first");
    f.wait_until("one call queued", |s| s.waiters == 1).await;
    let asked = tokio::time::Instant::now();
    let a = f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(450), "answered before max_queue_wait: {took:?}");
    assert!(took >= Limits::default().busy_delay, "after busy_delay: {took:?}");
    assert_eq!(a.error(), (429, "pool_exhausted".into()));
    assert!(
        a.json()["error"]["message"].as_str().unwrap().contains("past limits.max_queue_wait (0.5s)"),
        "{}",
        a.json()
    );
    assert_eq!(a.headers["retry-after"], "2");
    let pool = f.get("/v1/pool").await.json();
    assert_eq!(pool["counters"]["refused_by_capacity"], 1, "{pool}");
    assert_eq!(pool["waiters"], 1, "the first in line still waits: {pool}");
    first_in_line.abort();
    busy.abort();
}

#[tokio::test]
async fn sessions_pin_one_vm_per_key_and_end_on_delete() {
    let pool = PoolConfig { max_sessions: 2, ..pool_config() };
    let f = fixture_with(Limits::default(), pool, Functions::default());
    let call = |key: &str, cmd: &str| {
        Request::post("/v1/run")
            .header("x-ember-session", key)
            .body(Body::from(json!({ "cmd": cmd }).to_string()))
            .unwrap()
    };
    let a1 = f.send(call("alice", "echo 1")).await.json();
    let a2 = f.send(call("alice", "echo 2")).await.json();
    let b1 = f.send(call("bob", "echo 3")).await.json();
    assert_eq!(a1["vm_id"], a2["vm_id"]);
    assert_ne!(a1["vm_id"], b1["vm_id"]);
    assert_eq!(a1["session"], "alice");
    assert!(!f.agents.log().execs.last().unwrap().kill_leftovers, "session processes persist");
    // The limit, at its edge.
    let a = f.send(call("carol", "echo 4")).await;
    assert_eq!(a.error(), (429, "session_limit".into()));

    let list = f.get("/v1/sessions").await.json();
    let keys: Vec<&str> =
        list["sessions"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["alice", "bob"]);
    let del = |key: &str| Request::delete(format!("/v1/sessions/{key}")).body(Body::empty()).unwrap();
    assert_eq!(f.send(del("alice")).await.status, 204);
    assert_eq!(f.send(del("alice")).await.error(), (404, "not_found".into()));
    let again = f.send(call("alice", "echo 5")).await.json();
    assert_ne!(again["vm_id"], a1["vm_id"], "a new session gets a new VM");
}

#[tokio::test]
async fn session_create_false_refuses_a_session_that_does_not_exist() {
    let f = fixture();
    let call = |key: &str, create: &str| {
        Request::post("/v1/run")
            .header("x-ember-session", key)
            .header("x-ember-session-create", create)
            .body(Body::from(json!({ "cmd": "echo hi" }).to_string()))
            .unwrap()
    };
    let a = f.send(call("ghost", "false")).await;
    assert_eq!(a.error(), (404, "not_found".into()));
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("ended"), "{}", a.json());
    assert!(f.get("/v1/sessions").await.json()["sessions"].as_array().unwrap().is_empty(), "nothing opened");
    assert_eq!(f.send(call("ghost", "maybe")).await.error(), (400, "invalid_request".into()));
    // Opened (explicitly or by a first call), the session is found.
    assert_eq!(f.send(call("ghost", "TRUE")).await.status, 200);
    assert_eq!(f.send(call("ghost", "false")).await.status, 200);
    let del = Request::delete("/v1/sessions/ghost").body(Body::empty()).unwrap();
    assert_eq!(f.send(del).await.status, 204);
    assert_eq!(f.send(call("ghost", "false")).await.error(), (404, "not_found".into()));
}

#[tokio::test]
async fn draining_refuses_new_work_with_503() {
    let f = fixture();
    assert_eq!(f.get("/healthz").await.status, 200);
    f.state.start_draining();
    let a = f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    assert_eq!(a.error(), (503, "draining".into()));
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(f.get("/healthz").await.status, 503);
}

/// Liveness and readiness apart: `/healthz` is 200 from the start, while
/// `/readyz` is 503 (saying what it waits for) until every image's pool has
/// held its `min_size` ready VMs once, and stays 200 after even while calls
/// use them; both are 503 while draining.
#[tokio::test]
async fn readyz_waits_for_the_warm_pool_and_healthz_does_not() {
    let agents = FakeAgents { create_delay: Duration::from_millis(300), ..FakeAgents::default() };
    let pool = Pool::start(agents.clone(), PoolConfig { min_size: 2, target_free: 0, ..pool_config() }, 256);
    let other = FakeAgents { prefix: "data-", ..agents.clone() };
    let data = Pool::start(other, PoolConfig { min_size: 0, ..pool_config() }, 256);
    let pools = crate::pools::Pools::new(
        [("default".to_string(), pool), ("python-data".to_string(), data)].into(),
        "default",
    )
    .unwrap();
    let state = AppState::new(pools, Limits::default(), Functions::default());
    let f = Fixture { app: router(state.clone()), agents, state };

    assert_eq!(f.get("/healthz").await.status, 200);
    let r = f.get("/readyz").await;
    assert_eq!(r.status, 503);
    let j = r.json();
    assert_eq!(j["status"], "warming", "{j}");
    assert_eq!(
        j["waiting_for"].as_array().unwrap().len(),
        1,
        "an image with min_size 0 is ready at once: {j}"
    );
    assert_eq!(j["waiting_for"][0]["image"], "default");
    assert_eq!(j["waiting_for"][0]["min_size"], 2);
    assert!(j["message"].as_str().unwrap().starts_with("image default: "), "{j}");

    f.wait_until("two ready", |s| s.ready == 2).await;
    let r = f.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(r.json()["status"], "ready");
    // A call that takes a warm VM does not make the server unready.
    let a = f.post_json("/v1/run", json!({"cmd": "echo x"})).await.json();
    assert_eq!(a["warm"], true, "{a}");
    assert_eq!(f.get("/readyz").await.status, 200);

    f.state.start_draining();
    let r = f.get("/readyz").await;
    assert_eq!((r.status.as_u16(), r.json()["status"].clone()), (503, json!("draining")));
}

#[tokio::test]
async fn metrics_count_requests_and_show_the_pool() {
    let f = fixture();
    f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    f.post_json("/v1/run", json!({"cmd": 1})).await;
    f.get("/nowhere").await;
    let m = f.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for needle in [
        r#"ember_http_requests_total{route="/v1/run",method="POST",status="200"} 1"#,
        r#"ember_http_requests_total{route="/v1/run",method="POST",status="400"} 1"#,
        r#"ember_http_requests_total{route="unmatched",method="GET",status="404"} 1"#,
        r#"ember_invocations_total{outcome="exited"} 1"#,
        r#"ember_claim_seconds_count{image="default"} 1"#,
        r#"ember_exec_seconds_bucket{le="#,
        r#"ember_pool_vms{image="default",state="ready"}"#,
        r#"ember_warm_hits_total{image="default"}"#,
        r#"ember_warm_misses_total{image="default"}"#,
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let pool = f.get("/v1/pool").await.json();
    assert!(
        pool["vms"]["ready"].is_u64() && pool["target"].is_u64() && pool["rates"]["short_per_sec"].is_f64()
    );
}

/// Two images, as `ember serve` runs them: one pool each under one budget.
fn two_images() -> (Fixture, FakeAgents) {
    let agents = FakeAgents::default();
    let data = FakeAgents { prefix: "data-", ..FakeAgents::default() };
    let budget = std::sync::Arc::new(ember_pool::pool::MemoryBudget::new(4096));
    let a = Pool::start_sharing(agents.clone(), pool_config(), 256, std::sync::Arc::clone(&budget));
    let b = Pool::start_sharing(data.clone(), PoolConfig { min_size: 0, ..pool_config() }, 512, budget);
    let by_name =
        std::collections::BTreeMap::from([("default".to_string(), a), ("python-data".to_string(), b)]);
    let pools = crate::pools::Pools::new(by_name, "default").unwrap();
    let state = AppState::new(pools, Limits::default(), Functions::default());
    (Fixture { app: router(state.clone()), agents, state }, data)
}

#[tokio::test]
async fn each_call_runs_in_the_image_it_names_and_an_unknown_one_is_a_400_naming_the_known() {
    let (f, data) = two_images();
    let r = f.post_json("/v1/run", json!({"cmd": "echo hi", "image": "python-data"})).await.json();
    assert_eq!((r["image"].as_str(), r["stdout"].as_str()), (Some("python-data"), Some("hi\n")));
    assert!(r["vm_id"].as_str().unwrap().starts_with("data-fake-"), "{r}");
    assert_eq!(data.log().execs.len(), 1);
    let r = f.post_json("/v1/run", json!({"cmd": "echo hi"})).await.json();
    assert_eq!(r["image"], "default");
    assert!(r["vm_id"].as_str().unwrap().starts_with("fake-"), "{r}");

    let a = f.post_json("/v1/run", json!({"cmd": "echo hi", "image": "nope"})).await;
    assert_eq!(a.error(), (400, "unknown_image".into()));
    let msg = a.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("\"nope\"") && msg.contains("default, python-data"), "{msg}");
    let a = f.post_json("/v1/run", json!({"cmd": "echo hi", "image": ""})).await;
    assert_eq!(a.error(), (400, "invalid_request".into()));

    // The raw-body form takes ?image= beside ?lang=, and only there.
    let raw = |q: &str| Request::post(format!("/v1/run?{q}")).body(Body::from("echo raw")).unwrap();
    let r = f.send(raw("lang=sh&image=python-data")).await.json();
    assert_eq!(r["image"], "python-data");
    assert_eq!(f.send(raw("lang=sh&image=nope")).await.error(), (400, "unknown_image".into()));
    let a = f
        .send(
            Request::post("/v1/run?image=python-data")
                .header("content-type", "application/json")
                .body(Body::from(json!({"cmd": "echo x"}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.error(), (400, "bad_request".into()));

    // NDJSON says the image in its first line.
    let lines = f
        .send(
            Request::post("/v1/run")
                .header("accept", "application/x-ndjson")
                .header("content-type", "application/json")
                .body(Body::from(json!({"cmd": "echo s", "image": "python-data"}).to_string()))
                .unwrap(),
        )
        .await;
    let first: Value = serde_json::from_slice(lines.body.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!((first["type"].as_str(), first["image"].as_str()), (Some("started"), Some("python-data")));
}

#[tokio::test]
async fn a_session_stays_on_the_image_of_its_first_call() {
    let (f, _data) = two_images();
    let call = |body: Value| {
        Request::post("/v1/run")
            .header("content-type", "application/json")
            .header("x-ember-session", "s1")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let first = f.send(call(json!({"cmd": "echo a", "image": "python-data"}))).await.json();
    assert_eq!(first["image"], "python-data");
    let again = f.send(call(json!({"cmd": "echo b"}))).await.json();
    assert_eq!(
        (again["image"].clone(), again["vm_id"].clone()),
        (first["image"].clone(), first["vm_id"].clone())
    );
    let other = f.send(call(json!({"cmd": "echo c", "image": "default"}))).await;
    assert_eq!(other.error(), (409, "session_image".into()));
    let list = f.get("/v1/sessions").await.json();
    assert_eq!(list["sessions"][0]["image"], "python-data", "{list}");
    let gone = f.send(Request::delete("/v1/sessions/s1").body(Body::empty()).unwrap()).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let now_default = f.send(call(json!({"cmd": "echo d"}))).await.json();
    assert_eq!(now_default["image"], "default");
}

#[tokio::test]
async fn images_and_metrics_show_every_image_and_its_pool() {
    let (f, _data) = two_images();
    f.post_json("/v1/run", json!({"cmd": "echo x", "image": "python-data"})).await;
    let list = f.get("/v1/images").await.json();
    assert_eq!(list["default"], "default");
    let names: Vec<&str> =
        list["images"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "python-data"]);
    let data = &list["images"][1];
    assert_eq!((data["memory_mb"].as_u64(), data["pool"]["min_size"].as_u64()), (Some(512), Some(0)));
    assert_eq!(list["images"][0]["default"], true);
    let pool = f.get("/v1/pool").await.json();
    assert_eq!(pool["image"], "default");
    assert!(pool["images"]["python-data"]["vms"]["ready"].is_u64(), "{pool}");
    assert_eq!(pool["memory"]["max_mb"], 4096);
    let text = String::from_utf8(f.get("/metrics").await.body.to_vec()).unwrap();
    for needle in [
        r#"ember_claim_seconds_count{image="python-data"} 1"#,
        r#"ember_pool_vms{image="python-data",state="ready"}"#,
        r#"ember_pool_vms{image="default",state="ready"}"#,
        r#"ember_warm_hits_total{image="python-data"}"#,
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[tokio::test]
async fn functions_are_listed_and_run_with_the_body_as_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("shout");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("function.toml"),
        "description = \"d\"\nlang = \"sh\"\nentry = \"main.sh\"\ntimeout = \"9s\"",
    )
    .unwrap();
    std::fs::write(d.join("main.sh"), "tr a-z A-Z").unwrap();
    let fns = Functions::load(dir.path(), Duration::from_secs(60)).unwrap();
    let f = fixture_with(Limits::default(), pool_config(), fns);
    let list = f.get("/v1/functions").await.json();
    assert_eq!(list["functions"][0]["name"], "shout");
    assert_eq!(list["functions"][0]["timeout_ms"], 9000);
    let a = f.send(Request::post("/v1/functions/shout").body(Body::from("hey")).unwrap()).await;
    assert_eq!(a.status, 200);
    {
        let log = f.agents.log();
        let e = log.execs.last().unwrap();
        assert_eq!((e.stdin.as_slice(), e.timeout_ms), (&b"hey"[..], 9000));
        assert_eq!(log.files["main.sh"], b"tr a-z A-Z");
    }
    // A function's VM is scrubbed back into its warm set, not fully reset;
    // a general call's VM gets the full reset.
    f.wait_for("scrub", |l| l.scrubs == 1 && l.resets == 0).await;
    let pool = f.get("/v1/pool").await.json();
    assert_eq!(pool["warm_sets"]["shout"], 1, "{pool}");
    assert_eq!(f.post_json("/v1/run", json!({"cmd": "echo hi"})).await.status, 200);
    f.wait_for("reset", |l| l.resets == 1).await;
}

/// Every route in `openapi.yaml` exists with its methods, and no route is
/// undocumented.
#[tokio::test]
async fn openapi_describes_exactly_the_routes() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap().to_uppercase();
            if !matches!(method.as_str(), "PARAMETERS" | "DESCRIPTION" | "SUMMARY") {
                documented.push((method, path.as_str().unwrap().to_string()));
            }
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> =
        ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    routes.sort();
    assert_eq!(documented, routes);
    let f = fixture();
    for (method, path) in routes {
        let concrete = path
            .replace("{key}", "k")
            .replace("{name}", "n")
            .replace("{path}", "p")
            .replace("{pid}", "1")
            .replace("{port}", "8000");
        let req = Request::builder().method(method.as_str()).uri(&concrete).body(Body::from("{}")).unwrap();
        let a = f.send(req).await;
        assert_ne!(a.status, 405, "{method} {path}");
        if a.status == 404 {
            // A documented route may say "no such session/function", never "no route".
            assert!(
                !a.json()["error"]["message"].as_str().unwrap().starts_with("no route"),
                "{method} {path}"
            );
        }
    }
}

#[tokio::test]
async fn a_network_is_refused_while_networking_is_off_and_bad_policies_name_their_entry() {
    let f = fixture();
    let a = f.post_json("/v1/run", json!({"cmd": "echo x", "network": "open"})).await;
    assert_eq!(a.error(), (400, "network_disabled".into()));
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("[network] enabled = false"));
    // "none" asks for nothing: fine whatever the server.
    let r = f.post_json("/v1/run", json!({"cmd": "echo x", "network": "none"})).await;
    assert_eq!(r.status, 200);
    for (policy, needle) in [
        (json!({"egress": {"allow": ["203.0.113.0/33"]}}), "203.0.113.0/33"),
        (json!({"egress": {"allow": ["203.0.113.10:0"]}}), "port 0"),
        (json!({"egress": {"deny": [""]}}), "empty"),
        (json!("sometimes"), "\"sometimes\""),
    ] {
        let a = f.post_json("/v1/run", json!({"cmd": "true", "network": policy})).await;
        assert_eq!(a.error().0, 400);
        let m = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(needle), "{policy}: {m}");
    }
    let many: Vec<String> = (0..65).map(|i| format!("203.0.113.{i}")).collect();
    let a = f.post_json("/v1/run", json!({"cmd": "true", "network": {"egress": {"allow": many}}})).await;
    assert!(a.json()["error"]["message"].as_str().unwrap().contains("max_network_rules (64)"));
}

/// With networking on, a call's VM is connected after its claim, and
/// disconnected before it is reset; a session keeps its network and can
/// change it.
#[tokio::test]
async fn a_call_gets_its_network_after_the_claim_and_loses_it_before_the_reset() {
    let agents = FakeAgents::default();
    let pool = Pool::start(agents.clone(), pool_config(), 256);
    let state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default())
        .with_network(true);
    let f = Fixture { app: router(state.clone()), agents, state };
    let a = f
        .post_json(
            "/v1/run",
            json!({"cmd": "echo x", "network": {"egress": {"allow": ["203.0.113.10:8080"]}}}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert!(server_timing(&a.headers).contains_key("net"), "{:?}", a.headers);
    let vm = a.json()["vm_id"].as_str().unwrap().to_string();
    f.wait_until("the VM is back", |s| s.claimed == 0 && s.resetting == 0).await;
    {
        let log = f.agents.log();
        assert_eq!(log.connects.len(), 1);
        assert_eq!(log.connects[0].0, vm);
        assert_eq!(log.disconnects, std::slice::from_ref(&vm), "disconnected before its reset");
    }
    // No network asked: nothing connected, nothing to take away.
    f.post_json("/v1/run", json!({"cmd": "echo x"})).await;
    assert_eq!(f.agents.log().connects.len(), 1);

    // A session: open, then changed live, then `none`.
    let call = |body: Value| {
        Request::post("/v1/run")
            .header("content-type", "application/json")
            .header("x-ember-session", "net-s")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    assert_eq!(f.send(call(json!({"cmd": "echo a", "network": "open"}))).await.status, 200);
    let put = |body: &str| {
        Request::put("/v1/sessions/net-s/network")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let r = f.send(put(r#"{"egress": {"allow": ["allowed.test"]}}"#)).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(f.send(put(r#""none""#)).await.status, 200);
    let policies: Vec<ember_net::Policy> =
        f.agents.log().connects.iter().skip(1).map(|c| c.1.clone()).collect();
    assert_eq!(policies.len(), 3);
    assert_eq!(policies[0], ember_net::Policy::Open);
    assert!(matches!(policies[1], ember_net::Policy::Egress { .. }));
    assert_eq!(policies[2], ember_net::Policy::None);
    assert_eq!(f.send(put(r#"{"egress": {"allow": ["x"]}}"#)).await.error(), (400, "invalid_request".into()));
    let missing = Request::put("/v1/sessions/nobody/network").body(Body::from("\"open\"")).unwrap();
    assert_eq!(f.send(missing).await.error().0, 404);
}

/// `POST /v1/sessions` opens a session at once with its settings; `GET`
/// shows it; its env reaches every call; `timeout` moves its end; every
/// bad field is a 400 and a second open of one key a 409.
#[tokio::test]
async fn a_session_is_opened_shown_extended_and_its_env_reaches_its_calls() {
    let (f, data) = two_images();
    let opened = f
        .post_json(
            "/v1/sessions",
            json!({"key": "ws", "image": "python-data", "env": {"TOKEN": "t", "A": "session"},
                   "idle_timeout": "5m", "timeout": "1h", "metadata": {"owner": "me"}}),
        )
        .await;
    assert_eq!(opened.status, 201, "{:?}", String::from_utf8_lossy(&opened.body));
    let s = opened.json();
    assert_eq!(
        (s["key"].as_str(), s["image"].as_str(), s["state"].as_str()),
        (Some("ws"), Some("python-data"), Some("running"))
    );
    assert!(s["vm_id"].as_str().is_some_and(|v| v.starts_with("data-")), "{s}");
    assert_eq!(s["idle_timeout_secs"], 300.0);
    assert!(s["expires"].as_str().is_some_and(|e| e.ends_with('Z')), "{s}");
    assert_eq!(s["metadata"]["owner"], "me");
    assert_eq!(s["env"], json!(["A", "TOKEN"]), "names, not values");
    assert!(s["usage"].is_object(), "{s}");

    // The session's env reaches a call; the call's own wins.
    let call = Request::post("/v1/run")
        .header("x-ember-session", "ws")
        .body(Body::from(json!({"cmd": "env", "env": {"A": "call"}}).to_string()))
        .unwrap();
    let r = f.send(call).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["vm_id"], s["vm_id"]);
    let env = &data.log().execs.last().unwrap().env.clone();
    assert_eq!(env.get("TOKEN").map(String::as_str), Some("t"));
    assert_eq!(env.get("A").map(String::as_str), Some("call"));

    let shown = f.get("/v1/sessions/ws").await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.json()["vm_id"], s["vm_id"]);
    assert_eq!(f.get("/v1/sessions/nobody").await.error(), (404, "not_found".into()));

    let ext = f.post_json("/v1/sessions/ws/timeout", json!({"timeout": "2h"})).await;
    assert_eq!(ext.status, 200);
    assert!(ext.json()["expires"].as_str().unwrap() > s["expires"].as_str().unwrap());
    let too_long = f.post_json("/v1/sessions/ws/timeout", json!({"timeout": "100d"})).await;
    assert_eq!(too_long.error(), (400, "invalid_request".into()));
    let nobody = f.post_json("/v1/sessions/nobody/timeout", json!({"timeout": "1m"})).await;
    assert_eq!(nobody.error(), (404, "not_found".into()));

    // A key is one session, whichever image.
    let again = f.post_json("/v1/sessions", json!({"key": "ws"})).await;
    assert_eq!(again.error(), (409, "session_exists".into()));
    // No key: a UUID.
    let anon = f.post_json("/v1/sessions", json!({})).await;
    assert_eq!(anon.status, 201);
    assert!(uuid::Uuid::parse_str(anon.json()["key"].as_str().unwrap()).is_ok());

    for (body, status, code) in [
        (json!({"image": "nope"}), 400, "unknown_image"),
        (json!({"memory_mb": 100000}), 400, "invalid_request"),
        (json!({"timeout": "0s"}), 400, "invalid_request"),
        (json!({"network": "open"}), 400, "network_disabled"),
        (json!({"surprise": 1}), 400, "invalid_request"),
    ] {
        let a = f.post_json("/v1/sessions", body.clone()).await;
        assert_eq!(a.error(), (status, code.to_string()), "{body}");
    }
    // memory_mb at its edge: what the image's VMs have (512 MiB).
    let fits = f.post_json("/v1/sessions", json!({"image": "python-data", "memory_mb": 512})).await;
    assert_eq!(fits.status, 201);
    let over = f.post_json("/v1/sessions", json!({"image": "python-data", "memory_mb": 513})).await;
    assert_eq!(over.error(), (400, "invalid_request".into()));
    assert!(over.json()["error"]["message"].as_str().unwrap().contains("512 MiB"));
    let del = Request::delete("/v1/sessions/ws").body(Body::empty()).unwrap();
    assert_eq!(f.send(del).await.status, 204);
    assert_eq!(f.get("/v1/sessions/ws").await.status, 404);
}

/// The process routes answer their errors in the one shape: no session,
/// a bad pid, a bad body, a pty (not supported yet).
#[tokio::test]
async fn process_routes_name_their_errors() {
    let f = fixture();
    let nobody = f.post_json("/v1/sessions/nobody/processes", json!({"cmd": "sleep 1"})).await;
    assert_eq!(nobody.error(), (404, "not_found".into()));
    assert_eq!(f.get("/v1/sessions/nobody/processes").await.error(), (404, "not_found".into()));
    assert_eq!(f.post_json("/v1/sessions", json!({"key": "p"})).await.status, 201);
    for (path, body, want) in [
        ("/v1/sessions/p/processes", json!({"cmd": "top", "pty": {"cols": 80}}), "invalid_request"),
        ("/v1/sessions/p/processes", json!({}), "invalid_request"),
        ("/v1/sessions/p/processes", json!({"cmd": "x", "surprise": 1}), "invalid_request"),
        ("/v1/sessions/p/processes/abc/signal", json!({"signal": "TERM"}), "invalid_request"),
        ("/v1/sessions/p/processes/1/signal", json!({"signal": "NOPE"}), "invalid_request"),
    ] {
        assert_eq!(f.post_json(path, body.clone()).await.error(), (400, want.to_string()), "{path} {body}");
    }
    assert_eq!(f.get("/v1/sessions/p/processes/abc/output").await.error(), (400, "invalid_request".into()));
}

#[tokio::test]
async fn file_routes_name_their_errors() {
    let f = fixture();
    let put = Request::put("/v1/sessions/nobody/files/a.txt").body(Body::from("x")).unwrap();
    assert_eq!(f.send(put).await.error(), (404, "not_found".into()));
    assert_eq!(f.get("/v1/sessions/nobody/files/a.txt?stat").await.error(), (404, "not_found".into()));
    assert_eq!(f.post_json("/v1/sessions", json!({"key": "fs"})).await.status, 201);
    let post = Request::post("/v1/sessions/fs/files/a.txt").body(Body::empty()).unwrap();
    assert_eq!(f.send(post).await.error(), (400, "invalid_request".into()));
    // A body over limits.max_body_bytes on a JSON route: a JSON 413.
    let limits = Limits { max_body_bytes: 64, ..Limits::default() };
    let small = fixture_with(limits, pool_config(), Functions::default());
    let big = json!({"key": "x".repeat(100)});
    assert_eq!(small.post_json("/v1/sessions", big).await.error(), (413, "body_too_large".into()));
}

/// The file routes against the real agent (its own system calls, no tool
/// run): every operation, its JSON, and the errno behind each error.
#[tokio::test]
async fn file_routes_drive_the_real_agent_and_map_its_errnos() {
    let dir = tempfile::tempdir().unwrap();
    let agents = FakeAgents { real_agent_in: Some(dir.path().to_path_buf()), ..FakeAgents::default() };
    let pool = Pool::start(agents.clone(), pool_config(), 256);
    let state = AppState::new(crate::pools::Pools::single(pool), Limits::default(), Functions::default());
    let f = Fixture { app: router(state.clone()), agents, state };
    assert_eq!(f.post_json("/v1/sessions", json!({"key": "fs"})).await.status, 201);
    let base = "/v1/sessions/fs/files";
    let req = |method: &str, path: &str, body: Body| {
        Request::builder().method(method).uri(format!("{base}/{path}")).body(body).unwrap()
    };
    // Written in pieces larger than one upload piece, read back whole.
    let big: Vec<u8> = (0..(9 << 20) + 7).map(|i| (i % 251) as u8).collect();
    let put = f.send(req("PUT", "data/big.bin", Body::from(big.clone()))).await;
    assert_eq!((put.status.as_u16(), put.json()["size"].as_u64()), (201, Some(big.len() as u64)));
    let got = f.get(&format!("{base}/data/big.bin")).await;
    assert!(got.status == 200 && got.body == big, "read back {} bytes", got.body.len());

    let stat = f.get(&format!("{base}/data/big.bin?stat")).await.json();
    assert_eq!((stat["type"].as_str(), stat["path"].as_str()), (Some("file"), Some("data/big.bin")));
    assert_eq!((stat["size"].as_u64(), stat["mode"].as_str()), (Some(big.len() as u64), Some("644")));
    assert_eq!(stat["permissions"], "-rw-r--r--");
    assert!(stat["modified"].as_str().is_some_and(|m| m.ends_with('Z')) && stat["owner"].is_string());

    let made = f.send(req("POST", "data/a/b?mkdir", Body::empty())).await;
    assert_eq!((made.status.as_u16(), made.json()["type"].as_str()), (201, Some("directory")));
    let moved = f.send(req("POST", "data/big.bin?move_to=data/a/moved.bin", Body::empty())).await;
    assert_eq!((moved.status.as_u16(), moved.json()["path"].as_str()), (200, Some("data/a/moved.bin")));
    let list = f.get(&format!("{base}/data/a?list")).await.json();
    let names: Vec<_> = list["entries"].as_array().unwrap().iter().map(|e| e["name"].clone()).collect();
    assert_eq!(names, [json!("b"), json!("moved.bin")], "{list}");
    assert_eq!(list["truncated"], false);
    let deep = f.get(&format!("{base}/data?list&depth=3")).await.json();
    assert_eq!(deep["entries"].as_array().unwrap().len(), 3, "a, a/b, a/moved.bin: {deep}");
    assert_eq!(f.get(&format!("{base}/data?list&depth=0")).await.error(), (400, "invalid_request".into()));

    // The errno decides: ENOENT 404, ENOTEMPTY/EEXIST 409, ENOTDIR/EISDIR 400.
    assert_eq!(f.get(&format!("{base}/data/big.bin")).await.error(), (404, "not_found".into()));
    assert_eq!(f.get(&format!("{base}/nope?stat")).await.error(), (404, "not_found".into()));
    assert_eq!(f.get(&format!("{base}/nope?list")).await.error(), (404, "not_found".into()));
    assert_eq!(f.send(req("DELETE", "data", Body::empty())).await.error(), (409, "file_exists".into()));
    assert_eq!(
        f.get(&format!("{base}/data/a/moved.bin?list")).await.error(),
        (400, "invalid_request".into())
    );
    assert_eq!(f.get(&format!("{base}/data")).await.error(), (400, "invalid_request".into()));
    let over_file = f.send(req("POST", "data/a/moved.bin/sub?mkdir", Body::empty())).await;
    assert_eq!(over_file.error(), (400, "invalid_request".into()), "ENOTDIR");
    let put_under_file = f.send(req("PUT", "data/a/moved.bin/x", Body::from("x"))).await;
    assert_eq!(put_under_file.error(), (409, "file_exists".into()), "EEXIST: a file where its parent goes");
    let moved_missing = f.send(req("POST", "nope?move_to=x", Body::empty())).await;
    assert_eq!(moved_missing.error(), (404, "not_found".into()));

    assert_eq!(f.send(req("DELETE", "data?recursive=true", Body::empty())).await.status, 204);
    assert_eq!(f.get(&format!("{base}/data?stat")).await.error(), (404, "not_found".into()));
    assert_eq!(f.send(req("DELETE", "data", Body::empty())).await.error(), (404, "not_found".into()));
}

#[tokio::test]
async fn a_session_pauses_and_any_use_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig { session_dir: Some(dir.path().to_path_buf()), ..pool_config() };
    let f = fixture_with(Limits::default(), pool, Functions::default());
    assert_eq!(f.post_json("/v1/sessions", json!({"key": "p"})).await.status, 201);
    let paused = f.post_json("/v1/sessions/p/pause", json!({})).await;
    assert_eq!(paused.status, 200, "{:?}", String::from_utf8_lossy(&paused.body));
    let s = paused.json();
    assert_eq!((s["state"].as_str(), s["vm_id"].is_null()), (Some("paused"), true), "{s}");
    assert_eq!(f.get("/v1/sessions/p").await.json()["state"], "paused");
    // A call resumes it.
    let call = Request::post("/v1/run")
        .header("x-ember-session", "p")
        .body(Body::from(json!({"cmd": "echo back"}).to_string()))
        .unwrap();
    assert_eq!(f.send(call).await.status, 200);
    assert_eq!(f.get("/v1/sessions/p").await.json()["state"], "running");
    // Paused again, the resume route brings it back; resuming a running one is a no-op.
    f.post_json("/v1/sessions/p/pause", json!({})).await;
    assert_eq!(f.post_json("/v1/sessions/p/resume", json!({})).await.json()["state"], "running");
    assert_eq!(f.post_json("/v1/sessions/p/resume", json!({})).await.status, 200);
    assert_eq!(f.post_json("/v1/sessions/nobody/pause", json!({})).await.error(), (404, "not_found".into()));
    // Without a directory for paused sessions: a 503 that says so.
    let g = fixture();
    assert_eq!(g.post_json("/v1/sessions", json!({"key": "q"})).await.status, 201);
    let refused = g.post_json("/v1/sessions/q/pause", json!({})).await;
    assert_eq!(refused.error(), (503, "pause_failed".into()));
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("pool.sessions.dir"));
}

#[tokio::test]
async fn a_session_forks_into_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig { session_dir: Some(dir.path().to_path_buf()), ..pool_config() };
    let f = fixture_with(Limits::default(), pool, Functions::default());
    assert_eq!(f.post_json("/v1/sessions", json!({"key": "p", "metadata": {"m": "1"}})).await.status, 201);
    let child = f.post_json("/v1/sessions/p/fork", json!({"key": "c"})).await;
    assert_eq!(child.status, 201, "{:?}", String::from_utf8_lossy(&child.body));
    let c = child.json();
    assert_eq!(
        (c["key"].as_str(), c["state"].as_str(), c["metadata"]["m"].as_str()),
        (Some("c"), Some("running"), Some("1"))
    );
    assert_ne!(c["vm_id"], f.get("/v1/sessions/p").await.json()["vm_id"]);
    let anon = f.post_json("/v1/sessions/p/fork", json!({})).await;
    assert!(uuid::Uuid::parse_str(anon.json()["key"].as_str().unwrap()).is_ok());
    assert_eq!(
        f.post_json("/v1/sessions/p/fork", json!({"key": "c"})).await.error(),
        (409, "session_exists".into())
    );
    assert_eq!(f.post_json("/v1/sessions/nobody/fork", json!({})).await.error(), (404, "not_found".into()));
    assert_eq!(f.post_json("/v1/sessions/p/fork", json!({"key": "bad key"})).await.error().0, 400);
}

#[tokio::test]
async fn the_port_proxy_checks_its_port_session_and_body_limit_first() {
    let limits = Limits { max_upload_bytes: 10, ..Limits::default() };
    let f = fixture_with(limits, pool_config(), Functions::default());
    let put = |path: &str, n: usize| Request::put(path).body(Body::from(vec![b'x'; n])).unwrap();
    assert_eq!(f.send(put("/v1/sessions/s/ports/0/a", 1)).await.error(), (400, "invalid_request".into()));
    assert_eq!(f.send(put("/v1/sessions/s/ports/70000", 1)).await.error(), (400, "invalid_request".into()));
    // At the limit it goes on (to the unknown session); one byte over, a 413.
    assert_eq!(f.send(put("/v1/sessions/s/ports/80/a", 10)).await.error(), (404, "not_found".into()));
    assert_eq!(f.send(put("/v1/sessions/s/ports/80/a", 11)).await.error(), (413, "upload_too_large".into()));
    assert_eq!(f.get("/v1/sessions/s/ports/80/").await.error(), (404, "not_found".into()));
}
