//! The warm pool: VMs are created ahead of demand, claimed in FIFO order as
//! owned leases, made clean after every use, and replaced in the background.
//!
//! A VM is in exactly one state: booting, ready, claimed, resetting (or
//! pinned to a session), or gone. The VM side is a [`Backend`]: the real one
//! boots QEMU microVMs, a fake one lets unit tests drive every transition.

mod admission;
mod backend;
mod budget;
mod claim;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod lease;
mod replenish;
mod session;
mod state;
pub mod vm_backend;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use admission::CpuSummary;
pub use backend::{Backend, NetTimings, VmHandle};
pub use budget::MemoryBudget;
pub use lease::Lease;
pub use session::{SessionHandle, SessionInfo, SessionLease, SessionSpec, MIN_SESSION_TIMEOUT};
use state::{pick_ready, Phase, ReadyVm, State};
pub use vm_backend::VmBackend;

use crate::config::PoolConfig;
use crate::sizer::{RateEstimator, SizerState};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No VM for the claim: the wait queue is full, the claim would have
    /// waited past `max_queue_wait`, or none came within `claim_timeout`.
    /// The gateway answers 429.
    #[error(
        "pool exhausted: {why}; {in_use} VMs in use, {booting} booting (limit {limit}), {queued} calls \
         queued, waited {}; a VM is expected to be free in {}",
        secs(*waited),
        secs(*retry_after)
    )]
    Exhausted {
        why: Refusal,
        in_use: usize,
        booting: usize,
        limit: usize,
        /// Claims waiting when this one was refused (itself not counted).
        queued: usize,
        waited: Duration,
        retry_after: Duration,
    },
    /// The pool is shutting down. The gateway answers 503.
    #[error("pool is draining")]
    Draining,
    #[error("too many sessions (limit {limit})")]
    SessionLimit { limit: usize },
    #[error("session {key:?} lost its VM: {reason}")]
    SessionLost { key: String, reason: String },
    #[error("session {key:?} already exists")]
    SessionExists { key: String },
    /// A call for a session that must exist found none (it was never
    /// opened, or it ended). The gateway answers 404.
    #[error("no session {key:?}")]
    NoSession { key: String },
    #[error("too many paused sessions (limit {limit})")]
    PausedLimit { limit: usize },
    #[error("pause: {0}")]
    Pause(String),
    #[error("creating a VM failed: {0}")]
    Create(String),
    #[error("resetting VM {vm} failed: {reason}")]
    Reset { vm: String, reason: String },
    #[error("network: {0}")]
    Network(String),
}

/// Why a claim was refused for lack of capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_waiters` claims were waiting already.
    QueueFull { max_waiters: usize },
    /// Its expected wait was past `max_queue_wait` (refused at once).
    WouldWait { max_queue_wait: Duration },
    /// It was queued, the pool is refusing claims (overload), and what it
    /// waited plus what it still expects to wait is past `max_queue_wait`.
    WaitGrew { max_queue_wait: Duration },
    /// It was queued, and no VM came within `claim_timeout`.
    TimedOut { claim_timeout: Duration },
    /// Every VM is in use and the pool is at its limit (a resume, which
    /// does not queue).
    Full,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::QueueFull { max_waiters } => {
                write!(f, "the wait queue is full ({max_waiters} calls, pool.max_waiters)")
            }
            Refusal::WouldWait { max_queue_wait } => {
                write!(f, "the expected wait is past limits.max_queue_wait ({})", secs(*max_queue_wait))
            }
            Refusal::WaitGrew { max_queue_wait } => write!(
                f,
                "the host is overloaded and this call's wait grew past limits.max_queue_wait ({})",
                secs(*max_queue_wait)
            ),
            Refusal::TimedOut { claim_timeout } => {
                write!(f, "no VM came within pool.claim_timeout ({})", secs(*claim_timeout))
            }
            Refusal::Full => write!(f, "every VM is in use and the pool is at its limit"),
        }
    }
}

