//! What the API shows of a guest's files and processes: typed views every
//! front end serialises the same way (the HTTP routes as they are; the
//! E2B and MCP front ends translate from these, never from wire types).

use std::time::{Duration, UNIX_EPOCH};

use ember_wire::{Command, FsEntry, ProcessInfo};
use serde::Serialize;

/// A file, directory or link, as `?stat`, `?list`, `?mkdir` and
/// `?move_to` show it. `path` is what the caller named (stat, mkdir, move)
/// or the guest's absolute path (list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub size: u64,
    /// Octal permission bits, `"644"`.
    pub mode: String,
    /// As `ls -l` shows them, `"-rw-r--r--"`.
    pub permissions: String,
    pub owner: String,
    pub group: String,
    /// RFC 3339, whole seconds.
    pub modified: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl FileEntry {
    /// `e` shown under `path`.
    pub fn at(path: &str, e: &FsEntry) -> Self {
        let secs = u64::try_from(e.modified_unix_ns.div_euclid(1_000_000_000)).unwrap_or(0);
        let modified = UNIX_EPOCH + Duration::from_secs(secs);
        Self {
            name: e.name.clone(),
            path: path.to_string(),
            kind: e.kind.as_str(),
            size: e.size,
            mode: e.mode_octal(),
            permissions: e.permissions(),
            owner: e.owner.clone(),
            group: e.group.clone(),
            modified: humantime::format_rfc3339(modified).to_string(),
            symlink_target: e.symlink_target.clone(),
        }
    }

    /// `e` under its own (absolute) path, as a listing shows it.
    pub fn listed(e: &FsEntry) -> Self {
        Self::at(&e.path, e)
    }
}

/// A directory's listing.
#[derive(Debug, Clone, Serialize)]
pub struct FileListing {
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// The listing stopped at its bound (entries or bytes).
    pub truncated: bool,
}

/// What a finished upload answers.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub path: String,
    pub size: u64,
}

/// A background process as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessView {
    pub pid: u32,
    pub tag: Option<String>,
    pub cmd: Option<String>,
    pub argv: Option<Vec<String>>,
    /// RFC 3339 with milliseconds.
    pub started: String,
    /// `running` or `exited`.
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub output_bytes: u64,
    pub stdin_open: bool,
    pub pty: Option<PtyView>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PtyView {
    pub cols: u16,
    pub rows: u16,
}

impl From<&ProcessInfo> for ProcessView {
    fn from(p: &ProcessInfo) -> Self {
        let (cmd, argv) = match &p.command {
            Command::Shell(c) => (Some(c.clone()), None),
            Command::Argv(a) => (None, Some(a.clone())),
            Command::Python(py) => (None, Some(vec!["python3".to_string(), py.path.clone()])),
        };
        let started = UNIX_EPOCH + Duration::from_millis(p.started_unix_ms);
        Self {
            pid: p.pid,
            tag: p.tag.clone(),
            cmd,
            argv,
            started: humantime::format_rfc3339_millis(started).to_string(),
            state: if p.exit.is_some() { "exited" } else { "running" },
            exit_code: p.exit.as_ref().and_then(|e| e.code),
            signal: p.exit.as_ref().and_then(|e| e.signal),
            output_bytes: p.output_bytes,
            stdin_open: p.stdin_open,
            pty: p.pty.map(|t| PtyView { cols: t.cols, rows: t.rows }),
        }
    }
}

/// The processes of a session.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessList {
    pub processes: Vec<ProcessView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_wire::FileKind;

    #[test]
    fn an_entry_shows_every_field() {
        let e = FsEntry {
            name: "b.txt".into(),
            path: "/home/ember/notes/a|b.txt".into(),
            kind: FileKind::File,
            size: 12,
            mode: 0o100644,
            owner: "ember".into(),
            group: "ember".into(),
            modified_unix_ns: 1_700_000_000_500_000_000,
            symlink_target: None,
        };
        let v = serde_json::to_value(FileEntry::at("notes/a|b.txt", &e)).unwrap();
        assert_eq!(v["type"], "file");
        assert_eq!(v["size"], 12);
        assert_eq!(v["mode"], "644");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["path"], "notes/a|b.txt");
        assert_eq!(v["modified"], "2023-11-14T22:13:20Z");
        assert!(v.get("symlink_target").is_none());
        assert_eq!(FileEntry::listed(&e).path, "/home/ember/notes/a|b.txt");
    }
}
