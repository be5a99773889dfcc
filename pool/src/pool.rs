//! The warm pool: VMs are created ahead of demand, claimed in FIFO order as
//! owned leases, made clean after every use, and replaced in the background.
//!
//! A VM is in exactly one state: booting, ready, claimed, resetting (or
//! pinned to a session), or gone. The VM side is a [`Backend`]: the real one
//! boots QEMU microVMs, a fake one lets unit tests drive every transition.

mod admission;
mod backend;
mod budget;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod lease;
mod replenish;
mod session;
pub mod vm_backend;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use backend::{Backend, NetTimings, VmHandle};
pub use budget::MemoryBudget;
pub use lease::Lease;
pub use session::{SessionInfo, SessionLease, SessionSpec, MIN_SESSION_TIMEOUT};
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

/// CPU seconds by what they were spent on.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CpuSummary {
    pub exec: Option<f64>,
    pub reset: Option<f64>,
    pub scrub: Option<f64>,
    pub create: Option<f64>,
}

impl CpuSummary {
    fn add(slot: &mut Option<f64>, v: f64) {
        *slot = Some(match *slot {
            None => v,
            Some(avg) => 0.8 * avg + 0.2 * v,
        });
    }

    /// Host calls per second at these costs, for calls that each cost a
    /// call and a reset of `kind`: the reset a claim will cause (a general
    /// call's full reset, a function call's scrub), not a mix of what past
    /// calls caused (after a function's scrubbed calls, general calls would
    /// be estimated at a scrub's cost for as long as the mix remembers).
    ///
    /// Before a reset of that kind was measured, a creation's cost stands
    /// in for it (a full reset restores the same template a creation does);
    /// counting it free promised five times the calls a fresh server could
    /// serve in its first overload, and admitted claims by the dozen that
    /// then waited past `max_queue_wait` (docs/BENCHMARKS.md).
    fn capacity(&self, cpus: usize, kind: ResetKind) -> Option<f64> {
        let reset = match kind {
            ResetKind::Full => self.reset,
            ResetKind::Scrub => self.scrub.or(self.reset),
        }
        .or(self.create);
        if self.exec.is_none() && reset.is_none() {
            return None;
        }
        let per_call = self.exec.unwrap_or(0.0) + reset.unwrap_or(0.0);
        (per_call > 0.0).then(|| cpus as f64 / per_call)
    }
}

/// Above this share of the host's CPUs busy, the pool makes no VM beyond
/// `min_size`: booting would take the CPU that running calls need.
pub const DEFAULT_MAX_HOST_CPU: f64 = 0.9;

struct ReadyVm<V> {
    vm: V,
    uses: u32,
    /// The function whose warm set holds it (scrubbed after serving it);
    /// `None`: fully reset (or fresh), fit for any caller.
    warm_for: Option<Arc<str>>,
}

/// Where a claim should look first: the caller's function's warm set, else
/// a VM fit for anyone; a general claim takes only those. `None` when no
/// ready VM fits (one from another set needs a full reset first).
fn pick_ready<V>(ready: &VecDeque<ReadyVm<V>>, want: Option<&str>) -> Option<usize> {
    let own = want.and_then(|w| ready.iter().position(|r| r.warm_for.as_deref() == Some(w)));
    own.or_else(|| ready.iter().position(|r| r.warm_for.is_none()))
}

