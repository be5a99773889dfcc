//! A claimed VM. The lease owns it; whatever way the lease ends (released,
//! dropped on error or panic, client gone), the VM goes to reset, never
//! straight back to the ready set.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use tokio::time::Instant;

use super::{Backend, CpuSummary, Inner, Phase, PoolError, ReadyVm, ResetKind};
use crate::config::RunReset;

pub struct Lease<B: Backend> {
    inner: Arc<Inner<B>>,
    vm: Option<B::Vm>,
    uses: u32,
    warm: bool,
    claimed_at: Instant,
    /// How long the claim took (the caller's wait).
    claim_wait: std::time::Duration,
    /// The function this lease serves: its VM returns to that function's
    /// warm set after a scrub.
    function: Option<Arc<str>>,
    /// The VM's CPU seconds when claimed (what the call cost is the rest).
    cpu_at_claim: Option<f64>,
    /// Whether the VM was given a network (taken away before its reset).
    connected: bool,
}

impl<B: Backend> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = self.vm.as_ref().map(B::vm_id).unwrap_or("-");
        f.debug_struct("Lease").field("vm", &id).field("warm", &self.warm).finish()
    }
}

impl<B: Backend> Lease<B> {
    pub(super) fn new(
        inner: Arc<Inner<B>>,
        vm: B::Vm,
        uses: u32,
        warm: bool,
        started: Instant,
        function: Option<Arc<str>>,
    ) -> Self {
        let now = Instant::now();
        let cpu_at_claim = B::cpu_seconds(&vm);
        Self {
            inner,
            vm: Some(vm),
            uses,
            warm,
            claimed_at: now,
            claim_wait: now - started,
            function,
            cpu_at_claim,
            connected: false,
        }
    }

    /// Give the VM the network `policy` allows for this lease; it is taken
    /// away when the lease ends, before the VM's reset.
    pub async fn connect(&mut self, policy: &ember_net::Policy) -> Result<super::NetTimings, PoolError> {
        self.connected = true;
        match &self.vm {
            Some(vm) => self.inner.backend.connect(vm, policy).await,
            None => Err(PoolError::Network("the lease holds no VM".into())),
        }
    }

    fn returned(&mut self, discard: bool) -> Option<Returned<B::Vm>> {
        let vm = self.vm.take()?;
        Some(Returned {
            vm,
            uses: self.uses + 1,
            claimed_at: self.claimed_at,
            discard,
            function: self.function.take(),
            cpu_at_claim: self.cpu_at_claim,
            connected: self.connected,
        })
    }

    /// Whether the VM was a ready one (no boot or full reset on the claim's
    /// path; the claim may still have queued for it, see `claim_wait`).
    pub fn warm(&self) -> bool {
        self.warm
    }

    pub fn claim_wait(&self) -> std::time::Duration {
        self.claim_wait
    }

    /// Return the VM and wait until it is reset (or destroyed).
    pub async fn release(mut self) {
        if let Some(r) = self.returned(false) {
            recycle(Arc::clone(&self.inner), r).await;
        }
    }

    /// The VM is not to be reused (it misbehaved): destroy it.
    pub async fn discard(mut self) {
        if let Some(r) = self.returned(true) {
            recycle(Arc::clone(&self.inner), r).await;
        }
    }

    /// Take the VM out of the lease, still counted as claimed: the caller
    /// makes it a session's ([`State::shift_to_session`]) or recycles it.
    pub(super) fn into_vm(mut self) -> B::Vm {
        let vm = self.vm.take();
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
        let Some(r) = self.returned(false) else { return };
        let inner = Arc::clone(&self.inner);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(recycle(inner, r));
            }
            Err(_) => {
                // No runtime (process exit): the backend's own drop cleans up.
                inner.lock().leave(Phase::Claimed);
                drop(r);
            }
        }
    }
}

/// A VM coming back from a lease.
pub(super) struct Returned<V> {
    pub(super) vm: V,
    pub(super) uses: u32,
    pub(super) claimed_at: Instant,
    /// Not to be reused (it misbehaved).
    pub(super) discard: bool,
    /// The function it served, if any.
    pub(super) function: Option<Arc<str>>,
    pub(super) cpu_at_claim: Option<f64>,
    /// It had a network: take it away first.
    pub(super) connected: bool,
}

