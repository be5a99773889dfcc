//! Sessions as every front end sees them: typed operations (open, list,
//! get, extend, end, network, pause, resume, fork) over the image pools,
//! each answering a [`Session`] (its pool's view, its image) or an
//! [`Error`], and the [`SessionHandle`] side requests (processes, files,
//! ports) use: the session's agent, resumed first if it is paused.

use ember_net::RawPolicy;
use ember_pool::pool::{Backend, SessionHandle, SessionInfo};
use serde::Serialize;

use crate::api::{check_network, SessionRequest, TimeoutRequest};
use crate::error::Error;
use crate::invocation::check_network_enabled;
use crate::quotas::Quota;
use crate::state::AppState;
use crate::tenant::{tenant_of, Caller};

/// When to try again after a session quota: sessions end or pause on
/// their own schedule, not within a second.
const SESSION_QUOTA_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// A session as the API shows it: its pool's view, its image and, when it
/// was just given one, its network policy.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    #[serde(flatten)]
    pub info: SessionInfo,
    pub image: String,
    /// The tenant it belongs to, shown to admins (`None` without keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<RawPolicy>,
}

impl Session {
    /// The pools' `info` as `caller` sees it (its own key, the tenant for
    /// an admin).
    fn new(caller: &Caller, mut info: SessionInfo, image: &str) -> Self {
        let tenant = if caller.is_admin() { tenant_of(&info.key).map(str::to_string) } else { None };
        info.key = caller.shown_key(&info.key).unwrap_or_default();
        Self { info, image: image.to_string(), tenant, network: None }
    }
}

/// What a tenant's sessions hold now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Held {
    sessions: u32,
    paused: u32,
    memory_mb: u64,
}

fn no_session(key: &str) -> Error {
    Error::not_found(format!("no session {key:?}"))
}

fn exists(key: &str, image: &str) -> Error {
    Error::conflict("session_exists", format!("session {key:?} already exists (image {image:?})"))
}

impl<B: Backend> AppState<B> {
    /// Every image's sessions `caller` may see.
    pub fn sessions(&self, caller: &Caller) -> Vec<Session> {
        let mut all = Vec::new();
        for (image, pool) in self.pools.iter() {
            all.extend(
                pool.sessions()
                    .into_iter()
                    .filter(|s| caller.shown_key(&s.key).is_some())
                    .map(|s| Session::new(caller, s, image)),
            );
        }
        all
    }

    /// What `tenant`'s sessions hold, over every image's pool.
    fn held_by(&self, tenant: &str) -> Held {
        let mut held = Held::default();
        for (_, pool) in self.pools.iter() {
            for s in pool.sessions().into_iter().filter(|s| tenant_of(&s.key) == Some(tenant)) {
                held.sessions += 1;
                if s.state == "paused" {
                    held.paused += 1;
                } else {
                    held.memory_mb += pool.vm_memory_mb();
                }
            }
        }
        held
    }

    /// Refuse what would take `caller` past a session quota: `new` more
    /// sessions, `paused` more paused ones, `memory_mb` more running memory.
    pub(crate) fn check_session_quotas(
        &self,
        caller: &Caller,
        new: u32,
        paused: u32,
        memory_mb: u64,
    ) -> Result<(), Error> {
        let (Some(tenant), Some(q)) = (caller.tenant(), caller.quotas(&self.quotas)) else { return Ok(()) };
        let held = self.held_by(tenant);
        let over = |quota: Quota, detail: String| {
            self.metrics.quota_refused(tenant, quota.code());
            Err(quota.refuse(tenant, detail, SESSION_QUOTA_RETRY))
        };
        if let Some(max) = q.sessions.filter(|m| new > 0 && held.sessions + new > *m) {
            return over(
                Quota::Sessions,
                format!("{} sessions, the most this key may hold", held.sessions.max(max)),
            );
        }
        if let Some(max) = q.paused_sessions.filter(|m| paused > 0 && held.paused + paused > *m) {
            return over(
                Quota::PausedSessions,
                format!("{} paused sessions, the most this key may keep", max),
            );
        }
        if let Some(max) = q.session_memory_mb.filter(|m| memory_mb > 0 && held.memory_mb + memory_mb > *m) {
            return over(
                Quota::SessionMemory,
                format!(
                    "running sessions hold {} MiB and this one needs {memory_mb} MiB more; this key may hold {max} MiB",
                    held.memory_mb
                ),
            );
        }
        Ok(())
    }

