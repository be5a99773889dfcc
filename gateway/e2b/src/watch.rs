//! envd's directory watches over a session's (`ember_service::files::watch`:
//! inotify in the guest, as the user): the `WatchDir` stream (async Python,
//! JS) and the polling watchers the sync Python SDK uses (`CreateWatcher`,
//! `GetWatcherEvents`, `RemoveWatcher`). Ember's events map onto envd's:
//! `create`, `write`, `remove`, `chmod` as they are, a `rename` as the old
//! name's `RENAME` and the new one's `CREATE` (fsnotify's shape); names are
//! relative to the watched directory. A polling watcher keeps at most
//! [`MAX_BUFFERED`] events between polls (older ones dropped) and goes when
//! removed, when its directory goes, or after [`IDLE_LIMIT`] unpolled.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use dashmap::DashMap;
use ember_channel::DirWatch;
use ember_pool::pool::Backend;
use ember_service::AppState;
use serde::Deserialize;
use tokio::time::Instant;

use crate::connect::{self, Code, RpcError};
use crate::envd::{rpc_error, unary};
use crate::sandbox::Found;

/// Events a polling watcher keeps between polls.
pub const MAX_BUFFERED: usize = 10_000;
/// A polling watcher nobody polls for this long is removed.
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// Polling watchers one sandbox may hold.
pub const MAX_PER_SANDBOX: usize = 64;

/// One envd event from one line of Ember's watch output.
pub fn events(line: &[u8]) -> Vec<serde_json::Value> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { return Vec::new() };
    let ev = |name: &serde_json::Value, kind: &str| serde_json::json!({"name": name, "type": kind});
    match v["type"].as_str() {
        Some("create") => vec![ev(&v["path"], "EVENT_TYPE_CREATE")],
        Some("write") => vec![ev(&v["path"], "EVENT_TYPE_WRITE")],
        Some("remove") if v["path"] != "" => vec![ev(&v["path"], "EVENT_TYPE_REMOVE")],
        Some("chmod") => vec![ev(&v["path"], "EVENT_TYPE_CHMOD")],
        Some("rename") => vec![ev(&v["from"], "EVENT_TYPE_RENAME"), ev(&v["to"], "EVENT_TYPE_CREATE")],
        _ => Vec::new(),
    }
}

/// Whether a line says the watch is over (the directory went, or an error).
fn ends(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .is_ok_and(|v| v["type"] == "error" || (v["type"] == "remove" && v["path"] == ""))
}

/// Ember's watch output cut into whole lines.
#[derive(Debug, Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            out.push(self.buf.drain(..=i).collect());
        }
        out
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct WatchRequest {
    path: String,
    recursive: bool,
    watcher_id: String,
}

fn parse(body: &[u8]) -> Result<WatchRequest, RpcError> {
    if body.is_empty() {
        return Ok(WatchRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| RpcError::new(Code::InvalidArgument, format!("request: {e}")))
}

async fn set<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    req: &WatchRequest,
) -> Result<DirWatch, RpcError> {
    ember_service::files::check_path(&req.path).map_err(rpc_error)?;
    let files = state.files(&found.caller, &found.key).await.map_err(rpc_error)?;
    files.watch(&req.path, req.recursive).await.map_err(|e| match e.kind {
        ember_service::Kind::NotFound => {
            RpcError::new(Code::NotFound, format!("path {:?} not found", req.path))
        }
        _ => rpc_error(e),
    })
}

/// `WatchDir`: `start` first, then the events, keepalives in the silences,
/// the end of the stream when the directory goes.
pub async fn watch_dir<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    body: &[u8],
    every: Duration,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let started = async {
        let msg = connect::single_message(body)?;
        set(state, found, &parse(&msg)?).await
    };
    match started.await {
        Err(e) => {
            let _ = tx.try_send(connect::end_stream(Some(&e)));
        }
        Ok(mut w) => {
            tokio::spawn(async move {
                if tx.send(connect::envelope(&serde_json::json!({"start": {}}))).await.is_err() {
                    return;
                }
                let mut lines = Lines::default();
                loop {
                    let chunk = tokio::select! {
                        c = w.next() => c,
                        () = tokio::time::sleep(every) => {
                            if tx.send(connect::envelope(&serde_json::json!({"keepalive": {}}))).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        // The client went away: dropping `w` ends the watcher.
                        () = tx.closed() => return,
                    };
                    let Some(chunk) = chunk else { break };
                    for line in lines.push(&chunk) {
                        for ev in events(&line) {
                            let m = serde_json::json!({"filesystem": ev});
                            if tx.send(connect::envelope(&m)).await.is_err() {
                                return;
                            }
                        }
                        if ends(&line) {
                            let _ = tx.send(connect::end_stream(None)).await;
                            return;
                        }
                    }
                }
                let _ = tx.send(connect::end_stream(None)).await;
            });
        }
    }
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(connect::STREAM_CONTENT_TYPE));
    resp
}

