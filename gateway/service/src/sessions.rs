//! Sessions as every front end sees them: typed operations (open, list,
//! get, extend, end, network, pause, resume, fork) over the image pools,
//! each answering a [`Session`] (its pool's view, its image) or an
//! [`Error`], and the [`SessionHandle`] side requests (processes, files,
//! ports) use: the session's agent, resumed first if it is paused.

use ember_net::RawPolicy;
use ember_pool::pool::{Backend, SessionHandle, SessionInfo};
use serde::Serialize;

use crate::api::{check_network, check_session_key, SessionRequest, TimeoutRequest};
use crate::error::Error;
use crate::invocation::check_network_enabled;
use crate::state::AppState;

/// A session as the API shows it: its pool's view, its image and, when it
/// was just given one, its network policy.
#[derive(Debug, Clone, Serialize)]
pub struct Session {
    #[serde(flatten)]
    pub info: SessionInfo,
    pub image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<RawPolicy>,
}

impl Session {
    fn new(info: SessionInfo, image: &str) -> Self {
        Self { info, image: image.to_string(), network: None }
    }
}

fn no_session(key: &str) -> Error {
    Error::not_found(format!("no session {key:?}"))
}

fn exists(key: &str, image: &str) -> Error {
    Error::conflict("session_exists", format!("session {key:?} already exists (image {image:?})"))
}

impl<B: Backend> AppState<B> {
    /// Every image's sessions.
    pub fn sessions(&self) -> Vec<Session> {
        let mut all = Vec::new();
        for (image, pool) in self.pools.iter() {
            all.extend(pool.sessions().into_iter().map(|s| Session::new(s, image)));
        }
        all
    }

    /// Open a session now: its VM is claimed (and given its network) before
    /// this returns, so the first call finds it running.
    pub async fn open_session(&self, req: SessionRequest) -> Result<Session, Error> {
        if self.is_draining() {
            return Err(Error::draining());
        }
        let (_, default) = self.pools.get(None)?;
        let s = req.check(&self.limits, default.config().session_max_lifetime)?;
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
            return Err(exists(&s.key, other));
        }
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
        Ok(Session { network: s.network.map(|(raw, _)| raw), ..Session::new(info, image) })
    }

    /// One session as it is now, with its live figures.
    pub fn session(&self, key: &str) -> Result<Session, Error> {
        check_session_key(key)?;
        self.pools
            .with_session(key)
            .and_then(|(image, pool)| Some(Session::new(pool.session_info(key)?, image)))
            .ok_or_else(|| no_session(key))
    }

    /// End the session `req.timeout` from now.
    pub fn extend_session(&self, key: &str, req: TimeoutRequest) -> Result<Session, Error> {
        check_session_key(key)?;
        let (image, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        let lifetime = req.check(pool.config().session_max_lifetime)?;
        let info = pool.set_session_lifetime(key, lifetime).ok_or_else(|| no_session(key))?;
        Ok(Session::new(info, image))
    }

    /// End a session and destroy its VM (after a call in progress finishes).
    pub async fn end_session(&self, key: &str) -> Result<(), Error> {
        check_session_key(key)?;
        let (_, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        if pool.end_session(key).await {
            Ok(())
        } else {
            Err(no_session(key))
        }
    }

    /// Change a live session's network: the new rules hold from the next
    /// packet of every connection, open ones included (waits for a call in
    /// progress).
    pub async fn set_session_network(&self, key: &str, raw: &RawPolicy) -> Result<(), Error> {
        check_session_key(key)?;
        let policy = check_network(raw, &self.limits)?;
        check_network_enabled(self, &policy)?;
        let (_, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        let lease = pool.session(key).await?;
        lease.connect(&policy).await?;
        Ok(())
    }

    /// Pause a session: its VM is saved to disk and ended (after a call in
    /// progress finishes); the next use resumes it.
    pub async fn pause_session(&self, key: &str) -> Result<Session, Error> {
        check_session_key(key)?;
        let (image, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        Ok(Session::new(pool.pause_session(key).await?, image))
    }

    /// Resume a paused session now (any use of it does too).
    pub async fn resume_session(&self, key: &str) -> Result<Session, Error> {
        check_session_key(key)?;
        let (image, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        Ok(Session::new(pool.resume_session(key).await?, image))
    }

    /// Fork a session into `child` (a new UUID if `None`): the same memory,
    /// processes, files and settings, running when there is room.
    pub async fn fork_session(&self, key: &str, child: Option<String>) -> Result<Session, Error> {
        check_session_key(key)?;
        let child = match child {
            Some(k) => {
                check_session_key(&k)?;
                k
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let (image, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        if let Some((other, _)) = self.pools.with_session(&child) {
            return Err(exists(&child, other));
        }
        Ok(Session::new(pool.fork_session(key, &child).await?, image))
    }

    /// Session `key`'s agent and VM id for a side request (processes,
    /// files, ports): resumed first if it is paused, counted as a use.
    pub async fn session_handle(&self, key: &str) -> Result<SessionHandle, Error> {
        check_session_key(key)?;
        let (_, pool) = self.pools.with_session(key).ok_or_else(|| no_session(key))?;
        Ok(pool.session_handle(key).await?)
    }

    /// A TCP connection to `port` on the loopback of session `key`'s guest,
    /// carried over its agent (no guest network needed), paced by the
    /// reader.
    pub async fn connect_port(&self, key: &str, port: u16) -> Result<tokio::io::DuplexStream, Error> {
        let handle = self.session_handle(key).await?;
        std::sync::Arc::clone(&handle.agent)
            .connect(port)
            .await
            .map_err(|e| Error::from_agent(&handle.vm_id, e).0)
    }
}