/// A duration as people read it in an error: "2.1s".
fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Something the pool did that metrics may want to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolEvent {
    /// A VM was made (booted or restored), or making one failed.
    Created { took: Duration, ok: bool },
    /// A used VM was reset for reuse, or resetting it failed.
    Reset { took: Duration, ok: bool, kind: ResetKind },
}

/// Which reset a used VM got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetKind {
    /// The backend's reset mode (snapshot, rollback): clean for anyone.
    Full,
    /// The in-guest scrub: clean for the same function (or, with
    /// `run_reset = "scrub"`, the same single tenant).
    Scrub,
}

impl ResetKind {
    pub fn name(self) -> &'static str {
        match self {
            ResetKind::Full => "full",
            ResetKind::Scrub => "scrub",
        }
    }
}

/// Receives [`PoolEvent`]s; must be quick (it runs on pool tasks).
pub type Observer = Arc<dyn Fn(PoolEvent) + Send + Sync>;

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolCounters {
    pub hits: u64,
    pub misses: u64,
    pub exhausted: u64,
    pub created: u64,
    pub create_failures: u64,
    pub destroyed: u64,
    pub resets: u64,
    pub reset_failures: u64,
    pub scrubs: u64,
    /// Scrubs that failed (or found doubt) and escalated to a full reset.
    pub scrub_failures: u64,
    /// VMs taken from another function's warm set (full reset first).
    pub steals: u64,
    /// Hits that waited in the queue for a VM to come back from its reset.
    pub queued: u64,
    /// Claims refused at once because they would have waited longer than
    /// `max_queue_wait` (also counted in `exhausted`).
    pub refused_by_capacity: u64,
    /// Queued claims that no VM reached within `claim_timeout` (also
    /// counted in `exhausted`).
    pub queue_timeouts: u64,
    /// Sessions paused and resumed, and pauses or resumes that failed.
    pub pauses: u64,
    pub resumes: u64,
    pub pause_failures: u64,
    /// Changes of the VM counts that broke an invariant (always 0; logged,
    /// and a panic in debug builds).
    pub invariant_violations: u64,
}

/// A point-in-time view of the pool.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PoolStatus {
    pub ready: usize,
    pub booting: usize,
    pub claimed: usize,
    pub resetting: usize,
    /// Sessions holding a VM, and paused ones (holding none).
    pub sessions: usize,
    pub paused_sessions: usize,
    pub waiters: usize,
    pub target: usize,
    pub draining: bool,
    /// The pool has held `min_size` ready VMs at least once (or needs
    /// none): it is ready to serve warm (`GET /readyz`).
    pub warmed_up: bool,
    pub rate_short: f64,
    pub rate_long: f64,
    /// Ready VMs per function warm set (VMs scrubbed after serving it).
    pub warm_sets: BTreeMap<String, usize>,
    /// VMs per second coming back to the ready set now (Little's law over
    /// the VMs in service and the time one spends away).
    pub service_rate: f64,
    /// Seconds the next queued claim can expect to wait.
    pub queue_wait_secs: f64,
    /// What estimates are multiplied by: the 90th percentile of how much
    /// longer queued claims waited than the model said (1: as expected).
    pub wait_bias: f64,
    /// CPU seconds per call, per full reset, per scrub and per creation
    /// (moving averages over VMs' host processes).
    pub cpu_seconds: CpuSummary,
    /// The host's CPUs busy at the last sizer decision (0..=1).
    pub host_cpu_busy: Option<f64>,
    /// Calls per second the host's CPUs can serve at the measured cost of
    /// a call plus its reset (the mix of scrubs and full resets so far).
    pub capacity_per_sec: Option<f64>,
    pub counters: PoolCounters,
}

/// Above this share of the host's CPUs busy, the pool makes no VM beyond
/// `min_size`: booting would take the CPU that running calls need.
pub const DEFAULT_MAX_HOST_CPU: f64 = 0.9;

