//! Keys and tenants on a real `ember serve` of the case's own (the suite's
//! server stays open): keys made with the real `ember keys` CLI while it
//! runs, two tenants who cannot see or touch each other's sessions on any
//! route, an admin who sees both, a quota, a function's warm set per
//! tenant, a paused session that keeps its tenant across a restart, and a
//! revoked key refused without a restart; and the README's examples with
//! a key.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use serde_json::{json, Value};

use crate::server::{self, Answer, Server};

fn ember_keys(keys: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("keys")
        .args(args)
        .arg("--keys-file")
        .arg(keys)
        .output()?)
}

fn create_key(keys: &Path, name: &str, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["create", name];
    args.extend_from_slice(extra);
    let out = ember_keys(keys, &args)?;
    ensure!(out.status.success(), "ember keys create {name}: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout)?.trim().to_string();
    ensure!(key.starts_with("ember_"), "not a key: {key:?}");
    Ok(key)
}

/// A client call carrying `key`.
fn call(s: &Server, key: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Answer> {
    let auth = format!("authorization: Bearer {key}");
    s.request(method, path, &[&auth, "content-type: application/json"], body.map(str::as_bytes))
}

/// Wait (at most 3 s) until `probe` holds: what a running server must see of
/// a changed keys file "within a second or two".
fn within_seconds(what: &str, probe: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !probe()? {
        ensure!(t.elapsed() < Duration::from_secs(3), "{what}: not within 3 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(t.elapsed())
}

/// Every route that names a session, with a body it accepts.
fn session_routes(key: &str) -> Vec<(&'static str, String, Option<&'static str>)> {
    ember_gateway::routes::ROUTES
        .iter()
        .filter(|(_, p)| p.contains("{key}"))
        .map(|(m, p)| {
            let path = p
                .replace("{key}", key)
                .replace("{pid}", "1")
                .replace("{port}", "8000")
                .replace("{path}", "f.txt");
            let body = match (*m, *p) {
                (_, p) if p.ends_with("/timeout") => Some(r#"{"timeout": "60s"}"#),
                (_, p) if p.ends_with("/network") => Some(r#""none""#),
                ("POST", "/v1/sessions/{key}/processes") => Some(r#"{"cmd": "true"}"#),
                (_, p) if p.ends_with("/signal") => Some(r#"{"signal": "TERM"}"#),
                (_, p) if p.ends_with("/resize") => Some(r#"{"cols": 80, "rows": 24}"#),
                (_, p) if p.ends_with("/stdin") => Some("x"),
                ("PUT", _) => Some("x"),
                ("POST", _) => Some(""),
                _ => None,
            };
            (*m, path, body)
        })
        .collect()
}

pub fn two_tenants_with_keys_on_a_server_of_their_own(_: &Server) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ember.toml");
    let functions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions-examples").canonicalize()?;
    std::fs::write(
        &config,
        format!(
            "[gateway]\nfunctions_dir = \"{}\"\n[pool]\nmin_size = 2\nmax_size = 4\ntarget_free = 1\n\
             claim_timeout = \"60s\"\n[pool.images.python-data]\nmax_size = 1\n[images]\nbuild_on_start = false\n",
            functions.display()
        ),
    )?;
    let keys = dir.path().join("keys.json");
    let start = || {
        let mut opts = ember_testkit::ServeOptions::new(
            Path::new(env!("CARGO_BIN_EXE_ember")),
            &config,
            &server::images(),
            &dir.path().join("state"),
            &dir.path().join("server.log"),
        );
        opts.keys_file = keys.clone();
        ember_testkit::EmberServe::start(&opts)
    };
    let first = start()?;
    let s = Server::attach(&first.url(), dir.path())?;

    // No keys yet: open, as before keys existed.
    ensure!(s.get("/v1/sessions")?.status == 200);
    let alice = create_key(&keys, "alice", &[])?;
    let bob = create_key(&keys, "bob", &["--sessions", "1"])?;
    let root = create_key(&keys, "root", &["--admin"])?;
    let took = within_seconds("the first key seen", || Ok(s.get("/v1/sessions")?.status == 401))?;
    println!("    a key made while serving took effect after {} ms", took.as_millis());
    let no_key = s.get("/v1/sessions")?;
    ensure!(no_key.error()? == (401, "unauthorized".into()), "{no_key:?}");
    ensure!(no_key.headers.to_ascii_lowercase().contains("www-authenticate: bearer"), "{}", no_key.headers);
    ensure!(s.get("/healthz")?.status == 200, "health needs no key");
    let x_api_key = format!("x-api-key: {alice}");
    ensure!(s.request("GET", "/v1/sessions", &[&x_api_key], None)?.status == 200);
    ensure!(call(&s, &alice, "GET", "/v1/pool", None)?.error()? == (403, "admin_only".into()));
    ensure!(call(&s, &root, "GET", "/v1/pool", None)?.status == 200);

    // Alice's session, with a file; bob meets a 404 on every route naming it.
    let opened = call(&s, &alice, "POST", "/v1/sessions", Some(r#"{"key": "demo"}"#))?;
    ensure!(opened.status == 201, "{opened:?}");
    let a = call(&s, &alice, "PUT", "/v1/sessions/demo/files/secret.txt", Some("alice only"))?;
    ensure!(a.status == 201, "{a:?}");
    for (m, path, body) in session_routes("demo") {
        let a = call(&s, &bob, m, &path, body)?;
        ensure!(a.status == 404, "bob {m} {path}: {a:?}");
        ensure!(!String::from_utf8_lossy(&a.body).contains("alice"), "bob {m} {path} learns of alice: {a:?}");
    }
    let read = call(&s, &alice, "GET", "/v1/sessions/demo/files/secret.txt", None)?;
    ensure!(read.status == 200 && read.body == b"alice only", "alice's session was touched: {read:?}");
    // The same through MCP: keys as bearer tokens, tenants apart.
    let out = crate::mcp::run_client(
        &s,
        "auth.py",
        &[],
        &[("KEY_A", &alice), ("KEY_B", &bob), ("SESSION", "demo")],
    )?;
    ensure!(out.trim_end().ends_with("ok done"), "{out}");
    // The session header runs bob's call in a "demo" of his own.
    let auth = format!("authorization: Bearer {bob}");
    let r = s.post(
        "/v1/run",
        &["content-type: application/json", &auth, "x-ember-session: demo"],
        json!({"cmd": "cat secret.txt 2>&1 || echo none"}).to_string().as_bytes(),
    )?;
    ensure!(r.status == 200 && r.json()?["stdout"].as_str().is_some_and(|o| o.ends_with("none\n")), "{r:?}");
    // Bob's quota: one session, and he holds it now.
    let a = call(&s, &bob, "POST", "/v1/sessions", Some(r#"{"key": "more"}"#))?;
    ensure!(a.error()? == (429, "quota_sessions".into()), "{a:?}");
    ensure!(a.headers.to_ascii_lowercase().contains("retry-after:"), "{}", a.headers);
    ensure!(call(&s, &bob, "DELETE", "/v1/sessions/demo", None)?.status == 204);
    ensure!(call(&s, &bob, "POST", "/v1/sessions", Some(r#"{"key": "more"}"#))?.status == 201, "freed");
    ensure!(call(&s, &bob, "DELETE", "/v1/sessions/more", None)?.status == 204);

    // The admin sees every tenant's sessions and names them qualified.
    let all = call(&s, &root, "GET", "/v1/sessions", None)?.json()?;
    let listed: Vec<(String, String)> = all["sessions"]
        .as_array()
        .context("sessions")?
        .iter()
        .map(|v| (v["tenant"].as_str().unwrap_or("").into(), v["key"].as_str().unwrap_or("").into()))
        .collect();
    ensure!(listed == [("alice".to_string(), "alice+demo".to_string())], "{all}");
    ensure!(call(&s, &root, "GET", "/v1/sessions/alice+demo", None)?.status == 200);

    // A function's warm set is per tenant: bob never gets alice's scrubbed VM.
    let counters = |p: &Value| (p["counters"]["scrubs"].as_u64(), p["counters"]["steals"].as_u64());
    let f = |key: &str| -> anyhow::Result<Value> {
        let a = call(&s, key, "POST", "/v1/functions/wordfreq", Some("a b a"))?;
        ensure!(a.status == 200, "{a:?}");
        a.json()
    };
    let pool = |s: &Server| -> anyhow::Result<Value> { call(s, &root, "GET", "/v1/pool", None)?.json() };
    // Each call's VM is scrubbed into the caller's warm set after it.
    let scrubbed_after = |call: &dyn Fn() -> anyhow::Result<Value>| -> anyhow::Result<Value> {
        let before = counters(&pool(&s)?).0.unwrap_or(0);
        let r = call()?;
        let t = Instant::now();
        while counters(&pool(&s)?).0.unwrap_or(0) <= before {
            ensure!(t.elapsed() < Duration::from_secs(20), "no scrub after the function call");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(r)
    };
    let first_call = scrubbed_after(&|| f(&alice))?;
    let again = scrubbed_after(&|| f(&alice))?;
    ensure!(again["vm_id"] == first_call["vm_id"], "alice's second call did not reuse her warm VM");
    let before = counters(&pool(&s)?);
    let bobs = f(&bob)?;
    let after = counters(&pool(&s)?);
    if bobs["vm_id"] == first_call["vm_id"] {
        ensure!(after.1 > before.1, "bob got alice's warm VM without a full reset: {before:?} -> {after:?}");
    }
    ensure!(bobs["stdout"] == first_call["stdout"], "{bobs}");

    // A paused session keeps its tenant across a restart.
    let paused = call(&s, &alice, "POST", "/v1/sessions/demo/pause", Some(""))?;
    ensure!(paused.status == 200 && paused.json()?["state"] == "paused", "{paused:?}");
    // The drain ends an MCP long-poll that is open (here: 30 s of wait).
    let mut poll = crate::mcp::spawn_client(&s, "drain.py", &[("KEY_A", &alice)])?;
    poll.wait_for_line("waiting", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    first.stop(Duration::from_secs(60))?;
    println!("    drained with an MCP long-poll open in {:.1} s", t.elapsed().as_secs_f64());
    let ended = poll.wait_for_line("ended", Duration::from_secs(30))?;
    let secs: f64 = ended.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("seconds")?;
    ensure!(secs < 20.0, "the long-poll outlived the drain: {ended}");
    println!("    the long-poll {ended}");
    let second = start()?;
    let s = Server::attach(&second.url(), dir.path())?;
    ensure!(
        call(&s, &bob, "GET", "/v1/sessions/demo", None)?.status == 404,
        "bob sees alice's after a restart"
    );
    let shown = call(&s, &alice, "GET", "/v1/sessions/demo", None)?.json()?;
    ensure!(shown["state"] == "paused" && shown["key"] == "demo", "{shown}");
    let read = call(&s, &alice, "GET", "/v1/sessions/demo/files/secret.txt", None)?;
    ensure!(read.status == 200 && read.body == b"alice only", "{read:?}");

    // `ember keys list` names keys, never their secrets, and says when each was used.
    let out = ember_keys(&keys, &["list", "--json"])?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(out.status.success() && text.lines().count() == 3, "{text}");
    ensure!(!text.contains(&alice) && !text.contains(&alice["ember_".len()..]), "a secret is listed");
    let alice_line: Value =
        serde_json::from_str(text.lines().find(|l| l.contains("\"alice\"")).context("alice")?)?;
    ensure!(alice_line["last_used"].is_string(), "{alice_line}");

    // Every README example works with a key as it does without.
    crate::readme::run_examples(&s.url, Some(&root))?;

    // Revoked: refused within a second or two, without a restart.
    let out = ember_keys(&keys, &["revoke", "alice"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    within_seconds("a revoked key refused", || {
        Ok(call(&s, &alice, "GET", "/v1/sessions", None)?.status == 401)
    })?;
    ensure!(call(&s, &root, "DELETE", "/v1/sessions/alice+demo", None)?.status == 204);
    second.stop(Duration::from_secs(60))?;
    Ok(())
}
