//! A claimed VM. The lease owns it; whatever way the lease ends (released,
//! dropped on error or panic, client gone), the VM goes to reset, never
//! straight back to the ready set.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Backend, Inner, ReadyVm};

pub struct Lease<B: Backend> {
    inner: Arc<Inner<B>>,
    vm: Option<B::Vm>,
    uses: u32,
    warm: bool,
    claimed_at: Instant,
    /// How long the claim took (the caller's wait).
    claim_wait: std::time::Duration,
}

impl<B: Backend> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.vm.as_ref().map(B::vm_id).unwrap_or("-");
        f.debug_struct("Lease").field("vm", &id).field("warm", &self.warm).finish()
    }
}

impl<B: Backend> Lease<B> {
    pub(super) fn new(inner: Arc<Inner<B>>, vm: B::Vm, uses: u32, warm: bool, started: Instant) -> Self {
        let now = Instant::now();
        Self { inner, vm: Some(vm), uses, warm, claimed_at: now, claim_wait: now - started }
    }

    /// Whether the VM was ready when claimed (no boot waited for).
    pub fn warm(&self) -> bool {
        self.warm
    }

    pub fn claim_wait(&self) -> std::time::Duration {
        self.claim_wait
    }

    /// Return the VM and wait until it is reset (or destroyed).
    pub async fn release(mut self) {
        if let Some(vm) = self.vm.take() {
            recycle(Arc::clone(&self.inner), vm, self.uses + 1, self.claimed_at, false).await;
        }
    }

    /// The VM is not to be reused (it misbehaved): destroy it.
    pub async fn discard(mut self) {
        if let Some(vm) = self.vm.take() {
            recycle(Arc::clone(&self.inner), vm, self.uses + 1, self.claimed_at, true).await;
        }
    }

    /// Take the VM out of the pool for good (it becomes a session's).
    pub(super) fn into_vm(mut self) -> B::Vm {
        let vm = self.vm.take();
        self.inner.lock().claimed -= 1;
        match vm {
            Some(vm) => vm,
            None => unreachable!("a lease always holds its VM until it ends"),
        }
    }
}

impl<B: Backend> Deref for Lease<B> {
    type Target = B::Vm;
    fn deref(&self) -> &B::Vm {
        match &self.vm {
            Some(vm) => vm,
            None => unreachable!("a lease always holds its VM until it ends"),
        }
    }
}

impl<B: Backend> DerefMut for Lease<B> {
    fn deref_mut(&mut self) -> &mut B::Vm {
        match &mut self.vm {
            Some(vm) => vm,
            None => unreachable!("a lease always holds its VM until it ends"),
        }
    }
}

impl<B: Backend> Drop for Lease<B> {
    fn drop(&mut self) {
        let Some(vm) = self.vm.take() else { return };
        let inner = Arc::clone(&self.inner);
        let (uses, at) = (self.uses + 1, self.claimed_at);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(recycle(inner, vm, uses, at, false));
            }
            Err(_) => {
                // No runtime (process exit): the backend's own drop cleans up.
                let mut st = inner.lock();
                st.claimed -= 1;
                drop(st);
                drop(vm);
            }
        }
    }
}

/// Reset a used VM and put it back, or destroy it.
pub(super) async fn recycle<B: Backend>(
    inner: Arc<Inner<B>>,
    mut vm: B::Vm,
    uses: u32,
    claimed_at: Instant,
    discard: bool,
) {
    let draining = {
        let mut st = inner.lock();
        st.claimed -= 1;
        st.resetting += 1;
        st.draining
    };
    let reuse =
        !discard && !draining && inner.cfg.enabled && inner.backend.recycles() && uses < inner.cfg.max_uses;
    let clean = if reuse {
        let started = Instant::now();
        let ok = match inner.backend.reset(&mut vm).await {
            Ok(()) => inner.backend.healthy(&mut vm),
            Err(e) => {
                tracing::warn!(vm = B::vm_id(&vm), error = %e, "reset failed; destroying the VM");
                false
            }
        };
        inner.emit(super::PoolEvent::Reset { took: started.elapsed(), ok });
        ok
    } else {
        false
    };
    inner.note_out_of_pool(claimed_at.elapsed().as_secs_f64());
    // Back to the ready set, unless it must go (dirty, or the pool drains).
    let doomed = if clean {
        let mut st = inner.lock();
        st.counters.resets += 1;
        if st.draining {
            Some(vm)
        } else {
            st.resetting -= 1;
            st.ready.push_back(ReadyVm { vm, uses });
            None
        }
    } else {
        if reuse {
            inner.lock().counters.reset_failures += 1;
        }
        Some(vm)
    };
    if let Some(vm) = doomed {
        // Replacement may start while this one is still being torn down.
        inner.lock().resetting -= 1;
        inner.wake_replenisher.notify_one();
        inner.destroy_later(vm);
    }
    inner.changed.notify_one();
    inner.wake_replenisher.notify_one();
    let idle = inner.lock().is_idle();
    if idle {
        inner.idle.notify_waiters();
    }
}
