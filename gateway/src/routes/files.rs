//! A session's files, as the guest's user sees them: every operation runs
//! inside the guest as that user (reads and writes by the agent itself,
//! the rest by coreutils through it, on the session's shared agent
//! connection), so the guest's own permissions
//! decide and its own error is what the caller reads; nothing on the host
//! is ever opened. Paths are the guest's: relative ones are under
//! `/home/ember`; an absolute one is written with its first `/` as `%2F`.
//!
//! `GET` reads (streamed), or `?stat` / `?list` / `?watch` (NDJSON of the
//! directory's changes, `&recursive=true` for its tree); `PUT` writes (streamed,
//! parents created, at most `limits.max_upload_bytes`); `POST ?mkdir`,
//! `POST ?move_to=DEST`; `DELETE` (`?recursive=true` for a directory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use ember_vm::{AgentClient, ExecEvent};
use ember_wire::{Command, ExecRequest, Stream};
use futures_util::StreamExt as _;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// Bytes of one write of an upload (well under a frame's limit).
const UPLOAD_CHUNK: usize = 4 << 20;
/// Output of a listing or stat kept (a directory of ~100 000 entries).
const LISTING_LIMIT: u64 = 16 << 20;
/// How long a file operation other than a transfer may take.
const QUICK: Duration = Duration::from_secs(30);
/// The longest a directory watch lasts.
pub const WATCH_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// The agent binary in every guest (its `watch` subcommand).
const GUEST_AGENT: &str = "/usr/sbin/ember-agent";

type Params = Query<HashMap<String, String>>;

fn check_path(raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.contains('\0') || raw.len() > 4096 {
        return Err(crate::api::invalid(format!("path {raw:?}: 1-4096 bytes, no NUL")));
    }
    Ok(raw.to_string())
}

/// The checked path, and the session's VM and agent (resumed if paused).
async fn target<B: Backend>(
    state: &AppState<B>,
    key: &str,
    path: &str,
) -> Result<(String, String, Arc<AgentClient>), ApiError> {
    let path = check_path(path)?;
    let (vm, agent) = super::processes::agent_of(state, key).await?;
    Ok((path, vm, agent))
}

/// What the guest's tool said, as an HTTP error: its own message.
fn fs_error(path: &str, stderr: &[u8]) -> ApiError {
    let msg = String::from_utf8_lossy(stderr).trim().to_string();
    let msg = if msg.is_empty() { format!("{path}: the operation failed") } else { msg };
    let has = |s: &str| msg.contains(s);
    if has("No such file or directory") {
        ApiError::not_found(msg)
    } else if has("Permission denied") || has("Operation not permitted") || has("Read-only file system") {
        ApiError::new(StatusCode::FORBIDDEN, "permission_denied", msg)
    } else if has("File exists") || has("Directory not empty") {
        ApiError::conflict("file_exists", msg)
    } else if has("No space left") || has("Disk quota") {
        ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", msg)
    } else {
        crate::api::invalid(msg)
    }
}

/// Run `argv` in the guest as its user, to its end: (stdout, stderr, ok).
async fn guest(agent: &AgentClient, vm: &str, argv: &[&str]) -> Result<(Vec<u8>, Vec<u8>, bool), ApiError> {
    let mut req = ExecRequest::new(Command::Argv(argv.iter().map(|s| s.to_string()).collect()));
    req.timeout_ms = QUICK.as_millis() as u64;
    req.output_limit = LISTING_LIMIT;
    let out = agent.run(req).await.map_err(|e| ApiError::from_agent(vm, e).0)?;
    if out.status.timed_out {
        return Err(ApiError::vm_failed(format!("{} did not finish within {QUICK:?}", argv[0])));
    }
    Ok((out.stdout, out.stderr, out.status.code == Some(0)))
}