struct Inner<B: Backend> {
    backend: B,
    cfg: PoolConfig,
    vm_memory_mb: u64,
    state: Mutex<State<B::Vm>>,
    /// A VM became ready or capacity was freed: wake waiting claims.
    changed: Notify,
    /// Something the replenisher should look at happened.
    wake_replenisher: Notify,
    /// Shutdown finished: nothing is claimed any more.
    idle: Notify,
    /// Set once at shutdown; background tasks end on it.
    stop: tokio::sync::watch::Sender<bool>,
    observer: std::sync::OnceLock<Observer>,
    host_cpu: Mutex<ember_sys::procfs::HostCpu>,
    /// Resets and scrubs running at once (`cfg.reset_concurrency`).
    reset_permits: tokio::sync::Semaphore,
    /// Held while this pool owns `cfg.session_dir` (no other server may
    /// adopt or pause into it); `None`: its sessions cannot pause.
    session_dir_lock: Mutex<Option<nix::fcntl::Flock<std::fs::File>>>,
}

impl<B: Backend> Drop for Inner<B> {
    fn drop(&mut self) {
        let st = self.lock();
        st.budget.leave(st.budget_id);
    }
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, State<B::Vm>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most VMs that may exist at once.
    fn capacity(&self) -> usize {
        capacity_of(&self.cfg, self.vm_memory_mb)
    }

    /// Count and describe a claim refused for lack of capacity.
    fn exhausted(&self, st: &mut State<B::Vm>, why: Refusal, waited: Duration) -> PoolError {
        st.counters.exhausted += 1;
        match why {
            Refusal::WouldWait { .. } | Refusal::WaitGrew { .. } => {
                st.counters.refused_by_capacity += 1;
                if !st.past_capacity() {
                    // Into overload: the queued claims look at their
                    // expected waits again from now on (`Load::keep`).
                    self.wake_claims();
                }
                st.last_refusal = Some(Instant::now());
            }
            Refusal::TimedOut { .. } => st.counters.queue_timeouts += 1,
            Refusal::QueueFull { .. } | Refusal::Full => {}
        }
        let in_use = st.claimed + st.resetting + st.running_sessions();
        let queued = st.queue.len();
        let retry_after = st.load(queued + 1).expected_wait();
        PoolError::Exhausted {
            why,
            in_use,
            booting: st.booting,
            limit: self.capacity(),
            queued,
            waited,
            retry_after,
        }
    }

    /// A VM became ready, or room for one was freed: every queued claim
    /// looks again (the oldest takes it; the others see their place).
    fn wake_claims(&self) {
        self.changed.notify_waiters();
    }

    fn emit(&self, event: PoolEvent) {
        if let Some(f) = self.observer.get() {
            f(event);
        }
    }

    /// Reset (or scrub) a VM: time it, count it, account its CPU. Whether
    /// the VM came out clean and alive.
    async fn reset_vm(&self, vm: &mut B::Vm, kind: ResetKind) -> bool {
        // In turn (the semaphore is fair): a VM whose turn came is back in
        // a reset's time, not in the time of every reset sharing the CPUs.
        let _turn = self.reset_permits.acquire().await;
        let started = Instant::now();
        let before = B::cpu_seconds(vm);
        let done = match kind {
            ResetKind::Scrub => self.backend.scrub(vm).await,
            ResetKind::Full => self.backend.reset(vm).await,
        };
        let ok = match done {
            Ok(()) => self.backend.healthy(vm),
            Err(e) => {
                match kind {
                    ResetKind::Scrub => {
                        tracing::info!(vm = B::vm_id(vm), error = %e, "scrub failed; a full reset follows")
                    }
                    ResetKind::Full => {
                        tracing::warn!(vm = B::vm_id(vm), error = %e, "reset failed; destroying the VM")
                    }
                }
                false
            }
        };
        self.emit(PoolEvent::Reset { took: started.elapsed(), ok, kind });
        let cpu = before.zip(B::cpu_seconds(vm)).map(|(a, b)| b - a);
        let mut guard = self.lock();
        let st = &mut *guard;
        let (done, failed, slot) = match kind {
            ResetKind::Scrub => (&mut st.counters.scrubs, &mut st.counters.scrub_failures, &mut st.cpu.scrub),
            ResetKind::Full => (&mut st.counters.resets, &mut st.counters.reset_failures, &mut st.cpu.reset),
        };
        if ok {
            *done += 1;
            if let Some(c) = cpu {
                CpuSummary::add(slot, c);
            }
        } else {
            *failed += 1;
        }
        ok
    }

