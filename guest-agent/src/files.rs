//! `write_files`: create files for the user, with the user's permissions.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use ember_wire::{ErrorCode, ErrorReply, FileSpec};
use nix::unistd::{setfsgid, setfsuid, Gid, Uid};

use crate::GuestLayout;

/// Resolve a requested path: relative paths land in the workspace, absolute
/// ones must lie in a scratch directory, and `..` is refused outright.
pub fn resolve(layout: &GuestLayout, requested: &str) -> Result<PathBuf, String> {
    let p = Path::new(requested);
    if requested.is_empty() || requested.contains('\0') {
        return Err(format!("invalid path {requested:?}"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("path {requested:?} must not contain '..'"));
    }
    let full = if p.is_absolute() { p.to_path_buf() } else { layout.workspace.join(p) };
    let allowed = std::iter::once(&layout.workspace)
        .chain(&layout.scratch_dirs)
        .any(|dir| full.starts_with(dir) && full != *dir);
    if !allowed {
        return Err(format!("path {requested:?} is outside the writable directories"));
    }
    Ok(full)
}

/// Write `files` (all or none are validated up front; writing stops at the
/// first failure and names the file).
pub async fn write_files(layout: &GuestLayout, files: Vec<FileSpec>) -> Result<(), ErrorReply> {
    let mut resolved = Vec::with_capacity(files.len());
    for f in files {
        let path = resolve(layout, &f.path).map_err(|m| ErrorReply::new(ErrorCode::BadRequest, m))?;
        resolved.push((path, f));
    }
    let user = layout.user;
    tokio::task::spawn_blocking(move || {
        let _as_user = user.map(|(uid, gid)| FsIdGuard::switch(uid, gid));
        for (path, f) in &resolved {
            write_one(path, &f.content, f.mode).map_err(|e| {
                ErrorReply::new(ErrorCode::BadRequest, format!("cannot write {}: {e}", f.path))
            })?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("writer task failed: {e}")))?
}

fn write_one(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mode = mode & 0o777;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(content)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Filesystem uid/gid of this thread only (Linux `setfsuid` is per thread),
/// restored on drop, so file writes get exactly the user's permissions.
pub(crate) struct FsIdGuard {
    uid: Uid,
    gid: Gid,
}

impl FsIdGuard {
    pub(crate) fn switch(uid: u32, gid: u32) -> Self {
        let old_gid = setfsgid(Gid::from_raw(gid));
        let old_uid = setfsuid(Uid::from_raw(uid));
        Self { uid: old_uid, gid: old_gid }
    }
}

impl Drop for FsIdGuard {
    fn drop(&mut self) {
        setfsuid(self.uid);
        setfsgid(self.gid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> GuestLayout {
        let mut l = GuestLayout::guest();
        l.workspace = "/home/ember".into();
        l
    }

    #[test]
    fn resolves_inside_writable_dirs_only() {
        let l = layout();
        assert_eq!(resolve(&l, "a/b.txt").unwrap(), PathBuf::from("/home/ember/a/b.txt"));
        assert_eq!(resolve(&l, "/tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        for bad in ["../etc/passwd", "/etc/passwd", "/tmp", "", "a/../../x", "/home/ember2/x"] {
            assert!(resolve(&l, bad).is_err(), "{bad} should be refused");
        }
    }

    #[tokio::test]
    async fn writes_files_with_mode_and_refuses_symlink_targets() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = layout();
        l.workspace = dir.path().to_path_buf();
        l.user = None;
        let spec = |path: &str, mode| FileSpec { path: path.into(), content: b"hi\xff".to_vec(), mode };
        write_files(&l, vec![spec("sub/x.sh", 0o755)]).await.unwrap();
        let p = dir.path().join("sub/x.sh");
        assert_eq!(fs::read(&p).unwrap(), b"hi\xff");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o755);
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        let err = write_files(&l, vec![spec("link", 0o644)]).await.unwrap_err();
        assert!(err.message.contains("link"), "{err:?}");
    }
}
