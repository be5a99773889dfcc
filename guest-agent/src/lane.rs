//! The bulk lane: a read-only disk (virtio serial [`ember_wire::LANE_SERIAL`])
//! the host writes upload pieces into. A piece read from it is a few block
//! requests, each moving up to a megabyte by DMA; over the virtio-console
//! the same piece is a thousand 4 KiB reads, each with its own kick, which
//! under TCG caps uploads near 22 MB/s.
//!
//! The disk is read with `O_DIRECT`: the host rewrites its pieces, so the
//! guest must never serve one from its page cache.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// `O_DIRECT` wants buffers, offsets and lengths aligned to the logical
/// block size (and a file system's to its block); a page covers them all.
pub(crate) const ALIGN: usize = 4096;

/// A zeroed buffer with room for `len` bytes from an `ALIGN`-aligned
/// offset in it, and that offset: what a direct read or write needs.
pub(crate) fn aligned_buffer(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    (buf, start)
}

/// The lane as this agent found it (once, on first use).
#[derive(Debug, Default)]
pub struct Lane {
    opened: OnceLock<Result<Arc<File>, String>>,
}

impl Lane {
    /// The lane's device: `path` when given (host tests), else the block
    /// device whose serial is the lane's.
    fn open(path: Option<&Path>) -> Result<File, String> {
        let dev = match path {
            Some(p) => p.to_path_buf(),
            None => find_by_serial(Path::new("/sys/block"), ember_wire::LANE_SERIAL).ok_or_else(|| {
                format!("this VM has no bulk lane (no disk with serial {})", ember_wire::LANE_SERIAL)
            })?,
        };
        let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&dev);
        match direct {
            Ok(f) => Ok(f),
            // A regular file on a file system without O_DIRECT (host tests
            // on tmpfs) shares the page cache with its writer anyway.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && path.is_some() => {
                File::open(&dev).map_err(|e| format!("opening {}: {e}", dev.display()))
            }
            Err(e) => Err(format!("opening {}: {e}", dev.display())),
        }
    }

    fn file(&self, path: Option<&Path>) -> Result<Arc<File>, String> {
        self.opened.get_or_init(|| Self::open(path).map(Arc::new)).clone()
    }

    /// `len` bytes at lane offset `at` (aligned as `O_DIRECT` needs), read
    /// off the async threads. Returns the buffer and where the bytes start
    /// in it.
    pub async fn read(&self, path: Option<&Path>, at: u64, len: u32) -> Result<(Vec<u8>, usize), String> {
        if len > ember_wire::MAX_LANE_WRITE {
            return Err(format!("{len} bytes is over the lane's {} per write", ember_wire::MAX_LANE_WRITE));
        }
        if !at.is_multiple_of(ALIGN as u64) {
            return Err(format!("lane offset {at} is not {ALIGN}-aligned"));
        }
        let f = self.file(path)?;
        let len = len as usize;
        let whole = len.div_ceil(ALIGN) * ALIGN;
        let read = tokio::task::spawn_blocking(move || {
            let (mut buf, start) = aligned_buffer(whole);
            let mut done = 0;
            while done < len {
                let n = f
                    .read_at(&mut buf[start + done..start + whole], at + done as u64)
                    .map_err(|e| format!("reading the lane at {}: {e}", at + done as u64))?;
                if n == 0 {
                    return Err(format!("the lane ends before {} + {len}", at));
                }
                // A short direct read ends on a block boundary.
                done += n;
            }
            Ok((buf, start))
        });
        read.await.map_err(|e| format!("the lane read task failed: {e}"))?
    }
}

/// `/dev/vdX` for the `vdX` under `sys_block` whose `serial` is `serial`.
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|e| {
        let s = std::fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| Path::new("/dev").join(e.file_name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_is_found_by_its_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, serial) in [("vda", "ember-root"), ("vdb", "ember-scratch"), ("vdc", "ember-lane\n")] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
            std::fs::write(dir.path().join(name).join("serial"), serial).expect("write");
        }
        std::fs::create_dir(dir.path().join("loop0")).expect("mkdir");
        assert_eq!(find_by_serial(dir.path(), "ember-lane"), Some(PathBuf::from("/dev/vdc")));
        assert_eq!(find_by_serial(dir.path(), "ember-nothing"), None);
    }

    #[tokio::test]
    async fn pieces_come_back_whole_and_bad_requests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lane");
        let mut data = vec![0u8; 3 * ALIGN];
        data[ALIGN..ALIGN + 5000].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8);
        std::fs::write(&path, &data).expect("write");
        let lane = Lane::default();
        let (buf, start) = lane.read(Some(&path), ALIGN as u64, 5000).await.expect("read");
        assert_eq!(&buf[start..start + 5000], &data[ALIGN..ALIGN + 5000]);
        assert_eq!(buf.as_ptr().wrapping_add(start) as usize % ALIGN, 0);
        assert!(lane.read(Some(&path), 1, 10).await.unwrap_err().contains("aligned"));
        assert!(lane
            .read(Some(&path), 0, ember_wire::MAX_LANE_WRITE + 1)
            .await
            .unwrap_err()
            .contains("over"));
        assert!(lane
            .read(Some(&path), 2 * ALIGN as u64, 2 * ALIGN as u32)
            .await
            .unwrap_err()
            .contains("ends"));
    }
}
