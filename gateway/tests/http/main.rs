//! End-to-end: the real `ember serve` over real VMs, called with curl as a
//! user would. One server is shared by the cases (its pool stays warm);
//! the last cases drain it with SIGTERM and check that nothing is left.
//!
//! `cargo test --test http -- NAME` runs the cases whose name holds NAME.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test fixtures

mod e2b;
mod mcp;
mod readme;
mod server;
mod tenants;

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use base64::Engine as _;
use ember_testkit::Report;
use serde_json::{json, Value};
use server::Server;

type Case = fn(&Server) -> anyhow::Result<()>;

/// When the long-lived process of the first case started, and its pid.
static LONG_LIVED: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
const LONG_LIVED_WAIT: Duration = Duration::from_secs(180);

/// A session's background process started first and read again by the last
/// cases, minutes later (reconnects that stop working after minutes are a
/// failure peers' users report).
fn a_long_lived_process_starts(s: &Server) -> anyhow::Result<()> {
    ensure!(s.post_json("/v1/sessions", &json!({"key": "long", "idle_timeout": "30m"}))?.status == 201);
    let p = s.post_json(
        "/v1/sessions/long/processes",
        &json!({"cmd": "i=0; while :; do echo tick $i; i=$((i+1)); sleep 1; done", "tag": "ticker"}),
    )?;
    ensure!(p.status == 201, "{p:?}");
    let pid = p.json()?["pid"].as_u64().context("pid")?;
    LONG_LIVED.set((Instant::now(), pid)).map_err(|_| anyhow::anyhow!("started twice"))?;
    Ok(())
}

fn a_long_lived_process_replays_its_output_minutes_later(s: &Server) -> anyhow::Result<()> {
    let (started, pid) = *LONG_LIVED.get().context("the first case did not start it")?;
    let left = LONG_LIVED_WAIT.saturating_sub(started.elapsed());
    std::thread::sleep(left);
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| process_output(s, "long", pid, Some("2")));
        let b = sc.spawn(|| process_output(s, "long", pid, Some("2")));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let secs = started.elapsed().as_secs();
    for out in [stdout_of(&a?), stdout_of(&b?)] {
        ensure!(out.starts_with("tick 0\ntick 1\n"), "not replayed from the start after {secs} s: {out:.80}");
        // A tick a second, and a little more under TCG (the loop forks).
        let ticks = out.lines().count() as u64;
        ensure!(ticks >= 150 && ticks <= secs + 2, "{ticks} ticks after {secs} s");
    }
    ensure!(s.request("DELETE", "/v1/sessions/long", &[], None)?.status == 204);
    Ok(())
}

fn each_input_form(s: &Server) -> anyhow::Result<()> {
    let r = s.run(json!({"cmd": "echo hello; echo oops >&2; exit 3"}))?;
    ensure!(r["stdout"] == "hello\n" && r["stderr"] == "oops\n" && r["exit_code"] == 3, "{r}");
    ensure!(r["vm_id"].as_str().is_some_and(|v| !v.is_empty()) && r["id"].is_string(), "{r}");

    // Where the time went: the agent's run time sits inside the VM's share.
    let a = s.post_json("/v1/run", &json!({"cmd": "sleep 0.2"}))?;
    let timing = a.server_timing()?;
    let r = a.json()?;
    ensure!(timing["run"] >= 200.0 && timing["vm"] > timing["run"], "{timing:?}");
    ensure!(
        (timing["run"] - r["duration_us"].as_f64().unwrap_or(0.0) / 1000.0).abs() < 0.002,
        "{timing:?} {r}"
    );

    let r = s.run(json!({"argv": ["printf", "%s|", "a b", "c"]}))?;
    ensure!(r["stdout"] == "a b|c|", "{r}");

    let r = s.run(
        json!({"lang": "python", "code": "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
                         "stdin": "1 2 3 4"}),
    )?;
    ensure!(r["stdout"] == "10\n", "{r}");

    let a = s.post("/v1/run?lang=python", &[], b"import platform; print(platform.system())")?;
    ensure!(a.status == 200 && a.json()?["stdout"] == "Linux\n", "{a:?}");
    let a = s.post("/v1/run?lang=bash&timeout=5s", &[], b"echo ${BASH_VERSION%%.*}")?;
    ensure!(a.status == 200 && a.json()?["exit_code"] == 0, "{a:?}");

    let r = s.run(json!({
        "cmd": "cat data/in.txt; cat run.sh | wc -c; ./run.sh; pwd; echo $GREETING",
        "env": {"GREETING": "hej"},
        "files": [{"path": "data/in.txt", "content": "from a file\n"},
                  {"path": "run.sh", "content": "#!/bin/sh\necho exec ok\n", "mode": 493}],
    }))?;
    ensure!(r["stdout"] == "from a file\n23\nexec ok\n/home/ember\nhej\n", "{r}");
    let r = s.run(json!({"cmd": "pwd", "cwd": "/tmp"}))?;
    ensure!(r["stdout"] == "/tmp\n", "{r}");

    // Non-UTF-8 output and stdin arrive byte for byte.
    let r = s.run(json!({"cmd": "cat", "stdin_base64": "AP/+gA=="}))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(r["stdout_base64"].as_str().context("no base64")?)?;
    ensure!(raw == [0x00, 0xff, 0xfe, 0x80], "{r}");
    Ok(())
}

fn timeouts_and_output_limits(s: &Server) -> anyhow::Result<()> {
    let t = Instant::now();
    let r = s.run(json!({"cmd": "echo started; sleep 60", "timeout": "1s"}))?;
    ensure!(r["timed_out"] == true && r["stdout"] == "started\n", "{r}");
    ensure!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    // limits.max_output_bytes is 100000 in the suite's config.
    let r = s.run(json!({"cmd": "head -c 100000 /dev/zero | tr '\\0' x"}))?;
    ensure!(r["truncated"] == false && r["stdout"].as_str().map(str::len) == Some(100_000), "exact limit");
    let r = s.run(json!({"cmd": "head -c 5000000 /dev/zero | tr '\\0' x; echo end >&2"}))?;
    ensure!(r["truncated"] == true, "truncated flag");
    let kept = r["stdout"].as_str().map_or(0, str::len) + r["stderr"].as_str().map_or(0, str::len);
    ensure!(kept <= 100_000, "kept {kept} bytes");
    // A timeout above the limit (20s here) is refused.
    let a = s.post_json("/v1/run", &json!({"cmd": "true", "timeout": "21s"}))?;
    ensure!(a.error()? == (400, "invalid_request".into()), "{a:?}");
    Ok(())
}

