//! Component tests: a real agent session and the real host client, talking
//! the real protocol through an in-memory duplex. Commands run on the test
//! host as the current user (no cgroups, no uid switch), so only benign ones.

#![allow(clippy::unwrap_used)] // test fixtures

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_channel::{AgentClient, AgentError, ExecEvent};
use ember_guest_agent::{Agent, GuestLayout, ReapMode, Reaper};
use ember_wire::{Command, ErrorCode, ExecRequest, FileSpec, Stream, MAX_FRAME_LEN};

struct Harness {
    client: Arc<AgentClient>,
    dir: tempfile::TempDir,
    _lane_dir: Option<tempfile::TempDir>,
}

fn start() -> Harness {
    start_with(false)
}

/// With `lane`, a bulk lane (a file here, a disk in a VM) both sides share.
fn start_with(lane: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = GuestLayout::guest();
    layout.workspace = dir.path().to_path_buf();
    layout.scratch_dirs = vec![dir.path().to_path_buf()];
    layout.user = None;
    let lane_dir = lane.then(|| tempfile::tempdir().unwrap());
    layout.lane = lane_dir.as_ref().map(|d| d.path().join("lane.raw"));
    let host_lane = layout.lane.as_deref().map(|p| ember_channel::BulkLane::create(p).unwrap());
    let agent = Arc::new(Agent::unconfined(layout, Reaper::start(ReapMode::Registered).unwrap()));
    let (host, guest) = tokio::io::duplex(1 << 16);
    tokio::spawn(ember_guest_agent::serve(agent, guest));
    let client = Arc::new(AgentClient::new(host));
    if let Some(l) = host_lane {
        client.attach_lane(l);
    }
    Harness { client, dir, _lane_dir: lane_dir }
}

fn sh(cmd: &str) -> ExecRequest {
    let mut r = ExecRequest::new(Command::Shell(cmd.into()));
    r.timeout_ms = 10_000;
    r
}

#[tokio::test]
async fn hello_reports_protocol_and_echoes_nonce() {
    let h = start();
    let hello = h.client.hello(42).await.unwrap();
    assert_eq!(hello.nonce, 42);
    assert_eq!(hello.protocol, ember_wire::PROTOCOL_VERSION);
}

#[tokio::test]
async fn exit_codes_stdout_stderr_stdin_env_and_cwd() {
    let h = start();
    let mut req = sh("cat; echo \"$GREETING\" from \"$PWD\"; echo oops >&2; exit 7");
    req.stdin = b"in:".to_vec();
    req.env.insert("GREETING".into(), "hi".into());
    let out = h.client.run(req).await.unwrap();
    let cwd = h.dir.path().canonicalize().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("in:hi from {}\n", cwd.display()));
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!(out.status.code, Some(7));
    assert!(!out.status.timed_out && !out.status.truncated);
}

#[tokio::test]
async fn argv_is_not_shell_interpreted_and_output_may_be_binary() {
    let h = start();
    let req = ExecRequest::new(Command::Argv(vec!["printf".into(), "\\377\\000$HOME;".into()]));
    let out = h.client.run(req).await.unwrap();
    assert_eq!(out.stdout, b"\xff\x00$HOME;");
}

#[tokio::test]
async fn a_signal_is_reported_as_such() {
    let h = start();
    let out = h.client.run(sh("kill -TERM $$")).await.unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(15)));
}

#[tokio::test]
async fn timeout_kills_the_process_tree() {
    let h = start();
    let mut req = sh("sleep 30 & echo $!; sleep 30");
    req.timeout_ms = 300;
    let started = Instant::now();
    let out = h.client.run(req).await.unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert!(started.elapsed() < Duration::from_secs(5));
    let bg: i32 = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
    assert!(gone(bg).await, "background sleep {bg} survived the timeout");
}

#[tokio::test]
async fn leftover_processes_are_killed_when_the_command_exits() {
    let h = start();
    let out = h.client.run(sh("sleep 30 >/dev/null 2>&1 & echo $!")).await.unwrap();
    assert_eq!(out.status.code, Some(0));
    let bg: i32 = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
    assert!(gone(bg).await, "leftover {bg} survived");
}

