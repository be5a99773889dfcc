//! Paused sessions. Pausing saves the session's VM into
//! `session_dir/<key>` (the backend's files and `session.json`, this
//! module's record of the session) and ends the VM: the session keeps its
//! key and settings but holds no VM, so it counts against
//! `max_paused_sessions`, not the pool's VMs. The next use resumes it (a VM
//! counted as booting until it is back). Paused sessions outlive the server:
//! at start-up every directory with a record the backend can resume is a
//! paused session again; anything else there is removed. A resumed
//! session's record is removed at once, so a crash while it runs never
//! brings back a stale state over a newer disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::{locked, SessionSpec, Slot};
use crate::pool::{Backend, Inner, Phase, PoolError, Refusal, VmHandle};

const RECORD: &str = "session.json";

/// What `session.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    key: String,
    created_unix_ms: u64,
    idle_timeout_ms: u64,
    #[serde(default)]
    expires_unix_ms: Option<u64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    network: Option<ember_net::RawPolicy>,
    #[serde(default)]
    idle_never: bool,
    paused_unix_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `t` (an instant) on the wall clock.
fn wall_of(t: Instant) -> SystemTime {
    let now = Instant::now();
    let ago = now.saturating_duration_since(t);
    SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH)
}

/// The instant of wall time `ms` (never in the future).
fn instant_of(ms: u64) -> Instant {
    let then = UNIX_EPOCH + Duration::from_millis(ms);
    let ago = SystemTime::now().duration_since(then).unwrap_or_default();
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// The instant of wall time `ms`, which may be in the future.
fn deadline_of(ms: u64) -> Instant {
    let then = UNIX_EPOCH + Duration::from_millis(ms);
    match then.duration_since(SystemTime::now()) {
        Ok(later) => Instant::now() + later,
        Err(_) => instant_of(ms),
    }
}

pub(super) fn write_record<V>(dir: &Path, key: &str, slot: &Slot<V>) {
    let rec = Record {
        key: key.to_string(),
        created_unix_ms: unix_ms(slot.created_wall),
        idle_timeout_ms: slot.idle_timeout.as_millis() as u64,
        expires_unix_ms: (*locked(&slot.expires))
            .map(|e| unix_ms(wall_of(e) + e.saturating_duration_since(Instant::now()))),
        env: slot.spec.env.clone(),
        metadata: slot.spec.metadata.clone(),
        network: locked(&slot.network).clone(),
        idle_never: slot.spec.idle_never,
        paused_unix_ms: unix_ms(SystemTime::now()),
    };
    let written = serde_json::to_vec_pretty(&rec)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(dir.join(RECORD), b));
    if let Err(e) = written {
        tracing::warn!(session = key, error = %e, "cannot write the paused session's record");
    }
}

fn notify<B: Backend>(inner: &Inner<B>) {
    inner.wake_claims();
    inner.wake_replenisher.notify_one();
    if inner.lock().is_idle() {
        inner.idle.notify_waiters();
    }
}

/// Pause session `key` (its `slot`): save its VM and end it.
pub(super) async fn pause<B: Backend>(
    inner: &Arc<Inner<B>>,
    key: &str,
    slot: &Arc<Slot<B::Vm>>,
) -> Result<(), PoolError> {
    let Some(root) = inner.cfg.session_dir.clone() else {
        return Err(PoolError::Pause("sessions cannot pause: pool.sessions.dir is not set".into()));
    };
    if inner.session_dir_lock.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
        return Err(PoolError::Pause(format!(
            "sessions cannot pause: another Ember server uses {}",
            root.display()
        )));
    }
    if !inner.backend.pauses() {
        return Err(PoolError::Pause(
            "this pool's VMs cannot pause (it needs the serial or vsock channel)".into(),
        ));
    }
    let dir = root.join(key);
    let mut guard = Arc::clone(&slot.vm).lock_owned().await;
    let lost = || PoolError::SessionLost { key: key.into(), reason: "the session ended".into() };
    if guard.is_none() {
        return if slot.is_paused() { Ok(()) } else { Err(lost()) };
    }
    {
        let mut st = inner.lock();
        if !st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return Err(lost());
        }
        if st.paused >= inner.cfg.max_paused_sessions {
            return Err(PoolError::PausedLimit { limit: inner.cfg.max_paused_sessions });
        }
        // Counted paused at once; the VM is being saved (it still uses
        // memory) until it is gone.
        st.paused += 1;
        st.enter(Phase::Destroying);
    }
    let Some(vm) = guard.take() else { return Err(lost()) };
    let started = Instant::now();
    let saved = match std::fs::create_dir_all(&dir) {
        Ok(()) => {
            write_record(&dir, key, slot);
            inner.backend.pause(vm, &dir).await
        }
        Err(e) => {
            inner.backend.destroy(vm).await;
            Err(PoolError::Pause(format!("making {}: {e}", dir.display())))
        }
    };
    let outcome = {
        let mut st = inner.lock();
        st.leave(Phase::Destroying);
        let still_ours = st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot));
        match saved {
            Ok(()) if still_ours => {
                st.counters.pauses += 1;
                Ok(())
            }
            other => {
                // The VM is gone either way: so is the session.
                st.counters.pause_failures += u64::from(other.is_err());
                if still_ours {
                    st.sessions.remove(key);
                }
                st.paused -= 1;
                st.check(Phase::Destroying);
                Err(other.err().unwrap_or_else(lost))
            }
        }
    };
    match &outcome {
        Ok(()) => {
            *locked(&slot.paused) = Some((dir, Instant::now()));
            *locked(&slot.handle) = VmHandle::default();
            tracing::info!(session = key, took_ms = started.elapsed().as_millis() as u64, "session paused");
        }
        Err(e) => {
            tracing::warn!(session = key, error = %e, "pausing the session failed; it is ended");
            inner.backend.remove_paused(&dir).await;
        }
    }
    drop(guard);
    notify(inner);
    outcome
}