    /// Account the CPU a new VM used to come up.
    fn note_created(&self, vm: &B::Vm, took: Duration) {
        let mut st = self.lock();
        if let Some(cpu) = B::cpu_seconds(vm) {
            CpuSummary::add(&mut st.cpu.create, cpu);
        }
        CpuSummary::add(&mut st.create_secs, took.as_secs_f64());
    }

    /// Make one VM, counted as booting by the caller: the one create path,
    /// with the same bookkeeping for replenishment and on-demand claims
    /// (counters, creation time and CPU, the failure backoff). `place`
    /// moves the new VM out of `Booting` to where it goes, in one step
    /// under the lock, so the counts never see it twice or nowhere.
    async fn create_vm<T>(
        self: &Arc<Self>,
        for_claim: bool,
        place: impl FnOnce(&mut State<B::Vm>, B::Vm) -> T,
    ) -> Result<T, PoolError> {
        self.backend.prepare().await;
        let started = Instant::now();
        let result =
            if for_claim { self.backend.create_for_claim().await } else { self.backend.create().await };
        let took = started.elapsed();
        self.emit(PoolEvent::Created { took, ok: result.is_ok() });
        if let Ok(vm) = &result {
            self.note_created(vm, took);
        }
        let (outcome, doomed) = {
            let mut st = self.lock();
            if for_claim {
                st.end_creation_on_demand();
            }
            match result {
                Ok(vm) => {
                    st.counters.created += 1;
                    st.create_failures_since_success = 0;
                    st.create_retry_at = None;
                    if st.draining {
                        st.shift(Phase::Booting, Phase::Destroying);
                        (Err(PoolError::Draining), Some(vm))
                    } else {
                        (Ok(place(&mut st, vm)), None)
                    }
                }
                Err(e) => {
                    st.leave(Phase::Booting);
                    st.counters.create_failures += 1;
                    st.create_failures_since_success += 1;
                    let backoff = create_backoff(st.create_failures_since_success);
                    st.create_retry_at = Some(Instant::now() + backoff);
                    tracing::warn!(error = %e, ?backoff, "creating a VM failed");
                    (Err(e), None)
                }
            }
        };
        if let Some(vm) = doomed {
            self.destroy_now(Some(vm)).await;
        }
        let idle = self.lock().is_idle();
        self.wake_claims();
        self.wake_replenisher.notify_one();
        if idle {
            self.idle.notify_waiters();
        }
        outcome
    }

    fn note_out_of_pool(&self, secs: f64) {
        let mut st = self.lock();
        st.out_of_pool_secs =
            if st.out_of_pool_secs == 0.0 { secs } else { 0.8 * st.out_of_pool_secs + 0.2 * secs };
    }

    /// Destroy, in the background, a VM that is counted in phase `from`:
    /// it moves to `Destroying` in one step under one lock, so no other
    /// task ever sees room for a new VM while this one still exists.
    fn destroy_later(self: &Arc<Self>, vm: B::Vm, from: Phase) {
        self.lock().shift(from, Phase::Destroying);
        self.destroy_counted(vm);
    }

    /// Destroy, in the background, a VM the caller has already counted as
    /// `Destroying` (under the same lock that took it out of the ready set
    /// or a session).
    fn destroy_counted(self: &Arc<Self>, vm: B::Vm) {
        let inner = Arc::clone(self);
        tokio::spawn(async move { inner.destroy_now(Some(vm)).await });
    }