/// The command's first output chunk, parsed as a pid.
async fn first_line_as_pid(handle: &mut ember_channel::ExecHandle) -> i32 {
    match handle.next().await.unwrap() {
        ExecEvent::Output { data, .. } => String::from_utf8(data).unwrap().trim().parse().unwrap(),
        other => panic!("expected output, got {other:?}"),
    }
}

async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn output_cap_truncates_exactly_and_counts_both_streams() {
    let h = start();
    let mut req = sh("echo 12345 >&2; head -c 100000 /dev/zero");
    req.output_limit = 1000;
    let out = h.client.run(req).await.unwrap();
    assert!(out.status.truncated);
    // Which stream the agent reads first depends on scheduling: the cap
    // counts both, so their sum is exact and stderr is a prefix of its text.
    assert_eq!(out.stdout.len() + out.stderr.len(), 1000);
    assert!(b"12345\n".starts_with(&out.stderr), "{:?}", out.stderr);
    assert_eq!(out.status.code, Some(0), "the command is not killed by the cap");
}

#[tokio::test]
async fn output_is_streamed_before_the_command_ends() {
    let h = start();
    let mut handle = h.client.exec(sh("echo first; sleep 2; echo second")).await.unwrap();
    let t = Instant::now();
    match handle.next().await.unwrap() {
        ExecEvent::Output { stream: Stream::Stdout, data } => assert_eq!(data, b"first\n"),
        other => panic!("expected output, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(1500), "first chunk arrived only at the end");
    drop(handle);
}

#[tokio::test]
async fn dropping_the_handle_cancels_the_command() {
    let h = start();
    let mut handle = h.client.exec(sh("echo $$; exec sleep 30")).await.unwrap();
    let pid = first_line_as_pid(&mut handle).await;
    drop(handle);
    assert!(gone(pid).await, "cancelled command {pid} still runs");
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let h = start();
    let client = Arc::new(h.client);
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let c = Arc::clone(&client);
            tokio::spawn(async move { c.run(sh(&format!("sleep 0.5; echo {i}"))).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{i}\n"));
    }
    // 20 x 0.5 s one after another would take 10 s.
    assert!(started.elapsed() < Duration::from_secs(5), "requests did not overlap: {:?}", started.elapsed());
}

#[tokio::test]
async fn bad_requests_get_errors_not_crashes() {
    let h = start();
    let empty = ExecRequest::new(Command::Argv(vec![]));
    assert!(
        matches!(h.client.run(empty).await, Err(AgentError::Remote(e)) if e.code == ErrorCode::BadRequest)
    );
    let missing = ExecRequest::new(Command::Argv(vec!["/no/such/program".into()]));
    assert!(
        matches!(h.client.run(missing).await, Err(AgentError::Remote(e)) if e.code == ErrorCode::SpawnFailed)
    );
    let mut bad_cwd = sh("true");
    bad_cwd.cwd = Some("/definitely/not/here".into());
    assert!(
        matches!(h.client.run(bad_cwd).await, Err(AgentError::Remote(e)) if e.message.contains("/definitely/not/here"))
    );
    let mut bad_env = sh("true");
    bad_env.env.insert("A=B".into(), "x".into());
    assert!(h.client.run(bad_env).await.is_err());
    assert_eq!(h.client.hello(1).await.unwrap().nonce, 1, "agent still serves");
}

#[tokio::test]
async fn malformed_and_oversized_frames_get_error_frames_and_the_agent_keeps_serving() {
    let h = start();
    // Valid length, garbage body.
    let mut junk = 5u32.to_be_bytes().to_vec();
    junk.extend(b"{nope");
    h.client.send_raw(junk).await.unwrap();
    let e = h.client.next_stray_error(Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.code, ErrorCode::BadFrame);
    // Valid JSON, unknown request type: the id is kept.
    let body = br#"{"id":0,"body":{"type":"format_disk"}}"#;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    h.client.send_raw(frame).await.unwrap();
    assert_eq!(h.client.next_stray_error(Duration::from_secs(5)).await.unwrap().code, ErrorCode::BadFrame);
    // Oversized: announced and actually sent; skipped without buffering.
    let len = MAX_FRAME_LEN + 1;
    let mut big = (len as u32).to_be_bytes().to_vec();
    big.resize(4 + len, b'x');
    h.client.send_raw(big).await.unwrap();
    assert_eq!(
        h.client.next_stray_error(Duration::from_secs(10)).await.unwrap().code,
        ErrorCode::FrameTooLarge
    );
    assert_eq!(h.client.hello(9).await.unwrap().nonce, 9);
    let out = h.client.run(sh("echo still")).await.unwrap();
    assert_eq!(out.stdout, b"still\n");
}

#[tokio::test]
async fn write_files_then_read_them_back() {
    let h = start();
    let files = vec![
        FileSpec { path: "dir/a.txt".into(), content: b"alpha\xff".to_vec(), mode: 0o600 },
        FileSpec { path: "run.sh".into(), content: b"#!/bin/sh\necho ran\n".to_vec(), mode: 0o755 },
    ];
    h.client.write_files(files).await.unwrap();
    let out = h.client.run(sh("cat dir/a.txt; ./run.sh; stat -c %a dir/a.txt")).await.unwrap();
    assert_eq!(out.stdout, b"alpha\xffran\n600\n");
    let escape = vec![FileSpec { path: "../escape".into(), content: vec![], mode: 0o644 }];
    assert!(
        matches!(h.client.write_files(escape).await, Err(AgentError::Remote(e)) if e.code == ErrorCode::BadRequest)
    );
}

#[tokio::test]
async fn exec_writes_its_files_first_and_a_refused_file_runs_nothing() {
    let h = start();
    let mut req = sh("cat in/data.txt; ./go.sh");
    req.files = vec![
        FileSpec { path: "in/data.txt".into(), content: b"data\n".to_vec(), mode: 0o644 },
        FileSpec { path: "go.sh".into(), content: b"#!/bin/sh\necho went\n".to_vec(), mode: 0o755 },
    ];
    let out = h.client.run(req).await.unwrap();
    assert_eq!(out.stdout, b"data\nwent\n", "{:?}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(out.status.code, Some(0));

    let mut req = sh("touch ran");
    req.files = vec![
        FileSpec { path: "ok.txt".into(), content: vec![], mode: 0o644 },
        FileSpec { path: "../escape".into(), content: vec![], mode: 0o644 },
    ];
    let err = h.client.run(req).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Remote(e) if e.code == ErrorCode::BadRequest && e.message.contains("escape")),
        "{err:?}"
    );
    assert!(!h.dir.path().join("ran").exists(), "the command ran although a file was refused");
    assert!(!h.dir.path().join("ok.txt").exists(), "paths are checked before anything is written");
    // The session goes on.
    assert_eq!(h.client.run(sh("echo still")).await.unwrap().stdout, b"still\n");
}

#[tokio::test]
async fn closing_the_connection_kills_running_commands() {
    let h = start();
    let mut handle = h.client.exec(sh("echo $$; exec sleep 30")).await.unwrap();
    let pid = first_line_as_pid(&mut handle).await;
    std::mem::forget(handle);
    drop(h.client);
    assert!(gone(pid).await, "command {pid} outlived its connection");
}

fn spawn_req(cmd: &str, stdin: bool, buffer: u64) -> ember_wire::SpawnRequest {
    ember_wire::SpawnRequest {
        command: Command::Shell(cmd.into()),
        env: Default::default(),
        cwd: None,
        stdin,
        tag: Some("t".into()),
        buffer_bytes: buffer,
        pids_limit: None,
        max_processes: 4,
        pty: None,
    }
}

/// Everything an attach delivers until the exit: (dropped, stdout, exit).
async fn follow(client: &AgentClient, pid: u32) -> (u64, String, ember_wire::ExitStatus) {
    let mut h = client.attach(pid).await.unwrap();
    let (mut dropped, mut out) = (0, Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_secs(10), h.next()).await.unwrap().unwrap() {
            ExecEvent::Output { data, .. } => out.extend(data),
            ExecEvent::Dropped { bytes } => dropped += bytes,
            ExecEvent::Exit(st) => return (dropped, String::from_utf8(out).unwrap(), st),
        }
    }
}

#[tokio::test]
async fn a_background_process_outlives_its_call_takes_stdin_and_replays_its_output() {
    let h = start();
    let pid = h
        .client
        .spawn(spawn_req("echo start; while read l; do echo \"got $l\"; done; echo end", true, 1 << 20))
        .await
        .unwrap();
    // Two readers at once, attached before any input.
    let (a, b) = (follow(&h.client, pid), follow(&h.client, pid));
    let feed = async {
        h.client.stdin(pid, b"one\n".to_vec(), false).await.unwrap();
        h.client.stdin(pid, b"two\n".to_vec(), true).await.unwrap();
    };
    let ((da, oa, sa), (db, ob, _), ()) = tokio::join!(a, b, feed);
    assert_eq!((da, oa.as_str(), sa.code), (0, "start\ngot one\ngot two\nend\n", Some(0)));
    assert_eq!((db, ob.as_str()), (0, oa.as_str()), "the second reader saw the same");
    // A reader after the exit gets the whole buffer and the exit.
    let (d, o, st) = follow(&h.client, pid).await;
    assert_eq!((d, o.as_str(), st.code), (0, "start\ngot one\ngot two\nend\n", Some(0)));
    let listed = h.client.processes().await.unwrap();
    let p = listed.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!((p.tag.as_deref(), p.output_bytes, p.stdin_open), (Some("t"), 26, false));
    assert_eq!(p.exit.as_ref().and_then(|e| e.code), Some(0));
    // stdin of an exited process, a signal to it, an unknown pid.
    let code = |e: AgentError| match e {
        AgentError::Remote(r) => r.code,
        other => panic!("{other}"),
    };
    assert_eq!(code(h.client.stdin(pid, b"x".to_vec(), false).await.unwrap_err()), ErrorCode::Conflict);
    assert_eq!(code(h.client.signal(pid, 15).await.unwrap_err()), ErrorCode::Conflict);
    assert_eq!(code(h.client.signal(999_999, 15).await.unwrap_err()), ErrorCode::NotFound);
    assert!(matches!(h.client.attach(999_999).await.unwrap().next().await, Err(AgentError::Remote(_))));
}

#[tokio::test]
async fn older_output_past_the_buffer_is_dropped_and_counted() {
    let h = start();
    let pid = h
        .client
        .spawn(spawn_req("head -c 5000 /dev/zero | tr '\\0' x; sleep 0.3", false, 1000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (dropped, out, st) = follow(&h.client, pid).await;
    assert_eq!((dropped, out.len(), st.code), (4000, 1000, Some(0)));
    assert!(out.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn signals_end_a_process_and_the_running_count_is_capped() {
    let h = start();
    let mut req = spawn_req("sleep 30", false, 1000);
    req.max_processes = 1;
    let pid = h.client.spawn(req.clone()).await.unwrap();
    match h.client.spawn(req.clone()).await {
        Err(AgentError::Remote(e)) => assert!(e.message.contains("the limit"), "{}", e.message),
        other => panic!("a second process past the limit: {other:?}"),
    }
    let t = Instant::now();
    h.client.signal(pid, 15).await.unwrap();
    let (_, _, st) = follow(&h.client, pid).await;
    assert_eq!(st.signal, Some(15));
    assert!(t.elapsed() < Duration::from_secs(5));
    // Its slot is free again.
    let again = h.client.spawn(req).await.unwrap();
    h.client.signal(again, 9).await.unwrap();
    assert_eq!(follow(&h.client, again).await.2.signal, Some(9));
}

/// Output of an attached process until `needle` shows up in it.
async fn read_until(h: &mut ember_channel::ExecHandle, seen: &mut String, needle: &str) {
    while !seen.contains(needle) {
        match tokio::time::timeout(Duration::from_secs(10), h.next()).await {
            Ok(Ok(ExecEvent::Output { data, .. })) => seen.push_str(&String::from_utf8_lossy(&data)),
            other => panic!("waiting for {needle:?} in {seen:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_process_on_a_terminal_sees_one_echoes_input_and_follows_resizes() {
    let h = start();
    let mut req = spawn_req(
        "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; stty size; read x; stty size; echo \"got $x\"",
        false,
        1 << 20,
    );
    req.pty = Some(ember_wire::PtySize { cols: 80, rows: 24 });
    let pid = h.client.spawn(req).await.unwrap();
    let listed = h.client.processes().await.unwrap();
    assert_eq!(
        listed.iter().find(|p| p.pid == pid).unwrap().pty,
        Some(ember_wire::PtySize { cols: 80, rows: 24 })
    );
    let mut out = h.client.attach(pid).await.unwrap();
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "24 80").await;
    assert!(seen.contains("is-a-tty"), "{seen:?}");
    h.client.resize(pid, 120, 40).await.unwrap();
    h.client.stdin(pid, b"hello\n".to_vec(), false).await.unwrap();
    read_until(&mut out, &mut seen, "got hello").await;
    // The terminal echoed the input and the second `stty size` saw the new size.
    assert!(seen.contains("hello\r\n") && seen.contains("40 120"), "{seen:?}");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), out.next()).await.unwrap().unwrap() {
            ExecEvent::Exit(st) => break assert_eq!(st.code, Some(0)),
            _ => continue,
        }
    }
    // Resizing an exited or plain process, or to nothing, is refused.
    let plain = h.client.spawn(spawn_req("sleep 5", false, 100)).await.unwrap();
    for (p, c, r) in [(plain, 80, 24), (pid, 0, 24), (pid, 100, 30)] {
        assert!(matches!(h.client.resize(p, c, r).await, Err(AgentError::Remote(_))), "{p} {c}x{r}");
    }
    h.client.signal(plain, 9).await.unwrap();
}

#[tokio::test]
async fn a_connection_to_a_guest_port_carries_bytes_both_ways_beyond_the_window() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // More than the agent's window, so credit must flow back for it all.
    let big = 3 * ember_wire::CONNECT_WINDOW as usize + 12345;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("{} bytes\n", got.len()).as_bytes()).await.unwrap();
        s.write_all(&vec![b'z'; big]).await.unwrap();
    });
    let mut conn = h.client.connect(port).await.unwrap();
    conn.write_all(&vec![b'a'; 200_000]).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut back)).await.unwrap().unwrap();
    server.await.unwrap();
    assert!(
        back.starts_with(b"200000 bytes\n"),
        "{:?}",
        String::from_utf8_lossy(&back[..40.min(back.len())])
    );
    assert_eq!(back.len(), "200000 bytes\n".len() + big);
    // Nothing listening: the agent says so.
    drop(conn);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    match h.client.connect(dead).await {
        Err(AgentError::Remote(e)) => assert_eq!(e.code, ErrorCode::Unreachable),
        other => panic!("connect to a closed port: {other:?}"),
    }
}