/// Resume session `key` (its `slot`, whose VM lock the caller holds in
/// `guard`) if it is paused. On error it stays paused.
pub(super) async fn resume<B: Backend>(
    inner: &Arc<Inner<B>>,
    key: &str,
    slot: &Arc<Slot<B::Vm>>,
    guard: &mut OwnedMutexGuard<Option<B::Vm>>,
) -> Result<(), PoolError> {
    let Some((dir, _)) = locked(&slot.paused).clone() else { return Ok(()) };
    // Room for its VM; a ready VM gives way if the pool is full (a caller
    // waits on this session, and the pool refills).
    loop {
        let evicted = {
            let mut st = inner.lock();
            if !st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                return Err(PoolError::SessionLost { key: key.into(), reason: "the session ended".into() });
            }
            if st.running_sessions() >= inner.cfg.max_sessions {
                return Err(PoolError::SessionLimit { limit: inner.cfg.max_sessions });
            }
            if st.start_creation_on_demand() {
                break;
            }
            match st.ready.pop_front() {
                Some(r) => {
                    st.enter(Phase::Destroying);
                    r.vm
                }
                None => return Err(inner.exhausted(&mut st, Refusal::Full, Duration::ZERO)),
            }
        };
        inner.destroy_now(Some(evicted)).await;
    }
    let started = Instant::now();
    let vm = match inner.backend.resume(&dir).await {
        Ok(vm) => vm,
        Err(e) => {
            {
                let mut st = inner.lock();
                st.leave(Phase::Booting);
                st.end_creation_on_demand();
                st.counters.pause_failures += 1;
            }
            notify(inner);
            tracing::warn!(session = key, error = %e, "resuming the session failed; it stays paused");
            return Err(e);
        }
    };
    // Its network, as it had it.
    let network = locked(&slot.network).clone();
    if let Some(policy) = network.and_then(|raw| raw.check(usize::MAX).ok()).filter(|p| p.connected()) {
        if let Err(e) = inner.backend.connect(&vm, &policy).await {
            tracing::warn!(session = key, error = %e, "the resumed session's network could not be restored");
        }
    }
    let ended = {
        let mut st = inner.lock();
        st.end_creation_on_demand();
        if st.sessions.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            st.decrement(Phase::Booting);
            st.paused -= 1;
            st.check(Phase::Booting);
            st.counters.resumes += 1;
            false
        } else {
            // Ended while it resumed: the new VM goes.
            st.shift(Phase::Booting, Phase::Destroying);
            true
        }
    };
    if ended {
        inner.destroy_now(Some(vm)).await;
        return Err(PoolError::SessionLost { key: key.into(), reason: "the session ended".into() });
    }
    // A crash from now on must not bring back the old state over the disk
    // the running VM changes.
    let _ = std::fs::remove_file(dir.join(RECORD));
    *locked(&slot.vm_id) = B::vm_id(&vm).to_string();
    *locked(&slot.handle) = B::handle(&vm);
    **guard = Some(vm);
    *locked(&slot.paused) = None;
    tracing::info!(session = key, took_ms = started.elapsed().as_millis() as u64, "session resumed");
    Ok(())
}

