//! Sessions: a VM pinned to a key for a long-lived workspace. Its files and
//! processes persist between calls; calls in one session are serialized;
//! it is not counted as warm. It ends on request, after its idle timeout
//! (`session_idle_ttl` unless opened with another) without calls, at the
//! end of its lifetime if it has one, or at shutdown, and is then destroyed
//! (never reused). With `session_dir` set it can pause instead (`pause.rs`):
//! its VM is saved to disk and ended, and the next use resumes it.

pub(super) mod pause;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ember_vm::Usage;
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
    /// Never ended or paused for idleness: only its lifetime ends it (an
    /// E2B sandbox lives its whole timeout however idle it is).
    pub idle_never: bool,
    /// Added to the environment of every call in it (a call's own wins).
    pub env: BTreeMap<String, String>,
    /// The caller's labels, returned as given.
    pub metadata: BTreeMap<String, String>,
}

pub(super) struct Slot<V> {
    /// The VM while it runs; `None` while paused or once ended.
    pub(super) vm: Arc<tokio::sync::Mutex<Option<V>>>,
    vm_id: Mutex<String>,
    pub(super) created: Instant,
    created_wall: SystemTime,
    pub(super) last_used: Mutex<Instant>,
    idle_timeout: Duration,
    expires: Mutex<Option<Instant>>,
    spec: SessionSpec,
    handle: Mutex<VmHandle>,
    /// While paused: where, and since when.
    paused: Mutex<Option<(PathBuf, Instant)>>,
    /// The network it was last given (restored when it resumes).
    network: Mutex<Option<ember_net::RawPolicy>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the reaper acts on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reap {
    End(&'static str),
    Pause,
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
    fn paused_since(&self) -> Option<Instant> {
        locked(&self.paused).as_ref().map(|p| p.1)
    }
    pub(super) fn is_paused(&self) -> bool {
        locked(&self.paused).is_some()
    }
    /// What the reaper does now, if anything: end it past its lifetime
    /// (even in use: the running call finishes first) or paused past
    /// `paused_ttl`; pause it when idle past `idle_pause`, or else end it
    /// idle past its idle timeout (never while in use).
    fn reap(&self, now: Instant, idle_pause: Option<Duration>, paused_ttl: Duration) -> Option<Reap> {
        if self.expired(now) {
            return Some(Reap::End("its lifetime ended"));
        }
        if let Some(since) = self.paused_since() {
            return (now.saturating_duration_since(since) >= paused_ttl)
                .then_some(Reap::End("paused for pool.sessions.paused_ttl"));
        }
        if self.spec.idle_never {
            return None;
        }
        let idle = self.idle_for(now);
        let free = self.vm.try_lock().is_ok();
        match idle_pause {
            Some(p) if idle >= p && free => Some(Reap::Pause),
            Some(_) => None,
            None if idle >= self.idle_timeout && free => Some(Reap::End("idle for its idle timeout")),
            None => None,
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
        let paused = locked(&self.paused).clone();
        let usage = match &paused {
            Some((dir, _)) => Usage { disk_bytes: Some(ember_vm::paused_bytes(dir)), ..Usage::default() },
            None => locked(&self.handle).usage.read(),
        };
        SessionInfo {
            key: key.to_string(),
            state: if paused.is_some() { "paused" } else { "running" },
            vm_id: paused.is_none().then(|| locked(&self.vm_id).clone()),
            age_secs: now.saturating_duration_since(self.created).as_secs_f64(),
            idle_secs: now.saturating_duration_since(last_used).as_secs_f64(),
            created: humantime::format_rfc3339_millis(self.created_wall).to_string(),
            last_used: wall(last_used),
            expires: expires.map(wall),
            idle_timeout_secs: self.idle_timeout.as_secs_f64(),
            idle_expires: wall(last_used + self.idle_timeout),
            paused_at: paused.map(|(_, t)| wall(t)),
            env: self.spec.env.keys().cloned().collect(),
            metadata: self.spec.metadata.clone(),
            busy: self.vm.try_lock().is_err(),
            usage,
        }
    }
}

/// Exclusive use of a session's VM for one call.
pub struct SessionLease<B: Backend> {
    guard: OwnedMutexGuard<Option<B::Vm>>,
    slot: Arc<Slot<B::Vm>>,
    inner: Arc<Inner<B>>,
}

impl<B: Backend> std::fmt::Debug for SessionLease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLease").field("vm", &*locked(&self.slot.vm_id)).finish()
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

    /// Give the session's VM the network `policy` allows (as
    /// [`Backend::connect`]); it is kept for the session, and given again
    /// when the session resumes from a pause.
    pub async fn connect(&self, policy: &ember_net::Policy) -> Result<super::NetTimings, PoolError> {
        let t = self.inner.backend.connect(self, policy).await?;
        *locked(&self.slot.network) = Some(policy.to_raw());
        Ok(t)
    }
}

/// One session, as listed and as `GET /v1/sessions/{key}` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SessionInfo {
    pub key: String,
    /// `running` or `paused`.
    pub state: &'static str,
    /// Its VM while it runs.
    pub vm_id: Option<String>,
    pub age_secs: f64,
    pub idle_secs: f64,
    /// RFC 3339 times (UTC).
    pub created: String,
    pub last_used: String,
    /// The end of its lifetime; `None`: it has none.
    pub expires: Option<String>,
    pub idle_timeout_secs: f64,
    /// When idleness ends (or pauses) it if no call comes first.
    pub idle_expires: String,
    pub paused_at: Option<String>,
    /// The names of its environment variables (not their values).
    pub env: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// Whether a call runs in it now.
    pub busy: bool,
    /// Live figures of its VM, as the host sees them (a paused one: the
    /// bytes its saved state and disk take).
    pub usage: Usage,
}

impl<B: Backend> Pool<B> {
    /// The session `key`'s VM, created from the warm pool on first use,
    /// resumed if it is paused. Waits while another call of the same
    /// session runs.
    pub async fn session(&self, key: &str) -> Result<SessionLease<B>, PoolError> {
        self.session_lease(key, true).await
    }

