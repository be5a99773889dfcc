//! The bulk lane, the host's end: a small sparse file each VM gets as a
//! read-only disk (serial [`ember_wire::LANE_SERIAL`]). An upload puts each
//! piece in a free slot of it and asks the agent (`lane_write`) to copy it
//! into the file; the slot is free again once the agent answers, and its
//! bytes are punched out so nothing of one upload outlives it.
//!
//! Why a disk: host-to-guest bytes on the virtio-console arrive in 4 KiB
//! buffers, one read and one kick each, which under TCG holds an upload
//! near 22 MB/s; a block request moves a megabyte at a time by DMA.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Bytes per slot: one piece of an upload.
pub const SLOT_LEN: u64 = 4 << 20;
/// Slots per lane: pieces in flight at once, per VM.
pub const SLOTS: u64 = 4;

/// One VM's lane file and which of its slots are free.
#[derive(Debug)]
pub struct BulkLane {
    file: File,
    path: PathBuf,
    free: Mutex<Vec<u64>>,
    permits: Semaphore,
}

/// A slot holding one piece, until dropped.
#[derive(Debug)]
pub struct Slot {
    lane: Arc<BulkLane>,
    at: u64,
    len: u32,
}

impl Slot {
    /// Where the piece starts on the lane.
    pub fn at(&self) -> u64 {
        self.at
    }
    pub fn len(&self) -> u32 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = fallocate(&self.lane.file, punch, self.at as i64, SLOT_LEN as i64) {
            // Not fatal: the next piece overwrites it, and the file goes
            // with the VM.
            tracing::debug!(error = %e, "cannot punch out a lane slot");
        }
        self.lane.free.lock().unwrap_or_else(|p| p.into_inner()).push(self.at);
        self.lane.permits.add_permits(1);
    }
}

impl BulkLane {
    /// A new, empty (sparse) lane file at `path`.
    pub fn create(path: &Path) -> std::io::Result<Arc<Self>> {
        let file = File::options().read(true).write(true).create(true).truncate(true).open(path)?;
        file.set_len(SLOTS * SLOT_LEN)?;
        Ok(Arc::new(Self {
            file,
            path: path.to_path_buf(),
            free: Mutex::new((0..SLOTS).rev().map(|i| i * SLOT_LEN).collect()),
            permits: Semaphore::new(SLOTS as usize),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Put `data` (at most [`SLOT_LEN`] bytes) in a free slot, waiting for
    /// one if all are in flight.
    pub async fn put(self: &Arc<Self>, data: Vec<u8>) -> std::io::Result<Slot> {
        if data.len() as u64 > SLOT_LEN {
            return Err(std::io::Error::other(format!("{} bytes do not fit a lane slot", data.len())));
        }
        let permit = self.permits.acquire().await.map_err(std::io::Error::other)?;
        permit.forget();
        let at = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some(at) = at else {
            self.permits.add_permits(1);
            return Err(std::io::Error::other("no free lane slot (bookkeeping is off)"));
        };
        // The slot goes back if the write fails.
        let slot = Slot { lane: Arc::clone(self), at, len: data.len() as u32 };
        let lane = Arc::clone(self);
        let written = tokio::task::spawn_blocking(move || lane.file.write_all_at(&data, at));
        written.await.map_err(std::io::Error::other)??;
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[tokio::test]
    async fn pieces_land_in_free_slots_and_leave_no_bytes_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lane = BulkLane::create(&dir.path().join("lane")).expect("create");
        let meta = std::fs::metadata(lane.path()).expect("stat");
        assert_eq!(meta.len(), SLOTS * SLOT_LEN);
        assert_eq!(meta.blocks(), 0, "the lane starts sparse");

        let mut slots = Vec::new();
        for i in 0..SLOTS {
            let slot = lane.put(vec![i as u8 + 1; 5000]).await.expect("put");
            assert_eq!(slot.at() % SLOT_LEN, 0);
            let mut back = vec![0u8; 5000];
            lane.file.read_exact_at(&mut back, slot.at()).expect("read");
            assert_eq!(back, vec![i as u8 + 1; 5000]);
            slots.push(slot);
        }
        let mut ats: Vec<u64> = slots.iter().map(Slot::at).collect();
        ats.sort_unstable();
        ats.dedup();
        assert_eq!(ats.len() as u64, SLOTS, "every piece in a slot of its own");

        // Full: the next put waits until a slot is dropped.
        let next = tokio::spawn({
            let lane = Arc::clone(&lane);
            async move { lane.put(vec![9; 10]).await.map(|s| s.at()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!next.is_finished(), "a full lane made room it does not have");
        let freed = slots.remove(0);
        let freed_at = freed.at();
        drop(freed);
        assert_eq!(next.await.expect("join").expect("put"), freed_at);

        drop(slots);
        let mut rest = vec![0u8; 5000];
        for i in 0..SLOTS {
            lane.file.read_exact_at(&mut rest, i * SLOT_LEN).expect("read");
            assert!(rest.iter().all(|&b| b == 0), "slot {i} kept its bytes after it was freed");
        }
        assert!(lane.put(vec![0; SLOT_LEN as usize + 1]).await.is_err());
    }
}
