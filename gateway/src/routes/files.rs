//! A session's files over HTTP: each route parses its request and calls the
//! service's file operation (`ember_service::files`: typed agent requests
//! done in the guest as its user, errors by errno). Paths are the guest's:
//! relative ones are under `/home/ember`; an absolute one is written with
//! its first `/` as `%2F`.
//!
//! `GET` reads (streamed), or `?stat` / `?list` (`&depth=N`) / `?watch`
//! (NDJSON of the directory's changes, `&recursive=true` for its tree);
//! `PUT` writes (streamed, parents created, at most
//! `limits.max_upload_bytes`); `POST ?mkdir`, `POST ?move_to=DEST`;
//! `DELETE` (`?recursive=true` for a directory).

use std::collections::HashMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use ember_wire::FsEntry;
use futures_util::StreamExt as _;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

type Params = Query<HashMap<String, String>>;
type Answer = Result<Response, ApiError>;

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
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&key).await?;
    if q.contains_key("stat") {
        let e = files.stat(&path).await?;
        return Ok(Json(stat_json(&path, &e)).into_response());
    }
    if q.contains_key("list") {
        let depth = match q.get("depth") {
            None => 1,
            Some(d) => d.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "depth {d:?}: a whole number from 1 to {}",
                    ember_service::files::MAX_LIST_DEPTH
                ))
            })?,
        };
        let listing = files.list(&path, depth).await?;
        let entries: Vec<serde_json::Value> = listing
            .entries
            .iter()
            .map(|e| {
                let mut m = entry_json(e);
                m.insert("path".into(), json!(e.path));
                serde_json::Value::Object(m)
            })
            .collect();
        return Ok(
            Json(json!({ "path": path, "entries": entries, "truncated": listing.truncated })).into_response()
        );
    }
    if q.contains_key("watch") {
        let recursive = q.get("recursive").is_some_and(|v| v != "false");
        let w = files.watch(&path, recursive).await?;
        return Ok(watch(w));
    }
    // The headers wait for the file to open, so a missing or unreadable
    // one is a JSON error; the bytes then flow as the client takes them.
    let stream = files.read(&path).await?;
    let mut resp =
        Response::new(Body::from_stream(tokio_util::io::ReaderStream::with_capacity(stream, 256 << 10)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    Ok(resp)
}

/// A watch that is set, as NDJSON until the client goes away (which ends
/// the watcher), the directory goes, or `ember_service::files::WATCH_LIMIT`.
fn watch(mut w: ember_vm::DirWatch) -> Response {
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
    super::ndjson(rx)
}

/// Write the body to the file (parents created), streamed as it arrives.
pub async fn put<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&key).await?;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut upload = files.write(&path, declared).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        upload.write(&chunk).await?;
    }
    let written = upload.finish().await?;
    Ok((StatusCode::CREATED, Json(json!({ "path": path, "size": written }))).into_response())
}

pub(super) fn too_large(limit: u64) -> ApiError {
    ember_service::files::too_large(limit).into()
}

/// `?mkdir` (parents too) or `?move_to=DEST`.
pub async fn post<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&key).await?;
    if q.contains_key("mkdir") {
        let e = files.mkdir(&path, true).await?;
        return Ok((StatusCode::CREATED, Json(stat_json(&path, &e))).into_response());
    }
    let Some(dest) = q.get("move_to") else {
        return Err(ApiError::invalid("POST a path with ?mkdir or ?move_to=DEST"));
    };
    let e = files.rename(&path, dest, true).await?;
    Ok(Json(stat_json(dest, &e)).into_response())
}

/// Remove a file, an empty directory, or with `?recursive=true` a tree.
pub async fn delete<B: Backend>(
    State(state): State<AppState<B>>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&key).await?;
    let recursive = q.get("recursive").is_some_and(|v| v == "true" || v == "1");
    files.remove(&path, recursive, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
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
        let check = ember_service::files::check_path;
        assert!(check("").is_err() && check("a\0b").is_err() && check("a/b").is_ok());
    }
}