struct State<V> {
    ready: VecDeque<ReadyVm<V>>,
    booting: usize,
    claimed: usize,
    resetting: usize,
    /// Being destroyed: still uses memory, no longer serves.
    destroying: usize,
    sessions: HashMap<String, Arc<session::Slot<V>>>,
    /// Sessions (in `sessions`) that are paused: they hold no VM.
    paused: usize,
    /// Claims waiting for a VM, by ticket, oldest first: a ready VM goes to
    /// the oldest (a claim that arrives later cannot take it first).
    queue: VecDeque<u64>,
    next_ticket: u64,
    /// Since when the queue has not been empty, or has been.
    queue_standing_since: Option<Instant>,
    queue_empty_since: Option<Instant>,
    /// The reset a general call and a function call leave behind (what
    /// their capacity is estimated at).
    general_reset: ResetKind,
    function_reset: ResetKind,
    /// How often queued claims got their VMs while it stood.
    departures: admission::Departures,
    /// VMs being made for a claim that asked (counted in `booting` too).
    on_demand: usize,
    /// Claimed VMs of another function's warm set getting a full reset
    /// before their call (counted in `claimed` too).
    converting: usize,
    /// Ready VMs the pool must have held once to count as warmed up
    /// (`min_size`; 0 when disabled), and whether it has.
    min_ready: usize,
    warmed_up: bool,
    draining: bool,
    target: usize,
    rates: RateEstimator,
    sizer: SizerState,
    /// Moving average of seconds a VM spends away from the ready set.
    out_of_pool_secs: f64,
    /// How much longer queued claims waited than the model said; estimates
    /// are multiplied by its factor.
    calibration: admission::Calibration,
    /// Moving average of seconds a successful creation takes (wall time).
    create_secs: Option<f64>,
    /// Creations that failed since the last one that worked (backoff).
    create_failures_since_success: u32,
    /// After failures, no creation starts before this.
    create_retry_at: Option<Instant>,
    /// The most VMs that may exist at once (see `Inner::capacity`).
    capacity: usize,
    /// When admission last refused a claim: the pool is past capacity.
    last_refusal: Option<Instant>,
    counters: PoolCounters,
    cpu: CpuSummary,
    /// The host's CPU use at the last sizer decision, and a value tests set.
    host_cpu_busy: Option<f64>,
    forced_host_cpu: Option<f64>,
    /// The memory budget this pool shares with the other images' pools,
    /// its member id there, and the memory of one of its VMs.
    budget: Arc<MemoryBudget>,
    budget_id: usize,
    vm_memory_mb: u64,
}

impl<V> State<V> {
    /// Whether the host's CPU is too busy to make a VM beyond `min_size`.
    /// The host's CPU use: what tests forced, else the last measurement.
    fn host_cpu(&self) -> Option<f64> {
        self.forced_host_cpu.or(self.host_cpu_busy)
    }

    fn cpu_saturated(&self, cfg: &PoolConfig) -> bool {
        let busy = self.host_cpu();
        let in_service = self.claimed + self.resetting + self.booting;
        matches!((cfg.max_host_cpu, busy), (Some(max), Some(b)) if b >= max)
            && self.total() >= cfg.min_size
            && in_service > 0
    }

    /// Calls per second the host's CPUs can serve at this pool's measured
    /// costs: a call plus the reset a call of this kind (`function` or not)
    /// leaves behind.
    fn capacity_per_sec(&self, function: bool) -> Option<f64> {
        let kind = if function { self.function_reset } else { self.general_reset };
        self.cpu.capacity(ember_vm::procfs::host_cpus(), kind)
    }

    /// What admission sees, for a general claim at `position` in the queue.
    fn load(&self, position: usize) -> admission::Load {
        self.load_for(position, false)
    }

    /// What admission sees, for the claim at `position` in the queue (of a
    /// function, or general).
    fn load_for(&self, position: usize, function: bool) -> admission::Load {
        admission::Load {
            position,
            returning: self.claimed + self.resetting,
            boots_for_ready: self.booting.saturating_sub(self.on_demand),
            boots_on_demand: self.on_demand,
            cycle_secs: self.out_of_pool_secs,
            create_secs: self.create_secs,
            bias: self.calibration.factor(),
            capacity_per_sec: self.capacity_per_sec(function),
            measured_rate: self.departures.rate(Instant::now()),
            converting: self.converting,
        }
    }

    /// A queued claim waited `actual` where the model expected `expected`:
    /// the estimates learn how far off they run (under load, resets slow
    /// down before the moving averages see it). Waits the model put under
    /// a quarter second say little and are left out.
    fn calibrate(&mut self, expected: Duration, actual: Duration) {
        self.calibration.note(expected, actual);
    }