    /// [`Self::session`] of a session that exists (running or paused):
    /// never opens one; a missing key is [`PoolError::NoSession`].
    pub async fn existing_session(&self, key: &str) -> Result<SessionLease<B>, PoolError> {
        self.session_lease(key, false).await
    }

    async fn session_lease(&self, key: &str, open: bool) -> Result<SessionLease<B>, PoolError> {
        let existing = {
            let st = self.inner.lock();
            if st.draining {
                return Err(PoolError::Draining);
            }
            st.sessions.get(key).cloned()
        };
        let slot = match existing {
            Some(slot) => slot,
            None if open => self.open_session(key, SessionSpec::default(), false).await?,
            None => return Err(PoolError::NoSession { key: key.into() }),
        };
        let mut guard = Arc::clone(&slot.vm).lock_owned().await;
        if guard.is_none() && slot.is_paused() {
            pause::resume(&self.inner, key, &slot, &mut guard).await?;
        }
        let healthy = match guard.as_mut() {
            Some(vm) => self.inner.backend.healthy(vm),
            None => {
                return Err(PoolError::SessionLost { key: key.into(), reason: "the session ended".into() })
            }
        };
        if !healthy {
            drop(guard);
            end_slot(&self.inner, key, &slot).await;
            return Err(PoolError::SessionLost { key: key.into(), reason: "its VM stopped".into() });
        }
        slot.touch();
        Ok(SessionLease { guard, slot, inner: Arc::clone(&self.inner) })
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
            if st.running_sessions() >= self.inner.cfg.max_sessions {
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
        if st.running_sessions() >= self.inner.cfg.max_sessions || st.draining {
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
            vm_id: Mutex::new(B::vm_id(&vm).to_string()),
            handle: Mutex::new(B::handle(&vm)),
            vm: Arc::new(tokio::sync::Mutex::new(Some(vm))),
            created: now,
            created_wall: SystemTime::now(),
            last_used: Mutex::new(now),
            idle_timeout: spec.idle_timeout.unwrap_or(self.inner.cfg.session_idle_ttl),
            expires: Mutex::new(spec.lifetime.map(|l| now + l)),
            spec,
            paused: Mutex::new(None),
            network: Mutex::new(None),
        });
        st.shift_to_session(key.to_string(), Arc::clone(&slot));
        drop(st);
        tracing::info!(session = key, vm = %locked(&slot.vm_id), "session opened");
        Ok(slot)
    }