    /// Open a session now: its VM is claimed (and given its network) before
    /// this returns, so the first call finds it running.
    pub async fn open_session(&self, caller: &Caller, mut req: SessionRequest) -> Result<Session, Error> {
        if self.is_draining() {
            return Err(Error::draining());
        }
        let (_, default) = self.pools.get(None)?;
        let shown = req.key.take().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let full = caller.session_key(&shown)?;
        let mut s = req.check(&self.limits, default.config().session_max_lifetime)?;
        s.key = full;
        let (image, pool) = self.pools.get(s.image.as_deref())?;
        if let Some(want) = s.memory_mb.filter(|m| *m > pool.vm_memory_mb()) {
            return Err(crate::api::invalid(format!(
                "memory_mb {want} exceeds the {} MiB of image {image:?}'s VMs (set [pool.images.{image}] memory_mb)",
                pool.vm_memory_mb()
            )));
        }
        if let Some((_, policy)) = &s.network {
            check_network_enabled(self, policy)?;
        }
        if let Some((other, _)) = self.pools.with_session(&s.key) {
            return Err(exists(&shown, other));
        }
        let _counted = self.tenants.hold_sessions(caller.tenant()).await;
        self.check_session_quotas(caller, 1, 0, pool.vm_memory_mb())?;
        let mut info = pool.open(&s.key, s.spec).await?;
        if let Some((raw, policy)) = &s.network {
            let connected = async {
                let lease = pool.session(&s.key).await?;
                lease.connect(policy).await?;
                Ok::<_, Error>(())
            };
            if let Err(e) = connected.await {
                pool.end_session(&s.key).await;
                return Err(e);
            }
            info = pool.session_info(&s.key).unwrap_or(info);
            tracing::info!(session = %s.key, network = ?raw, "session connected");
        }
        Ok(Session { network: s.network.map(|(raw, _)| raw), ..Session::new(caller, info, image) })
    }

    /// One session as it is now, with its live figures.
    pub fn session(&self, caller: &Caller, key: &str) -> Result<Session, Error> {
        let full = caller.session_key(key)?;
        self.pools
            .with_session(&full)
            .and_then(|(image, pool)| Some(Session::new(caller, pool.session_info(&full)?, image)))
            .ok_or_else(|| no_session(key))
    }