    /// The place in the queue of the claim holding `ticket` (1 = next), or
    /// of a claim that would join it now.
    fn position(&self, ticket: Option<u64>) -> usize {
        let ahead = ticket.and_then(|t| self.queue.iter().position(|&q| q == t));
        ahead.unwrap_or(self.queue.len()) + 1
    }

    fn dequeue(&mut self, ticket: u64) -> bool {
        let at = self.queue.iter().position(|&q| q == ticket);
        let left = at.and_then(|i| self.queue.remove(i)).is_some();
        if left && self.queue.is_empty() {
            self.queue_standing_since = None;
            self.queue_empty_since = Some(Instant::now());
        }
        left
    }

    /// A claim joins the queue under `ticket`. After an idle spell the
    /// service rate measured before it is of another load: forgotten.
    fn enqueue(&mut self, ticket: u64) {
        if self.queue.is_empty() {
            let now = Instant::now();
            if self.queue_empty_since.is_some_and(|t| now.saturating_duration_since(t) > IDLE_SPELL) {
                self.departures = admission::Departures::default();
            }
            self.queue_standing_since = Some(now);
        }
        self.queue.push_back(ticket);
    }

    /// Whether admission refused a claim lately: boots then only take the
    /// CPU the running calls need.
    fn past_capacity(&self) -> bool {
        self.last_refusal.is_some_and(|t| t.elapsed() < OVERLOAD_MEMORY)
    }

    fn count(&mut self, p: Phase) -> &mut usize {
        match p {
            Phase::Booting => &mut self.booting,
            Phase::Claimed => &mut self.claimed,
            Phase::Resetting => &mut self.resetting,
            Phase::Destroying => &mut self.destroying,
        }
    }

    fn decrement(&mut self, p: Phase) {
        let c = self.count(p);
        match c.checked_sub(1) {
            Some(n) => *c = n,
            None => self.violated(format!("a VM left {p:?}, which counted none")),
        }
    }

    /// A VM enters phase `p` (from outside the counts, the ready set or a
    /// session). Every change of the counts goes through one of these
    /// methods, each one step that checks the invariants after it (never in
    /// between, where a VM would look gone or counted twice).
    fn enter(&mut self, p: Phase) {
        *self.count(p) += 1;
        self.check(p);
    }

    /// A VM leaves phase `p` (and the pool).
    fn leave(&mut self, p: Phase) {
        self.decrement(p);
        self.check(p);
    }

    /// A VM moves from phase `from` to phase `to`.
    fn shift(&mut self, from: Phase, to: Phase) {
        self.decrement(from);
        *self.count(to) += 1;
        self.check(to);
    }

    /// A VM moves from phase `from` into the ready set.
    fn shift_to_ready(&mut self, from: Phase, r: ReadyVm<V>) {
        self.decrement(from);
        self.ready.push_back(r);
        self.warmed_up |= self.ready.len() >= self.min_ready;
        self.check(from);
    }

    /// A claimed VM becomes session `key`'s.
    fn shift_to_session(&mut self, key: String, slot: Arc<session::Slot<V>>) {
        self.decrement(Phase::Claimed);
        self.sessions.insert(key, slot);
        self.check(Phase::Claimed);
    }

    /// How many more VMs may be made now: this pool's capacity, and the
    /// memory budget every image's pool shares.
    fn room(&self) -> usize {
        self.capacity.saturating_sub(self.total()).min(self.budget.room(self.vm_memory_mb))
    }

    /// Count a creation as booting if the shared memory budget has room for
    /// it (reserved first, so that two pools cannot both take the last).
    fn start_creation(&mut self) -> bool {
        let after = (self.total() as u64 + 1) * self.vm_memory_mb;
        if self.total() >= self.capacity || !self.budget.reserve(self.budget_id, after) {
            return false;
        }
        self.enter(Phase::Booting);
        true
    }

