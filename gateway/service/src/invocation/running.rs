//! A started command and the VM it holds, until it ends.

use std::ops::Deref;
use std::time::Duration;

use ember_channel::{AgentClient, AgentError, ExecEvent};
use ember_pool::pool::{Backend, Lease, Pool, SessionLease};
use ember_wire::ExitStatus;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{AgentVm, EXIT_GRACE};
use crate::error::Error;
use crate::state::AppState;

/// The VM an invocation holds.
pub(super) enum HeldVm<B: Backend> {
    Pool(Lease<B>),
    Session { lease: SessionLease<B>, key: String, pool: Pool<B> },
}

impl<B: Backend> Deref for HeldVm<B> {
    type Target = B::Vm;
    fn deref(&self) -> &B::Vm {
        match self {
            HeldVm::Pool(l) => l,
            HeldVm::Session { lease, .. } => lease,
        }
    }
}

/// A started command and everything it holds.
pub struct Running<B: Backend> {
    pub id: String,
    pub vm_id: String,
    pub image: String,
    pub warm: bool,
    pub session: Option<String>,
    /// How long claiming the VM took.
    pub claim: Duration,
    /// When the VM was claimed.
    pub started: Instant,
    /// Giving the VM its network, when the call asked for one.
    pub net: Option<ember_pool::pool::NetTimings>,
    pub(super) deadline: Instant,
    // Field order is drop order: cancel the command, then free the VM.
    pub(super) handle: Option<ember_channel::ExecHandle>,
    pub(super) held: Option<HeldVm<B>>,
    pub(super) state: AppState<B>,
    pub(super) _permit: OwnedSemaphorePermit,
    /// The call counted against its tenant's quota, freed with it.
    pub(super) _call: Option<crate::quotas::CallSlot>,
}

impl<B: Backend> std::fmt::Debug for Running<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("id", &self.id).field("vm", &self.vm_id).finish()
    }
}

impl<B: Backend> Running<B>
where
    B::Vm: AgentVm,
{
    pub(super) fn agent(&self) -> &AgentClient {
        match &self.held {
            Some(h) => h.agent(),
            None => unreachable!("a running invocation holds its VM until dropped"),
        }
    }

    /// The next output chunk or the exit. After an error the invocation is
    /// over (and a broken VM is on its way out).
    pub async fn next(&mut self) -> Result<ExecEvent, Error> {
        let Some(handle) = self.handle.as_mut() else {
            return Err(Error::vm_failed("the command already ended"));
        };
        match tokio::time::timeout_at(self.deadline, handle.next()).await {
            Ok(Ok(ExecEvent::Exit(status))) => {
                self.handle = None;
                self.finished(&status);
                Ok(ExecEvent::Exit(status))
            }
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(e)) => {
                self.handle = None;
                Err(self.fail(e))
            }
            Err(_) => {
                self.handle = None;
                let e = Error::vm_failed(format!(
                    "VM {} did not report the command's exit within its timeout + {EXIT_GRACE:?}",
                    self.vm_id
                ));
                self.discard();
                Err(e)
            }
        }
    }

    fn finished(&self, status: &ExitStatus) {
        let outcome = if status.timed_out { "timed_out" } else { "exited" };
        self.state.metrics.invocation(&self.image, outcome, Some(self.started.elapsed()));
        tracing::info!(
            code = ?status.code,
            signal = ?status.signal,
            timed_out = status.timed_out,
            truncated = status.truncated,
            ms = status.duration_ms,
            exec_rtt_us = self.started.elapsed().as_micros() as u64,
            guest_us = status.duration_us,
            "command finished"
        );
    }

    /// Turn an agent error into the caller's; destroy the VM if it broke.
    pub(super) fn fail(&mut self, e: AgentError) -> Error {
        let (api, broken) = Error::from_agent(&self.vm_id, e);
        self.state.metrics.invocation(&self.image, "error", None);
        tracing::warn!(error = %api, broken, "invocation failed");
        if broken {
            self.discard();
        }
        api
    }

    /// The VM is not to be trusted again: destroy it (or end its session).
    fn discard(&mut self) {
        match self.held.take() {
            Some(HeldVm::Pool(lease)) => {
                tokio::spawn(lease.discard());
            }
            Some(HeldVm::Session { lease, key, pool }) => {
                drop(lease);
                tokio::spawn(async move {
                    pool.end_session(&key).await;
                });
            }
            None => {}
        }
    }
}
