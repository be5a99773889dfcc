//! `ember-agent watch [--recursive] DIR`: a directory's changes as NDJSON
//! on stdout, one line per event, for the host's file-watch route. It runs
//! as the guest's user (like every file operation), so inotify sees only
//! what the user may read. Lines: `ready` once the watch is set, then
//! `create`, `write`, `remove`, `rename` (`from`, `to`), `chmod`, and
//! `overflow` when the kernel dropped events; it ends when the directory
//! itself goes (`remove` of `""`), or with an `error` line (`message`,
//! `errno`) when the watch cannot be set or goes wrong.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use serde_json::json;

/// Directories one recursive watch covers unless `--max-dirs` says (the
/// kernel's own default cap per user is 8192 watches).
pub const MAX_WATCHED_DIRS: usize = 4096;
/// How long a `moved_from` waits for its `moved_to` before it counts as a
/// removal (moved out of the watched tree).
const RENAME_PAIRING_MS: u16 = 50;

const USAGE: &str = "usage: ember-agent watch [--recursive] [--max-dirs N] DIR";

/// Parse `watch`'s arguments and run it; the process's exit code.
pub fn main(args: &[String]) -> i32 {
    let mut recursive = false;
    let mut max_dirs = MAX_WATCHED_DIRS;
    let mut it = args.iter();
    let mut dir = None;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--recursive" => recursive = true,
            "--max-dirs" => match it.next().and_then(|n| n.parse().ok()).filter(|n| *n > 0) {
                Some(n) => max_dirs = n,
                None => return usage(),
            },
            _ if dir.is_none() => dir = Some(a),
            _ => return usage(),
        }
    }
    let Some(dir) = dir else { return usage() };
    let mut out = std::io::stdout();
    match watch(Path::new(dir), recursive, max_dirs, &mut out) {
        Ok(()) => 0,
        Err(e) => {
            // For the host, typed: the failed call's errno and its words.
            let e = ember_wire::ErrorReply::io(dir, &e);
            let _ = line(&mut out, json!({ "type": "error", "message": e.message, "errno": e.errno }));
            eprintln!("{}", e.message);
            1
        }
    }
}

fn usage() -> i32 {
    eprintln!("{USAGE}");
    64
}

struct Watcher {
    inotify: Inotify,
    /// Each watched directory's path relative to the root.
    dirs: HashMap<WatchDescriptor, PathBuf>,
    root: PathBuf,
    root_wd: Option<WatchDescriptor>,
    recursive: bool,
    max_dirs: usize,
    warned_cap: bool,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

fn line(out: &mut impl Write, v: serde_json::Value) -> std::io::Result<()> {
    writeln!(out, "{v}")?;
    out.flush()
}

fn rel(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Watcher {
    /// Watch `rel` (and, recursively, the directories under it).
    fn add(&mut self, rel_dir: &Path, out: &mut impl Write) -> std::io::Result<()> {
        if self.dirs.len() >= self.max_dirs {
            if !self.warned_cap {
                self.warned_cap = true;
                let msg = format!("more than {} directories: the rest are not watched", self.max_dirs);
                line(out, json!({ "type": "overflow", "message": msg }))?;
            }
            return Ok(());
        }
        let full = self.root.join(rel_dir);
        let wd = self.inotify.add_watch(&full, mask()).map_err(std::io::Error::from)?;
        self.dirs.insert(wd, rel_dir.to_path_buf());
        if self.root_wd.is_none() {
            self.root_wd = Some(wd);
        }
        if self.recursive {
            // Entries that vanish meanwhile are skipped, not errors.
            for entry in std::fs::read_dir(&full)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = self.add(&rel_dir.join(entry.file_name()), out);
                }
            }
        }
        Ok(())
    }

    fn path_of(&self, ev: &InotifyEvent) -> PathBuf {
        let dir = self.dirs.get(&ev.wd).cloned().unwrap_or_default();
        match &ev.name {
            Some(n) => dir.join(n),
            None => dir,
        }
    }
}

