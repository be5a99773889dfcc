//! Unpacking a user's root filesystem tarball (`docker export` output, a
//! debootstrap tree packed with tar) for `ember images import`, as root on
//! the host, without trusting a byte of it: no member may land outside the
//! destination, whether by an absolute path, a `..`, a hard link, or a path
//! that goes through a symlink unpacked before it; a symlink whose relative
//! target climbs above the root is refused too. Absolute symlink targets are
//! kept as they are (`/usr/bin/awk -> /etc/alternatives/awk` in every Debian
//! root): they resolve inside the guest's own root, and nothing is ever
//! written through one here. Sizes and member counts are capped.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Caps on what an import may unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// The tarball's own size and the sum of its members' sizes.
    pub max_bytes: u64,
    pub max_members: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self { max_bytes: 4 << 30, max_members: 1_000_000 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    #[error("{0}")]
    Io(String),
    #[error("the tarball is {size} bytes, more than the limit of {limit} (images.max_import_bytes)")]
    TooLarge { size: u64, limit: u64 },
    #[error("the tarball holds more than {limit} members")]
    TooManyMembers { limit: u64 },
    #[error("member {member:?} {why}")]
    Unsafe { member: String, why: String },
    #[error("the root has no /bin/sh{0}; Ember runs every command with it")]
    NoShell(String),
}

/// What was unpacked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub members: u64,
    pub bytes: u64,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |e| ImportError::Io(format!("{what}: {e}"))
}

/// The member's path as plain relative components, or why not.
fn relative(member: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in member.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("has an absolute path".into()),
            Component::ParentDir => return Err("has '..' in its path".into()),
        }
    }
    Ok(out)
}

/// Whether a relative symlink target, read from the link's directory
/// `link_dir` (relative to the root), stays within the root.
fn stays_inside(link_dir: &Path, target: &Path) -> bool {
    let mut depth = link_dir.components().count() as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Unpack `tarball` (plain or gzip) into `dest`, which must exist and be
/// empty.
pub fn unpack(tarball: &Path, dest: &Path, limits: ImportLimits) -> Result<Unpacked, ImportError> {
    let size = std::fs::metadata(tarball).map_err(io("reading the tarball"))?.len();
    if size > limits.max_bytes {
        return Err(ImportError::TooLarge { size, limit: limits.max_bytes });
    }
    let mut file = std::fs::File::open(tarball).map_err(io("opening the tarball"))?;
    let mut magic = [0u8; 2];
    let gz = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let file = std::fs::File::open(tarball).map_err(io("opening the tarball"))?;
    let reader: Box<dyn Read> =
        if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);

    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    let mut done = Unpacked::default();
    for entry in archive.entries().map_err(io("reading the tarball"))? {
        let mut entry = entry.map_err(io("reading the tarball"))?;
        done.members += 1;
        if done.members > limits.max_members {
            return Err(ImportError::TooManyMembers { limit: limits.max_members });
        }
        let raw = entry.path().map_err(io("reading a member's name"))?.into_owned();
        let name = raw.to_string_lossy().into_owned();
        let unsafe_member = |why: String| ImportError::Unsafe { member: name.clone(), why };
        let rel = relative(&raw).map_err(&unsafe_member)?;
        if rel.as_os_str().is_empty() {
            continue; // "./" itself
        }
        // Never write through a symlink: not one this tarball made, nor
        // anything else that is one on disk now.
        for anc in rel.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            let on_disk = std::fs::symlink_metadata(dest.join(anc)).map(|m| m.file_type().is_symlink());
            if symlinks.contains(anc) || on_disk.unwrap_or(false) {
                let target = std::fs::read_link(dest.join(anc)).unwrap_or_default();
                return Err(unsafe_member(format!(
                    "would be written through the symlink {} (-> {}), which could lead outside the root",
                    anc.display(),
                    target.display()
                )));
            }
        }
        done.bytes += entry.header().size().unwrap_or(0);
        if done.bytes > limits.max_bytes {
            return Err(ImportError::TooLarge { size: done.bytes, limit: limits.max_bytes });
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(io("reading a symlink"))?
                    .ok_or_else(|| unsafe_member("is a symlink without a target".into()))?
                    .into_owned();
                let dir = rel.parent().unwrap_or(Path::new(""));
                if !target.is_absolute() && !stays_inside(dir, &target) {
                    return Err(unsafe_member(format!(
                        "is a symlink to {} which climbs out of the root",
                        target.display()
                    )));
                }
                symlinks.insert(rel.clone());
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(io("reading a hard link"))?
                    .ok_or_else(|| unsafe_member("is a hard link without a target".into()))?
                    .into_owned();
                let target = relative(&target)
                    .map_err(|why| unsafe_member(format!("is a hard link whose target {why}")))?;
                if target.ancestors().any(|a| symlinks.contains(a)) {
                    return Err(unsafe_member("is a hard link through a symlink".into()));
                }
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::GNUSparse => {}
            // Device nodes and FIFOs: the guest's /dev is devtmpfs; headers
            // (pax, GNU long names) are consumed by the reader itself.
            _ => continue,
        }
        // A member that replaces an earlier symlink must not follow it.
        if std::fs::symlink_metadata(dest.join(&rel)).is_ok_and(|m| m.is_symlink()) {
            std::fs::remove_file(dest.join(&rel)).map_err(io("replacing a symlink"))?;
            if kind != tar::EntryType::Symlink {
                symlinks.remove(&rel);
            }
        }
        let unpacked =
            entry.unpack_in(dest).map_err(|e| unsafe_member(format!("cannot be unpacked: {e}")))?;
        if !unpacked {
            return Err(unsafe_member("would land outside the root".into()));
        }
    }
    Ok(done)
}

