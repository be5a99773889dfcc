//! A session's background processes: start, list, get, follow the output,
//! stdin, signals and terminal size, on the session's agent connection
//! without holding its VM (a call running in the session does not block
//! them, nor they it; each use counts as activity of the session).

use std::sync::Arc;

use ember_channel::AgentError;
use ember_channel::ExecHandle;
use ember_pool::pool::{Backend, SessionHandle};
use ember_wire::{ProcessInfo, PtySize};

use crate::api::ProcessRequest;
use crate::error::Error;
use crate::limits::Limits;
use crate::state::AppState;

/// One session's background processes (see [`AppState::processes`]).
#[derive(Debug, Clone)]
pub struct Processes {
    handle: SessionHandle,
    limits: Arc<Limits>,
}

impl<B: Backend> AppState<B> {
    /// Session `key`'s processes: its agent, the session resumed first if
    /// it is paused and counted as used.
    pub async fn processes(&self, caller: &crate::tenant::Caller, key: &str) -> Result<Processes, Error> {
        Ok(Processes { handle: self.session_handle(caller, key).await?, limits: Arc::clone(&self.limits) })
    }
}

impl Processes {
    /// The VM the session runs on.
    pub fn vm_id(&self) -> &str {
        &self.handle.vm_id
    }

    /// An agent error as the caller sees it.
    pub fn failed(&self, e: AgentError) -> Error {
        Error::from_agent(&self.handle.vm_id, e).0
    }

    /// Start a process (checked against the limits); what it is now.
    pub async fn start(&self, req: ProcessRequest) -> Result<ProcessInfo, Error> {
        let mut spawn = req.check(&self.limits)?;
        // The session's environment, under the process's own.
        for (k, v) in &self.handle.env {
            spawn.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let pid = self.handle.agent.spawn(spawn).await.map_err(|e| self.failed(e))?;
        self.get(pid).await
    }

    /// Every background process, running and exited.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>, Error> {
        self.handle.agent.processes().await.map_err(|e| self.failed(e))
    }

    /// Process `pid`, or the 404 that names it.
    pub async fn get(&self, pid: u32) -> Result<ProcessInfo, Error> {
        let all = self.list().await?;
        all.into_iter().find(|p| p.pid == pid).ok_or_else(|| Error::not_found(format!("no process {pid}")))
    }

    /// Follow process `pid`'s output: what its buffer holds, then live
    /// output, then its exit; dropping the handle detaches (the process
    /// goes on). An unknown pid is an error here, not in the stream.
    pub async fn attach(&self, pid: u32) -> Result<ExecHandle, Error> {
        self.get(pid).await?;
        self.handle.agent.attach(pid).await.map_err(|e| self.failed(e))
    }

    /// Write to process `pid`'s stdin; `eof` closes it after `data`.
    pub async fn stdin(&self, pid: u32, data: Vec<u8>, eof: bool) -> Result<(), Error> {
        self.handle.agent.stdin(pid, data, eof).await.map_err(|e| self.failed(e))
    }

    /// Send `signal` to process `pid`'s group.
    pub async fn signal(&self, pid: u32, signal: i32) -> Result<(), Error> {
        self.handle.agent.signal(pid, signal).await.map_err(|e| self.failed(e))
    }

    /// Set process `pid`'s terminal size (an error if it has none).
    pub async fn resize(&self, pid: u32, size: PtySize) -> Result<(), Error> {
        self.handle.agent.resize(pid, size.cols, size.rows).await.map_err(|e| self.failed(e))
    }
}