    /// End the session `req.timeout` from now.
    pub fn extend_session(&self, caller: &Caller, key: &str, req: TimeoutRequest) -> Result<Session, Error> {
        let full = caller.session_key(key)?;
        let (image, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        let lifetime = req.check(pool.config().session_max_lifetime)?;
        let info = pool.set_session_lifetime(&full, lifetime).ok_or_else(|| no_session(key))?;
        Ok(Session::new(caller, info, image))
    }

    /// End a session and destroy its VM (after a call in progress finishes).
    pub async fn end_session(&self, caller: &Caller, key: &str) -> Result<(), Error> {
        let full = caller.session_key(key)?;
        let (_, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        if pool.end_session(&full).await {
            Ok(())
        } else {
            Err(no_session(key))
        }
    }

    /// Change a live session's network: the new rules hold from the next
    /// packet of every connection, open ones included (waits for a call in
    /// progress).
    pub async fn set_session_network(
        &self,
        caller: &Caller,
        key: &str,
        raw: &RawPolicy,
    ) -> Result<(), Error> {
        let full = caller.session_key(key)?;
        let policy = check_network(raw, &self.limits)?;
        check_network_enabled(self, &policy)?;
        let (_, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        let _counted = self.hold_if_resuming(caller, &full).await;
        self.check_resume_quota(caller, &full)?;
        let lease = pool.session(&full).await?;
        lease.connect(&policy).await?;
        Ok(())
    }

    /// Pause a session: its VM is saved to disk and ended (after a call in
    /// progress finishes); the next use resumes it.
    pub async fn pause_session(&self, caller: &Caller, key: &str) -> Result<Session, Error> {
        let full = caller.session_key(key)?;
        let (image, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        let _counted = self.tenants.hold_sessions(caller.tenant()).await;
        if pool.session_info(&full).is_some_and(|s| s.state != "paused") {
            self.check_session_quotas(caller, 0, 1, 0)?;
        }
        Ok(Session::new(caller, pool.pause_session(&full).await?, image))
    }

    /// Resume a paused session now (any use of it does too).
    pub async fn resume_session(&self, caller: &Caller, key: &str) -> Result<Session, Error> {
        let full = caller.session_key(key)?;
        let (image, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        let _counted = self.hold_if_resuming(caller, &full).await;
        self.check_resume_quota(caller, &full)?;
        Ok(Session::new(caller, pool.resume_session(&full).await?, image))
    }

    /// Fork a session into `child` (a new UUID if `None`): the same memory,
    /// processes, files and settings, running when there is room.
    pub async fn fork_session(
        &self,
        caller: &Caller,
        key: &str,
        child: Option<String>,
    ) -> Result<Session, Error> {
        let full = caller.session_key(key)?;
        let shown_child = child.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let child = caller.session_key(&shown_child)?;
        let (image, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        if let Some((other, _)) = self.pools.with_session(&child) {
            return Err(exists(&shown_child, other));
        }
        // The fork counts as a session, paused until it runs.
        let _counted = self.tenants.hold_sessions(caller.tenant()).await;
        self.check_session_quotas(caller, 1, 1, 0)?;
        Ok(Session::new(caller, pool.fork_session(&full, &child).await?, image))
    }

    /// Session `key`'s agent and VM id for a side request (processes,
    /// files, ports): resumed first if it is paused, counted as a use.
    pub async fn session_handle(&self, caller: &Caller, key: &str) -> Result<SessionHandle, Error> {
        let full = caller.session_key(key)?;
        let (_, pool) = self.pools.with_session(&full).ok_or_else(|| no_session(key))?;
        let _counted = self.hold_if_resuming(caller, &full).await;
        self.check_resume_quota(caller, &full)?;
        Ok(pool.session_handle(&full).await?)
    }

    /// The tenant's session lock, only if session `full` is missing or
    /// paused: a change a quota counts is coming (an open or a resume). A
    /// running session's calls never wait for another session's.
    pub(crate) async fn hold_if_resuming(
        &self,
        caller: &Caller,
        full: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let counted = match self.pools.with_session(full) {
            None => true,
            Some((_, pool)) => pool.session_info(full).is_some_and(|s| s.state == "paused"),
        };
        if counted {
            self.tenants.hold_sessions(caller.tenant()).await
        } else {
            None
        }
    }

    /// A use of a paused session resumes it: refused if its memory would
    /// take the caller past its quota.
    pub(crate) fn check_resume_quota(&self, caller: &Caller, full: &str) -> Result<(), Error> {
        let Some((_, pool)) = self.pools.with_session(full) else { return Ok(()) };
        if pool.session_info(full).is_some_and(|s| s.state == "paused") {
            self.check_session_quotas(caller, 0, 0, pool.vm_memory_mb())?;
        }
        Ok(())
    }

    /// A TCP connection to `port` on the loopback of session `key`'s guest,
    /// carried over its agent (no guest network needed), paced by the
    /// reader.
    pub async fn connect_port(
        &self,
        caller: &Caller,
        key: &str,
        port: u16,
    ) -> Result<tokio::io::DuplexStream, Error> {
        let handle = self.session_handle(caller, key).await?;
        std::sync::Arc::clone(&handle.agent)
            .connect(port)
            .await
            .map_err(|e| Error::from_agent(&handle.vm_id, e).0)
    }
}
