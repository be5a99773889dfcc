//! The key an image is cached under: a hash of everything it is built
//! from. Trees are hashed by their paths relative to the tree's root, so
//! every clone of the repository (CI's among them) finds what another built.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Builds one input hash, part by part; each part is labelled so that
/// moving bytes from one part to the next changes the hash.
#[derive(Debug, Default)]
pub struct InputHash(Sha256);

impl InputHash {
    pub fn new(kind: &str) -> Self {
        let mut h = Self(Sha256::new());
        h.text("kind", kind);
        h
    }

    pub fn text(&mut self, label: &str, value: &str) -> &mut Self {
        self.bytes(label, value.as_bytes())
    }

    fn bytes(&mut self, label: &str, value: &[u8]) -> &mut Self {
        self.0.update((label.len() as u64).to_be_bytes());
        self.0.update(label.as_bytes());
        self.0.update((value.len() as u64).to_be_bytes());
        self.0.update(value);
        self
    }

    /// A file's content and mode (mode matters for scripts in an image).
    pub fn file(&mut self, label: &str, path: &Path) -> std::io::Result<&mut Self> {
        let meta = std::fs::metadata(path)?;
        let mut f = std::fs::File::open(path)?;
        let mut content = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            content.update(&buf[..n]);
        }
        let mode = meta.permissions().mode() & 0o7777;
        self.bytes(label, &content.finalize());
        self.text("mode", &format!("{mode:o}"));
        Ok(self)
    }

    /// Every file, symlink and directory below `root` (which may be missing:
    /// then it counts as empty), by relative path, in sorted order.
    pub fn tree(&mut self, label: &str, root: &Path) -> std::io::Result<&mut Self> {
        self.text("tree", label);
        if !root.exists() {
            return Ok(self);
        }
        let mut stack = vec![root.to_path_buf()];
        let mut entries = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                let meta = std::fs::symlink_metadata(&p)?;
                if meta.is_dir() {
                    stack.push(p.clone());
                }
                entries.push(p);
            }
        }
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().into_owned();
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p)?;
                self.text("symlink", &rel).text("target", &target.to_string_lossy());
            } else if meta.is_dir() {
                self.text("dir", &rel).text("mode", &format!("{:o}", meta.permissions().mode() & 0o7777));
            } else {
                self.text("file", &rel);
                self.file("content", &p)?;
            }
        }
        Ok(self)
    }

    /// The first 16 hex digits: short enough for a directory name.
    pub fn finish(self) -> String {
        let d = self.0.finalize();
        d.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_hash(root: &Path) -> String {
        let mut h = InputHash::new("t");
        h.tree("r", root).unwrap();
        h.finish()
    }

    #[test]
    fn a_tree_hashes_by_relative_path_content_and_mode() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir_all(d.join("x/y")).unwrap();
            std::fs::write(d.join("x/y/f"), "one").unwrap();
            std::os::unix::fs::symlink("f", d.join("x/y/l")).unwrap();
        }
        assert_eq!(tree_hash(a.path()), tree_hash(b.path()), "same content elsewhere");
        let before = tree_hash(a.path());
        std::fs::write(a.path().join("x/y/f"), "two").unwrap();
        assert_ne!(tree_hash(a.path()), before, "content");
        let before = tree_hash(a.path());
        std::fs::set_permissions(a.path().join("x/y/f"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(tree_hash(a.path()), before, "mode");
        let before = tree_hash(a.path());
        std::fs::rename(a.path().join("x/y/f"), a.path().join("x/y/g")).unwrap();
        assert_ne!(tree_hash(a.path()), before, "name");
        assert_eq!(tree_hash(&a.path().join("missing")), tree_hash(&b.path().join("missing")));
    }

    #[test]
    fn labels_keep_parts_apart() {
        let mut one = InputHash::new("k");
        one.text("a", "bc").text("d", "");
        let mut two = InputHash::new("k");
        two.text("a", "b").text("d", "c");
        assert_ne!(one.finish(), two.finish());
    }
}
