//! The guest's filesystem as its user sees it: typed requests the agent
//! does with system calls (no tool of the image runs), answered with
//! [`FsEntry`]s or an error carrying the guest's `errno`.

use std::time::Duration;

use ember_wire::{
    Command, ErrorCode, ErrorReply, ExecRequest, FsEntry, RequestBody, ResponseBody, Stream, MAX_LIST_ENTRIES,
};

use super::{AgentClient, AgentError, ExecEvent, ExecHandle};

/// The agent binary in every guest (its `watch` subcommand).
const GUEST_AGENT: &str = "/usr/sbin/ember-agent";

/// A directory's entries, and whether some were left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<FsEntry>,
    pub truncated: bool,
}

impl AgentClient {
    async fn entries(
        &self,
        what: &'static str,
        within: Duration,
        body: RequestBody,
    ) -> Result<Listing, AgentError> {
        match self.call(what, within, body).await? {
            ResponseBody::Entries { entries, truncated } => Ok(Listing { entries, truncated }),
            other => Err(AgentError::Protocol(format!("expected entries to {what}, got {other:?}"))),
        }
    }

    async fn one(
        &self,
        what: &'static str,
        within: Duration,
        body: RequestBody,
    ) -> Result<FsEntry, AgentError> {
        let mut l = self.entries(what, within, body).await?;
        match (l.entries.pop(), l.entries.is_empty()) {
            (Some(e), true) => Ok(e),
            _ => Err(AgentError::Protocol(format!("expected one entry to {what}"))),
        }
    }

    /// The file at `path` (a link is itself).
    pub async fn stat(&self, path: &str) -> Result<FsEntry, AgentError> {
        self.one("stat", self.timeouts.quick, RequestBody::Stat { path: path.into() }).await
    }

    /// The directory's entries `depth` levels down, at most `limit`
    /// (capped at [`MAX_LIST_ENTRIES`]), sorted by path.
    pub async fn list(&self, path: &str, depth: u32, limit: u32) -> Result<Listing, AgentError> {
        let body = RequestBody::List { path: path.into(), depth, limit: limit.min(MAX_LIST_ENTRIES) };
        self.entries("list", self.timeouts.slow, body).await
    }

    /// Make a directory (with `parents`, its parents too; one that exists is fine).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<FsEntry, AgentError> {
        self.one("mkdir", self.timeouts.quick, RequestBody::Mkdir { path: path.into(), parents }).await
    }

    /// Move `from` to `to`; what is at `to` then.
    pub async fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<FsEntry, AgentError> {
        let body = RequestBody::Rename { from: from.into(), to: to.into(), overwrite };
        self.one("rename", self.timeouts.slow, body).await
    }

    /// Remove a file, a link or an empty directory (with `recursive`, a tree).
    pub async fn remove(&self, path: &str, recursive: bool, missing_ok: bool) -> Result<(), AgentError> {
        let body = RequestBody::Remove { path: path.into(), recursive, missing_ok };
        self.call_ok("remove", self.timeouts.slow, body).await
    }

    /// Follow a directory's changes: the guest's agent binary watches it as
    /// the guest's user. Returns once the watch is set (its `ready` line),
    /// so a directory that is missing or unreadable is an error here, with
    /// its errno; then [`DirWatch::next`] gives NDJSON, one line a change,
    /// until the watch is dropped, the directory goes, or `within` passes.
    /// At most `max_dirs` directories are watched (`recursive`: the tree).
    pub async fn watch(
        &self,
        path: &str,
        recursive: bool,
        max_dirs: u32,
        within: Duration,
    ) -> Result<DirWatch, AgentError> {
        let mut argv =
            vec![GUEST_AGENT.to_string(), "watch".into(), "--max-dirs".into(), max_dirs.to_string()];
        if recursive {
            argv.push("--recursive".into());
        }
        argv.push(path.to_string());
        let mut req = ExecRequest::new(Command::Argv(argv));
        req.timeout_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        req.output_limit = u64::MAX;
        let mut handle = self.exec(req).await?;
        let (mut head, mut stderr) = (Vec::new(), Vec::new());
        let start = self.timeouts.quick;
        let newline = loop {
            if let Some(i) = head.iter().position(|b| *b == b'\n') {
                break i;
            }
            if head.len() > WATCH_HEAD_LIMIT {
                return Err(AgentError::Protocol(format!(
                    "the watch of {path} sent no line in {} bytes",
                    head.len()
                )));
            }
            let ev = tokio::time::timeout(start, handle.next())
                .await
                .map_err(|_| AgentError::Timeout { what: "watch", after: start })??;
            match ev {
                ExecEvent::Output { stream: Stream::Stdout, data } => head.extend(data),
                ExecEvent::Output { stream: Stream::Stderr, data } => {
                    stderr.extend(data);
                    stderr.truncate(WATCH_HEAD_LIMIT);
                }
                ExecEvent::Exit(_) => {
                    let words = String::from_utf8_lossy(&stderr).trim().to_string();
                    return Err(AgentError::Remote(ErrorReply::new(ErrorCode::SpawnFailed, words)));
                }
                ExecEvent::Dropped { .. } => {}
            }
        };
        let first: serde_json::Value = serde_json::from_slice(&head[..newline])
            .map_err(|e| AgentError::Protocol(format!("the watch's first line: {e}")))?;
        if first["type"] == "error" {
            let message = first["message"].as_str().unwrap_or("the watch failed").to_string();
            let errno = first["errno"].as_i64().and_then(|n| i32::try_from(n).ok());
            return Err(AgentError::Remote(ErrorReply {
                errno,
                ..ErrorReply::new(ErrorCode::BadRequest, message)
            }));
        }
        Ok(DirWatch { handle, head: Some(head) })
    }
}

/// Bytes the host reads of a watch before its first line, at most.
const WATCH_HEAD_LIMIT: usize = 64 << 10;

/// A directory watch that is set: its NDJSON, chunk by chunk (the `ready`
/// line first). Dropping it ends the watcher in the guest.
#[derive(Debug)]
pub struct DirWatch {
    handle: ExecHandle,
    head: Option<Vec<u8>>,
}

impl DirWatch {
    /// The next bytes of NDJSON; `None` once the watch is over.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        loop {
            match self.handle.next().await {
                Ok(ExecEvent::Output { stream: Stream::Stdout, data }) => return Some(data),
                Ok(ExecEvent::Output { .. } | ExecEvent::Dropped { .. }) => {}
                Ok(ExecEvent::Exit(_)) | Err(_) => return None,
            }
        }
    }
}