    /// [`State::start_creation`] of a VM a caller waits for (a claim's own,
    /// a session's resume): it does not go to the ready set, so queued
    /// claims do not count on it.
    fn start_creation_on_demand(&mut self) -> bool {
        let started = self.start_creation();
        if started {
            self.on_demand += 1;
        }
        started
    }

    /// A creation [`State::start_creation_on_demand`] counted has ended.
    fn end_creation_on_demand(&mut self) {
        self.on_demand = self.on_demand.saturating_sub(1);
    }

    /// No more VMs exist than the pool may have; the budget learns what
    /// they take.
    fn check(&mut self, after: Phase) {
        self.budget.set(self.budget_id, self.total() as u64 * self.vm_memory_mb);
        if self.total() > self.capacity {
            self.violated(format!(
                "after a change of {after:?}: {} VMs, capacity {}",
                self.total(),
                self.capacity
            ));
        }
    }

    fn violated(&mut self, what: String) {
        self.counters.invariant_violations += 1;
        tracing::error!("pool bookkeeping broken: {what}");
        debug_assert!(false, "pool bookkeeping broken: {what}");
    }

    /// Whether a creation may start now (not within a failure backoff).
    fn may_create(&self, now: Instant) -> bool {
        self.create_retry_at.is_none_or(|t| now >= t)
    }

    /// Nothing is in flight: no VM claimed, being reset, booted or destroyed.
    fn is_idle(&self) -> bool {
        self.claimed == 0 && self.resetting == 0 && self.booting == 0 && self.destroying == 0
    }

    /// VMs that exist or are being made (sessions included).
    fn total(&self) -> usize {
        self.ready.len()
            + self.booting
            + self.claimed
            + self.resetting
            + self.destroying
            + self.running_sessions()
    }