/// Which reset a returned VM gets and which warm set it then joins: a VM
/// that served a function is scrubbed back into that function's set; one
/// that served a general call gets the full reset (or, where the operator
/// chose `run_reset = "scrub"`, a scrub back into the general set).
pub(super) fn reset_plan(
    function: Option<&Arc<str>>,
    run_reset: RunReset,
    scrubs: bool,
) -> (ResetKind, Option<Arc<str>>) {
    match function {
        Some(f) if scrubs => (ResetKind::Scrub, Some(Arc::clone(f))),
        None if scrubs && run_reset == RunReset::Scrub => (ResetKind::Scrub, None),
        _ => (ResetKind::Full, None),
    }
}

/// Reset a used VM and put it back, or destroy it.
pub(super) async fn recycle<B: Backend>(inner: Arc<Inner<B>>, r: Returned<B::Vm>) {
    let Returned { mut vm, uses, claimed_at, discard, function, cpu_at_claim, connected } = r;
    let cpu_now = B::cpu_seconds(&vm);
    if connected {
        // Before anything else: the VM must reach nothing while it is reset
        // (a scrub or rollback then clears the guest's side too).
        inner.backend.disconnect(&vm).await;
    }
    let draining = {
        let mut st = inner.lock();
        if let (Some(a), Some(b)) = (cpu_at_claim, cpu_now) {
            CpuSummary::add(&mut st.cpu.exec, b - a);
        }
        st.shift(Phase::Claimed, Phase::Resetting);
        st.draining
    };
    let reuse = !discard
        && !draining
        && inner.cfg.enabled
        && inner.backend.recycles()
        && inner.backend.keeps(&vm)
        && uses < inner.cfg.max_uses;
    let (mut kind, mut warm_for) = reset_plan(function.as_ref(), inner.cfg.run_reset, inner.backend.scrubs());
    let clean = if reuse {
        let mut ok = false;
        if kind == ResetKind::Scrub {
            ok = inner.reset_vm(&mut vm, ResetKind::Scrub).await;
            if !ok {
                (kind, warm_for) = (ResetKind::Full, None);
            }
        }
        if kind == ResetKind::Full {
            ok = inner.reset_vm(&mut vm, ResetKind::Full).await;
        }
        ok
    } else {
        false
    };
    inner.note_out_of_pool(claimed_at.elapsed().as_secs_f64());
    // Back to the ready set, unless it must go (dirty, or the pool drains).
    let doomed = if clean {
        let mut st = inner.lock();
        if st.draining {
            Some(vm)
        } else {
            st.shift_to_ready(Phase::Resetting, ReadyVm { vm, uses, warm_for });
            None
        }
    } else {
        Some(vm)
    };
    if let Some(vm) = doomed {
        inner.destroy_later(vm, Phase::Resetting);
    }
    inner.wake_claims();
    inner.wake_replenisher.notify_one();
    let idle = inner.lock().is_idle();
    if idle {
        inner.idle.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_reset_a_returned_vm_gets() {
        let f: Arc<str> = Arc::from("json-stats");
        let table = [
            // (function, run_reset, backend scrubs) -> (kind, warm set)
            (Some(&f), RunReset::Full, true, ResetKind::Scrub, Some("json-stats")),
            (Some(&f), RunReset::Scrub, true, ResetKind::Scrub, Some("json-stats")),
            (Some(&f), RunReset::Full, false, ResetKind::Full, None),
            (None, RunReset::Full, true, ResetKind::Full, None),
            (None, RunReset::Scrub, true, ResetKind::Scrub, None),
            (None, RunReset::Scrub, false, ResetKind::Full, None),
        ];
        for (func, run, scrubs, kind, set) in table {
            let (k, s) = reset_plan(func, run, scrubs);
            assert_eq!((k, s.as_deref()), (kind, set), "{func:?} {run:?} {scrubs}");
        }
    }
}
