//! Sessions: a VM pinned to a key for a long-lived workspace. Its files and
//! processes persist between calls; calls in one session are serialized;
//! it is not counted as warm; it ends on request, after its idle timeout
//! (`session_idle_ttl` unless opened with another) without calls, at the
//! end of its lifetime if it has one, or at shutdown, and is then destroyed
//! (never reused).

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ember_vm::vm::Usage;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::{lease, Backend, Inner, Phase, Pool, PoolError, VmHandle};

/// What a session is opened with; the session header's implicit open uses
/// the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSpec {
    /// Ended after this long without calls; `None`: the pool's
    /// `session_idle_ttl`.
    pub idle_timeout: Option<Duration>,
    /// Ended this long after it opens however busy it is (extendable);
    /// `None`: only idleness ends it.
    pub lifetime: Option<Duration>,
    /// Added to the environment of every call in it (a call's own wins).
    pub env: BTreeMap<String, String>,
    /// The caller's labels, returned as given.
    pub metadata: BTreeMap<String, String>,
}

pub(super) struct Slot<V> {
    pub(super) vm: Arc<tokio::sync::Mutex<Option<V>>>,
    pub(super) vm_id: String,
    pub(super) created: Instant,
    created_wall: SystemTime,
    pub(super) last_used: Mutex<Instant>,
    idle_timeout: Duration,
    expires: Mutex<Option<Instant>>,
    spec: SessionSpec,
    handle: VmHandle,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<V> Slot<V> {
    fn touch(&self) {
        *locked(&self.last_used) = Instant::now();
    }
    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*locked(&self.last_used))
    }
    fn expired(&self, now: Instant) -> bool {
        locked(&self.expires).is_some_and(|e| now >= e)
    }
    /// Why the reaper ends it now, if it does: past its lifetime (even in
    /// use: the running call finishes first), or idle (never while in use).
    fn reap_reason(&self, now: Instant) -> Option<&'static str> {
        if self.expired(now) {
            Some("its lifetime ended")
        } else if self.idle_for(now) >= self.idle_timeout && self.vm.try_lock().is_ok() {
            Some("idle for its idle timeout")
        } else {
            None
        }
    }
    fn info(&self, key: &str, now: Instant) -> SessionInfo {
        let wall = |t: Instant| {
            let ago = now.saturating_duration_since(t);
            let later = t.saturating_duration_since(now);
            let at = SystemTime::now().checked_sub(ago).and_then(|t| t.checked_add(later));
            humantime::format_rfc3339_millis(at.unwrap_or_else(SystemTime::now)).to_string()
        };
        let last_used = *locked(&self.last_used);
        let expires = *locked(&self.expires);
        SessionInfo {
            key: key.to_string(),
            vm_id: self.vm_id.clone(),
            age_secs: now.saturating_duration_since(self.created).as_secs_f64(),
            idle_secs: now.saturating_duration_since(last_used).as_secs_f64(),
            created: humantime::format_rfc3339_millis(self.created_wall).to_string(),
            last_used: wall(last_used),
            expires: expires.map(wall),
            idle_timeout_secs: self.idle_timeout.as_secs_f64(),
            idle_expires: wall(last_used + self.idle_timeout),
            env: self.spec.env.keys().cloned().collect(),
            metadata: self.spec.metadata.clone(),
            busy: self.vm.try_lock().is_err(),
            usage: self.handle.usage.read(),
        }
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

impl<B: Backend> SessionLease<B> {
    /// The environment every call of the session gets.
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.slot.spec.env
    }
}