/// A polling watcher's buffered events.
#[derive(Debug)]
struct Watcher {
    sandbox: String,
    events: Arc<Mutex<VecDeque<serde_json::Value>>>,
    polled: Arc<Mutex<Instant>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn watchers() -> &'static DashMap<String, Watcher> {
    static ALL: OnceLock<DashMap<String, Watcher>> = OnceLock::new();
    ALL.get_or_init(DashMap::new)
}

/// `CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`.
pub async fn polling<B: Backend>(state: &AppState<B>, found: &Found, method: &str, body: &[u8]) -> Response {
    let req = match parse(body) {
        Ok(r) => r,
        Err(e) => return unary::<()>(Err(e)),
    };
    match method {
        "CreateWatcher" => unary(create(state, found, &req).await),
        "GetWatcherEvents" => unary(take(found, &req.watcher_id)),
        _ => unary(remove(found, &req.watcher_id)),
    }
}

async fn create<B: Backend>(
    state: &AppState<B>,
    found: &Found,
    req: &WatchRequest,
) -> Result<serde_json::Value, RpcError> {
    let all = watchers();
    // Watchers nobody polls any more go first.
    all.retain(|_, w| w.polled.lock().map_or(true, |t| t.elapsed() < IDLE_LIMIT));
    if all.iter().filter(|w| w.sandbox == found.key).count() >= MAX_PER_SANDBOX {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("{MAX_PER_SANDBOX} watchers are set in this sandbox; remove one first"),
        ));
    }
    let mut w = set(state, found, req).await?;
    let buffered: Arc<Mutex<VecDeque<serde_json::Value>>> = Arc::default();
    let sink = Arc::clone(&buffered);
    let task = tokio::spawn(async move {
        let mut lines = Lines::default();
        while let Some(chunk) = w.next().await {
            for line in lines.push(&chunk) {
                let mut q = sink.lock().unwrap_or_else(|p| p.into_inner());
                for ev in events(&line) {
                    if q.len() == MAX_BUFFERED {
                        q.pop_front();
                    }
                    q.push_back(ev);
                }
                if ends(&line) {
                    return;
                }
            }
        }
    });
    let id = format!("w{}", uuid::Uuid::new_v4().simple());
    let watcher = Watcher {
        sandbox: found.key.clone(),
        events: buffered,
        polled: Arc::new(Mutex::new(Instant::now())),
        task,
    };
    all.insert(id.clone(), watcher);
    Ok(serde_json::json!({ "watcherId": id }))
}

fn take(found: &Found, id: &str) -> Result<serde_json::Value, RpcError> {
    let all = watchers();
    let w = all
        .get(id)
        .filter(|w| w.sandbox == found.key)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("watcher {id:?} not found")))?;
    *w.polled.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    let drained: Vec<_> = w.events.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    Ok(serde_json::json!({ "events": drained }))
}

fn remove(found: &Found, id: &str) -> Result<serde_json::Value, RpcError> {
    let all = watchers();
    if all.get(id).is_some_and(|w| w.sandbox == found.key) {
        all.remove(id);
    }
    Ok(serde_json::json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ember_events_become_envds() {
        assert_eq!(
            events(br#"{"type":"create","path":"a.txt","directory":false}"#),
            vec![serde_json::json!({"name": "a.txt", "type": "EVENT_TYPE_CREATE"})]
        );
        assert_eq!(events(br#"{"type":"write","path":"a.txt"}"#)[0]["type"], "EVENT_TYPE_WRITE");
        let r = events(br#"{"type":"rename","from":"a","to":"b"}"#);
        assert_eq!((r[0]["type"].as_str(), r[1]["name"].as_str()), (Some("EVENT_TYPE_RENAME"), Some("b")));
        assert!(events(br#"{"type":"ready","path":"x"}"#).is_empty());
        assert!(
            events(br#"{"type":"remove","path":""}"#).is_empty() && ends(br#"{"type":"remove","path":""}"#)
        );
        assert!(!ends(br#"{"type":"remove","path":"x"}"#));
        let mut l = Lines::default();
        assert!(l.push(b"{\"a\":").is_empty());
        assert_eq!(l.push(b"1}\n{\"b\":2}\n{").len(), 2);
    }
}
