//! One invocation: take a concurrency permit, claim a VM (from the pool or
//! the caller's session), write the files, start the command, and follow
//! it to its exit. Whatever way a [`Running`] ends (finished, client gone,
//! error), dropping it cancels the command and hands the VM back to be
//! reset; a VM whose agent broke is destroyed instead.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use ember_pool::pool::{Backend, Lease, SessionLease};
use ember_pool::{AgentClient, AgentError, ExecEvent};
use ember_wire::ExitStatus;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::api::{text_and_base64, Invocation, RunResult, Timing};
use crate::error::ApiError;
use crate::state::AppState;

/// How long past its own timeout a command may take to report its exit
/// before the VM is given up on.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What the gateway needs of a VM: its agent.
pub trait Sandbox: Send + Sync + 'static {
    fn agent(&self) -> &AgentClient;
    fn id(&self) -> &str;
}

impl Sandbox for ember_pool::Vm {
    fn agent(&self) -> &AgentClient {
        ember_pool::Vm::agent(self)
    }
    fn id(&self) -> &str {
        ember_pool::Vm::id(self)
    }
}

/// The VM an invocation holds.
enum Held<B: Backend> {
    Pool(Lease<B>),
    Session { lease: SessionLease<B>, key: String },
}

impl<B: Backend> Deref for Held<B> {
    type Target = B::Vm;
    fn deref(&self) -> &B::Vm {
        match self {
            Held::Pool(l) => l,
            Held::Session { lease, .. } => lease,
        }
    }
}

/// A started command and everything it holds.
pub struct Running<B: Backend> {
    pub id: String,
    pub vm_id: String,
    pub warm: bool,
    pub session: Option<String>,
    /// How long claiming the VM took.
    pub claim: Duration,
    /// When the VM was claimed.
    pub started: Instant,
    deadline: Instant,
    // Field order is drop order: cancel the command, then free the VM.
    handle: Option<ember_pool::channel::ExecHandle>,
    held: Option<Held<B>>,
    state: AppState<B>,
    _permit: OwnedSemaphorePermit,
}

impl<B: Backend> std::fmt::Debug for Running<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("id", &self.id).field("vm", &self.vm_id).finish()
    }
}

impl<B: Backend> AppState<B>
where
    B::Vm: Sandbox,
{
    /// Claim a VM and start `inv` in it. A refusal (429) is answered after
    /// `limits.busy_delay` (at most its Retry-After).
    pub async fn start(
        &self,
        id: String,
        session: Option<String>,
        inv: Invocation,
    ) -> Result<Running<B>, ApiError> {
        let started = self.claim_and_start(id, session, inv).await;
        if let Err(e) = &started {
            if e.status == axum::http::StatusCode::TOO_MANY_REQUESTS {
                let cap = Duration::from_secs(u64::from(e.retry_after.unwrap_or(1)));
                tokio::time::sleep(self.limits.busy_delay.min(cap)).await;
            }
        }
        started
    }

    async fn claim_and_start(
        &self,
        id: String,
        session: Option<String>,
        inv: Invocation,
    ) -> Result<Running<B>, ApiError> {
        if self.is_draining() {
            return Err(ApiError::draining());
        }
        let permit = Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            ApiError::busy(
                "too_many_requests",
                format!("{} invocations are running, the limit", self.limits.max_concurrent_requests),
                1,
            )
        })?;
        let claim_started = Instant::now();
        let (held, warm) = match &session {
            Some(key) => {
                let lease = self.pool.session(key).await?;
                (Held::Session { lease, key: key.clone() }, true)
            }
            None => {
                let lease = match &inv.function {
                    Some(f) => self.pool.claim_for(f).await?,
                    None => self.pool.claim().await?,
                };
                let warm = lease.warm();
                (Held::Pool(lease), warm)
            }
        };
        let claim = claim_started.elapsed();
        self.metrics.claim_seconds.observe(claim.as_secs_f64());
        let vm_id = held.id().to_string();
        tracing::Span::current().record("vm", vm_id.as_str());
        let timeout = inv.timeout;
        let req = inv.into_exec(&id, &self.limits, session.is_some());
        let mut running = Running {
            id,
            vm_id,
            warm,
            session,
            claim,
            started: Instant::now(),
            deadline: Instant::now() + timeout + EXIT_GRACE,
            handle: None,
            held: Some(held),
            state: self.clone(),
            _permit: permit,
        };
        match running.agent().exec(req).await {
            Ok(h) => running.handle = Some(h),
            Err(e) => return Err(running.fail(e)),
        }
        Ok(running)
    }

    /// Run `inv` to its end and collect the result.
    pub async fn run(
        &self,
        id: String,
        session: Option<String>,
        inv: Invocation,
    ) -> Result<RunResult, ApiError> {
        let mut running = self.start(id, session, inv).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match running.next().await? {
                ExecEvent::Output { stream: ember_wire::Stream::Stdout, data } => stdout.extend(data),
                ExecEvent::Output { stream: ember_wire::Stream::Stderr, data } => stderr.extend(data),
                ExecEvent::Exit(status) => {
                    let (stdout, stdout_base64) = text_and_base64(stdout);
                    let (stderr, stderr_base64) = text_and_base64(stderr);
                    return Ok(RunResult {
                        id: running.id.clone(),
                        exit_code: status.code,
                        signal: status.signal,
                        stdout,
                        stdout_base64,
                        stderr,
                        stderr_base64,
                        timed_out: status.timed_out,
                        truncated: status.truncated,
                        duration_ms: status.duration_ms,
                        duration_us: status.duration_us,
                        warm: running.warm,
                        vm_id: running.vm_id.clone(),
                        session: running.session.clone(),
                        timing: Timing {
                            claim: running.claim,
                            vm: running.started.elapsed(),
                            run: Duration::from_micros(status.duration_us),
                        },
                    });
                }
            }
        }
    }
}

impl<B: Backend> Running<B>
where
    B::Vm: Sandbox,
{
    fn agent(&self) -> &AgentClient {
        match &self.held {
            Some(h) => h.agent(),
            None => unreachable!("a running invocation holds its VM until dropped"),
        }
    }

    /// The next output chunk or the exit. After an error the invocation is
    /// over (and a broken VM is on its way out).
    pub async fn next(&mut self) -> Result<ExecEvent, ApiError> {
        let Some(handle) = self.handle.as_mut() else {
            return Err(ApiError::vm_failed("the command already ended"));
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
                let e = ApiError::vm_failed(format!(
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
        self.state.metrics.invocation(outcome, Some(self.started.elapsed()));
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
    fn fail(&mut self, e: AgentError) -> ApiError {
        let (api, broken) = ApiError::from_agent(&self.vm_id, e);
        self.state.metrics.invocation("error", None);
        tracing::warn!(error = %api, broken, "invocation failed");
        if broken {
            self.discard();
        }
        api
    }

    /// The VM is not to be trusted again: destroy it (or end its session).
    fn discard(&mut self) {
        match self.held.take() {
            Some(Held::Pool(lease)) => {
                tokio::spawn(lease.discard());
            }
            Some(Held::Session { lease, key }) => {
                drop(lease);
                let pool = self.state.pool.clone();
                tokio::spawn(async move {
                    pool.end_session(&key).await;
                });
            }
            None => {}
        }
    }
}
