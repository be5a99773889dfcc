//! A session's files, as the guest's user sees them: every operation is a
//! typed request the guest's agent does itself with system calls as that
//! user, on the session's shared agent connection, so the guest's own
//! permissions decide and its errno says what went wrong; nothing on the
//! host is ever opened and no tool of the image runs. Paths are the
//! guest's: relative ones are under `/home/ember`; an absolute one is
//! written with its first `/` as `%2F`.
//!
//! `GET` reads (streamed), or `?stat` / `?list` (`&depth=N`) / `?watch`
//! (NDJSON of the directory's changes, `&recursive=true` for its tree);
//! `PUT` writes (streamed, parents created, at most
//! `limits.max_upload_bytes`); `POST ?mkdir`, `POST ?move_to=DEST`;
//! `DELETE` (`?recursive=true` for a directory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use ember_vm::AgentClient;
use ember_wire::FsEntry;
use futures_util::StreamExt as _;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// The longest a directory watch lasts.
pub const WATCH_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// Levels a listing goes down at most (`?depth=`).
const MAX_LIST_DEPTH: u32 = 32;

type Params = Query<HashMap<String, String>>;

fn check_path(raw: &str) -> Result<String, ApiError> {
    if raw.is_empty() || raw.contains('\0') || raw.len() > 4096 {
        return Err(crate::error::ApiError::invalid(format!("path {raw:?}: 1-4096 bytes, no NUL")));
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

/// An agent's error as the caller sees it (a file operation's by its errno).
fn failed(vm: &str) -> impl Fn(ember_vm::AgentError) -> ApiError + '_ {
    move |e| ApiError::from_agent(vm, e).0
}

/// An entry's fields both `?stat` and `?list` show.
fn entry_json(e: &FsEntry) -> serde_json::Map<String, serde_json::Value> {
    let secs = u64::try_from(e.modified_unix_ns.div_euclid(1_000_000_000)).unwrap_or(0);
    let modified = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    let mut m = serde_json::Map::new();
    m.insert("name".into(), json!(e.name));
    m.insert("type".into(), json!(e.kind.as_str()));
    m.insert("size".into(), json!(e.size));
    m.insert("mode".into(), json!(e.mode_octal()));
    m.insert("permissions".into(), json!(e.permissions()));
    m.insert("owner".into(), json!(e.owner));
    m.insert("group".into(), json!(e.group));
    m.insert("modified".into(), json!(humantime::format_rfc3339(modified).to_string()));
    if let Some(t) = &e.symlink_target {
        m.insert("symlink_target".into(), json!(t));
    }
    m
}

/// `?stat`'s body: the entry, with `path` as the caller named it.
fn stat_json(path: &str, e: &FsEntry) -> serde_json::Value {
    let mut m = entry_json(e);
    m.insert("path".into(), json!(path));
    serde_json::Value::Object(m)
}

pub async fn get<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    let r = async {
        let (path, vm, agent) = target(&state, &key, &path).await?;
        if q.contains_key("stat") {
            let e = agent.stat(&path).await.map_err(failed(&vm))?;
            return Ok(Json(stat_json(&path, &e)).into_response());
        }
        if q.contains_key("list") {
            let depth = match q.get("depth") {
                None => 1,
                Some(d) => d.parse().ok().filter(|d| (1..=MAX_LIST_DEPTH).contains(d)).ok_or_else(|| {
                    crate::error::ApiError::invalid(format!(
                        "depth {d:?}: a whole number from 1 to {MAX_LIST_DEPTH}"
                    ))
                })?,
            };
            return list(&agent, &vm, &path, depth).await.map(|v| Json(v).into_response());
        }
        if q.contains_key("watch") {
            let recursive = q.get("recursive").is_some_and(|v| v != "false");
            return watch(agent, vm, path, recursive, state.limits.max_watched_dirs).await;
        }
        read(agent, vm, path).await
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

async fn list(agent: &AgentClient, vm: &str, path: &str, depth: u32) -> Result<serde_json::Value, ApiError> {
    let listing = agent.list(path, depth, ember_wire::MAX_LIST_ENTRIES).await.map_err(failed(vm))?;
    let entries: Vec<serde_json::Value> = listing
        .entries
        .iter()
        .map(|e| {
            let mut m = entry_json(e);
            m.insert("path".into(), json!(e.path));
            serde_json::Value::Object(m)
        })
        .collect();
    Ok(json!({ "path": path, "entries": entries, "truncated": listing.truncated }))
}

/// Stream the file's bytes, read by the agent itself as the guest's user
/// (no `cat`, no pipe: under TCG a pipe's copies alone cap a stream at
/// ~27 MB/s), paced by how fast the client takes them. The headers wait
/// for the file to open, so a missing or unreadable one is a JSON error.
async fn read(agent: Arc<AgentClient>, vm: String, path: String) -> Result<Response, ApiError> {
    let stream = agent.read_file(&path).await.map_err(failed(&vm))?;
    let mut resp =
        Response::new(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(stream, 256 << 10)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// Follow a directory's changes (NDJSON, see the agent's `watch`); the
/// response starts once the watch is set, so a missing or unreadable
/// directory is a JSON error. It lasts until the client goes away (which
/// ends the watcher), the directory goes, or [`WATCH_LIMIT`].
async fn watch(
    agent: Arc<AgentClient>,
    vm: String,
    path: String,
    recursive: bool,
    max_dirs: u32,
) -> Result<Response, ApiError> {
    let mut w = agent.watch(&path, recursive, max_dirs, WATCH_LIMIT).await.map_err(failed(&vm))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                b = w.next() => b,
                // The client went away: dropping `w` ends the watcher.
                () = tx.closed() => return,
            };
            let Some(b) = next else { return };
            if tx.send(Bytes::from(b)).await.is_err() {
                return;
            }
        }
    });
    Ok(super::ndjson(rx))
}

