//! The path of one invocation, after the route has validated it:
//! [`start`] takes a concurrency permit, claims a VM (from the pool, a
//! function's warm set, or the caller's session) and starts the command with
//! its files in one agent round trip; [`run`] follows it to its exit and
//! collects one JSON result (the NDJSON route follows [`Running`] itself).
//! Whatever way a [`Running`] ends (finished, client gone, error), dropping
//! it cancels the command and hands the VM back to be reset; a VM whose
//! agent broke is destroyed instead (`running.rs`).

mod running;

use std::sync::Arc;
use std::time::Duration;

use ember_channel::{AgentClient, ExecEvent};
use ember_net::Policy;
use ember_pool::pool::{Backend, NetTimings};
use tokio::time::Instant;

use crate::api::{text_and_base64, Invocation, RunResult, Timing};
use crate::error::Error;
use crate::state::AppState;
use crate::tenant::Caller;
use running::HeldVm;
pub use running::Running;

/// How long past its own timeout a command may take to report its exit
/// before the VM is given up on.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What the service needs of a pool's VM: its agent and its id (the real
/// `Vm`, or a fake one in router tests).
pub trait AgentVm: Send + Sync + 'static {
    fn agent(&self) -> &AgentClient;
    fn id(&self) -> &str;
}

impl AgentVm for ember_vm::Vm {
    fn agent(&self) -> &AgentClient {
        ember_vm::Vm::agent(self)
    }
    fn id(&self) -> &str {
        ember_vm::Vm::id(self)
    }
}

/// Claim a VM and start `inv` in it. A refusal (429) is answered after
/// `limits.busy_delay` (at most its Retry-After).
pub async fn start<B: Backend>(
    state: &AppState<B>,
    caller: &Caller,
    id: String,
    session: Option<String>,
    inv: Invocation,
) -> Result<Running<B>, Error>
where
    B::Vm: AgentVm,
{
    let started = claim_and_start(state, caller, id, session, inv).await;
    if let Err(e) = &started {
        if e.kind == crate::Kind::Busy {
            let cap = Duration::from_secs(u64::from(e.retry_after.unwrap_or(1)));
            tokio::time::sleep(state.limits.busy_delay.min(cap)).await;
        }
    }
    started
}

async fn claim_and_start<B: Backend>(
    state: &AppState<B>,
    caller: &Caller,
    id: String,
    session: Option<String>,
    mut inv: Invocation,
) -> Result<Running<B>, Error>
where
    B::Vm: AgentVm,
{
    if state.is_draining() {
        return Err(Error::draining());
    }
    if let Some(p) = inv.network.as_ref().filter(|p| p.connected()) {
        check_network_enabled(state, p)?;
    }
    // The session as the pools know it (the caller's namespace).
    let full = session.as_deref().map(|k| caller.session_key(k)).transpose()?;
    let call = match caller.quotas(&state.quotas) {
        Some(q) => Some(state.tenants.start_call(&Arc::from(caller.label()), &q).inspect_err(|e| {
            state.metrics.quota_refused(caller.label(), e.code);
        })?),
        None => None,
    };
    let permit = Arc::clone(&state.permits).try_acquire_owned().map_err(|_| {
        Error::busy(
            "too_many_requests",
            format!("{} invocations are running, the limit", state.limits.max_concurrent_requests),
            1,
        )
    })?;
    let claim_started = Instant::now();
    let (image, held, warm) = match (&full, &session) {
        (Some(full), Some(key)) => {
            // Quota check and the session's claim as one step for its tenant.
            let counted = state.hold_if_resuming(caller, full).await;
            // A session stays on the image its first call chose.
            let (image, pool) = match state.pools.with_session(full) {
                Some((image, pool)) => {
                    if let Some(want) = inv.image.as_deref().filter(|w| *w != image) {
                        return Err(Error::conflict(
                            "session_image",
                            format!(
                                "session {key:?} runs image {image:?}, not {want:?}; end it to change images"
                            ),
                        ));
                    }
                    state.check_resume_quota(caller, full)?;
                    (image, pool)
                }
                None if !inv.open_session => {
                    return Err(Error::not_found(format!(
                        "no session {key:?} (it was never opened, or it ended)"
                    )))
                }
                None => {
                    let (image, pool) = state.pools.get(inv.image.as_deref())?;
                    // The first call of a session opens it.
                    state.check_session_quotas(caller, 1, 0, pool.vm_memory_mb())?;
                    (image, pool)
                }
            };
            // Never opened here unless asked (it may end between the look and the claim).
            let lease = if inv.open_session {
                pool.session(full).await?
            } else {
                pool.existing_session(full).await?
            };
            drop(counted);
            for (k, v) in lease.env() {
                inv.env.entry(k.clone()).or_insert_with(|| v.clone());
            }
            (image, HeldVm::Session { lease, key: full.clone(), pool: pool.clone() }, true)
        }
        _ => {
            let (image, pool) = state.pools.get(inv.image.as_deref())?;
            let lease = match &inv.function {
                Some(f) => pool.claim_for(&caller.function_set(f)).await?,
                None => pool.claim().await?,
            };
            let warm = lease.warm();
            (image, HeldVm::Pool(lease), warm)
        }
    };
    let image = image.to_string();
    let claim = claim_started.elapsed();
    state.metrics.claim(&image, claim);
    let vm_id = held.id().to_string();
    tracing::Span::current().record("vm", vm_id.as_str()).record("image", image.as_str());
    // The network, after the claim (a warm VM has none) and before the
    // command: host rules and resolver joined with the guest's configure.
    let mut held = held;
    let net = match &inv.network {
        Some(policy) => connect(&mut held, policy, session.is_some()).await?,
        None => None,
    };
    let timeout = inv.timeout;
    let req = inv.into_exec(&id, &state.limits, session.is_some());
    let mut running = Running {
        id,
        vm_id,
        image,
        warm,
        session,
        claim,
        started: Instant::now(),
        deadline: Instant::now() + timeout + EXIT_GRACE,
        net,
        handle: None,
        held: Some(held),
        state: state.clone(),
        _permit: permit,
        _call: call,
    };
    match running.agent().exec(req).await {
        Ok(h) => running.handle = Some(h),
        Err(e) => return Err(running.fail(e)),
    }
    Ok(running)
}