    /// Sessions that hold a VM.
    fn running_sessions(&self) -> usize {
        self.sessions.len().saturating_sub(self.paused)
    }
}

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
    host_cpu: Mutex<ember_vm::procfs::HostCpu>,
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
        let reset_concurrency = cfg.reset_concurrency.unwrap_or_else(ember_vm::procfs::host_cpus).max(1);
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
            host_cpu: Mutex::new(ember_vm::procfs::HostCpu::default()),
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

    /// Claim a VM for a general call: the oldest ready one fit for anyone
    /// at once (a hit), else a new one created on demand within the limits
    /// (a miss), else one taken from a function's warm set and fully reset,
    /// else wait in a bounded queue until `claim_timeout`.
    pub async fn claim(&self) -> Result<Lease<B>, PoolError> {
        self.claim_as(None).await
    }

    /// Claim a VM for a call of `function`: one of its own warm set first
    /// (scrubbed after serving it), else as [`Pool::claim`]. The lease
    /// returns the VM to that warm set after a scrub.
    pub async fn claim_for(&self, function: &str) -> Result<Lease<B>, PoolError> {
        self.claim_as(Some(Arc::from(function))).await
    }

    async fn claim_as(&self, want: Option<Arc<str>>) -> Result<Lease<B>, PoolError> {
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        // Admitted, a claim waits up to the caller's patience, not up to
        // the estimate that admitted it (see `admission`).
        let mut deadline = started + cfg.claim_timeout;
        self.inner.lock().rates.record(started);
        self.inner.wake_replenisher.notify_one();
        // In the queue from the first wait until this claim ends, however
        // it ends (a caller that goes away drops this future).
        let mut queued: Option<WaiterGuard<'_, B>> = None;
        // Until when this claim waits for a VM that is coming rather than
        // make one (set once: after it, the claim makes one if it may).
        let mut patience: Option<Instant> = None;
        let mut last_try = false;
        // When this claim joined the queue and what the model said it would
        // wait (see `State::calibrate`).
        let mut predicted: Option<(Instant, Duration)> = None;
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let patient = patience.is_none_or(|until| Instant::now() < until);
            let left = patient.then(|| deadline.saturating_duration_since(Instant::now()));
            let ticket = queued.as_ref().map(|q| q.ticket);
            match self.try_claim(ticket, want.as_deref(), left, started) {
                Ok(Step::Got(r, warm)) => {
                    if let Some((since, expected)) = predicted {
                        self.inner.lock().calibrate(expected, since.elapsed());
                    }
                    return Ok(Lease::new(Arc::clone(&self.inner), r.vm, r.uses, warm, started, want));
                }
                Ok(Step::Convert(r)) => match self.convert(r).await {
                    Some(r) => {
                        return Ok(Lease::new(Arc::clone(&self.inner), r.vm, r.uses, false, started, want))
                    }
                    // The VM is gone; this claim joins the queue again, last.
                    None => {
                        queued = None;
                        continue;
                    }
                },
                Ok(Step::Create) => return self.create_on_demand(want).await,
                Ok(Step::Wait { ticket, patience: p, expected }) => {
                    if queued.is_none() {
                        queued = Some(WaiterGuard { inner: &self.inner, ticket });
                        predicted = expected.map(|e| (Instant::now(), e));
                    }
                    if patience.is_none() {
                        patience = p.map(|p| Instant::now() + p);
                    }
                }
                Err(e) => return Err(e),
            }
            // Look again when patience or a creation backoff ends, and
            // often while the pool is refusing claims (see `Load::keep`).
            let (retry, recheck) = {
                let st = self.inner.lock();
                let recheck =
                    (queued.is_some() && st.past_capacity()).then(|| Instant::now() + OVERLOAD_RECHECK);
                (st.create_retry_at, recheck)
            };
            let wake = [patience, retry, recheck]
                .into_iter()
                .flatten()
                .filter(|&t| t > Instant::now())
                .fold(deadline, Instant::min);
            if tokio::time::timeout_at(wake, changed).await.is_err() && Instant::now() >= deadline {
                // A boot under way that covers this claim's place (an
                // image's first boot, slower than claim_timeout under load)
                // is waited for: it ends, or fails by its own timeout.
                let covered = queued.as_ref().is_some_and(|q| {
                    let st = self.inner.lock();
                    st.position(Some(q.ticket)) <= st.booting.saturating_sub(st.on_demand)
                });
                if covered {
                    deadline = Instant::now() + BOOT_RECHECK;
                    continue;
                }
                // A claim that waited for a VM coming rather than boot one
                // gets that boot now, if it may, instead of a refusal; not
                // while admission is refusing claims (past capacity, boots
                // take the CPU the running calls need).
                let overloaded = self.inner.lock().past_capacity();
                if patience.is_some() && !last_try && !overloaded {
                    last_try = true;
                    patience = Some(Instant::now());
                    continue;
                }
                let why = Refusal::TimedOut { claim_timeout: cfg.claim_timeout };
                let mut st = self.inner.lock();
                if let Some((since, expected)) = predicted {
                    st.calibrate(expected, since.elapsed());
                }
                if let Some(q) = queued.take() {
                    st.dequeue(q.disarm());
                }
                return Err(self.inner.exhausted(&mut st, why, started.elapsed()));
            }
        }
    }

    /// Fully reset a VM taken from another function's warm set (counted as
    /// claimed meanwhile); `None` if that failed and the VM is gone.
    async fn convert(&self, mut r: ReadyVm<B::Vm>) -> Option<ReadyVm<B::Vm>> {
        // Counted by `try_claim_locked`; uncounted however this ends (the
        // caller may go away meanwhile).
        let _counted = Converting(&self.inner);
        if self.inner.reset_vm(&mut r.vm, ResetKind::Full).await {
            r.warm_for = None;
            return Some(r);
        }
        self.inner.destroy_later(r.vm, Phase::Claimed);
        None
    }

    /// One look at the pool for a claim (`ticket`: its place in the queue,
    /// once it has one). `patient`: the time the claim has left if it may
    /// still wait for a VM that is coming instead of making one.
    fn try_claim(
        &self,
        ticket: Option<u64>,
        want: Option<&str>,
        patient: Option<Duration>,
        started: Instant,
    ) -> Result<Step<B>, PoolError> {
        let mut dead = Vec::new();
        let step = {
            let mut st = self.inner.lock();
            let step = self.try_claim_locked(&mut st, ticket, &mut dead, want, patient, started);
            // A claim that leaves the queue leaves it under the lock that
            // gave it its VM, so no other claim sees it ahead for a moment.
            if let (Some(t), Ok(Step::Got(..) | Step::Convert(_) | Step::Create)) = (ticket, &step) {
                // Measured before it leaves: the queue stood until now.
                let standing = st.queue_standing_since;
                st.departures.note(Instant::now(), standing);
                st.dequeue(t);
            }
            step
        };
        // Counted as destroying under the lock that took them out of the
        // ready set; destroyed outside it.
        for vm in dead {
            tracing::warn!(vm = B::vm_id(&vm), "ready VM died; replacing it");
            self.inner.destroy_counted(vm);
        }
        step
    }

    fn try_claim_locked(
        &self,
        st: &mut State<B::Vm>,
        ticket: Option<u64>,
        dead: &mut Vec<B::Vm>,
        want: Option<&str>,
        patient: Option<Duration>,
        started: Instant,
    ) -> Result<Step<B>, PoolError> {
        if st.draining {
            return Err(PoolError::Draining);
        }
        let position = st.position(ticket);
        // First come, first served: a ready VM goes to the claims queued
        // before this one first.
        let my_turn = position <= st.ready.len();
        while let Some(i) = pick_ready(&st.ready, want).filter(|_| my_turn) {
            let Some(mut r) = st.ready.remove(i) else { break };
            if !self.inner.backend.healthy(&mut r.vm) {
                st.enter(Phase::Destroying);
                dead.push(r.vm);
                self.inner.wake_replenisher.notify_one();
                continue;
            }
            st.enter(Phase::Claimed);
            // A ready VM is a warm hit, whether the claim found it at once or
            // after queueing for a reset: no boot or full reset was on its path.
            st.counters.hits += 1;
            if ticket.is_some() {
                st.counters.queued += 1;
            }
            self.inner.wake_replenisher.notify_one();
            return Ok(Step::Got(r, true));
        }
        let load = st.load_for(position, want.is_some());
        let max_queue_wait = self.inner.cfg.max_queue_wait;
        // A claim joining the queue now: would admission take it?
        let refused = ticket.is_none() && load.admit(max_queue_wait).is_err();
        let mut plan = patient.map_or(admission::NoReady::Create, |left| {
            load.on_no_ready(self.inner.backend.recycles(), left, st.past_capacity(), max_queue_wait)
        });
        if refused && matches!(plan, admission::NoReady::Patient(_)) {
            // It may not wait for the VM coming back: it makes one if it
            // may (room, CPU), and is refused only if it may not.
            plan = admission::NoReady::Create;
        }
        let patience = match plan {
            admission::NoReady::Patient(p) => Some(p),
            admission::NoReady::Create | admission::NoReady::Queue => None,
        };
        if !st.cpu_saturated(&self.inner.cfg)
            && plan == admission::NoReady::Create
            && st.may_create(Instant::now())
            && st.start_creation_on_demand()
        {
            st.counters.misses += 1;
            return Ok(Step::Create);
        }
        // Only VMs of other functions' warm sets are ready: take the oldest
        // (FIFO across the sets) and give it a full reset.
        if my_turn {
            if let Some(mut r) = st.ready.pop_front() {
                if self.inner.backend.healthy(&mut r.vm) {
                    st.enter(Phase::Claimed);
                    st.converting += 1;
                    st.counters.misses += 1;
                    st.counters.steals += 1;
                    return Ok(Step::Convert(r));
                }
                st.enter(Phase::Destroying);
                dead.push(r.vm);
            }
        }
        if let Some(ticket) = ticket {
            // Under overload, admission is looked at again while a claim
            // waits: once the model has learnt that the queue moves slower
            // than it said, a claim that would get its VM too late is
            // refused now, not after waiting for it.
            if let (true, Some(max)) = (st.past_capacity(), max_queue_wait) {
                if load.keep(started.elapsed(), max).is_err() {
                    return Err(self.inner.exhausted(
                        st,
                        Refusal::WaitGrew { max_queue_wait: max },
                        started.elapsed(),
                    ));
                }
            }
            return Ok(Step::Wait { ticket, patience, expected: None });
        }
        if st.queue.len() >= self.inner.cfg.max_waiters {
            let why = Refusal::QueueFull { max_waiters: self.inner.cfg.max_waiters };
            return Err(self.inner.exhausted(st, why, started.elapsed()));
        }
        // Admission by capacity: refuse at once what would wait too long.
        if let (true, Some(max_queue_wait)) = (refused, max_queue_wait) {
            return Err(self.inner.exhausted(st, Refusal::WouldWait { max_queue_wait }, started.elapsed()));
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.enqueue(ticket);
        // What the estimate said, to be held against what comes (only
        // behind others: the first in line is never refused for it).
        let expected = (position > 1).then(|| load.model_wait());
        Ok(Step::Wait { ticket, patience, expected })
    }

    async fn create_on_demand(&self, want: Option<Arc<str>>) -> Result<Lease<B>, PoolError> {
        let started = Instant::now();
        let vm = self
            .inner
            .create_vm(true, |st, vm| {
                st.shift(Phase::Booting, Phase::Claimed);
                vm
            })
            .await?;
        Ok(Lease::new(Arc::clone(&self.inner), vm, 0, false, started, want))
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

/// A conversion under way (see `State::converting`).
struct Converting<'a, B: Backend>(&'a Arc<Inner<B>>);

impl<B: Backend> Drop for Converting<'_, B> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.converting = st.converting.saturating_sub(1);
    }
}