/// One session, as listed and as `GET /v1/sessions/{key}` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub key: String,
    pub vm_id: String,
    pub age_secs: f64,
    pub idle_secs: f64,
    /// RFC 3339 times (UTC).
    pub created: String,
    pub last_used: String,
    /// The end of its lifetime; `None`: it has none.
    pub expires: Option<String>,
    pub idle_timeout_secs: f64,
    /// When idleness ends it if no call comes first.
    pub idle_expires: String,
    /// The names of its environment variables (not their values).
    pub env: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Whether a call runs in it now.
    pub busy: bool,
    /// Live figures of its VM, as the host sees them.
    pub usage: Usage,
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
            None => self.open_session(key, SessionSpec::default(), false).await?,
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

    /// Open session `key` with `spec`, its VM claimed from the warm pool
    /// now. A session of that key already open is an error.
    pub async fn open(&self, key: &str, spec: SessionSpec) -> Result<SessionInfo, PoolError> {
        let slot = self.open_session(key, spec, true).await?;
        Ok(slot.info(key, Instant::now()))
    }

    async fn open_session(
        &self,
        key: &str,
        spec: SessionSpec,
        exclusive: bool,
    ) -> Result<Arc<Slot<B::Vm>>, PoolError> {
        {
            let st = self.inner.lock();
            if exclusive && st.sessions.contains_key(key) {
                return Err(PoolError::SessionExists { key: key.into() });
            }
            if st.sessions.len() >= self.inner.cfg.max_sessions {
                return Err(PoolError::SessionLimit { limit: self.inner.cfg.max_sessions });
            }
        }
        let lease = self.claim().await?;
        let claimed_at = Instant::now();
        let vm = lease.into_vm();
        let mut st = self.inner.lock();
        if let Some(other) = st.sessions.get(key).cloned() {
            // Another call opened this session meanwhile: use that one (or,
            // opening explicitly, refuse) and hand our VM (still counted as
            // claimed) back for reset.
            drop(st);
            tokio::spawn(lease::recycle(Arc::clone(&self.inner), returned(vm, claimed_at)));
            return if exclusive { Err(PoolError::SessionExists { key: key.into() }) } else { Ok(other) };
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
            handle: B::handle(&vm),
            vm: Arc::new(tokio::sync::Mutex::new(Some(vm))),
            created: now,
            created_wall: SystemTime::now(),
            last_used: Mutex::new(now),
            idle_timeout: spec.idle_timeout.unwrap_or(self.inner.cfg.session_idle_ttl),
            expires: Mutex::new(spec.lifetime.map(|l| now + l)),
            spec,
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
        let slots: Vec<(String, Arc<Slot<B::Vm>>)> =
            self.inner.lock().sessions.iter().map(|(k, s)| (k.clone(), Arc::clone(s))).collect();
        let mut v: Vec<SessionInfo> = slots.iter().map(|(k, s)| s.info(k, now)).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Session `key`'s agent connection, to use without waiting for a call
    /// running in it (background processes); `None` if there is no such
    /// session or its backend has no shared connection.
    pub fn session_agent(&self, key: &str) -> Option<std::sync::Arc<ember_vm::AgentClient>> {
        self.inner.lock().sessions.get(key)?.handle.agent.clone()
    }

    /// Count a use of session `key` that is not a call (its processes).
    pub fn touch_session(&self, key: &str) {
        if let Some(slot) = self.inner.lock().sessions.get(key) {
            slot.touch();
        }
    }

    /// Session `key` as it is now, if this pool has it.
    pub fn session_info(&self, key: &str) -> Option<SessionInfo> {
        let slot = self.inner.lock().sessions.get(key).cloned()?;
        Some(slot.info(key, Instant::now()))
    }

    /// End session `key` `lifetime` from now (longer or shorter than it
    /// had, or where it had none). `None` if this pool has no such session.
    pub fn set_session_lifetime(&self, key: &str, lifetime: Duration) -> Option<SessionInfo> {
        let slot = self.inner.lock().sessions.get(key).cloned()?;
        let now = Instant::now();
        *locked(&slot.expires) = Some(now + lifetime);
        Some(slot.info(key, now))
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

/// End sessions idle for longer than their idle timeout, and those past
/// their lifetime.
pub(super) async fn reap_idle<B: Backend>(inner: Arc<Inner<B>>) {
    // Often enough for the shortest idle timeout a session may ask for.
    let every = (inner.cfg.session_idle_ttl / 10)
        .min(MIN_SESSION_TIMEOUT / 2)
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut stop = inner.stop.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Instant::now();
        let expired: Vec<Ended<B::Vm>> = {
            let mut st = inner.lock();
            if st.draining {
                return;
            }
            let keys: Vec<(String, &'static str)> =
                st.sessions.iter().filter_map(|(k, s)| Some((k.clone(), s.reap_reason(now)?))).collect();
            let gone: Vec<_> =
                keys.into_iter().filter_map(|(k, why)| st.sessions.remove(&k).map(|s| (k, s, why))).collect();
            for _ in &gone {
                st.enter(Phase::Destroying);
            }
            gone
        };
        for (key, slot, why) in expired {
            tracing::info!(session = %key, "session ended: {why}");
            // A call running in it finishes first (its own timeout bounds it).
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                let vm = slot.vm.lock().await.take();
                inner.destroy_now(vm).await;
            });
        }
    }
}

/// A session the reaper took out: its key, slot and why.
type Ended<V> = (String, Arc<Slot<V>>, &'static str);

/// The shortest idle timeout or lifetime a session may have.
pub const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(1);
