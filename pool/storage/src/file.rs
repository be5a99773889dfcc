//! The file storage backend's disk operations: a VM's writable layer is a
//! sparse raw copy of the clean scratch image, rolled back in place (so
//! QEMU's open file sees the clean data) while the guest has it unmounted.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// Data extents `(offset, len)` of a sparse file.
fn data_extents(f: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let start = match lseek(f, pos, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(e.into()),
        };
        let end = lseek(f, start, Whence::SeekHole).map_err(io::Error::from)?;
        out.push((start as u64, (end - start) as u64));
        pos = end;
    }
    Ok(out)
}

/// Write `src`'s data extents into `dst` at the same offsets.
fn copy_extents(src: &mut File, dst: &mut File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (off, n) in data_extents(src, len)? {
        src.seek(SeekFrom::Start(off))?;
        dst.seek(SeekFrom::Start(off))?;
        let mut left = n;
        while left > 0 {
            let chunk = left.min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..chunk])?;
            dst.write_all(&buf[..chunk])?;
            left -= chunk as u64;
        }
        copied += n;
    }
    Ok(copied)
}

/// A sparse copy of `clean` at `dst` (holes stay holes).
pub fn sparse_copy(clean: &Path, dst: &Path) -> io::Result<()> {
    let mut src = File::open(clean)?;
    let len = src.metadata()?.len();
    let mut out = OpenOptions::new().write(true).create_new(true).open(dst)?;
    out.set_len(len)?;
    copy_extents(&mut src, &mut out, len)?;
    out.sync_data()
}

/// Write `clean`'s data onto an existing, zeroed file or device (a new
/// zvol): only the data extents are written.
pub fn copy_onto(clean: &Path, dst: &Path) -> io::Result<()> {
    let mut src = File::open(clean)?;
    let len = src.metadata()?.len();
    let mut out = OpenOptions::new().write(true).open(dst)?;
    copy_extents(&mut src, &mut out, len)?;
    out.sync_data()
}

/// Make `dst` byte-for-byte equal to `clean` again, in place: punch out
/// everything, then write back the clean image's data. Returns bytes written.
pub fn rollback_in_place(clean: &Path, dst: &Path) -> io::Result<u64> {
    let mut src = File::open(clean)?;
    let len = src.metadata()?.len();
    let mut out = OpenOptions::new().write(true).open(dst)?;
    if out.metadata()?.len() != len {
        return Err(io::Error::other(format!("{} is not the size of {}", dst.display(), clean.display())));
    }
    fallocate(
        &out,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        len as i64,
    )
    .map_err(io::Error::from)?;
    let n = copy_extents(&mut src, &mut out, len)?;
    out.sync_data()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_rollback_restore_the_clean_bytes_and_keep_holes() {
        let d = tempfile::tempdir().unwrap();
        let clean = d.path().join("clean");
        {
            let mut f = File::create(&clean).unwrap();
            f.set_len(64 << 20).unwrap();
            f.seek(SeekFrom::Start(4096)).unwrap();
            f.write_all(b"superblock").unwrap();
            f.seek(SeekFrom::Start(40 << 20)).unwrap();
            f.write_all(&[7u8; 10_000]).unwrap();
        }
        let vm = d.path().join("vm");
        sparse_copy(&clean, &vm).unwrap();
        assert_eq!(std::fs::read(&vm).unwrap(), std::fs::read(&clean).unwrap());
        let used = |p: &Path| std::os::unix::fs::MetadataExt::blocks(&p.metadata().unwrap()) * 512;
        assert!(used(&vm) < 1 << 20, "the copy is not sparse: {} bytes", used(&vm));
        // The guest writes all over it.
        {
            let mut f = OpenOptions::new().write(true).open(&vm).unwrap();
            for off in [0u64, 4096, 10 << 20, 40 << 20, (64 << 20) - 11] {
                f.seek(SeekFrom::Start(off)).unwrap();
                f.write_all(b"dirty!dirty").unwrap();
            }
        }
        assert_ne!(std::fs::read(&vm).unwrap(), std::fs::read(&clean).unwrap());
        // An fd opened before the rollback (QEMU's) sees the clean data.
        let mut held = File::open(&vm).unwrap();
        rollback_in_place(&clean, &vm).unwrap();
        let mut seen = Vec::new();
        held.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, std::fs::read(&clean).unwrap());
        assert!(used(&vm) < 1 << 20);
    }
}