/// Write the body to the file (parents created), streamed: the agent writes
/// it itself as the user, in the upload's own pieces as the body arrives.
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
        let upload = agent.write_file(&path).await.map_err(failed(&vm))?;
        let written = feed(upload, body, limit, failed(&vm)).await?;
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
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| crate::error::ApiError::invalid(format!("reading the body: {e}")))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(too_large(limit));
        }
        upload.write(&chunk).await.map_err(&failed)?;
    }
    upload.finish().await.map_err(failed)?;
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
        if q.contains_key("mkdir") {
            let e = agent.mkdir(&path, true).await.map_err(failed(&vm))?;
            return Ok((StatusCode::CREATED, Json(stat_json(&path, &e))).into_response());
        }
        let Some(dest) = q.get("move_to") else {
            return Err(crate::error::ApiError::invalid("POST a path with ?mkdir or ?move_to=DEST"));
        };
        let dest = check_path(dest)?;
        let e = agent.rename(&path, &dest, true).await.map_err(failed(&vm))?;
        Ok((StatusCode::OK, Json(stat_json(&dest, &e))).into_response())
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
        agent.remove(&path, recursive, false).await.map_err(failed(&vm))?;
        Ok::<_, ApiError>(StatusCode::NO_CONTENT.into_response())
    };
    r.await.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_show_as_before_with_more_fields() {
        let e = FsEntry {
            name: "b.txt".into(),
            path: "/home/ember/notes/a|b.txt".into(),
            kind: ember_wire::FileKind::File,
            size: 12,
            mode: 0o100644,
            owner: "ember".into(),
            group: "ember".into(),
            modified_unix_ns: 1_700_000_000_500_000_000,
            symlink_target: None,
        };
        let v = stat_json("notes/a|b.txt", &e);
        assert_eq!(v["type"], "file");
        assert_eq!(v["size"], 12);
        assert_eq!(v["mode"], "644");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["path"], "notes/a|b.txt");
        assert_eq!(v["modified"], "2023-11-14T22:13:20Z");
        assert!(v.get("symlink_target").is_none());
        assert!(check_path("").is_err() && check_path("a\0b").is_err() && check_path("a/b").is_ok());
    }
}
