//! Sessions: a VM pinned to a key for a long-lived workspace. Its files and
//! processes persist between calls; calls in one session are serialized;
//! it is not counted as warm; it ends on request, after `session_idle_ttl`
//! without calls, or at shutdown, and is then destroyed (never reused).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::{lease, Backend, Inner, Phase, Pool, PoolError};

pub(super) struct Slot<V> {
    pub(super) vm: Arc<tokio::sync::Mutex<Option<V>>>,
    pub(super) vm_id: String,
    pub(super) created: Instant,
    pub(super) last_used: Mutex<Instant>,
}

impl<V> Slot<V> {
    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last_used.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Exclusive use of a session's VM for one call.
pub struct SessionLease<B: Backend> {
    guard: OwnedMutexGuard<Option<B::Vm>>,
    slot: Arc<Slot<B::Vm>>,
}

impl<B: Backend> std::fmt::Debug for SessionLease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLease").field("vm", &self.slot.vm_id).finish()
    }
}

impl<B: Backend> Deref for SessionLease<B> {
    type Target = B::Vm;
    fn deref(&self) -> &B::Vm {
        match self.guard.as_ref() {
            Some(vm) => vm,
            None => unreachable!("a session lease is only handed out with its VM"),
        }
    }
}

impl<B: Backend> DerefMut for SessionLease<B> {
    fn deref_mut(&mut self) -> &mut B::Vm {
        match self.guard.as_mut() {
            Some(vm) => vm,
            None => unreachable!("a session lease is only handed out with its VM"),
        }
    }
}

impl<B: Backend> Drop for SessionLease<B> {
    fn drop(&mut self) {
        self.slot.touch();
    }
}

/// One session, as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub key: String,
    pub vm_id: String,
    pub age_secs: f64,
    pub idle_secs: f64,
}

impl<B: Backend> Pool<B> {
    /// The session `key`'s VM, created from the warm pool on first use.
    /// Waits while another call of the same session runs.
    pub async fn session(&self, key: &str) -> Result<SessionLease<B>, PoolError> {
        let existing = {
            let st = self.inner.lock();
            if st.draining {
                return Err(PoolError::Draining);
            }
            st.sessions.get(key).cloned()
        };
        let slot = match existing {
            Some(slot) => slot,
            None => self.open_session(key).await?,
        };
        let mut guard = Arc::clone(&slot.vm).lock_owned().await;
        let healthy = match guard.as_mut() {
            Some(vm) => self.inner.backend.healthy(vm),
            None => {
                return Err(PoolError::SessionLost { key: key.into(), reason: "the session ended".into() })
            }
        };
        if !healthy {
            drop(guard);
            self.end_slot(key, &slot).await;
            return Err(PoolError::SessionLost { key: key.into(), reason: "its VM stopped".into() });
        }
        slot.touch();
        Ok(SessionLease { guard, slot })
    }

    async fn open_session(&self, key: &str) -> Result<Arc<Slot<B::Vm>>, PoolError> {
        {
            let st = self.inner.lock();
            if st.sessions.len() >= self.inner.cfg.max_sessions {
                return Err(PoolError::SessionLimit { limit: self.inner.cfg.max_sessions });
            }
        }
        let lease = self.claim().await?;
        let claimed_at = Instant::now();
        let vm = lease.into_vm();
        let mut st = self.inner.lock();
        if let Some(other) = st.sessions.get(key).cloned() {
            // Another call opened this session meanwhile: use that one and
            // hand our VM (still counted as claimed) back for reset.
            drop(st);
            tokio::spawn(lease::recycle(Arc::clone(&self.inner), returned(vm, claimed_at)));
            return Ok(other);
        }
        if st.sessions.len() >= self.inner.cfg.max_sessions || st.draining {
            let err = if st.draining {
                PoolError::Draining
            } else {
                PoolError::SessionLimit { limit: self.inner.cfg.max_sessions }
            };
            drop(st);
            tokio::spawn(lease::recycle(Arc::clone(&self.inner), returned(vm, claimed_at)));
            return Err(err);
        }
        let now = Instant::now();
        let slot = Arc::new(Slot {
            vm_id: B::vm_id(&vm).to_string(),
            vm: Arc::new(tokio::sync::Mutex::new(Some(vm))),
            created: now,
            last_used: Mutex::new(now),
        });
        st.shift_to_session(key.to_string(), Arc::clone(&slot));
        drop(st);
        tracing::info!(session = key, vm = %slot.vm_id, "session opened");
        Ok(slot)
    }

    /// End the session `key` if `slot` is still its slot: out of the
    /// sessions and into `Destroying` in one step, then (once a running
    /// call lets go of it) the VM is destroyed. Whether it ended it.
    async fn end_slot(&self, key: &str, slot: &Arc<Slot<B::Vm>>) -> bool {
        {
            let mut st = self.inner.lock();
            if !st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                return false;
            }
            st.sessions.remove(key);
            st.enter(Phase::Destroying);
        }
        let vm = slot.vm.lock().await.take();
        self.inner.destroy_now(vm).await;
        true
    }

    /// End a session and destroy its VM (after a running call finishes).
    /// Returns whether the session existed.
    pub async fn end_session(&self, key: &str) -> bool {
        let slot = self.inner.lock().sessions.get(key).cloned();
        match slot {
            Some(slot) => self.end_slot(key, &slot).await,
            None => false,
        }
    }

    /// Whether session `key` exists in this pool.
    pub fn has_session(&self, key: &str) -> bool {
        self.inner.lock().sessions.contains_key(key)
    }

    pub fn sessions(&self) -> Vec<SessionInfo> {
        let now = Instant::now();
        let st = self.inner.lock();
        let mut v: Vec<SessionInfo> = st
            .sessions
            .iter()
            .map(|(k, s)| SessionInfo {
                key: k.clone(),
                vm_id: s.vm_id.clone(),
                age_secs: now.saturating_duration_since(s.created).as_secs_f64(),
                idle_secs: s.idle_for(now).as_secs_f64(),
            })
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }
}

/// A VM a session claimed but did not keep, on its way back.
fn returned<V>(vm: V, claimed_at: Instant) -> lease::Returned<V> {
    lease::Returned {
        vm,
        uses: 1,
        claimed_at,
        discard: false,
        function: None,
        cpu_at_claim: None,
        connected: false,
    }
}

/// End sessions idle for longer than their TTL.
pub(super) async fn reap_idle<B: Backend>(inner: Arc<Inner<B>>) {
    let ttl = inner.cfg.session_idle_ttl;
    let every = (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let expired: Vec<(String, Arc<Slot<B::Vm>>)> = {
            let mut st = inner.lock();
            if st.draining {
                return;
            }
            let keys: Vec<String> = st
                .sessions
                .iter()
                // In use: the lock is held; not idle however old last_used is.
                .filter(|(_, s)| s.idle_for(now) >= ttl && s.vm.try_lock().is_ok())
                .map(|(k, _)| k.clone())
                .collect();
            let gone: Vec<_> =
                keys.into_iter().filter_map(|k| st.sessions.remove(&k).map(|s| (k, s))).collect();
            for _ in &gone {
                st.enter(Phase::Destroying);
            }
            gone
        };
        for (key, slot) in expired {
            tracing::info!(session = %key, "session idle for {ttl:?}; ending it");
            let vm = slot.vm.lock().await.take();
            inner.destroy_now(vm).await;
        }
    }
}