/// Follow `path` inside `root` the way the guest would (absolute symlink
/// targets from the guest's root), at most 40 links deep.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut todo: Vec<PathBuf> = vec![relative(path.strip_prefix("/").unwrap_or(path)).ok()?];
    let mut at = PathBuf::new();
    let mut hops = 0;
    while let Some(rest) = todo.pop() {
        let mut comps = rest.components();
        let Some(first) = comps.next() else { continue };
        let remaining: PathBuf = comps.collect();
        if !remaining.as_os_str().is_empty() {
            todo.push(remaining);
        }
        let Component::Normal(part) = first else { continue };
        let next = at.join(part);
        match std::fs::symlink_metadata(root.join(&next)) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                let target = std::fs::read_link(root.join(&next)).ok()?;
                let base = if target.is_absolute() { PathBuf::new() } else { at.clone() };
                let mut joined = base;
                for c in target.components() {
                    match c {
                        Component::ParentDir => {
                            joined.pop();
                        }
                        Component::Normal(p) => joined.push(p),
                        _ => {}
                    }
                }
                // Restart from the root with the resolved prefix.
                at = PathBuf::new();
                todo.push(joined);
            }
            Ok(_) => at = next,
            Err(_) => return None,
        }
    }
    Some(root.join(at))
}

/// The root must have a `/bin/sh` the guest can execute.
pub fn check_shell(root: &Path) -> Result<(), ImportError> {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(sh) = resolve_in_root(root, Path::new("/bin/sh")) else {
        return Err(ImportError::NoShell(String::new()));
    };
    match std::fs::metadata(&sh) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(ImportError::NoShell(" (it is not an executable file)".into())),
        Err(_) => Err(ImportError::NoShell(String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tarball built member by member, as a hostile one would be.
    struct Tarball(tar::Builder<Vec<u8>>);

    impl Tarball {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h
        }
        /// Names go in raw, so that `..` and absolute ones can be written.
        fn raw_name(h: &mut tar::Header, name: &str) {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, 0, 0o755);
            Self::raw_name(&mut h, name);
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn file(mut self, name: &str, data: &[u8], mode: u32) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, data.len() as u64, mode);
            Self::raw_name(&mut h, name);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, 0, 0o777);
            Self::raw_name(&mut h, name);
            h.set_link_name(target).unwrap();
            h.set_cksum();
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, name, target)
        }
        fn write(self, dir: &Path) -> PathBuf {
            let p = dir.join("root.tar");
            std::fs::write(&p, self.0.into_inner().unwrap()).unwrap();
            p
        }
    }

    fn minimal() -> Tarball {
        Tarball::new()
            .dir("bin/")
            .file("bin/dash", b"#!fake", 0o755)
            .symlink("bin/sh", "dash")
            .dir("etc/")
            .file("etc/os-release", b"ID=test\n", 0o644)
    }

    fn try_unpack(t: Tarball) -> (tempfile::TempDir, Result<Unpacked, ImportError>) {
        let dir = tempfile::tempdir().unwrap();
        let tar = t.write(dir.path());
        let dest = dir.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        let r = unpack(&tar, &dest, ImportLimits::default()).and_then(|u| check_shell(&dest).map(|()| u));
        (dir, r)
    }

    #[test]
    fn a_plain_root_unpacks_and_has_a_shell() {
        let (dir, r) = try_unpack(
            minimal()
                .dir("usr/bin/")
                .symlink("usr/bin/awk", "/etc/alternatives/awk")
                .symlink("lib", "usr/lib")
                .dir("usr/lib/"),
        );
        let u = r.unwrap();
        assert_eq!(u.members, 9);
        let root = dir.path().join("root");
        assert_eq!(std::fs::read_link(root.join("usr/bin/awk")).unwrap(), Path::new("/etc/alternatives/awk"));
        assert!(resolve_in_root(&root, Path::new("/bin/sh")).unwrap().ends_with("bin/dash"));
    }

    #[test]
    fn a_gzipped_tarball_unpacks_too() {
        let dir = tempfile::tempdir().unwrap();
        let plain = std::fs::read(minimal().write(dir.path())).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        let p = dir.path().join("root.tar.gz");
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        let dest = dir.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        unpack(&p, &dest, ImportLimits::default()).unwrap();
        check_shell(&dest).unwrap();
    }

    #[test]
    fn every_escape_is_refused_with_the_member_named() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let v = victim.to_str().unwrap();
        let cases: Vec<(Tarball, &str, &str)> = vec![
            (minimal().file("../escape", b"x", 0o644), "../escape", "'..'"),
            (minimal().file("/abs", b"x", 0o644), "/abs", "absolute"),
            (
                minimal().symlink("evil", v).file("evil/planted", b"x", 0o644),
                "evil/planted",
                "through the symlink",
            ),
            (
                minimal().symlink("up", "../../../..").file("up/planted", b"x", 0o644),
                "up",
                "climbs out of the root",
            ),
            (minimal().symlink("etc/deep", "../../x"), "etc/deep", "climbs out"),
            (minimal().link(tar::EntryType::Link, "hard", "/etc/shadow"), "hard", "hard link"),
            (minimal().link(tar::EntryType::Link, "hard", "../x"), "hard", "hard link"),
        ];
        for (t, member, why) in cases {
            let (_d, r) = try_unpack(t);
            let e = r.unwrap_err().to_string();
            assert!(e.contains(member) && e.contains(why), "{member}: {e}");
        }
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0, "nothing was written outside");
    }

    #[test]
    fn a_root_without_a_shell_is_refused() {
        let (_d, r) = try_unpack(Tarball::new().dir("etc/").file("etc/x", b"1", 0o644));
        assert!(matches!(r, Err(ImportError::NoShell(_))), "{r:?}");
        let (_d, r) = try_unpack(Tarball::new().dir("bin/").symlink("bin/sh", "/nowhere"));
        assert!(matches!(r, Err(ImportError::NoShell(_))), "{r:?}");
        let (_d, r) = try_unpack(Tarball::new().dir("bin/").file("bin/sh", b"x", 0o644));
        assert!(r.unwrap_err().to_string().contains("not an executable"));
    }

    #[test]
    fn sizes_and_counts_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let tar = minimal().file("big", &vec![0u8; 10_000], 0o644).write(dir.path());
        let dest = dir.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        let small = ImportLimits { max_bytes: 5_000, max_members: 100 };
        assert!(matches!(unpack(&tar, &dest, small), Err(ImportError::TooLarge { .. })));
        let big_file_only =
            ImportLimits { max_bytes: std::fs::metadata(&tar).unwrap().len(), max_members: 100 };
        let few = ImportLimits { max_members: 3, ..big_file_only };
        assert!(matches!(unpack(&tar, &dest, few), Err(ImportError::TooManyMembers { limit: 3 })));
    }
}
