//! A session's files, as the guest's user sees them: every operation is a
//! typed request its agent does with system calls as that user (the
//! guest's permissions decide; the errno says what went wrong; nothing on
//! the host is opened and no tool of the image runs). Paths are the
//! guest's: relative ones are under the user's home.

use std::sync::Arc;
use std::time::Duration;

use ember_channel::{AgentError, DirWatch, FileUpload, Listing};
use ember_pool::pool::{Backend, SessionHandle};
use ember_wire::{FsEntry, MAX_LIST_ENTRIES};
use tokio::io::DuplexStream;

use crate::error::{Error, Kind};
use crate::limits::Limits;
use crate::state::AppState;

/// Levels a listing goes down at most.
pub const MAX_LIST_DEPTH: u32 = 32;
/// The longest a directory watch lasts.
pub const WATCH_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// A path as a request may name it: 1-4096 bytes, no NUL.
pub fn check_path(raw: &str) -> Result<(), Error> {
    if raw.is_empty() || raw.contains('\0') || raw.len() > 4096 {
        return Err(crate::api::invalid(format!("path {raw:?}: 1-4096 bytes, no NUL")));
    }
    Ok(())
}

/// The error of an upload over `limits.max_upload_bytes`.
pub fn too_large(limit: u64) -> Error {
    Error::new(
        Kind::TooLarge,
        "upload_too_large",
        format!("the upload is over limits.max_upload_bytes ({limit} bytes)"),
    )
}

/// One session's files (see [`AppState::files`]).
#[derive(Debug, Clone)]
pub struct Files {
    handle: SessionHandle,
    limits: Arc<Limits>,
}

impl<B: Backend> AppState<B> {
    /// Session `key`'s files: its agent, the session resumed first if it is
    /// paused and counted as used.
    pub async fn files(&self, caller: &crate::tenant::Caller, key: &str) -> Result<Files, Error> {
        Ok(Files { handle: self.session_handle(caller, key).await?, limits: Arc::clone(&self.limits) })
    }
}

impl Files {
    fn failed(&self) -> impl Fn(AgentError) -> Error + '_ {
        move |e| Error::from_agent(&self.handle.vm_id, e).0
    }

    /// The file at `path` (a symbolic link is itself).
    pub async fn stat(&self, path: &str) -> Result<FsEntry, Error> {
        check_path(path)?;
        self.handle.agent.stat(path).await.map_err(self.failed())
    }

    /// The directory's entries `depth` levels down (1 to [`MAX_LIST_DEPTH`]),
    /// sorted by path, at most [`MAX_LIST_ENTRIES`].
    pub async fn list(&self, path: &str, depth: u32) -> Result<Listing, Error> {
        check_path(path)?;
        if !(1..=MAX_LIST_DEPTH).contains(&depth) {
            return Err(crate::api::invalid(format!(
                "depth {depth}: a whole number from 1 to {MAX_LIST_DEPTH}"
            )));
        }
        self.handle.agent.list(path, depth, MAX_LIST_ENTRIES).await.map_err(self.failed())
    }

    /// Make a directory (with `parents`, its parents; one that exists is fine).
    pub async fn mkdir(&self, path: &str, parents: bool) -> Result<FsEntry, Error> {
        check_path(path)?;
        self.handle.agent.mkdir(path, parents).await.map_err(self.failed())
    }

    /// Move `from` to `to` (across filesystems too); what is at `to` then.
    pub async fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<FsEntry, Error> {
        check_path(from)?;
        check_path(to)?;
        self.handle.agent.rename(from, to, overwrite).await.map_err(self.failed())
    }

    /// Remove a file, a link or an empty directory (`recursive`: a tree).
    pub async fn remove(&self, path: &str, recursive: bool, missing_ok: bool) -> Result<(), Error> {
        check_path(path)?;
        self.handle.agent.remove(path, recursive, missing_ok).await.map_err(self.failed())
    }

    /// The file's bytes, read by the agent as the guest's user, paced by how
    /// fast the caller takes them; an error once it is open fails the stream.
    pub async fn read(&self, path: &str) -> Result<DuplexStream, Error> {
        check_path(path)?;
        self.handle.agent.read_file(path).await.map_err(self.failed())
    }

    /// Write a file (parents made, an existing one truncated), at most
    /// `limits.max_upload_bytes`; `declared` is the size the caller says it
    /// sends, refused at once when it is over.
    pub async fn write(&self, path: &str, declared: Option<u64>) -> Result<Upload, Error> {
        check_path(path)?;
        let limit = self.limits.max_upload_bytes;
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large(limit));
        }
        let upload = self.handle.agent.write_file(path).await.map_err(self.failed())?;
        Ok(Upload { upload, written: 0, limit, vm_id: self.handle.vm_id.clone() })
    }

    /// Follow a directory's changes (NDJSON lines, see the agent's `watch`),
    /// once the watch is set, for up to [`WATCH_LIMIT`].
    pub async fn watch(&self, path: &str, recursive: bool) -> Result<DirWatch, Error> {
        check_path(path)?;
        let max_dirs = self.limits.max_watched_dirs;
        self.handle.agent.watch(path, recursive, max_dirs, WATCH_LIMIT).await.map_err(self.failed())
    }
}

/// A file being written: bytes in order with [`Upload::write`], closed by
/// [`Upload::finish`]. Past the limit the write stops (what was written
/// stays, as with any interrupted write).
#[derive(Debug)]
pub struct Upload {
    upload: FileUpload,
    written: u64,
    limit: u64,
    vm_id: String,
}

impl Upload {
    pub async fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(too_large(self.limit));
        }
        let vm = &self.vm_id;
        self.upload.write(data).await.map_err(|e| Error::from_agent(vm, e).0)
    }

    /// Close the file; the bytes written.
    pub async fn finish(self) -> Result<u64, Error> {
        let (vm, written) = (self.vm_id, self.written);
        self.upload.finish().await.map_err(|e| Error::from_agent(&vm, e).0)?;
        Ok(written)
    }
}
