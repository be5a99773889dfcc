//! Filesystem requests (`stat`, `list`, `mkdir`, `rename`, `remove`), done
//! by the agent itself with system calls as the guest's user (its
//! filesystem uid and gid, so the guest's permissions decide), off the async
//! threads. No tool of the image is run: a root with only `/bin/sh` works
//! the same. A failure answers the `errno` and its words.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use ember_wire::{ErrorCode, ErrorReply, FileKind, FsEntry, MAX_LIST_BYTES, MAX_LIST_ENTRIES};

use crate::GuestLayout;

/// What a filesystem request answers: its entries, and whether a listing
/// left some out.
pub type Answer = Result<(Vec<FsEntry>, bool), ErrorReply>;

/// `path` as the guest's user sees it: relative ones under the workspace,
/// `.` components dropped (`..` is the kernel's to resolve, as the user's
/// own permissions allow).
fn full(layout: &GuestLayout, path: &str) -> Result<PathBuf, ErrorReply> {
    if path.is_empty() || path.contains('\0') {
        return Err(ErrorReply {
            errno: Some(libc::EINVAL),
            ..ErrorReply::new(ErrorCode::BadRequest, format!("invalid path {path:?}"))
        });
    }
    let joined = layout.workspace.join(path);
    Ok(joined.components().filter(|c| !matches!(c, Component::CurDir)).collect())
}

/// Run `op` as the guest's user on a blocking thread.
async fn as_user<T: Send + 'static>(
    layout: &GuestLayout,
    op: impl FnOnce() -> Result<T, ErrorReply> + Send + 'static,
) -> Result<T, ErrorReply> {
    let user = layout.user;
    tokio::task::spawn_blocking(move || {
        let _as_user = user.map(|(uid, gid)| crate::files::FsIdGuard::switch(uid, gid));
        op()
    })
    .await
    .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("the filesystem task failed: {e}")))?
}

pub async fn stat(layout: &GuestLayout, path: String) -> Answer {
    let p = full(layout, &path)?;
    as_user(layout, move || {
        let e = entry(&p, &mut Names::default()).map_err(|e| ErrorReply::io(&path, &e))?;
        Ok((vec![e], false))
    })
    .await
}

pub async fn list(layout: &GuestLayout, path: String, depth: u32, limit: u32) -> Answer {
    let p = full(layout, &path)?;
    let limit = limit.clamp(1, MAX_LIST_ENTRIES) as usize;
    as_user(layout, move || walk(&p, depth.max(1), limit).map_err(|e| ErrorReply::io(&path, &e))).await
}

pub async fn mkdir(layout: &GuestLayout, path: String, parents: bool) -> Answer {
    let p = full(layout, &path)?;
    as_user(layout, move || {
        let made = if parents { fs::create_dir_all(&p) } else { fs::create_dir(&p) };
        let e =
            made.and_then(|()| entry(&p, &mut Names::default())).map_err(|e| ErrorReply::io(&path, &e))?;
        Ok((vec![e], false))
    })
    .await
}

pub async fn rename(layout: &GuestLayout, from: String, to: String, overwrite: bool) -> Answer {
    let (src, dst) = (full(layout, &from)?, full(layout, &to)?);
    as_user(layout, move || {
        let what = format!("{from} -> {to}");
        move_path(&src, &dst, overwrite).map_err(|e| ErrorReply::io(&what, &e))?;
        let e = entry(&dst, &mut Names::default()).map_err(|e| ErrorReply::io(&to, &e))?;
        Ok((vec![e], false))
    })
    .await
}

pub async fn remove(
    layout: &GuestLayout,
    path: String,
    recursive: bool,
    missing_ok: bool,
) -> Result<(), ErrorReply> {
    let p = full(layout, &path)?;
    as_user(layout, move || {
        let removed = match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && missing_ok => Ok(()),
            Err(e) => Err(e),
            Ok(md) if md.is_dir() && recursive => fs::remove_dir_all(&p),
            Ok(md) if md.is_dir() => fs::remove_dir(&p),
            Ok(_) => fs::remove_file(&p),
        };
        removed.map_err(|e| ErrorReply::io(&path, &e))
    })
    .await
}

/// Owner and group names by number, looked up once per request.
#[derive(Default)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
                Ok(Some(u)) => u.name,
                _ => uid.to_string(),
            })
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
                Ok(Some(g)) => g.name,
                _ => gid.to_string(),
            })
            .clone()
    }
}

