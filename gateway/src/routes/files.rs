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

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use futures_util::StreamExt as _;
use std::collections::HashMap;

use crate::api::{FileEntry, FileListing, Written};
use crate::error::ApiError;
use crate::state::AppState;
use axum::Extension;
use ember_service::Caller;

type Params = Query<HashMap<String, String>>;
type Answer = Result<Response, ApiError>;

pub async fn get<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&caller, &key).await?;
    if q.contains_key("stat") {
        let e = files.stat(&path).await?;
        return Ok(Json(FileEntry::at(&path, &e)).into_response());
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
        let entries = listing.entries.iter().map(FileEntry::listed).collect();
        return Ok(Json(FileListing { path, entries, truncated: listing.truncated }).into_response());
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
fn watch(mut w: ember_channel::DirWatch) -> Response {
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
    Extension(caller): Extension<Caller>,
    Path((key, path)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&caller, &key).await?;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut upload = files.write(&path, declared).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        upload.write(&chunk).await?;
    }
    let written = upload.finish().await?;
    Ok((StatusCode::CREATED, Json(Written { path, size: written })).into_response())
}

pub(super) fn too_large(limit: u64) -> ApiError {
    ember_service::files::too_large(limit).into()
}

/// `?mkdir` (parents too) or `?move_to=DEST`.
pub async fn post<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&caller, &key).await?;
    if q.contains_key("mkdir") {
        let e = files.mkdir(&path, true).await?;
        return Ok((StatusCode::CREATED, Json(FileEntry::at(&path, &e))).into_response());
    }
    let Some(dest) = q.get("move_to") else {
        return Err(ApiError::invalid("POST a path with ?mkdir or ?move_to=DEST"));
    };
    let e = files.rename(&path, dest, true).await?;
    Ok(Json(FileEntry::at(dest, &e)).into_response())
}

/// Remove a file, an empty directory, or with `?recursive=true` a tree.
pub async fn delete<B: Backend>(
    State(state): State<AppState<B>>,
    Extension(caller): Extension<Caller>,
    Path((key, path)): Path<(String, String)>,
    Query(q): Params,
) -> Answer {
    // A bad path is refused before a paused session is resumed for it.
    ember_service::files::check_path(&path)?;
    let files = state.files(&caller, &key).await?;
    let recursive = q.get("recursive").is_some_and(|v| v == "true" || v == "1");
    files.remove(&path, recursive, false).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_paths_are_refused_before_any_session_is_touched() {
        let check = ember_service::files::check_path;
        assert!(check("").is_err() && check("a\0b").is_err() && check("a/b").is_ok());
    }
}