fn errors_are_json_with_the_right_status(s: &Server) -> anyhow::Result<()> {
    let cases: Vec<(server::Answer, u16, &str)> = vec![
        (s.post("/v1/run", &["content-type: application/json"], b"{\"cmd\":")?, 400, "invalid_json"),
        (
            s.post("/v1/run", &["content-type: application/json"], b"{\"cmd\":\"x\",\"y\":1}")?,
            400,
            "invalid_request",
        ),
        (s.post("/v1/run", &["content-type: text/plain"], b"echo")?, 415, "unsupported_media_type"),
        (s.post("/v1/run?lang=sh", &[], &vec![b'#'; 65_537])?, 413, "body_too_large"),
        (s.request("GET", "/v1/run", &[], None)?, 405, "method_not_allowed"),
        (s.request("GET", "/nope", &[], None)?, 404, "not_found"),
        (s.post("/v1/functions/nope", &[], b"")?, 404, "not_found"),
        (s.post_json("/v1/run", &json!({"argv": ["/no/such/program"]}))?, 422, "spawn_failed"),
    ];
    for (a, status, code) in cases {
        ensure!(a.error()? == (status, code.to_string()), "expected {status} {code}: {a:?}");
    }
    // The limit itself is accepted.
    let a = s.post("/v1/run?lang=sh", &[], &vec![b'#'; 65_536])?;
    ensure!(a.status == 200, "{a:?}");
    Ok(())
}

fn ndjson_streams_output_as_it_comes(s: &Server) -> anyhow::Result<()> {
    let lines =
        s.stream(&json!({"cmd": "for i in 1 2 3; do echo line$i; sleep 0.5; done; printf '\\377'"}))?;
    let types: Vec<&str> = lines.iter().map(|(_, l)| l["type"].as_str().unwrap_or("?")).collect();
    ensure!(types.first() == Some(&"started") && types.last() == Some(&"exit"), "{types:?}");
    let out: Vec<&(Instant, Value)> = lines.iter().filter(|(_, l)| l["type"] == "stdout").collect();
    ensure!(out.len() >= 4, "{lines:?}");
    ensure!(out[0].1["data"] == "line1\n", "{:?}", out[0]);
    let exit_at = lines.last().map(|(t, _)| *t).context("no lines")?;
    ensure!(exit_at - out[0].0 >= Duration::from_millis(800), "the first line came only at the end");
    ensure!(out.last().map(|(_, l)| &l["data_base64"]) == Some(&json!("/w==")), "{lines:?}");
    Ok(())
}