    /// End a session and destroy its VM (after a running call finishes),
    /// or delete it if it is paused. Returns whether the session existed.
    pub async fn end_session(&self, key: &str) -> bool {
        let slot = self.inner.lock().sessions.get(key).cloned();
        match slot {
            Some(slot) => end_slot(&self.inner, key, &slot).await,
            None => false,
        }
    }

    /// Pause session `key` now (after a running call finishes).
    pub async fn pause_session(&self, key: &str) -> Result<SessionInfo, PoolError> {
        let slot = self.slot(key)?;
        pause::pause(&self.inner, key, &slot).await?;
        Ok(slot.info(key, Instant::now()))
    }

    /// Resume session `key` if it is paused (a running one is left as is).
    pub async fn resume_session(&self, key: &str) -> Result<SessionInfo, PoolError> {
        let slot = self.slot(key)?;
        drop(self.session(key).await?);
        Ok(slot.info(key, Instant::now()))
    }

    /// Fork session `key` into a new session `child`: the same memory,
    /// processes, files and settings; the two diverge from then on. The
    /// child is resumed at once when there is room (else it waits paused).
    pub async fn fork_session(&self, key: &str, child: &str) -> Result<SessionInfo, PoolError> {
        let slot = self.slot(key)?;
        pause::fork(&self.inner, key, &slot, child).await?;
        if let Err(e) = self.session(child).await {
            tracing::info!(session = child, error = %e, "the fork stays paused for now");
        }
        self.session_info(child)
            .ok_or_else(|| PoolError::SessionLost { key: child.into(), reason: "the fork ended".into() })
    }

