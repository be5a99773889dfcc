//! envd's `filesystem.Filesystem` unary RPCs over a session's files
//! (`ember_service::files`: typed agent requests done as the guest's user):
//! Stat, ListDir (with a depth), MakeDir (parents; an existing directory is
//! `already_exists`, a file in the way `invalid_argument`), Move (overwrites,
//! as `rename(2)`), Remove (recursive; a missing path is no error).

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::response::Response;
use ember_pool::pool::Backend;
use ember_service::files::Files;
use ember_service::{AppState, Kind};
use ember_wire::{FileKind, FsEntry};
use serde::Deserialize;

use crate::connect::{Code, RpcError};
use crate::envd::{rpc_error, unary};
use crate::sandbox::Found;

/// The deepest `ListDir` walks (as Ember's own listing).
const MAX_DEPTH: u32 = ember_service::files::MAX_LIST_DEPTH;

/// An entry as envd writes `EntryInfo` (proto3 JSON: `size` a string).
pub fn entry_info(e: &FsEntry) -> serde_json::Value {
    let kind = match e.kind {
        FileKind::Directory => "FILE_TYPE_DIRECTORY",
        FileKind::Symlink => "FILE_TYPE_SYMLINK",
        FileKind::File | FileKind::Other => "FILE_TYPE_FILE",
    };
    let secs = u64::try_from(e.modified_unix_ns.div_euclid(1_000_000_000)).unwrap_or(0);
    let nanos = u32::try_from(e.modified_unix_ns.rem_euclid(1_000_000_000)).unwrap_or(0);
    let modified = UNIX_EPOCH + Duration::new(secs, nanos);
    let mut v = serde_json::json!({
        "name": e.name,
        "type": kind,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode & 0o7777,
        "permissions": e.permissions(),
        "owner": e.owner,
        "group": e.group,
        "modifiedTime": humantime::format_rfc3339_nanos(modified).to_string(),
    });
    if let Some(t) = &e.symlink_target {
        v["symlinkTarget"] = serde_json::json!(t);
        v["isSymlink"] = serde_json::json!(true);
    }
    v
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PathRequest {
    path: String,
    depth: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MoveRequest {
    source: String,
    destination: String,
}

fn parse<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, RpcError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| RpcError::new(Code::InvalidArgument, format!("request: {e}")))
}

fn path_of(p: &str) -> Result<&str, RpcError> {
    ember_service::files::check_path(p).map_err(rpc_error)?;
    Ok(p)
}

async fn files<B: Backend>(state: &AppState<B>, found: &Found) -> Result<Files, RpcError> {
    state.files(&found.caller, &found.key).await.map_err(rpc_error)
}

/// A missing path, as envd says it (`FileNotFoundException` in the SDK).
fn missing(path: &str, e: ember_service::Error) -> RpcError {
    match e.kind {
        Kind::NotFound => RpcError::new(Code::NotFound, format!("path {path:?} not found")),
        _ => rpc_error(e),
    }
}

/// `filesystem.Filesystem/*`: the unary ones here, the watches in `watch.rs`.
pub async fn filesystem<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    method: &str,
    headers: &axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    match method {
        "WatchDir" => crate::watch::watch_dir(state, found, &body, crate::envd::keepalive(headers)).await,
        "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
            crate::watch::polling(state, found, method, &body).await
        }
        "Stat" => unary(stat(state, found, &body).await),
        "ListDir" => unary(list_dir(state, found, &body).await),
        "MakeDir" => unary(make_dir(state, found, &body).await),
        "Move" => unary(move_to(state, found, &body).await),
        "Remove" => unary(remove(state, found, &body).await),
        other => unary::<()>(Err(RpcError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{other} is not implemented by Ember's envd yet"),
        ))),
    }
}

async fn stat<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: PathRequest = parse(body)?;
    let path = path_of(&req.path)?;
    let e = files(state, found).await?.stat(path).await.map_err(|e| missing(path, e))?;
    Ok(serde_json::json!({ "entry": entry_info(&e) }))
}

async fn list_dir<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: PathRequest = parse(body)?;
    let path = path_of(&req.path)?;
    let depth = req.depth.unwrap_or(1).clamp(1, MAX_DEPTH);
    let listing = files(state, found).await?.list(path, depth).await.map_err(|e| missing(path, e))?;
    let entries: Vec<_> = listing.entries.iter().map(entry_info).collect();
    Ok(serde_json::json!({ "entries": entries }))
}

async fn make_dir<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: PathRequest = parse(body)?;
    let path = path_of(&req.path)?;
    let f = files(state, found).await?;
    match f.stat(path).await {
        Ok(e) if e.kind == FileKind::Directory => {
            return Err(RpcError::new(Code::AlreadyExists, format!("directory {path:?} already exists")))
        }
        Ok(_) => {
            return Err(RpcError::new(
                Code::InvalidArgument,
                format!("{path:?} exists and is not a directory"),
            ))
        }
        Err(e) if e.kind == Kind::NotFound => {}
        Err(e) => return Err(rpc_error(e)),
    }
    let e = f.mkdir(path, true).await.map_err(|e| match e.kind {
        // A file where a parent should be.
        Kind::Conflict | Kind::Invalid => RpcError::new(Code::InvalidArgument, e.message),
        _ => rpc_error(e),
    })?;
    Ok(serde_json::json!({ "entry": entry_info(&e) }))
}

async fn move_to<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: MoveRequest = parse(body)?;
    let (from, to) = (path_of(&req.source)?, path_of(&req.destination)?);
    let e = files(state, found).await?.rename(from, to, true).await.map_err(|e| missing(from, e))?;
    Ok(serde_json::json!({ "entry": entry_info(&e) }))
}

async fn remove<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
) -> Result<serde_json::Value, RpcError> {
    let req: PathRequest = parse(body)?;
    let path = path_of(&req.path)?;
    files(state, found).await?.remove(path, true, true).await.map_err(rpc_error)?;
    Ok(serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_as_envd_writes_them() {
        let e = FsEntry {
            name: "a.txt".into(),
            path: "/home/ember/a.txt".into(),
            kind: FileKind::File,
            size: 1024,
            mode: 0o100644,
            owner: "ember".into(),
            group: "ember".into(),
            modified_unix_ns: 1_700_000_000_500_000_000,
            symlink_target: None,
        };
        let v = entry_info(&e);
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["size"], "1024");
        assert_eq!(v["mode"], 0o644);
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["modifiedTime"], "2023-11-14T22:13:20.500000000Z");
        assert!(v.get("symlinkTarget").is_none());
        let link = FsEntry { kind: FileKind::Symlink, symlink_target: Some("b".into()), ..e };
        assert_eq!(
            (entry_info(&link)["type"].clone(), entry_info(&link)["isSymlink"].clone()),
            (serde_json::json!("FILE_TYPE_SYMLINK"), serde_json::json!(true))
        );
    }
}