    /// Destroy a VM counted as `Destroying` (`None`: someone else holds
    /// it and destroys it), then account for it and wake whoever waits.
    async fn destroy_now(&self, vm: Option<B::Vm>) {
        if let Some(vm) = vm {
            self.backend.destroy(vm).await;
            self.lock().counters.destroyed += 1;
        }
        let mut st = self.lock();
        st.leave(Phase::Destroying);
        let idle = st.is_idle();
        drop(st);
        self.wake_claims();
        self.wake_replenisher.notify_one();
        if idle {
            self.idle.notify_waiters();
        }
    }
}

/// The warm pool. Cheap to clone.
pub struct Pool<B: Backend> {
    inner: Arc<Inner<B>>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner), tasks: Arc::clone(&self.tasks) }
    }
}

impl<B: Backend> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("status", &self.status()).finish()
    }
}

impl<B: Backend> Pool<B> {
    /// Start the pool and its background tasks (replenisher, session
    /// reaper), with a memory budget of its own (`cfg.max_memory_mb`).
    pub fn start(backend: B, cfg: PoolConfig, vm_memory_mb: u32) -> Self {
        let budget = Arc::new(MemoryBudget::new(cfg.max_memory_mb));
        Self::start_sharing(backend, cfg, vm_memory_mb, budget)
    }

    /// Start the pool within `budget`, which other pools (one per image)
    /// share.
    pub fn start_sharing(backend: B, cfg: PoolConfig, vm_memory_mb: u32, budget: Arc<MemoryBudget>) -> Self {
        let now = Instant::now();
        let budget_id = budget.join();
        let state = State {
            ready: VecDeque::new(),
            booting: 0,
            claimed: 0,
            resetting: 0,
            destroying: 0,
            sessions: HashMap::new(),
            paused: 0,
            queue: VecDeque::new(),
            next_ticket: 0,
            queue_standing_since: None,
            queue_empty_since: None,
            general_reset: lease::reset_plan(None, cfg.run_reset, backend.scrubs()).0,
            function_reset: lease::reset_plan(Some(&Arc::from("")), cfg.run_reset, backend.scrubs()).0,
            departures: admission::Departures::default(),
            on_demand: 0,
            converting: 0,
            min_ready: if cfg.enabled { cfg.min_size } else { 0 },
            warmed_up: !cfg.enabled || cfg.min_size == 0,
            draining: false,
            target: if cfg.enabled { cfg.min_size } else { 0 },
            rates: RateEstimator::new(now),
            sizer: SizerState::default(),
            out_of_pool_secs: 0.0,
            calibration: admission::Calibration::default(),
            create_secs: None,
            create_retry_at: None,
            last_refusal: None,
            capacity: capacity_of(&cfg, u64::from(vm_memory_mb)),
            create_failures_since_success: 0,
            counters: PoolCounters::default(),
            cpu: CpuSummary::default(),
            host_cpu_busy: None,
            forced_host_cpu: None,
            budget,
            budget_id,
            vm_memory_mb: u64::from(vm_memory_mb),
        };
        let reset_concurrency = cfg.reset_concurrency.unwrap_or_else(ember_sys::procfs::host_cpus).max(1);
        let inner = Arc::new(Inner {
            backend,
            cfg,
            vm_memory_mb: u64::from(vm_memory_mb),
            state: Mutex::new(state),
            changed: Notify::new(),
            wake_replenisher: Notify::new(),
            idle: Notify::new(),
            stop: tokio::sync::watch::Sender::new(false),
            observer: std::sync::OnceLock::new(),
            host_cpu: Mutex::new(ember_sys::procfs::HostCpu::default()),
            reset_permits: tokio::sync::Semaphore::new(reset_concurrency),
            session_dir_lock: Mutex::new(None),
        });
        session::pause::adopt(&inner);
        let tasks = vec![
            tokio::spawn(replenish::run(Arc::clone(&inner))),
            tokio::spawn(session::reap_idle(Arc::clone(&inner))),
        ];
        Self { inner, tasks: Arc::new(Mutex::new(tasks)) }
    }