/// Watch `dir` (and, `recursive`, up to `max_dirs` directories of its
/// tree) until it is removed, writing events to `out`.
pub fn watch(dir: &Path, recursive: bool, max_dirs: usize, out: &mut impl Write) -> std::io::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(std::io::Error::from)?;
    let mut w = Watcher {
        inotify,
        dirs: HashMap::new(),
        root: dir.to_path_buf(),
        root_wd: None,
        recursive,
        max_dirs,
        warned_cap: false,
    };
    w.add(Path::new(""), out)?;
    line(out, json!({ "type": "ready", "path": rel(dir), "recursive": recursive }))?;
    let mut moved_from: Option<(u32, PathBuf)> = None;
    let mut last: Option<(&'static str, PathBuf)> = None;
    loop {
        if moved_from.is_some() {
            let fd = w.inotify.as_fd();
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(RENAME_PAIRING_MS)).map_err(std::io::Error::from)? == 0 {
                if let Some((_, from)) = moved_from.take() {
                    line(out, json!({ "type": "remove", "path": rel(&from) }))?;
                }
            }
        }
        let events = w.inotify.read_events().map_err(std::io::Error::from)?;
        for ev in events {
            let path = w.path_of(&ev);
            let is_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR);
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                line(out, json!({ "type": "overflow", "message": "the kernel dropped events" }))?;
                continue;
            }
            if ev.mask.contains(AddWatchFlags::IN_MOVED_TO) {
                if is_dir && recursive {
                    let _ = w.add(&path, out);
                }
                match moved_from.take() {
                    Some((cookie, from)) if cookie == ev.cookie => {
                        line(out, json!({ "type": "rename", "from": rel(&from), "to": rel(&path) }))?;
                    }
                    other => {
                        if let Some((_, from)) = other {
                            line(out, json!({ "type": "remove", "path": rel(&from) }))?;
                        }
                        line(out, json!({ "type": "create", "path": rel(&path), "directory": is_dir }))?;
                    }
                }
                last = None;
                continue;
            }
            if let Some((_, from)) = moved_from.take() {
                line(out, json!({ "type": "remove", "path": rel(&from) }))?;
            }
            if ev.mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                moved_from = Some((ev.cookie, path));
                continue;
            }
            if ev.mask.contains(AddWatchFlags::IN_DELETE_SELF) {
                if Some(ev.wd) == w.root_wd {
                    line(out, json!({ "type": "remove", "path": "" }))?;
                    return Ok(());
                }
                continue; // a subdirectory's own removal is told by its parent
            }
            let kind = if ev.mask.contains(AddWatchFlags::IN_CREATE) {
                "create"
            } else if ev.mask.contains(AddWatchFlags::IN_MODIFY) {
                "write"
            } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                "remove"
            } else if ev.mask.contains(AddWatchFlags::IN_ATTRIB) {
                "chmod"
            } else {
                continue;
            };
            // A stream of writes to one file is one line per batch.
            if kind == "write" && last.as_ref().is_some_and(|(k, p)| *k == "write" && *p == path) {
                continue;
            }
            // A new directory is watched before it is told of, so what a
            // reader does in it on hearing of it is seen.
            if kind == "create" && is_dir && recursive {
                let _ = w.add(&path, out);
            }
            let v = match kind {
                "create" => json!({ "type": kind, "path": rel(&path), "directory": is_dir }),
                _ => json!({ "type": kind, "path": rel(&path) }),
            };
            line(out, v)?;
            last = Some((kind, path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;

    /// Lines written to a pipe, read back as they come.
    struct Pipe(std::os::unix::net::UnixStream);

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }

    #[test]
    fn events_are_told_with_paths_relative_to_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("w");
        std::fs::create_dir_all(root.join("old")).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let r = root.clone();
        let t = std::thread::spawn(move || watch(&r, true, MAX_WATCHED_DIRS, &mut Pipe(a)));
        let mut lines = std::io::BufReader::new(b).lines();
        let mut next =
            || -> serde_json::Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
        assert_eq!(next()["type"], "ready");
        std::fs::write(root.join("a.txt"), "1").unwrap();
        assert_eq!(next(), json!({"type": "create", "path": "a.txt", "directory": false}));
        assert_eq!(next(), json!({"type": "write", "path": "a.txt"}));
        std::fs::rename(root.join("a.txt"), root.join("b.txt")).unwrap();
        assert_eq!(next(), json!({"type": "rename", "from": "a.txt", "to": "b.txt"}));
        std::fs::write(root.join("old/deep.txt"), "").unwrap();
        assert_eq!(next(), json!({"type": "create", "path": "old/deep.txt", "directory": false}));
        std::fs::create_dir(root.join("new")).unwrap();
        assert_eq!(next(), json!({"type": "create", "path": "new", "directory": true}));
        std::fs::write(root.join("new/x"), "").unwrap();
        assert_eq!(next(), json!({"type": "create", "path": "new/x", "directory": false}));
        std::fs::rename(root.join("b.txt"), dir.path().join("out.txt")).unwrap();
        assert_eq!(next(), json!({"type": "remove", "path": "b.txt"}), "moved out of the tree");
        std::fs::remove_file(root.join("new/x")).unwrap();
        assert_eq!(next(), json!({"type": "remove", "path": "new/x"}));
        std::fs::remove_dir_all(&root).unwrap();
        let mut rest = Vec::new();
        loop {
            let v = next();
            rest.push(v.clone());
            if v == json!({"type": "remove", "path": ""}) {
                break;
            }
        }
        assert!(t.join().unwrap().is_ok());
        assert!(rest.contains(&json!({"type": "remove", "path": "old/deep.txt"})), "{rest:?}");
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = watch(&dir.path().join("nope"), false, 9, &mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for bad in [a(&[]), a(&["--max-dirs", "0", "d"]), a(&["--max-dirs"]), a(&["d", "e"])] {
            assert_eq!(main(&bad), 64, "{bad:?}");
        }
    }

    #[test]
    fn a_recursive_watch_covers_at_most_max_dirs_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["a", "b", "c"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        // The root and the first subdirectories up to the cap; one line says so.
        let mut at_cap = Vec::new();
        let mut w = Watcher {
            inotify: Inotify::init(InitFlags::IN_CLOEXEC).unwrap(),
            dirs: HashMap::new(),
            root: dir.path().to_path_buf(),
            root_wd: None,
            recursive: true,
            max_dirs: 4,
            warned_cap: false,
        };
        w.add(Path::new(""), &mut at_cap).unwrap();
        assert_eq!((w.dirs.len(), at_cap.len()), (4, 0), "exactly at the cap: no overflow");
        let mut over = Vec::new();
        w.max_dirs = 3;
        w.dirs.clear();
        w.root_wd = None;
        w.add(Path::new(""), &mut over).unwrap();
        assert_eq!(w.dirs.len(), 3);
        let text = String::from_utf8(over).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("\"overflow\"") && text.contains("more than 3 directories"), "{text}");
    }
}
