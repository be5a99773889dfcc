//! Filesystem requests' results: one entry per file, as the guest's user
//! sees it (`lstat`: a symbolic link is itself, with its target), and the
//! pure helpers both sides share.

use serde::{Deserialize, Serialize};

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A device, FIFO or socket.
    Other,
}

impl FileKind {
    /// The kind of a `st_mode`.
    pub fn of_mode(mode: u32) -> Self {
        match mode & 0o170000 {
            0o100000 => Self::File,
            0o040000 => Self::Directory,
            0o120000 => Self::Symlink,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Directory => "directory",
            Self::Symlink => "symlink",
            Self::Other => "other",
        }
    }
}

/// One file, as `lstat` sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsEntry {
    /// The last component of its path.
    pub name: String,
    /// Its absolute path in the guest.
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// The whole `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner and group by name (their number when the guest has no name).
    pub owner: String,
    pub group: String,
    /// Last modification, since the Unix epoch.
    pub modified_unix_ns: i64,
    /// Where a symbolic link points (as written in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

impl FsEntry {
    /// The permission bits in octal as `stat -c %a` prints them (`644`, `1777`).
    pub fn mode_octal(&self) -> String {
        format!("{:o}", self.mode & 0o7777)
    }

    /// The mode as `ls -l` prints it (`-rw-r--r--`, `drwxrwxrwt`).
    pub fn permissions(&self) -> String {
        permissions(self.mode)
    }
}

/// `st_mode` as `ls -l` prints it.
pub fn permissions(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o100000 => '-',
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '?',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    // (read, write, execute bit, special bit, letter when special)
    for (shift, special, letter) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (mode >> shift) & 0o7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let exec = bits & 1 != 0;
        s.push(match (mode & special != 0, exec) {
            (true, true) => letter,
            (true, false) => letter.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// Entries a `list` answers at most by default, and the most a request may
/// ask for: the reply is one frame.
pub const MAX_LIST_ENTRIES: u32 = 50_000;

/// Bytes of entries one `list` reply holds at most (under [`crate::MAX_FRAME_LEN`]
/// with room for the frame's JSON around them).
pub const MAX_LIST_BYTES: usize = 12 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_print_as_ls_does() {
        assert_eq!(permissions(0o100644), "-rw-r--r--");
        assert_eq!(permissions(0o040755), "drwxr-xr-x");
        assert_eq!(permissions(0o041777), "drwxrwxrwt");
        assert_eq!(permissions(0o104755), "-rwsr-xr-x");
        assert_eq!(permissions(0o102644), "-rw-r-Sr--");
        assert_eq!(permissions(0o120777), "lrwxrwxrwx");
        assert_eq!(FileKind::of_mode(0o020666), FileKind::Other);
        let e = FsEntry {
            name: "t".into(),
            path: "/t".into(),
            kind: FileKind::Directory,
            size: 0,
            mode: 0o041777,
            owner: "root".into(),
            group: "root".into(),
            modified_unix_ns: 0,
            symlink_target: None,
        };
        assert_eq!(e.mode_octal(), "1777");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "directory");
        assert!(json.get("symlink_target").is_none());
    }
}