fn a_client_that_goes_away_frees_its_vm(s: &Server) -> anyhow::Result<()> {
    let before = s.pool()?["counters"]["resets"].as_u64().unwrap_or(0);
    // Streaming: kill the client after the first line.
    s.stream_then_hang_up(&json!({"cmd": "sleep 300"}))?;
    s.wait_until("the streamed command's VM reset", |p| {
        p["counters"]["resets"].as_u64() > Some(before) && p["invocations_running"] == 0
    })?;
    // Plain JSON: curl gives up after 2 s.
    let before = s.pool()?["counters"]["resets"].as_u64().unwrap_or(0);
    let a = s.curl(&["--max-time", "2", "--json", r#"{"cmd":"sleep 300"}"#], "/v1/run")?;
    ensure!(a.curl_exit == Some(28), "curl should time out: {a:?}");
    s.wait_until("the abandoned command's VM reset", |p| {
        p["counters"]["resets"].as_u64() > Some(before) && p["invocations_running"] == 0
    })?;
    Ok(())
}

fn sessions_keep_state_and_stay_apart(s: &Server) -> anyhow::Result<()> {
    let call = |key: &str, cmd: &str| s.run_in(key, json!({ "cmd": cmd }));
    let a1 = call("alice", "echo secret > note.txt; (sleep 600 &); echo ok")?;
    ensure!(a1["stdout"] == "ok\n" && a1["session"] == "alice", "{a1}");
    // No procps in the guest: /proc is enough.
    let sleepers = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep";
    let a2 = call("alice", &format!("cat note.txt; [ $({sleepers}) -gt 0 ] && echo sleeper alive"))?;
    ensure!(a2["stdout"] == "secret\nsleeper alive\n", "{a2}");
    ensure!(a1["vm_id"] == a2["vm_id"], "same VM");
    let b = call("bob", &format!("cat note.txt 2>&1; [ $({sleepers}) -eq 0 ] && echo no sleeper"))?;
    ensure!(
        b["vm_id"] != a1["vm_id"] && b["stdout"].as_str().is_some_and(|o| o.contains("No such file")),
        "{b}"
    );
    ensure!(b["stdout"].as_str().is_some_and(|o| o.ends_with("no sleeper\n")), "{b}");

    // Calls in one session are serialized: two at once take twice as long.
    let t = Instant::now();
    std::thread::scope(|sc| {
        let h: Vec<_> = (0..2).map(|_| sc.spawn(|| call("bob", "sleep 1"))).collect();
        h.into_iter().try_for_each(|h| h.join().expect("thread").map(drop))
    })?;
    ensure!(t.elapsed() >= Duration::from_secs(2), "ran in parallel: {:?}", t.elapsed());

    let list = s.get("/v1/sessions")?.json()?;
    let keys: Vec<&str> =
        list["sessions"].as_array().context("sessions")?.iter().filter_map(|x| x["key"].as_str()).collect();
    ensure!(keys == ["alice", "bob", "long"], "{list}");
    // The suite allows three sessions (one is the long-lived process's): a
    // fourth is refused.
    let c = s.post(
        "/v1/run",
        &["x-ember-session: carol", "content-type: application/json"],
        br#"{"cmd":"true"}"#,
    )?;
    ensure!(c.error()? == (429, "session_limit".into()), "{c:?}");
    for key in ["alice", "bob"] {
        let d = s.request("DELETE", &format!("/v1/sessions/{key}"), &[], None)?;
        ensure!(d.status == 204, "{d:?}");
    }
    ensure!(s.request("DELETE", "/v1/sessions/alice", &[], None)?.status == 404, "deleted twice");
    let fresh = call("alice", "cat note.txt 2>&1 || true")?;
    ensure!(
        fresh["vm_id"] != a1["vm_id"] && fresh["stdout"].as_str().is_some_and(|o| o.contains("No such")),
        "{fresh}"
    );
    ensure!(s.request("DELETE", "/v1/sessions/alice", &[], None)?.status == 204, "cleanup");
    Ok(())
}

/// A session opened with settings: its env reaches its calls, GET shows
/// its VM's real figures, and its lifetime ends it (and its VM) on time.
fn an_opened_session_shows_its_figures_and_ends_with_its_lifetime(s: &Server) -> anyhow::Result<()> {
    let body = json!({"key": "timed", "env": {"STAGE": "e2e"}, "timeout": "6s", "metadata": {"by": "test"}});
    let opened = s.post_json("/v1/sessions", &body)?;
    ensure!(opened.status == 201, "{opened:?}");
    let o = opened.json()?;
    let vm = o["vm_id"].as_str().context("vm_id")?.to_string();
    let disk = |v: &Value| v["usage"]["disk_bytes"].as_u64();
    let before = disk(&o).context("no disk figure")?;
    let r = s.run_in("timed", json!({"cmd": "echo $STAGE; head -c 20000000 /dev/urandom > big; sync"}))?;
    ensure!(r["stdout"] == "e2e\n" && r["vm_id"] == vm.as_str(), "{r}");
    let shown = s.get("/v1/sessions/timed")?.json()?;
    let usage = &shown["usage"];
    ensure!(usage["cpu_seconds"].as_f64().is_some_and(|c| c > 0.0), "{shown}");
    ensure!(usage["memory_bytes"].as_u64().is_some_and(|m| m > 10_000_000), "{shown}");
    ensure!(
        disk(&shown).is_some_and(|d| d >= before + 19_000_000),
        "the 20 MB file (before: {before}): {shown}"
    );
    ensure!(shown["metadata"]["by"] == "test" && shown["busy"] == false, "{shown}");
    let again = s.post_json("/v1/sessions", &json!({"key": "timed"}))?;
    ensure!(again.error()? == (409, "session_exists".into()), "{again:?}");
    // Its 6 s lifetime ends it, and its VM goes with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.get("/v1/sessions/timed")?.status != 404 {
        ensure!(Instant::now() < deadline, "the session outlived its lifetime");
        std::thread::sleep(Duration::from_millis(200));
    }
    let gone = Instant::now() + Duration::from_secs(10);
    while !ember_sys::os::processes_mentioning(&vm).is_empty() {
        ensure!(Instant::now() < gone, "the ended session's VM still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// NDJSON lines of a process's output; with `max_time`, curl hangs up
/// after that long (a reader that leaves while the process runs).
fn process_output(s: &Server, key: &str, pid: u64, max_time: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let mut args = vec!["-N"];
    if let Some(t) = max_time {
        args.extend(["--max-time", t]);
    }
    let a = s.curl(&args, &format!("/v1/sessions/{key}/processes/{pid}/output"))?;
    ensure!(a.status == 200, "{a:?}");
    String::from_utf8_lossy(&a.body)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("line {l:?}")))
        .collect()
}

fn stdout_of(lines: &[Value]) -> String {
    lines.iter().filter(|l| l["type"] == "stdout").filter_map(|l| l["data"].as_str()).collect()
}

/// Background processes in a real VM: they outlive the call that started
/// them, their output is replayed to late and concurrent readers, stdin
/// and EOF reach them, signals end them, and they go with the session.
fn a_sessions_background_processes_keep_running_and_replay_their_output(s: &Server) -> anyhow::Result<()> {
    ensure!(s.post_json("/v1/sessions", &json!({"key": "procs"}))?.status == 201);
    let counter = s.post_json(
        "/v1/sessions/procs/processes",
        &json!({"cmd": "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done", "tag": "counter"}),
    )?;
    ensure!(counter.status == 201, "{counter:?}");
    let c = counter.json()?;
    let pid = c["pid"].as_u64().context("pid")?;
    ensure!(c["state"] == "running" && c["tag"] == "counter", "{c}");
    // A reader that leaves after 2 s, then two at once: each starts from
    // the beginning of the buffer and sees the count go on.
    let first = stdout_of(&process_output(s, "procs", pid, Some("2"))?);
    ensure!(first.starts_with("0\n1\n2\n"), "{first:?}");
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| process_output(s, "procs", pid, Some("2")));
        let b = sc.spawn(|| process_output(s, "procs", pid, Some("2")));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let (a, b) = (stdout_of(&a?), stdout_of(&b?));
    ensure!(a.len() > first.len() && b.len() > first.len() && a.starts_with("0\n1\n"), "{a:?} {b:?}");
    // A call in the session runs while the process goes on, and sees it.
    let seen = s.run_in(
        "procs",
        json!({"cmd": "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c 'while true'"}),
    )?;
    ensure!(seen["stdout"].as_str().is_some_and(|o| o.trim() != "0"), "{seen}");

    // stdin, then EOF, reach a process that reads them.
    let cat =
        s.post_json("/v1/sessions/procs/processes", &json!({"argv": ["cat"], "stdin": true}))?.json()?;
    let cat_pid = cat["pid"].as_u64().context("pid")?;
    let path = format!("/v1/sessions/procs/processes/{cat_pid}/stdin");
    ensure!(s.post(&path, &[], b"hello\n")?.status == 204);
    ensure!(s.request("DELETE", &path, &[], None)?.status == 204);
    let lines = process_output(s, "procs", cat_pid, None)?;
    ensure!(stdout_of(&lines) == "hello\n", "{lines:?}");
    ensure!(lines.last().is_some_and(|l| l["type"] == "exit" && l["exit_code"] == 0), "{lines:?}");
    ensure!(s.post(&path, &[], b"more")?.error()? == (409, "process_state".into()));

    // SIGTERM ends the counter; a second signal is a 409; its exit is kept.
    let sig = format!("/v1/sessions/procs/processes/{pid}/signal");
    ensure!(s.post_json(&sig, &json!({"signal": "TERM"}))?.status == 204);
    let ended = process_output(s, "procs", pid, None)?;
    ensure!(ended.last().is_some_and(|l| l["type"] == "exit" && l["signal"] == 15), "{:?}", ended.last());
    ensure!(s.post_json(&sig, &json!({"signal": "KILL"}))?.error()? == (409, "process_state".into()));
    let listed = s.get("/v1/sessions/procs/processes")?.json()?;
    let states: Vec<&str> =
        listed["processes"].as_array().context("list")?.iter().filter_map(|p| p["state"].as_str()).collect();
    ensure!(states == ["exited", "exited"], "{listed}");
    ensure!(s.get("/v1/sessions/procs/processes/999999")?.error()? == (404, "not_found".into()));

    // A process still running when the session ends goes with its VM.
    let vm = s.get("/v1/sessions/procs")?.json()?["vm_id"].as_str().context("vm")?.to_string();
    ensure!(s.post_json("/v1/sessions/procs/processes", &json!({"cmd": "sleep 600"}))?.status == 201);
    ensure!(s.request("DELETE", "/v1/sessions/procs", &[], None)?.status == 204);
    let gone = Instant::now() + Duration::from_secs(10);
    while !ember_sys::os::processes_mentioning(&vm).is_empty() {
        ensure!(Instant::now() < gone, "the ended session's VM still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(s.get("/v1/sessions/procs/processes")?.error()? == (404, "not_found".into()));
    Ok(())
}

fn sha256_of(path: &std::path::Path) -> anyhow::Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum failed");
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// A session's files through the gateway: 100 MiB up and down with the
/// same sha256 (the rate printed), the upload limit at its edge, stat,
/// list, mkdir, move, remove, and the guest's own permission errors for
/// what its user cannot reach (a symlink out of reach is never followed
/// on the host).
fn a_sessions_files_are_written_read_and_managed_as_its_user(s: &Server) -> anyhow::Result<()> {
    ensure!(s.post_json("/v1/sessions", &json!({"key": "files"}))?.status == 201);
    let dir = tempfile::tempdir()?;
    let big = dir.path().join("big");
    let limit = 104_857_600u64;
    {
        let mut f = std::fs::File::create(&big)?;
        let mut rng = std::fs::File::open("/dev/urandom")?;
        std::io::copy(&mut std::io::Read::take(&mut rng, limit), &mut f)?;
    }
    let want = sha256_of(&big)?;
    let big_arg = format!("@{}", big.display());
    let t = Instant::now();
    let up = s.curl(&["-X", "PUT", "--data-binary", &big_arg], "/v1/sessions/files/files/data/big.bin")?;
    let up_secs = t.elapsed().as_secs_f64();
    ensure!(up.status == 201, "{up:?}");
    ensure!(up.json()?["size"] == limit, "{up:?}");
    let back = dir.path().join("back");
    let t = Instant::now();
    let down = s.get("/v1/sessions/files/files/data/big.bin")?;
    let down_secs = t.elapsed().as_secs_f64();
    ensure!(down.status == 200, "{}", down.status);
    std::fs::write(&back, &down.body)?;
    ensure!(sha256_of(&back)? == want, "the download differs ({} bytes)", down.body.len());
    let mb = limit as f64 / 1e6;
    println!("    100 MiB upload {:.1} MB/s, download {:.1} MB/s", mb / up_secs, mb / down_secs);
    // One byte over the limit: a 413 before anything is written.
    std::fs::OpenOptions::new().append(true).open(&big)?.write_all(b"x")?;
    let over = s.curl(&["-X", "PUT", "--data-binary", &big_arg], "/v1/sessions/files/files/over.bin")?;
    ensure!(over.error()? == (413, "upload_too_large".into()), "{over:?}");

    let stat = s.get("/v1/sessions/files/files/data/big.bin?stat")?.json()?;
    ensure!(stat["type"] == "file" && stat["size"] == limit && stat["owner"] == "ember", "{stat}");
    ensure!(s.post("/v1/sessions/files/files/data/a/b?mkdir", &[], b"")?.status == 201);
    let moved = s.post("/v1/sessions/files/files/data/big.bin?move_to=data/a/moved.bin", &[], b"")?;
    ensure!(moved.status == 200 && moved.json()?["size"] == limit, "{moved:?}");
    let list = s.get("/v1/sessions/files/files/data/a?list")?.json()?;
    let names: Vec<(&str, &str)> = list["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["type"].as_str()?)))
        .collect();
    ensure!(names == [("b", "directory"), ("moved.bin", "file")], "{list}");
    ensure!(s.get("/v1/sessions/files/files/data/big.bin")?.error()? == (404, "not_found".into()));
    ensure!(
        s.request("DELETE", "/v1/sessions/files/files/data", &[], None)?.error()?
            == (409, "file_exists".into())
    );
    ensure!(s.request("DELETE", "/v1/sessions/files/files/data?recursive=true", &[], None)?.status == 204);
    ensure!(s.get("/v1/sessions/files/files/data?stat")?.error()? == (404, "not_found".into()));

    // What the user cannot reach stays out of reach, with the guest's own error.
    s.run_in("files", json!({"cmd": "ln -s /root/secret out-of-reach; ln -s /etc/shadow shadow"}))?;
    for link in ["out-of-reach", "shadow"] {
        let a = s.get(&format!("/v1/sessions/files/files/{link}"))?;
        ensure!(a.error()? == (403, "permission_denied".into()), "{link}: {a:?}");
        ensure!(
            a.json()?["error"]["message"].as_str().is_some_and(|m| m.contains("Permission denied")),
            "{a:?}"
        );
    }
    let put_root = s.curl(&["-X", "PUT", "--data-binary", "x"], "/v1/sessions/files/files/%2Fetc%2Fx")?;
    ensure!(put_root.status == 403, "{put_root:?}");
    // A write through a link to a file the user cannot write: the guest's
    // refusal, nothing written (the link still points at a root file).
    let put_link = s.curl(&["-X", "PUT", "--data-binary", "x"], "/v1/sessions/files/files/shadow")?;
    ensure!(put_link.error()? == (403, "permission_denied".into()), "{put_link:?}");
    let still = s.run_in("files", json!({"cmd": "stat -c '%U %s' /etc/shadow; readlink shadow"}))?;
    let out = still["stdout"].as_str().unwrap_or_default();
    ensure!(out.starts_with("root ") && out.ends_with("/etc/shadow\n"), "{still}");
    let os = s.get("/v1/sessions/files/files/%2Fetc%2Fos-release")?;
    ensure!(os.status == 200 && String::from_utf8_lossy(&os.body).contains("Debian"), "{os:?}");
    ensure!(s.request("DELETE", "/v1/sessions/files", &[], None)?.status == 204);
    Ok(())
}

/// A WebSocket echo server on 127.0.0.1:8765, for a guest.
const WS_ECHO: &str = include_str!("../ws_echo.py");

/// Wait until a guest server answers through the proxy (not 502).
fn wait_for_port(s: &Server, key: &str, port: u16) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let a = s.get(&format!("/v1/sessions/{key}/ports/{port}/"))?;
        if a.status != 502 {
            return Ok(());
        }
        ensure!(Instant::now() < until, "port {port} never answered: {a:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Servers inside a session's guest, reached through the port proxy over
/// the agent channel (the session has no network): python -m http.server
/// streams a 20 MB file with its sha256 intact, a query and methods pass
/// through, a WebSocket echo round-trips, and a port nobody listens on is
/// a 502 that says so.
fn a_sessions_ports_are_reached_through_the_proxy(s: &Server) -> anyhow::Result<()> {
    ensure!(s.post_json("/v1/sessions", &json!({"key": "web"}))?.status == 201);
    let closed = s.get("/v1/sessions/web/ports/8000/")?;
    ensure!(closed.error()? == (502, "port_unreachable".into()), "{closed:?}");
    ensure!(s.get("/v1/sessions/web/ports/0/")?.error()? == (400, "invalid_request".into()));
    let made = s.run_in("web", json!({"cmd": "mkdir -p site && head -c 20000000 /dev/urandom > site/big.bin && sha256sum site/big.bin"}))?;
    let want =
        made["stdout"].as_str().context("stdout")?.split_whitespace().next().context("sum")?.to_string();
    let http = json!({"argv": ["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1", "--directory", "site"]});
    ensure!(s.post_json("/v1/sessions/web/processes", &http)?.status == 201);
    wait_for_port(s, "web", 8000)?;
    let dir = tempfile::tempdir()?;
    let t = Instant::now();
    let big = s.get("/v1/sessions/web/ports/8000/big.bin?x=1")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(big.status == 200 && big.body.len() == 20_000_000, "{} {} bytes", big.status, big.body.len());
    std::fs::write(dir.path().join("big"), &big.body)?;
    ensure!(sha256_of(&dir.path().join("big"))? == want, "the proxied body differs");
    println!("    20 MB through the port proxy at {:.1} MB/s", 20.0 / secs);
    let listing = s.get("/v1/sessions/web/ports/8000")?;
    ensure!(
        listing.status == 200 && String::from_utf8_lossy(&listing.body).contains("big.bin"),
        "{listing:?}"
    );
    // http.server has no POST: its own 501 comes back as it is.
    ensure!(s.post("/v1/sessions/web/ports/8000/big.bin", &[], b"x")?.status == 501);
    ensure!(s.get("/v1/sessions/web/ports/8000/missing")?.status == 404);

    std::fs::write(dir.path().join("ws.py"), WS_ECHO)?;
    let ws_arg = format!("@{}", dir.path().join("ws.py").display());
    ensure!(s.curl(&["-X", "PUT", "--data-binary", &ws_arg], "/v1/sessions/web/files/ws.py")?.status == 201);
    ensure!(s.post_json("/v1/sessions/web/processes", &json!({"argv": ["python3", "ws.py"]}))?.status == 201);
    wait_for_port(s, "web", 8765)?;
    let url = format!("{}/v1/sessions/web/ports/8765/echo", s.url.replace("http://", "ws://"));
    let (mut ws, resp) =
        tungstenite::connect(url.as_str()).context("websocket handshake through the proxy")?;
    ensure!(resp.status() == 101, "{resp:?}");
    for msg in ["hello ember", &"x".repeat(100_000)] {
        ws.send(tungstenite::Message::text(msg))?;
        match ws.read()? {
            tungstenite::Message::Text(t) => ensure!(t.as_str() == msg, "echoed {} bytes", t.len()),
            other => anyhow::bail!("not an echo: {other:?}"),
        }
    }
    ws.close(None)?;
    while ws.read().is_ok() {}
    ensure!(s.request("DELETE", "/v1/sessions/web", &[], None)?.status == 204);
    Ok(())
}

/// A shell on a pseudo-terminal: it knows it is on one, echoes its input,
/// and follows a resize.
fn a_sessions_terminal_echoes_and_follows_resizes(s: &Server) -> anyhow::Result<()> {
    ensure!(s.post_json("/v1/sessions", &json!({"key": "tty"}))?.status == 201);
    let bad =
        s.post_json("/v1/sessions/tty/processes", &json!({"cmd": "sh", "pty": {"cols": 0, "rows": 24}}))?;
    ensure!(bad.error()? == (400, "invalid_request".into()), "{bad:?}");
    let sh =
        s.post_json("/v1/sessions/tty/processes", &json!({"argv": ["sh"], "pty": {"cols": 80, "rows": 24}}))?;
    ensure!(sh.status == 201, "{sh:?}");
    let p = sh.json()?;
    let pid = p["pid"].as_u64().context("pid")?;
    ensure!(p["pty"] == json!({"cols": 80, "rows": 24}) && p["stdin_open"] == true, "{p}");
    let stdin = format!("/v1/sessions/tty/processes/{pid}/stdin");
    ensure!(s.post(&stdin, &[], b"tty; stty size\n")?.status == 204);
    let resize = format!("/v1/sessions/tty/processes/{pid}/resize");
    // Wait for the first answer before resizing, so the order is fixed.
    let until = Instant::now() + Duration::from_secs(20);
    while !stdout_of(&process_output(s, "tty", pid, Some("1"))?).contains("24 80") {
        ensure!(Instant::now() < until, "no `stty size` answer");
    }
    ensure!(s.post_json(&resize, &json!({"cols": 132, "rows": 43}))?.status == 204);
    ensure!(s.post(&stdin, &[], b"stty size; exit 3\n")?.status == 204);
    let lines = process_output(s, "tty", pid, Some("20"))?;
    let out = stdout_of(&lines);
    ensure!(out.contains("/dev/pts/") && out.contains("stty size; exit 3\r\n"), "no tty or no echo: {out:?}");
    ensure!(out.contains("43 132"), "the resize was not seen: {out:?}");
    ensure!(lines.last().is_some_and(|l| l["type"] == "exit" && l["exit_code"] == 3), "{:?}", lines.last());
    ensure!(
        s.post_json(&resize, &json!({"cols": 10, "rows": 10}))?.error()? == (409, "process_state".into())
    );
    ensure!(s.request("DELETE", "/v1/sessions/tty", &[], None)?.status == 204);
    Ok(())
}

/// A directory watch over HTTP sees create, write, rename and remove, in
/// order, with paths relative to the directory; an unknown directory is a
/// 404 before any stream starts.
fn a_sessions_directory_watch_sees_changes(s: &Server) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    ensure!(s.post_json("/v1/sessions", &json!({"key": "watch"}))?.status == 201);
    ensure!(s.get("/v1/sessions/watch/files/nope?watch")?.error()? == (404, "not_found".into()));
    s.run_in("watch", json!({"cmd": "mkdir -p w/sub"}))?;
    let mut curl = std::process::Command::new("curl")
        .args(["-sSN", "--max-time", "60"])
        .arg(format!("{}/v1/sessions/watch/files/w?watch&recursive=true", s.url))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(curl.stdout.take().context("stdout")?).lines();
    let mut next = || -> anyhow::Result<Value> {
        let l = lines.next().context("the watch ended")??;
        serde_json::from_str(&l).with_context(|| format!("line {l:?}"))
    };
    let ready = next()?;
    ensure!(ready["type"] == "ready", "{ready}");
    s.run_in("watch", json!({"cmd": "cd w && echo 1 > a && mv a b && echo 2 > sub/c && rm b"}))?;
    let mut seen = Vec::new();
    while seen.last() != Some(&json!({"type": "remove", "path": "b"})) {
        seen.push(next()?);
    }
    let watchers = || -> anyhow::Result<String> {
        let r = s.run_in("watch", json!({"cmd": "pgrep -fc '[e]mber-agent watch' || true"}))?;
        Ok(r["stdout"].as_str().unwrap_or_default().trim().to_string())
    };
    ensure!(watchers()? == "1", "the watcher is not seen running");
    let _ = curl.kill();
    let _ = curl.wait();
    let want = [
        json!({"type": "create", "path": "a", "directory": false}),
        json!({"type": "write", "path": "a"}),
        json!({"type": "rename", "from": "a", "to": "b"}),
        json!({"type": "create", "path": "sub/c", "directory": false}),
        json!({"type": "write", "path": "sub/c"}),
        json!({"type": "remove", "path": "b"}),
    ];
    ensure!(seen == want, "{seen:?}");
    // The client went away: its watcher is gone from the guest.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = watchers()?;
        if left == "0" {
            break;
        }
        ensure!(Instant::now() < until, "the watcher outlived its client: {left} left");
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(s.request("DELETE", "/v1/sessions/watch", &[], None)?.status == 204);
    Ok(())
}

/// Pause and resume through the API, across a restart of `ember serve`:
/// a server of its own (the suite's keeps running), stopped while the
/// session is paused, and a new one on the same directories that resumes
/// it with its files and its counting process.
/// Readiness apart from liveness, on a server of its own from its first
/// moment: `/healthz` is 200 as soon as it listens, `/readyz` is 503 saying
/// what it waits for until the pool is warm, the ready line comes when
/// `/readyz` turns 200, and a call sent that moment is served warm.
fn a_call_sent_the_moment_readyz_turns_200_is_served_warm(_: &Server) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ember.toml");
    std::fs::write(&config, "[pool]\nmin_size = 2\nmax_size = 3\n[images]\nbuild_on_start = false\n")?;
    let mut opts = ember_testkit::ServeOptions::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_ember")),
        &config,
        &server::images(),
        &dir.path().join("state"),
        &dir.path().join("server.log"),
    );
    opts.return_when_listening = true;
    let mut serve = ember_testkit::EmberServe::start(&opts)?;
    let s = Server::attach(&serve.url(), dir.path())?;
    let live = s.get("/healthz")?;
    ensure!(live.status == 200, "liveness from the start: {live:?}");
    let started = Instant::now();
    let mut warming = 0;
    let turned = loop {
        let r = s.get("/readyz")?;
        match r.status {
            503 => {
                let j = r.json()?;
                ensure!(j["status"] == "warming" && j["waiting_for"][0]["image"] == "default", "{j}");
                ensure!(j["message"].as_str().is_some_and(|m| m.contains("warm VMs ready")), "{j}");
                warming += 1;
            }
            200 => break Instant::now(),
            _ => anyhow::bail!("/readyz: {r:?}"),
        }
        ensure!(started.elapsed() < Duration::from_secs(300), "never ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let a = s.post_json("/v1/run", &json!({"cmd": "echo warm"}))?;
    let timing = a.server_timing()?;
    let r = a.json()?;
    ensure!(a.status == 200 && r["warm"] == true && r["stdout"] == "warm\n", "{r}");
    ensure!(timing["claim"] < 50.0, "the claim waited {} ms", timing["claim"]);
    ensure!(warming > 0, "/readyz was never 503 while the pool warmed");
    let line = serve.wait_ready(&opts)?;
    let apart = if line > turned { line - turned } else { turned - line };
    ensure!(apart < Duration::from_millis(500), "ready line and /readyz {apart:?} apart");
    println!(
        "    /readyz turned 200 after {:.1} s ({warming} answers 503 before)",
        (turned - started).as_secs_f64()
    );
    serve.stop(Duration::from_secs(60))?;
    Ok(())
}

fn a_paused_session_survives_a_restart_of_the_server(_: &Server) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ember.toml");
    std::fs::write(
        &config,
        "[pool]\nmin_size = 1\nmax_size = 2\ntarget_free = 0\nclaim_timeout = \"60s\"\n\
         [pool.images.python-data]\nmax_size = 1\n[images]\nbuild_on_start = false\n",
    )?;
    let start = || {
        let opts = ember_testkit::ServeOptions::new(
            std::path::Path::new(env!("CARGO_BIN_EXE_ember")),
            &config,
            &server::images(),
            &dir.path().join("state"),
            &dir.path().join("server.log"),
        );
        ember_testkit::EmberServe::start(&opts)
    };
    let first = start()?;
    let s = Server::attach(&first.url(), dir.path())?;
    ensure!(s.post_json("/v1/sessions", &json!({"key": "keep"}))?.status == 201);
    let counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done";
    let p = s.post_json("/v1/sessions/keep/processes", &json!({"cmd": counter, "tag": "counter"}))?.json()?;
    let pid = p["pid"].as_u64().context("pid")?;
    s.run_in("keep", json!({"cmd": "echo kept > notes; sleep 0.5"}))?;
    let vm = s.get("/v1/sessions/keep")?.json()?["vm_id"].as_str().context("vm")?.to_string();
    let t = Instant::now();
    let paused = s.post_json("/v1/sessions/keep/pause", &json!({}))?;
    let pause_ms = t.elapsed().as_millis();
    ensure!(paused.status == 200 && paused.json()?["state"] == "paused", "{paused:?}");
    ensure!(ember_sys::os::processes_mentioning(&vm).is_empty(), "the paused session's QEMU still runs");
    first.stop(Duration::from_secs(60))?;

    let second = start()?;
    let s = Server::attach(&second.url(), dir.path())?;
    let shown = s.get("/v1/sessions/keep")?.json()?;
    ensure!(shown["state"] == "paused", "not back as paused after the restart: {shown}");
    // Any use resumes it: here, its process list.
    let t = Instant::now();
    let procs = s.get("/v1/sessions/keep/processes")?.json()?;
    let resume_ms = t.elapsed().as_millis();
    let listed = procs["processes"].as_array().context("list")?;
    ensure!(listed.iter().any(|p| p["pid"] == pid && p["state"] == "running"), "{procs}");
    let a = s.run_in("keep", json!({"cmd": "cat notes; cat /tmp/count"}))?;
    std::thread::sleep(Duration::from_millis(500));
    let b = s.run_in("keep", json!({"cmd": "cat /tmp/count"}))?;
    let count = |v: &Value, line: usize| -> u64 {
        v["stdout"]
            .as_str()
            .and_then(|o| o.lines().nth(line))
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    };
    ensure!(a["stdout"].as_str().is_some_and(|o| o.starts_with("kept\n")), "{a}");
    ensure!(count(&b, 0) > count(&a, 1) && count(&a, 1) > 0, "the counter did not carry on: {a} {b}");
    println!("    pause over HTTP {pause_ms} ms; first use after a restart (resume) {resume_ms} ms");
    ensure!(s.request("DELETE", "/v1/sessions/keep", &[], None)?.status == 204);
    let sessions_dir = dir.path().join("state/sessions/default/keep");
    ensure!(!sessions_dir.exists(), "the ended session's files stay: {}", sessions_dir.display());
    second.stop(Duration::from_secs(60))?;
    Ok(())
}

fn functions_run_with_real_input(s: &Server) -> anyhow::Result<()> {
    let list = s.get("/v1/functions")?.json()?;
    let names: Vec<&str> = list["functions"]
        .as_array()
        .context("functions")?
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    ensure!(names == ["json-stats", "plot", "primes", "tar-inspect", "wordfreq"], "{names:?}");

    let r = s.post("/v1/functions/wordfreq", &[], b"the cat saw the other cat. The end")?.json()?;
    ensure!(r["stdout"].as_str().is_some_and(|o| o.starts_with("      3 the\n      2 cat\n")), "{r}");

    let r =
        s.post("/v1/functions/json-stats", &[], br#"[{"n": 1, "k": "a"}, {"n": 3, "k": "a"}]"#)?.json()?;
    let out: Value = serde_json::from_str(r["stdout"].as_str().context("stdout")?)?;
    ensure!(out["fields"]["n"]["mean"] == 2.0 && out["fields"]["k"]["distinct"] == 1, "{out}");
    let bad = s.post("/v1/functions/json-stats", &[], b"not json")?.json()?;
    ensure!(bad["exit_code"] == 2 && bad["stderr"].as_str().is_some_and(|e| e.contains("not JSON")), "{bad}");

    let r = s.post("/v1/functions/primes", &[], br#"{"limit": 100000}"#)?.json()?;
    let out: Value = serde_json::from_str(r["stdout"].as_str().context("stdout")?)?;
    ensure!(out["primes"] == 9592 && out["largest"] == 99991, "{out}");

    // A tarball with an escaping symlink, built here, inspected in the VM.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("hello.txt"), "hello\n")?;
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("escape"))?;
    let tar = std::process::Command::new("tar")
        .args(["-czf", "-", "-C"])
        .arg(dir.path())
        .args(["hello.txt", "escape"])
        .output()?;
    ensure!(tar.status.success(), "tar failed");
    let r = s.post("/v1/functions/tar-inspect", &[], &tar.stdout)?.json()?;
    let out: Value =
        serde_json::from_str(r["stdout"].as_str().context("stdout")?).with_context(|| format!("{r}"))?;
    ensure!(out["entries"] == 2 && out["flagged"] == 1, "{out}");
    let hello = &out["list"][0];
    ensure!(hello["sha256"] == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03", "{hello}");
    Ok(())
}

fn concurrent_requests_all_succeed(s: &Server) -> anyhow::Result<()> {
    let t = Instant::now();
    let results: Vec<anyhow::Result<Value>> = std::thread::scope(|sc| {
        let h: Vec<_> =
            (0..6).map(|i| sc.spawn(move || s.run(json!({"cmd": format!("sleep 1; echo {i}")})))).collect();
        h.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        let r = r?;
        ensure!(r["stdout"] == format!("{i}\n"), "request {i}: {r}");
    }
    // Six one-second commands, run side by side on a pool of at most 4 + boots.
    ensure!(t.elapsed() < Duration::from_secs(20), "took {:?}", t.elapsed());
    Ok(())
}

fn metrics_and_pool_status(s: &Server) -> anyhow::Result<()> {
    let text = String::from_utf8(s.get("/metrics")?.body)?;
    for needle in [
        r#"ember_http_requests_total{route="/v1/run",method="POST",status="200"}"#,
        r#"ember_http_requests_total{route="/v1/run",method="POST",status="413"}"#,
        r#"ember_invocations_total{outcome="timed_out"}"#,
        r#"ember_claim_seconds_count{image="default"}"#,
        r#"ember_claim_seconds_count{image="python-data"}"#,
        r#"ember_exec_seconds_count{image="default"}"#,
        r#"ember_reset_seconds_count{image="default"}"#,
        r#"ember_pool_vms{image="default",state="ready"}"#,
        r#"ember_pool_vms{image="python-data",state="ready"}"#,
        r#"ember_warm_hits_total{image="default"}"#,
        r#"ember_warm_misses_total{image="python-data"}"#,
    ] {
        ensure!(text.contains(needle), "metrics lack {needle:?}");
    }
    let resets = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"ember_reset_seconds_count{image="default"} "#))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    ensure!(resets > 0.0, "no reset was timed");
    let p = s.pool()?;
    ensure!(
        p["vms"]["ready"].is_u64() && p["target"].as_u64() >= Some(2) && p["limits"]["max_size"] == 6,
        "{p}"
    );
    ensure!(s.get("/healthz")?.json()?["status"] == "ok", "healthz");
    Ok(())
}

/// The images the server serves, a call, a session and a function on the
/// second one, and the error for one it does not serve.
fn images_are_served_each_in_its_own_pool(s: &Server) -> anyhow::Result<()> {
    let list = s.get("/v1/images")?.json()?;
    let names: Vec<&str> =
        list["images"].as_array().context("images")?.iter().filter_map(|i| i["name"].as_str()).collect();
    ensure!(names == ["base-sudo", "default", "python-data", "tiny"], "{list}");
    let image = |name: &str| list["images"].as_array().and_then(|a| a.iter().find(|i| i["name"] == name));
    let data = image("python-data").context("python-data")?;
    ensure!(
        data["pip"].as_array().is_some_and(|p| p.iter().any(|r| r == "numpy==1.26.4"))
            && data["size_bytes"].as_u64() > Some(100_000_000)
            && data["memory_mb"] == 512
            && data["pool"]["min_size"] == 0,
        "{data}"
    );
    let default = image("default").context("default")?;
    ensure!(default["packages"].as_array().is_some_and(|p| p.iter().any(|x| x == "git")), "{list}");
    ensure!(default["writable_root"] == false && default["sudo"] == false, "{default}");
    let sudo = image("base-sudo").context("base-sudo")?;
    ensure!(sudo["writable_root"] == true && sudo["sudo"] == true && sudo["disk_mb"] == 2048, "{sudo}");

    // The first call to python-data boots its pool (and its template).
    let code = "import numpy, pandas; print(numpy.__version__, pandas.__version__)";
    let first = s.run(json!({"lang": "python", "code": code, "image": "python-data"}))?;
    ensure!(first["stdout"] == "1.26.4 2.2.3\n" && first["image"] == "python-data", "{first}");
    // Warm now: the pandas import is in the pre-warmed interpreter.
    let t = Instant::now();
    let warm = s.run(json!({"lang": "python", "code": code, "image": "python-data"}))?;
    ensure!(warm["stdout"] == "1.26.4 2.2.3\n", "{warm}");
    println!("    python-data numpy+pandas call, warm: {:?} (warm VM: {})", t.elapsed(), warm["warm"]);
    let r = s.run(json!({"cmd": "cat /etc/ember/image"}))?;
    ensure!(r["stdout"] == "default\n" && r["image"] == "default", "{r}");

    let a = s.post_json("/v1/run", &json!({"cmd": "true", "image": "no-such-image"}))?;
    let (status, code) = a.error()?;
    let message = a.json()?["error"]["message"].as_str().unwrap_or_default().to_string();
    ensure!(
        status == 400 && code == "unknown_image" && message.contains("base-sudo, default, python-data, tiny"),
        "{a:?}"
    );

    // The recipe of the test's own configuration was built at start-up.
    let r = s.run(json!({"cmd": "cat /etc/tiny-motd; echo $EMBER_TINY", "image": "tiny"}))?;
    ensure!(r["stdout"] == "tiny overlay\nyes\n" && r["image"] == "tiny", "{r}");
    // Its disk is the size its recipe says: a session fills it, and learns so.
    ensure!(image("tiny").is_some_and(|i| i["disk_mb"] == 40) && default["disk_mb"] == 1024, "{list}");
    let full = s.run_in("tiny-s", json!({"cmd": "head -c 48000000 /dev/zero > big", "image": "tiny"}))?;
    ensure!(
        full["exit_code"] != 0 && full["stderr"].as_str().is_some_and(|e| e.contains("No space left")),
        "{full}"
    );
    let put = s.curl(&["-X", "PUT", "--data-binary", "more"], "/v1/sessions/tiny-s/files/more")?;
    ensure!(put.error()? == (507, "no_space".into()), "{put:?}");
    ensure!(s.request("DELETE", "/v1/sessions/tiny-s", &[], None)?.status == 204);

    // A session on python-data keeps its image and its files.
    let one = s.run_in("data-s", json!({"cmd": "echo kept > note", "image": "python-data"}))?;
    let two = s.run_in("data-s", json!({"lang": "python", "code": "print(open('note').read().strip())"}))?;
    ensure!(
        two["stdout"] == "kept\n" && two["image"] == "python-data" && two["vm_id"] == one["vm_id"],
        "{two}"
    );
    let h = "x-ember-session: data-s";
    let body = json!({"cmd": "true", "image": "default"}).to_string();
    let clash = s.post("/v1/run", &["content-type: application/json", h], body.as_bytes())?;
    ensure!(clash.error()? == (409, "session_image".to_string()), "{clash:?}");
    ensure!(s.request("DELETE", "/v1/sessions/data-s", &[], None)?.status == 204);

    // A function that names the image: a PNG plot.
    let plot = s.post_json("/v1/functions/plot", &json!({"series": {"a": [1, 4, 9], "b": [2, 3, 5]}}))?;
    let r = plot.json()?;
    ensure!(plot.status == 200 && r["exit_code"] == 0 && r["image"] == "python-data", "{r}");
    let png =
        base64::engine::general_purpose::STANDARD.decode(r["stdout_base64"].as_str().context("no PNG")?)?;
    ensure!(png.starts_with(b"\x89PNG\r\n") && png.len() > 2000, "not a PNG: {} bytes", png.len());
    Ok(())
}

const CASES: &[(&str, Case)] = &[
    ("a_long_lived_process_starts", a_long_lived_process_starts),
    ("each_input_form", each_input_form),
    ("timeouts_and_output_limits", timeouts_and_output_limits),
    ("errors_are_json_with_the_right_status", errors_are_json_with_the_right_status),
    ("ndjson_streams_output_as_it_comes", ndjson_streams_output_as_it_comes),
    ("a_client_that_goes_away_frees_its_vm", a_client_that_goes_away_frees_its_vm),
    ("sessions_keep_state_and_stay_apart", sessions_keep_state_and_stay_apart),
    (
        "an_opened_session_shows_its_figures_and_ends_with_its_lifetime",
        an_opened_session_shows_its_figures_and_ends_with_its_lifetime,
    ),
    (
        "a_sessions_background_processes_keep_running_and_replay_their_output",
        a_sessions_background_processes_keep_running_and_replay_their_output,
    ),
    (
        "a_sessions_files_are_written_read_and_managed_as_its_user",
        a_sessions_files_are_written_read_and_managed_as_its_user,
    ),
    ("a_sessions_ports_are_reached_through_the_proxy", a_sessions_ports_are_reached_through_the_proxy),
    ("a_sessions_terminal_echoes_and_follows_resizes", a_sessions_terminal_echoes_and_follows_resizes),
    ("a_sessions_directory_watch_sees_changes", a_sessions_directory_watch_sees_changes),
    (
        "a_call_sent_the_moment_readyz_turns_200_is_served_warm",
        a_call_sent_the_moment_readyz_turns_200_is_served_warm,
    ),
    ("a_paused_session_survives_a_restart_of_the_server", a_paused_session_survives_a_restart_of_the_server),
    ("functions_run_with_real_input", functions_run_with_real_input),
    ("images_are_served_each_in_its_own_pool", images_are_served_each_in_its_own_pool),
    ("concurrent_requests_all_succeed", concurrent_requests_all_succeed),
    ("readme_curl_examples_work", readme::examples_work),
    (
        "two_tenants_with_keys_on_a_server_of_their_own",
        tenants::two_tenants_with_keys_on_a_server_of_their_own,
    ),
    ("the_python_sdk_drives_a_sandboxs_life", e2b::the_python_sdk_drives_a_sandboxs_life),
    ("the_js_sdk_drives_a_sandbox", e2b::the_js_sdk_drives_a_sandbox),
    ("an_mcp_client_uses_every_tool_in_both_protocols", mcp::an_mcp_client_uses_every_tool_in_both_protocols),
    ("the_mcp_inspector_cli_lists_and_calls_tools", mcp::the_mcp_inspector_cli_lists_and_calls_tools),
    ("metrics_and_pool_status", metrics_and_pool_status),
    (
        "a_long_lived_process_replays_its_output_minutes_later",
        a_long_lived_process_replays_its_output_minutes_later,
    ),
];

fn main() {
    if !ember_testkit::vms_can_run("http", &server::images()) {
        return;
    }
    let mut report = Report::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let server = match Server::start() {
            Ok(s) => s,
            Err(e) => {
                report.fail("server start", e);
                return;
            }
        };
        for (name, case) in CASES {
            report.run(name, Box::pin(async { case(&server) })).await;
        }
        // Always last: drain, then nothing may be left.
        report.run("sigterm_drains_and_removes_every_vm", Box::pin(async { server.drain() })).await;
    });
    std::process::exit(report.finish());
}