/// Paused sessions a previous run left in `session_dir`, as paused slots;
/// what cannot be resumed there is removed.
pub(in crate::pool) fn adopt<B: Backend>(inner: &Arc<Inner<B>>) {
    let Some(root) = &inner.cfg.session_dir else { return };
    // One server at a time owns the directory: a second one (a test server
    // next to `make up`'s) neither adopts nor removes what is there.
    let lock = std::fs::create_dir_all(root).and_then(|()| {
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(root.join(".lock"))
    });
    let lock = match lock.map(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)) {
        Ok(Ok(f)) => f,
        Ok(Err(_)) => {
            tracing::warn!(dir = %root.display(), "another Ember server owns this directory; sessions here cannot pause");
            return;
        }
        Err(e) => {
            tracing::warn!(dir = %root.display(), error = %e, "cannot use the paused sessions' directory");
            return;
        }
    };
    *inner.session_dir_lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let record = std::fs::read(dir.join(RECORD))
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| dir.file_name().is_some_and(|n| n == r.key.as_str()))
            .filter(|_| inner.backend.can_resume(&dir));
        let Some(rec) = record else {
            tracing::info!(dir = %dir.display(), "removing what no paused session can use");
            let inner = Arc::clone(inner);
            tokio::spawn(async move { inner.backend.remove_paused(&dir).await });
            continue;
        };
        let paused_at = instant_of(rec.paused_unix_ms);
        let slot = Arc::new(Slot {
            vm: Arc::new(tokio::sync::Mutex::new(None)),
            vm_id: Mutex::new(String::new()),
            created: instant_of(rec.created_unix_ms),
            created_wall: UNIX_EPOCH + Duration::from_millis(rec.created_unix_ms),
            last_used: Mutex::new(paused_at),
            idle_timeout: Duration::from_millis(rec.idle_timeout_ms),
            expires: Mutex::new(rec.expires_unix_ms.map(deadline_of)),
            spec: SessionSpec {
                idle_timeout: Some(Duration::from_millis(rec.idle_timeout_ms)),
                lifetime: None,
                idle_never: rec.idle_never,
                env: rec.env,
                metadata: rec.metadata,
            },
            handle: Mutex::new(VmHandle::default()),
            paused: Mutex::new(Some((dir.clone(), paused_at))),
            network: Mutex::new(rec.network),
        });
        let mut st = inner.lock();
        st.sessions.insert(rec.key.clone(), slot);
        st.paused += 1;
        tracing::info!(session = %rec.key, "a paused session from an earlier run is back");
    }
}

/// Fork session `key` (its `slot`) into a new paused session `child` with
/// the same memory, processes, files and settings (a running one is saved
/// without stopping for longer than the save; a paused one is copied).
pub(super) async fn fork<B: Backend>(
    inner: &Arc<Inner<B>>,
    key: &str,
    slot: &Arc<Slot<B::Vm>>,
    child: &str,
) -> Result<(), PoolError> {
    let Some(root) = inner.cfg.session_dir.clone() else {
        return Err(PoolError::Pause("sessions cannot fork: pool.sessions.dir is not set".into()));
    };
    if inner.session_dir_lock.lock().unwrap_or_else(|p| p.into_inner()).is_none() || !inner.backend.pauses() {
        return Err(PoolError::Pause("this pool's sessions cannot fork (see why pausing cannot)".into()));
    }
    {
        let st = inner.lock();
        if st.sessions.contains_key(child) {
            return Err(PoolError::SessionExists { key: child.into() });
        }
        if st.paused >= inner.cfg.max_paused_sessions {
            return Err(PoolError::PausedLimit { limit: inner.cfg.max_paused_sessions });
        }
    }
    let dir = root.join(child);
    inner.backend.remove_paused(&dir).await;
    std::fs::create_dir_all(&dir).map_err(|e| PoolError::Pause(format!("making {}: {e}", dir.display())))?;
    let started = Instant::now();
    let guard = Arc::clone(&slot.vm).lock_owned().await;
    let paused_in = locked(&slot.paused).clone().map(|p| p.0);
    let copied = match (guard.as_ref(), paused_in) {
        (Some(vm), _) => inner.backend.fork(vm, &dir).await,
        (None, Some(from)) => inner.backend.copy_paused(&from, &dir).await,
        (None, None) => Err(PoolError::SessionLost { key: key.into(), reason: "the session ended".into() }),
    };
    drop(guard);
    if let Err(e) = copied {
        inner.backend.remove_paused(&dir).await;
        return Err(e);
    }
    let now = Instant::now();
    let copy = Arc::new(Slot {
        vm: Arc::new(tokio::sync::Mutex::new(None)),
        vm_id: Mutex::new(String::new()),
        created: now,
        created_wall: SystemTime::now(),
        last_used: Mutex::new(now),
        idle_timeout: slot.idle_timeout,
        expires: Mutex::new(*locked(&slot.expires)),
        spec: slot.spec.clone(),
        handle: Mutex::new(VmHandle::default()),
        paused: Mutex::new(Some((dir.clone(), now))),
        network: Mutex::new(locked(&slot.network).clone()),
    });
    write_record(&dir, child, &copy);
    let taken = {
        let mut st = inner.lock();
        let taken = st.sessions.contains_key(child);
        if !taken {
            st.sessions.insert(child.to_string(), copy);
            st.paused += 1;
            st.check(Phase::Booting);
        }
        taken
    };
    if taken {
        inner.backend.remove_paused(&dir).await;
        return Err(PoolError::SessionExists { key: child.into() });
    }
    tracing::info!(
        session = key,
        fork = child,
        took_ms = started.elapsed().as_millis() as u64,
        "session forked"
    );
    Ok(())
}