/// The file at `p`, as `lstat` sees it.
fn entry(p: &Path, names: &mut Names) -> io::Result<FsEntry> {
    let md = fs::symlink_metadata(p)?;
    let kind = FileKind::of_mode(md.mode());
    let symlink_target = match kind {
        FileKind::Symlink => Some(fs::read_link(p)?.to_string_lossy().into_owned()),
        _ => None,
    };
    Ok(FsEntry {
        name: p
            .file_name()
            .map_or_else(|| p.to_string_lossy().into_owned(), |n| n.to_string_lossy().into_owned()),
        path: p.to_string_lossy().into_owned(),
        kind,
        size: md.len(),
        mode: md.mode(),
        owner: names.user(md.uid()),
        group: names.group(md.gid()),
        modified_unix_ns: md.mtime().saturating_mul(1_000_000_000).saturating_add(md.mtime_nsec()),
        symlink_target,
    })
}

/// Bytes an entry takes in the reply, about (its strings and the JSON around them).
fn reply_bytes(e: &FsEntry) -> usize {
    200 + e.name.len()
        + e.path.len()
        + e.owner.len()
        + e.group.len()
        + e.symlink_target.as_ref().map_or(0, String::len)
}

/// The entries under directory `top` (followed if it is a link), `depth`
/// levels down, at most `limit` of them and [`MAX_LIST_BYTES`]: (entries
/// sorted by path, whether some were left out). A subdirectory that cannot
/// be read is listed but not entered; an entry gone meanwhile is skipped.
fn walk(top: &Path, depth: u32, limit: usize) -> io::Result<(Vec<FsEntry>, bool)> {
    if !fs::metadata(top)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let mut names = Names::default();
    let (mut out, mut bytes, mut truncated) = (Vec::new(), 0usize, false);
    let mut dirs = vec![(top.to_path_buf(), 1u32)];
    'walk: while let Some((dir, level)) = dirs.pop() {
        let read = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if dir == top => return Err(e),
            Err(_) => continue,
        };
        for item in read {
            let Ok(item) = item else { continue };
            let Ok(e) = entry(&item.path(), &mut names) else { continue };
            bytes += reply_bytes(&e);
            if out.len() >= limit || bytes > MAX_LIST_BYTES {
                truncated = true;
                break 'walk;
            }
            if e.kind == FileKind::Directory && level < depth {
                dirs.push((item.path(), level + 1));
            }
            out.push(e);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((out, truncated))
}

