//! Guest CIDs for kernel vsock. CIDs are global on a host, so a lease is
//! held both in-process and as an `flock` on `<dir>/<cid>.lock`, which
//! other ember processes respect and the kernel drops if we crash.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};

/// CIDs 0-2 are reserved (hypervisor, local, host).
pub const FIRST_GUEST_CID: u32 = 3;

#[derive(Debug)]
pub struct CidAllocator {
    dir: PathBuf,
    range: std::ops::Range<u32>,
    taken: Arc<Mutex<HashSet<u32>>>,
}

/// A CID in use; released on drop.
#[derive(Debug)]
pub struct CidLease {
    cid: u32,
    taken: Arc<Mutex<HashSet<u32>>>,
    _lock: Flock<File>,
}

impl CidLease {
    pub fn cid(&self) -> u32 {
        self.cid
    }
}

impl Drop for CidLease {
    fn drop(&mut self) {
        self.taken.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.cid);
    }
}

impl CidAllocator {
    pub fn new(dir: PathBuf, range: std::ops::Range<u32>) -> Self {
        let start = range.start.max(FIRST_GUEST_CID);
        Self { dir, range: start..range.end, taken: Arc::default() }
    }

    /// Lease the lowest free CID.
    pub fn allocate(&self) -> std::io::Result<CidLease> {
        std::fs::create_dir_all(&self.dir)?;
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        for cid in self.range.clone() {
            if taken.contains(&cid) {
                continue;
            }
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join(format!("{cid}.lock")))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => {
                    taken.insert(cid);
                    return Ok(CidLease { cid, taken: Arc::clone(&self.taken), _lock: lock });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
                Err((_, e)) => return Err(e.into()),
            }
        }
        Err(std::io::Error::other(format!("no free vsock CID in {:?}", self.range)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_distinct_cids_and_reuses_released_ones() {
        let dir = tempfile::tempdir().unwrap();
        let a = CidAllocator::new(dir.path().into(), 0..6);
        let l1 = a.allocate().unwrap();
        let l2 = a.allocate().unwrap();
        assert_eq!((l1.cid(), l2.cid()), (3, 4), "reserved CIDs are skipped");
        // A second allocator (another process) sees the flocks.
        let b = CidAllocator::new(dir.path().into(), 0..6);
        let l5 = b.allocate().unwrap();
        assert_eq!(l5.cid(), 5);
        assert!(a.allocate().is_err(), "range exhausted");
        drop(l1);
        assert_eq!(a.allocate().unwrap().cid(), 3, "a released CID is reused");
    }
}