    fn slot(&self, key: &str) -> Result<Arc<Slot<B::Vm>>, PoolError> {
        self.inner
            .lock()
            .sessions
            .get(key)
            .cloned()
            .ok_or_else(|| PoolError::SessionLost { key: key.into(), reason: "no such session".into() })
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
    /// session, it is paused, or its backend has no shared connection.
    pub fn session_agent(&self, key: &str) -> Option<std::sync::Arc<ember_channel::AgentClient>> {
        let slot = self.inner.lock().sessions.get(key).cloned()?;
        if slot.is_paused() {
            return None;
        }
        let agent = locked(&slot.handle).agent.clone();
        agent
    }

    /// Session `key`'s agent connection and VM id, for a use that is not a
    /// call (its processes, files, ports): resumed first if it is paused,
    /// and counted as a use. No figures are read (`session_info` reads the
    /// VM's usage from `/proc`).
    pub async fn session_handle(&self, key: &str) -> Result<SessionHandle, PoolError> {
        let mut slot = self.slot(key)?;
        if slot.is_paused() {
            drop(self.session(key).await?);
            slot = self.slot(key)?;
        }
        let agent = locked(&slot.handle).agent.clone();
        let agent = agent.ok_or_else(|| PoolError::SessionLost {
            key: key.into(),
            reason: "its VM has no agent".into(),
        })?;
        slot.touch();
        let vm_id = locked(&slot.vm_id).clone();
        Ok(SessionHandle { agent, vm_id, env: slot.spec.env.clone() })
    }

    /// Count a use of session `key` that is not a call (its processes).
    pub fn touch_session(&self, key: &str) {
        if let Some(slot) = self.inner.lock().sessions.get(key) {
            slot.touch();
        }
    }

    /// The keys of this pool's sessions (no figures read).
    pub fn session_keys(&self) -> Vec<String> {
        self.inner.lock().sessions.keys().cloned().collect()
    }

    /// Every session with metadata `label`: its key and that value (read
    /// under the lock, no figures).
    pub fn sessions_labelled(&self, label: &str) -> Vec<(String, String)> {
        let st = self.inner.lock();
        st.sessions
            .iter()
            .filter_map(|(k, slot)| slot.spec.metadata.get(label).map(|v| (k.clone(), v.clone())))
            .collect()
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
        if let Some((dir, _)) = locked(&slot.paused).as_ref() {
            pause::write_record(dir, key, &slot);
        }
        Some(slot.info(key, now))
    }
}

/// A running session's agent connection, to use without holding its VM
/// (see [`Pool::session_handle`]).
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub agent: std::sync::Arc<ember_channel::AgentClient>,
    pub vm_id: String,
    /// The environment every call and process of the session gets.
    pub env: BTreeMap<String, String>,
}

/// End the session `key` if `slot` is still its slot: out of the sessions
/// (and into `Destroying` if it has a VM) in one step, then (once a running
/// call lets go of it) the VM is destroyed and its saved files removed.
/// Whether it ended it.
async fn end_slot<B: Backend>(inner: &Arc<Inner<B>>, key: &str, slot: &Arc<Slot<B::Vm>>) -> bool {
    let paused = {
        let mut st = inner.lock();
        if !st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return false;
        }
        st.sessions.remove(key);
        if slot.is_paused() {
            st.paused -= 1;
            st.check(Phase::Destroying);
            true
        } else {
            st.enter(Phase::Destroying);
            false
        }
    };
    let mut guard = slot.vm.lock().await;
    let vm = guard.take();
    let dir = locked(&slot.paused).take().map(|p| p.0);
    if paused {
        drop(guard);
    } else {
        inner.destroy_now(vm).await;
        drop(guard);
    }
    // Its saved files (a paused one's, or a resumed one's disk).
    if let Some(dir) = dir.or_else(|| inner.cfg.session_dir.as_ref().map(|d| d.join(key))) {
        inner.backend.remove_paused(&dir).await;
    }
    tracing::info!(session = key, "session ended");
    true
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

/// End sessions past their lifetime, idle past their idle timeout or paused
/// past `paused_ttl`; pause those idle past `idle_pause` when it is set.
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
        let due: Vec<Due<B::Vm>> = {
            let st = inner.lock();
            if st.draining {
                return;
            }
            st.sessions
                .iter()
                .filter_map(|(k, s)| {
                    let r = s.reap(now, inner.cfg.session_idle_pause, inner.cfg.session_paused_ttl)?;
                    Some((k.clone(), Arc::clone(s), r))
                })
                .collect()
        };
        for (key, slot, what) in due {
            let inner = Arc::clone(&inner);
            match what {
                Reap::End(why) => {
                    tracing::info!(session = %key, "ending the session: {why}");
                    // A call running in it finishes first (its own timeout bounds it).
                    tokio::spawn(async move { end_slot(&inner, &key, &slot).await });
                }
                Reap::Pause => {
                    // Marked used, so that it is not picked again while it pauses.
                    slot.touch();
                    tokio::spawn(async move {
                        if let Err(e) = pause::pause(&inner, &key, &slot).await {
                            tracing::warn!(session = %key, error = %e, "pausing the idle session failed");
                        }
                    });
                }
            }
        }
    }
}

/// A session the reaper acts on: its key, slot and what it does.
type Due<V> = (String, Arc<Slot<V>>, Reap);

/// At shutdown: running sessions' VMs are destroyed (their saved files
/// too); paused sessions stay on disk for the next start.
pub(super) async fn shut_down<B: Backend>(inner: &Arc<Inner<B>>) {
    // The next server may take the directory (and the paused sessions).
    let _lock = inner.session_dir_lock.lock().unwrap_or_else(|p| p.into_inner()).take();
    let sessions: Vec<(String, Arc<Slot<B::Vm>>)> = {
        let mut st = inner.lock();
        let all: Vec<_> = st.sessions.drain().collect();
        let running = all.iter().filter(|(_, s)| !s.is_paused()).count();
        st.paused = 0;
        for _ in 0..running {
            st.enter(Phase::Destroying);
        }
        all
    };
    for (key, slot) in sessions {
        if slot.is_paused() {
            continue;
        }
        let vm = slot.vm.lock().await.take();
        inner.destroy_now(vm).await;
        if let Some(dir) = inner.cfg.session_dir.as_ref().map(|d| d.join(&key)) {
            inner.backend.remove_paused(&dir).await;
        }
    }
}

/// The shortest idle timeout or lifetime a session may have.
pub const MIN_SESSION_TIMEOUT: Duration = Duration::from_secs(1);