#[tokio::test]
async fn a_file_is_read_by_the_agent_itself_beyond_the_window_with_the_guests_errors() {
    use tokio::io::AsyncReadExt as _;
    let h = start();
    let data: Vec<u8> = (0..3 * ember_wire::CONNECT_WINDOW as usize + 777).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir(h.dir.path().join("d")).unwrap();
    std::fs::write(h.dir.path().join("d/f.bin"), &data).unwrap();
    let mut s = h.client.read_file("d/f.bin").await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert!(back == data, "{} bytes back of {}", back.len(), data.len());
    for (path, needle) in [("nope", "nope: No such file or directory"), ("d", "d: Is a directory")] {
        match h.client.read_file(path).await {
            Err(AgentError::Remote(e)) => {
                assert_eq!((e.code, e.message.as_str()), (ErrorCode::BadRequest, needle))
            }
            other => panic!("{path}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_file_is_written_by_the_agent_itself_in_order_with_the_guests_errors() {
    written_in_order_with_the_guests_errors(start(), 1 << 20).await;
}

/// Pieces over a slot and more of them than the lane has slots: some wait
/// for room, some are split, all land at their offsets.
#[tokio::test]
async fn a_file_comes_over_the_bulk_lane_in_pieces_at_their_offsets() {
    written_in_order_with_the_guests_errors(start_with(true), 5 << 20).await;
}

#[tokio::test]
async fn a_lane_write_for_no_file_or_a_connection_is_refused_and_the_agent_serves_on() {
    let h = start_with(true);
    for target in [0u64, 9999] {
        let body = format!(
            r#"{{"id":0,"body":{{"type":"lane_write","target":{target},"at":0,"lane_at":0,"len":10}}}}"#
        );
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend(body.as_bytes());
        h.client.send_raw(frame).await.unwrap();
        let e = h.client.next_stray_error(Duration::from_secs(5)).await.unwrap();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::NotFound, format!("no file {target}").as_str()));
    }
    let out = h.client.run(sh("echo alive")).await.unwrap();
    assert_eq!(out.stdout, b"alive\n");
}

async fn written_in_order_with_the_guests_errors(h: Harness, piece: usize) {
    let data: Vec<u8> = (0..5 * piece + 333).map(|i| (i % 253) as u8).collect();
    let mut up = h.client.write_file("new/dir/f.bin").await.unwrap();
    // Pieces of any size: the upload cuts its own.
    for p in data.chunks(piece) {
        up.write(p).await.unwrap();
    }
    up.finish().await.unwrap();
    assert!(
        std::fs::read(h.dir.path().join("new/dir/f.bin")).unwrap() == data,
        "parents made, bytes in order"
    );
    // An existing file is truncated; an empty write makes an empty file.
    let mut up = h.client.write_file("new/dir/f.bin").await.unwrap();
    up.write(b"short").await.unwrap();
    up.finish().await.unwrap();
    assert_eq!(std::fs::read(h.dir.path().join("new/dir/f.bin")).unwrap(), b"short");
    h.client.write_file("empty").await.unwrap().finish().await.unwrap();
    assert_eq!(std::fs::metadata(h.dir.path().join("empty")).unwrap().len(), 0);
    // The guest's own words for what cannot be opened.
    std::fs::write(h.dir.path().join("plain"), b"x").unwrap();
    for (path, needle, errno) in [
        ("new/dir", "new/dir: Is a directory", libc::EISDIR),
        ("plain/below", "plain/below: File exists", libc::EEXIST),
    ] {
        match h.client.write_file(path).await {
            Err(AgentError::Remote(e)) => {
                assert_eq!(
                    (e.code, e.message.as_str(), e.errno),
                    (ErrorCode::BadRequest, needle, Some(errno))
                )
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    // A full disk says ENOSPC (`/dev/full` fails every write so), on the
    // channel and on the lane alike, for the host to answer as such.
    let mut full = h.client.write_file("/dev/full").await.unwrap();
    let first_error = match full.write(&vec![7u8; 5 << 20]).await {
        Err(e) => e,
        Ok(()) => full.finish().await.expect_err("a write to /dev/full succeeded"),
    };
    match first_error {
        AgentError::Remote(e) => assert_eq!(e.errno, Some(libc::ENOSPC), "{e:?}"),
        other => panic!("a write to /dev/full: {other:?}"),
    }
    // Abandoned half-way: the agent lets go of it and serves on.
    let mut up = h.client.write_file("abandoned").await.unwrap();
    up.write(b"part").await.unwrap();
    drop(up);
    let out = h.client.run(sh("echo alive")).await.unwrap();
    assert_eq!(out.stdout, b"alive\n");
}