pub async fn get<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let r = async {
        let (path, vm, agent) = target(&state, &key, &path).await?;
        if q.contains_key("stat") {
            return stat(&agent, &vm, &path).await.map(|v| Json(v).into_response());
        }
        if q.contains_key("list") {
            return list(&agent, &vm, &path).await.map(|v| Json(v).into_response());
        }
        if q.contains_key("watch") {
            let recursive = q.get("recursive").is_some_and(|v| v != "false");
            return watch(agent, vm, path, recursive, state.limits.max_watched_dirs).await;
        }
        read(agent, vm, path).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// `stat -c` fields, `|`-separated, the name last (it may hold `|`).
const STAT_FORMAT: &str = "%F|%s|%a|%Y|%U|%n";

fn stat_json(line: &str) -> Option<serde_json::Value> {
    let mut f = line.splitn(6, '|');
    let kind = match f.next()? {
        "regular file" | "regular empty file" => "file",
        "directory" => "directory",
        "symbolic link" => "symlink",
        _ => "other",
    };
    let size: u64 = f.next()?.parse().ok()?;
    let mode = f.next()?;
    let mtime: u64 = f.next()?.parse().ok()?;
    let owner = f.next()?;
    let name = f.next()?;
    let modified = std::time::UNIX_EPOCH + Duration::from_secs(mtime);
    Some(json!({
        "path": name,
        "type": kind,
        "size": size,
        "mode": mode,
        "owner": owner,
        "modified": humantime::format_rfc3339(modified).to_string(),
    }))
}

async fn stat(agent: &AgentClient, vm: &str, path: &str) -> Result<serde_json::Value, ApiError> {
    let (out, err, ok) = guest(agent, vm, &["stat", "-c", STAT_FORMAT, "--", path]).await?;
    if !ok {
        return Err(fs_error(path, &err));
    }
    let text = String::from_utf8_lossy(&out);
    stat_json(text.trim_end_matches('\n'))
        .ok_or_else(|| ApiError::vm_failed(format!("the guest's stat printed {text:?}")))
}

async fn list(agent: &AgentClient, vm: &str, path: &str) -> Result<serde_json::Value, ApiError> {
    let script = "p=$1; case $p in -*) p=./$p;; esac
        if [ ! -d \"$p\" ]; then
            if [ -e \"$p\" ]; then echo \"$1: Not a directory\" >&2; else echo \"$1: No such file or directory\" >&2; fi
            exit 1
        fi
        exec find \"$p\" -mindepth 1 -maxdepth 1 -printf '%y|%s|%m|%T@|%u|%f\\0'";
    let (out, err, ok) = guest(agent, vm, &["sh", "-c", script, "sh", path]).await?;
    if !ok {
        return Err(fs_error(path, &err));
    }
    let mut entries: Vec<serde_json::Value> = out
        .split(|b| *b == 0)
        .filter(|l| !l.is_empty())
        .filter_map(|l| list_entry(&String::from_utf8_lossy(l)))
        .collect();
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(json!({ "path": path, "entries": entries }))
}

/// One `find -printf '%y|%s|%m|%T@|%u|%f'` entry.
fn list_entry(line: &str) -> Option<serde_json::Value> {
    let mut f = line.splitn(6, '|');
    let kind = match f.next()? {
        "f" => "file",
        "d" => "directory",
        "l" => "symlink",
        _ => "other",
    };
    let size: u64 = f.next()?.parse().ok()?;
    let mode = f.next()?;
    let mtime: u64 = f.next()?.split('.').next()?.parse().ok()?;
    let owner = f.next()?;
    let name = f.next()?;
    let modified = std::time::UNIX_EPOCH + Duration::from_secs(mtime);
    Some(json!({
        "name": name,
        "type": kind,
        "size": size,
        "mode": mode,
        "owner": owner,
        "modified": humantime::format_rfc3339(modified).to_string(),
    }))
}

/// Stream the file's bytes, read by the agent itself as the guest's user
/// (no `cat`, no pipe: under TCG a pipe's copies alone cap a stream at
/// ~27 MB/s), paced by how fast the client takes them. The headers wait
/// for the file to open, so a missing or unreadable one is a JSON error.
async fn read(agent: Arc<AgentClient>, vm: String, path: String) -> Result<Response, ApiError> {
    let stream = match agent.read_file(&path).await {
        Ok(s) => s,
        Err(ember_vm::AgentError::Remote(e)) if e.code == ember_wire::ErrorCode::BadRequest => {
            return Err(fs_error(&path, e.message.as_bytes()))
        }
        Err(e) => return Err(ApiError::from_agent(&vm, e).0),
    };
    let mut resp =
        Response::new(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(stream, 256 << 10)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// Follow a directory's changes (NDJSON, see the agent's `watch`): the
/// guest's agent binary watches it as the guest's user; the response starts
/// once the watch is set (its `ready` line), so a missing or unreadable
/// directory is a JSON error. It lasts until the client goes away (which
/// ends the watcher), the directory goes, or [`WATCH_LIMIT`].
async fn watch(
    agent: Arc<AgentClient>,
    vm: String,
    path: String,
    recursive: bool,
    max_dirs: u32,
) -> Result<Response, ApiError> {
    let mut argv = vec![GUEST_AGENT.to_string(), "watch".into(), "--max-dirs".into(), max_dirs.to_string()];
    if recursive {
        argv.push("--recursive".into());
    }
    argv.push(path.clone());
    let mut req = ExecRequest::new(Command::Argv(argv));
    req.timeout_ms = WATCH_LIMIT.as_millis() as u64;
    req.output_limit = u64::MAX;
    let mut h = agent.exec(req).await.map_err(|e| ApiError::from_agent(&vm, e).0)?;
    let (mut stderr, mut head) = (Vec::new(), Vec::new());
    while !head.contains(&b'\n') {
        match tokio::time::timeout(QUICK, h.next()).await {
            Err(_) => {
                return Err(ApiError::vm_failed(format!(
                    "the watch of {path} did not start within {QUICK:?}"
                )))
            }
            Ok(ev) => match ev.map_err(|e| ApiError::from_agent(&vm, e).0)? {
                ExecEvent::Output { stream: Stream::Stdout, data } => head.extend(data),
                ExecEvent::Output { stream: Stream::Stderr, data } => stderr.extend(data),
                ExecEvent::Exit(_) => return Err(fs_error(&path, &stderr)),
                ExecEvent::Dropped { .. } => {}
            },
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if tx.send(Bytes::from(head)).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                ev = h.next() => ev,
                // The client went away: dropping `h` ends the watcher.
                () = tx.closed() => return,
            };
            match next {
                Ok(ExecEvent::Output { stream: Stream::Stdout, data }) => {
                    if tx.send(Bytes::from(data)).await.is_err() {
                        return;
                    }
                }
                Ok(ExecEvent::Output { .. } | ExecEvent::Dropped { .. }) => {}
                Ok(ExecEvent::Exit(_)) | Err(_) => return,
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(super::NDJSON));
    Ok(resp)
}

/// Write the body to the file (parents created), streamed: the agent writes
/// it itself as the user, in 4 MiB pieces (`UPLOAD_CHUNK`) as the body arrives.
pub async fn put<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let (path, vm, agent) = target(&state, &key, &path).await?;
        let limit = state.limits.max_upload_bytes;
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large(limit));
        }
        let failed = |e: ember_vm::AgentError| match e {
            ember_vm::AgentError::Remote(e)
                if matches!(e.code, ember_wire::ErrorCode::BadRequest | ember_wire::ErrorCode::Conflict) =>
            {
                fs_error(&path, e.message.as_bytes())
            }
            e => ApiError::from_agent(&vm, e).0,
        };
        let upload = agent.write_file(&path).await.map_err(failed)?;
        let written = feed(upload, body, limit, failed).await?;
        Ok((StatusCode::CREATED, Json(json!({ "path": path, "size": written }))).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload_too_large",
        format!("the upload is over limits.max_upload_bytes ({limit} bytes)"),
    )
}

/// Write the body to the file, then close it; the bytes written. A body
/// over `limit` stops the write (what was written stays, as with any
/// interrupted write).
async fn feed(
    mut upload: ember_vm::FileUpload,
    body: Body,
    limit: u64,
    failed: impl Fn(ember_vm::AgentError) -> ApiError,
) -> Result<u64, ApiError> {
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    let mut pending = Vec::with_capacity(UPLOAD_CHUNK);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::api::invalid(format!("reading the body: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large(limit));
        }
        pending.extend_from_slice(&chunk);
        if pending.len() >= UPLOAD_CHUNK {
            upload
                .write(std::mem::replace(&mut pending, Vec::with_capacity(UPLOAD_CHUNK)))
                .await
                .map_err(&failed)?;
        }
    }
    upload.finish(pending).await.map_err(failed)?;
    Ok(written)
}

/// `?mkdir` (parents too) or `?move_to=DEST`.
pub async fn post<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let r = async {
        let (path, vm, agent) = target(&state, &key, &path).await?;
        let (argv, status): (Vec<&str>, StatusCode) = if q.contains_key("mkdir") {
            (vec!["mkdir", "-p", "--", &path], StatusCode::CREATED)
        } else if let Some(dest) = q.get("move_to") {
            check_path(dest)?;
            (vec!["mv", "-T", "--", &path, dest], StatusCode::OK)
        } else {
            return Err(crate::api::invalid("POST a path with ?mkdir or ?move_to=DEST"));
        };
        let (_, err, ok) = guest(&agent, &vm, &argv).await?;
        if !ok {
            return Err(fs_error(&path, &err));
        }
        Ok((status, Json(stat(&agent, &vm, q.get("move_to").unwrap_or(&path)).await?)).into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

/// Remove a file, an empty directory, or with `?recursive=true` a tree.
pub async fn delete<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let r = async {
        let (path, vm, agent) = target(&state, &key, &path).await?;
        let recursive = q.get("recursive").is_some_and(|v| v == "true" || v == "1");
        let argv: Vec<&str> = if recursive {
            vec!["rm", "-r", "--", &path]
        } else {
            vec![
                "sh",
                "-c",
                "if [ -d \"$1\" ] && [ ! -L \"$1\" ]; then rmdir -- \"$1\"; else rm -- \"$1\"; fi",
                "sh",
                &path,
            ]
        };
        let (_, err, ok) = guest(&agent, &vm, &argv).await?;
        if !ok {
            return Err(fs_error(&path, &err));
        }
        Ok(StatusCode::NO_CONTENT.into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_and_errors() {
        let v = stat_json("regular file|12|644|1700000000|ember|notes/a|b.txt").unwrap();
        assert_eq!(v["type"], "file");
        assert_eq!(v["size"], 12);
        assert_eq!(v["path"], "notes/a|b.txt");
        assert_eq!(v["modified"], "2023-11-14T22:13:20Z");
        assert_eq!(stat_json("directory|4096|755|1|root|/etc").unwrap()["type"], "directory");
        assert!(stat_json("garbage").is_none());
        let e = list_entry("d|4096|755|1700000000.5|ember|sub|dir").unwrap();
        assert_eq!((e["type"].as_str(), e["name"].as_str()), (Some("directory"), Some("sub|dir")));
        assert!(list_entry("f|x|644|1|u|n").is_none());
        let code = |s: &str| {
            let e = fs_error("p", s.as_bytes());
            (e.status.as_u16(), e.code)
        };
        assert_eq!(code("cat: x: No such file or directory"), (404, "not_found"));
        assert_eq!(code("cat: /root/x: Permission denied"), (403, "permission_denied"));
        assert_eq!(code("rmdir: d: Directory not empty"), (409, "file_exists"));
        assert_eq!(code("cat: d: Is a directory"), (400, "invalid_request"));
        assert_eq!(fs_error("p", b"").message, "p: the operation failed");
        assert!(check_path("").is_err() && check_path("a\0b").is_err() && check_path("a/b").is_ok());
    }
}