/// `rename(2)` `src` to `dst` (without `overwrite`, never over an existing
/// `dst`); across filesystems, a copy then the source's removal.
fn move_path(src: &Path, dst: &Path, overwrite: bool) -> io::Result<()> {
    let flags =
        if overwrite { nix::fcntl::RenameFlags::empty() } else { nix::fcntl::RenameFlags::RENAME_NOREPLACE };
    let at = nix::fcntl::AT_FDCWD;
    match nix::fcntl::renameat2(at, src, at, dst, flags) {
        Ok(()) => return Ok(()),
        // A filesystem without RENAME_NOREPLACE: look, then rename.
        Err(nix::errno::Errno::EINVAL) if !overwrite => {
            if fs::symlink_metadata(dst).is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            fs::rename(src, dst)?;
            return Ok(());
        }
        Err(nix::errno::Errno::EXDEV) => {}
        Err(e) => return Err(e.into()),
    }
    let md = fs::symlink_metadata(src)?;
    if let Ok(there) = fs::symlink_metadata(dst) {
        if !overwrite {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        // As rename(2) would: a file over a file, a directory over an empty one.
        match (md.is_dir(), there.is_dir()) {
            (true, true) => fs::remove_dir(dst)?,
            (false, false) => fs::remove_file(dst)?,
            (true, false) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            (false, true) => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
        }
    }
    copy_tree(src, dst)?;
    if md.is_dir() {
        fs::remove_dir_all(src)
    } else {
        fs::remove_file(src)
    }
}

/// Copy `src` to the new `dst`: files with their mode, links as links,
/// directories with what they hold.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(src)?;
    if md.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)
    } else if md.is_dir() {
        fs::create_dir(dst)?;
        for item in fs::read_dir(src)? {
            let item = item?;
            copy_tree(&item.path(), &dst.join(item.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
    } else {
        fs::copy(src, dst).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(dir: &Path) -> GuestLayout {
        let mut l = GuestLayout::guest();
        l.workspace = dir.to_path_buf();
        l.user = None;
        l
    }

    fn errno(r: Result<impl std::fmt::Debug, ErrorReply>) -> Option<i32> {
        r.expect_err("should fail").errno
    }

    #[tokio::test]
    async fn stat_list_mkdir_rename_remove_with_errnos() {
        let dir = tempfile::tempdir().unwrap();
        let l = layout(dir.path());
        let (s, _) = mkdir(&l, "a/b".into(), true).await.unwrap();
        assert_eq!((s[0].kind, s[0].name.as_str()), (FileKind::Directory, "b"));
        assert_eq!(s[0].path, dir.path().join("a/b").to_string_lossy());
        assert_eq!(errno(mkdir(&l, "a/b".into(), false).await), Some(libc::EEXIST));
        assert_eq!(errno(mkdir(&l, "x/y".into(), false).await), Some(libc::ENOENT));
        mkdir(&l, "./a/b".into(), true).await.unwrap();
        fs::write(dir.path().join("a/f.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("f.txt", dir.path().join("a/link")).unwrap();

        let (f, _) = stat(&l, "a/f.txt".into()).await.unwrap();
        assert_eq!((f[0].kind, f[0].size, f[0].name.as_str()), (FileKind::File, 5, "f.txt"));
        assert!(f[0].modified_unix_ns > 1_600_000_000 * 1_000_000_000);
        let (k, _) = stat(&l, "a/link".into()).await.unwrap();
        assert_eq!((k[0].kind, k[0].symlink_target.as_deref()), (FileKind::Symlink, Some("f.txt")));
        let missing = stat(&l, "nope".into()).await.unwrap_err();
        assert_eq!(
            (missing.errno, missing.message.as_str()),
            (Some(libc::ENOENT), "nope: No such file or directory")
        );

        let (one, cut) = list(&l, "a".into(), 1, 100).await.unwrap();
        let names: Vec<_> = one.iter().map(|e| e.name.as_str()).collect();
        assert_eq!((names, cut), (vec!["b", "f.txt", "link"], false));
        let (deep, _) = list(&l, ".".into(), 3, 100).await.unwrap();
        assert_eq!(deep.len(), 4, "a, a/b, a/f.txt, a/link: {deep:?}");
        let (few, cut) = list(&l, "a".into(), 1, 2).await.unwrap();
        assert_eq!((few.len(), cut), (2, true));
        assert_eq!(errno(list(&l, "a/f.txt".into(), 1, 10).await), Some(libc::ENOTDIR));
        assert_eq!(errno(list(&l, "".into(), 1, 10).await), Some(libc::EINVAL));

        fs::write(dir.path().join("g.txt"), b"g").unwrap();
        assert_eq!(errno(rename(&l, "g.txt".into(), "a/f.txt".into(), false).await), Some(libc::EEXIST));
        let (moved, _) = rename(&l, "g.txt".into(), "a/f.txt".into(), true).await.unwrap();
        assert_eq!(moved[0].size, 1);
        assert!(!dir.path().join("g.txt").exists());

        assert_eq!(errno(remove(&l, "a".into(), false, false).await), Some(libc::ENOTEMPTY));
        assert_eq!(errno(remove(&l, "zz".into(), false, false).await), Some(libc::ENOENT));
        remove(&l, "zz".into(), false, true).await.unwrap();
        remove(&l, "a/link".into(), false, false).await.unwrap();
        assert!(dir.path().join("a/f.txt").exists(), "removing a link keeps its target");
        remove(&l, "a".into(), true, false).await.unwrap();
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn a_tree_moves_across_filesystems_by_copy() {
        // /dev/shm is a tmpfs; the temp dir may or may not be: copy_tree is
        // what EXDEV falls back on, so test it directly too.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/x"), b"x").unwrap();
        fs::set_permissions(src.join("sub/x"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("sub/x", src.join("l")).unwrap();
        copy_tree(&src, &dir.path().join("dst")).unwrap();
        let dst = dir.path().join("dst");
        assert_eq!(fs::read(dst.join("sub/x")).unwrap(), b"x");
        assert_eq!(fs::metadata(dst.join("sub/x")).unwrap().mode() & 0o777, 0o750);
        assert_eq!(fs::read_link(dst.join("l")).unwrap(), Path::new("sub/x"));
    }
}
