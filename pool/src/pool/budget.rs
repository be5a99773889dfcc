//! One memory budget (`pool.max_memory_mb`) shared by the pools of every
//! image. Each pool reports the memory its VMs take (every VM it counts,
//! booting to destroying, sessions included) after every change of its
//! counts, and reserves memory before it starts a creation; a reservation
//! that would take the sum over the limit is refused, so that two pools
//! growing at once cannot both take the last room.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug)]
pub struct MemoryBudget {
    limit_mb: u64,
    used: Mutex<BTreeMap<usize, u64>>,
    next: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit_mb: u64) -> Self {
        Self { limit_mb, used: Mutex::default(), next: AtomicUsize::new(0) }
    }

    pub fn limit_mb(&self) -> u64 {
        self.limit_mb
    }

    /// A new member (one pool); it uses nothing yet.
    pub(super) fn join(&self) -> usize {
        self.next.fetch_add(1, Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, u64>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What every member uses now.
    pub fn used_mb(&self) -> u64 {
        self.lock().values().sum()
    }

    /// Record what member `id` uses now (shrinking is always allowed; so is
    /// growing through a [`Self::reserve`] made before).
    pub(super) fn set(&self, id: usize, mb: u64) {
        self.lock().insert(id, mb);
    }

    /// Let member `id` grow to `mb` if the sum stays within the limit.
    pub(super) fn reserve(&self, id: usize, mb: u64) -> bool {
        let mut used = self.lock();
        let others: u64 = used.iter().filter(|(k, _)| **k != id).map(|(_, v)| v).sum();
        let mine = used.get(&id).copied().unwrap_or(0);
        if mb <= mine || others + mb <= self.limit_mb {
            used.insert(id, mb.max(mine));
            true
        } else {
            false
        }
    }

    /// How many more VMs of `vm_mb` fit now.
    pub(super) fn room(&self, vm_mb: u64) -> usize {
        let all: u64 = self.lock().values().sum();
        (self.limit_mb.saturating_sub(all) / vm_mb.max(1)) as usize
    }

    /// Member `id` is gone.
    pub(super) fn leave(&self, id: usize) {
        self.lock().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_share_the_limit_and_shrinking_always_works() {
        let b = MemoryBudget::new(1024);
        let (a, c) = (b.join(), b.join());
        assert!(b.reserve(a, 512));
        assert!(b.reserve(c, 512));
        assert!(!b.reserve(c, 768), "the sum would pass the limit");
        assert_eq!(b.room(256), 0);
        b.set(a, 256);
        assert_eq!(b.room(256), 1);
        assert!(b.reserve(c, 768));
        assert_eq!(b.used_mb(), 1024);
        b.leave(c);
        assert_eq!(b.used_mb(), 256);
    }
}