/// A queued claim's place; dropping it (the caller went away) leaves the
/// queue, and the claims behind move up.
struct WaiterGuard<'a, B: Backend> {
    inner: &'a Arc<Inner<B>>,
    ticket: u64,
}

impl<B: Backend> WaiterGuard<'_, B> {
    /// The ticket, for a caller that takes it out of the queue itself.
    fn disarm(self) -> u64 {
        let t = self.ticket;
        std::mem::forget(self);
        t
    }
}

impl<B: Backend> Drop for WaiterGuard<'_, B> {
    fn drop(&mut self) {
        if self.inner.lock().dequeue(self.ticket) {
            // A ready VM this claim was first in line for is someone else's.
            self.inner.wake_claims();
        }
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

/// How often a claim past `claim_timeout` that a boot under way covers
/// looks again.
const BOOT_RECHECK: Duration = Duration::from_secs(1);

/// How often a queued claim looks at its expected wait again while the
/// pool is refusing claims (between VMs coming back, which wake it too).
const OVERLOAD_RECHECK: Duration = Duration::from_millis(250);

/// A queue empty for longer than this was idle: the service rate measured
/// before is of another load (a closed loop's queue empties for moments).
const IDLE_SPELL: Duration = Duration::from_secs(1);

/// How long after admission refused a claim the pool counts as past
/// capacity (no fallback boots for claims that waited in vain).
const OVERLOAD_MEMORY: Duration = Duration::from_secs(5);

/// Where a VM the pool counts is, when neither the ready set nor a
/// session (which hold their VMs themselves) has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Booting,
    Claimed,
    Resetting,
    Destroying,
}

enum Step<B: Backend> {
    /// A ready VM that fits, and whether it counts as warm.
    Got(ReadyVm<B::Vm>, bool),
    /// A VM of another function's warm set, to be fully reset first.
    Convert(ReadyVm<B::Vm>),
    Create,
    /// Wait for a VM in the queue under `ticket`; with `patience`, a
    /// creation was possible but a VM is expected sooner: wait that long
    /// before creating instead.
    Wait {
        ticket: u64,
        patience: Option<Duration>,
        /// A new entry's wait as the model (uncalibrated) expects it.
        expected: Option<Duration>,
    },
}

#[cfg(test)]
mod tests;