    /// Take `busy` as the host's CPU use instead of measuring it (tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn force_host_cpu(&self, busy: Option<f64>) {
        self.inner.lock().forced_host_cpu = busy;
        self.inner.wake_replenisher.notify_one();
    }

    /// Report pool events to `f` from now on (the first observer set stays).
    pub fn observe(&self, f: Observer) {
        let _ = self.inner.observer.set(f);
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// The memory budget this pool shares with the other images' pools.
    pub fn budget(&self) -> Arc<MemoryBudget> {
        Arc::clone(&self.inner.lock().budget)
    }

    /// The memory of one of this pool's VMs.
    pub fn vm_memory_mb(&self) -> u64 {
        self.inner.vm_memory_mb
    }

    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    pub fn status(&self) -> PoolStatus {
        let now = Instant::now();
        let st = self.inner.lock();
        let rates = st.rates.rates(now);
        PoolStatus {
            ready: st.ready.len(),
            booting: st.booting,
            claimed: st.claimed,
            resetting: st.resetting,
            sessions: st.running_sessions(),
            paused_sessions: st.paused,
            waiters: st.queue.len(),
            target: st.target,
            draining: st.draining,
            warmed_up: st.warmed_up,
            rate_short: rates.short,
            rate_long: rates.long,
            service_rate: st.load(1).service_rate(),
            wait_bias: st.calibration.factor(),
            cpu_seconds: st.cpu,
            host_cpu_busy: st.host_cpu(),
            capacity_per_sec: st.capacity_per_sec(false),
            queue_wait_secs: if st.ready.is_empty() && !st.queue.is_empty() {
                st.load(st.queue.len() + 1).expected_wait().as_secs_f64()
            } else {
                0.0
            },
            warm_sets: st.ready.iter().filter_map(|r| r.warm_for.as_deref()).fold(
                BTreeMap::new(),
                |mut m, f| {
                    *m.entry(f.to_string()).or_insert(0) += 1;
                    m
                },
            ),
            counters: st.counters,
        }
    }

    /// Stop: refuse new claims, let claimed VMs come back (and VMs being
    /// destroyed go) for up to `drain_timeout`, then destroy every VM the
    /// pool holds.
    pub async fn shutdown(&self) {
        self.inner.lock().draining = true;
        self.inner.stop.send_replace(true);
        self.inner.changed.notify_waiters();
        self.inner.wake_replenisher.notify_one();
        let tasks: Vec<_> = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        let deadline = Instant::now() + self.inner.cfg.drain_timeout;
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                if self.inner.lock().is_idle() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    "drain timeout passed with VMs still in use; they are destroyed when returned"
                );
                break;
            }
        }
        let ready: Vec<_> = {
            let mut st = self.inner.lock();
            let ready: Vec<_> = st.ready.drain(..).collect();
            for _ in 0..ready.len() {
                st.enter(Phase::Destroying);
            }
            ready
        };
        for r in ready {
            self.inner.destroy_now(Some(r.vm)).await;
        }
        session::shut_down(&self.inner).await;
    }
}

/// The pause after `failures` creations failed in a row: 200 ms doubling,
/// at most [`MAX_CREATE_BACKOFF`].
fn create_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.min(7)).min(MAX_CREATE_BACKOFF)
}

const MAX_CREATE_BACKOFF: Duration = Duration::from_secs(10);

/// The most VMs that may exist at once: `max_size`, or fewer if the memory
/// budget holds fewer.
fn capacity_of(cfg: &PoolConfig, vm_memory_mb: u64) -> usize {
    cfg.max_size.min((cfg.max_memory_mb / vm_memory_mb.max(1)) as usize)
}

/// A queue empty for longer than this was idle: the service rate measured
/// before is of another load (a closed loop's queue empties for moments).
const IDLE_SPELL: Duration = Duration::from_secs(1);

/// How long after admission refused a claim the pool counts as past
/// capacity (no fallback boots for claims that waited in vain).
const OVERLOAD_MEMORY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;