/// Run `inv` to its end and collect the result.
pub async fn run<B: Backend>(
    state: &AppState<B>,
    caller: &Caller,
    id: String,
    session: Option<String>,
    inv: Invocation,
) -> Result<RunResult, Error>
where
    B::Vm: AgentVm,
{
    let mut running = start(state, caller, id, session, inv).await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        match running.next().await? {
            ExecEvent::Output { stream: ember_wire::Stream::Stdout, data } => stdout.extend(data),
            ExecEvent::Output { stream: ember_wire::Stream::Stderr, data } => stderr.extend(data),
            ExecEvent::Dropped { .. } => {}
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
                    image: running.image.clone(),
                    session: running.session.clone(),
                    timing: Timing {
                        claim: running.claim,
                        vm: running.started.elapsed(),
                        run: Duration::from_micros(status.duration_us),
                        net: running.net.map(Into::into),
                    },
                });
            }
        }
    }
}

/// A 400 for a network asked of a server whose networking is off.
pub fn check_network_enabled<B: Backend>(state: &AppState<B>, policy: &Policy) -> Result<(), Error> {
    if state.network_enabled || !policy.connected() {
        return Ok(());
    }
    Err(Error::bad_request_code(
        "network_disabled",
        "this server's networking is off ([network] enabled = false): only \"network\": \"none\" is possible",
    ))
}

/// Give the held VM the network `policy` says. A pool VM has none yet, so
/// `none` costs nothing there; a session keeps its network between calls
/// and gets `none` as asked.
async fn connect<B: Backend>(
    held: &mut HeldVm<B>,
    policy: &Policy,
    in_session: bool,
) -> Result<Option<NetTimings>, Error> {
    if !policy.connected() && !in_session {
        return Ok(None);
    }
    let connected = match held {
        HeldVm::Pool(lease) => lease.connect(policy).await,
        HeldVm::Session { lease, .. } => lease.connect(policy).await,
    };
    let t = connected?;
    tracing::info!(
        rules_us = t.host.rules.as_micros() as u64,
        resolver_us = t.host.resolver.as_micros() as u64,
        configure_us = t.configure.as_micros() as u64,
        total_us = t.total.as_micros() as u64,
        "network connected"
    );
    Ok(Some(t))
}
