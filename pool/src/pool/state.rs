//! The pool's bookkeeping: where every VM is (ready, booting, claimed,
//! resetting, destroying, in a session), the claims queued for one, and the
//! figures admission decides on. Every transition goes through `enter`,
//! `leave`, `shift` and friends, which check capacity and the memory budget
//! after each step and count a violation instead of going on silently.

use super::*;

/// Where a VM the pool counts is, when neither the ready set nor a
/// session (which hold their VMs themselves) has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Booting,
    Claimed,
    Resetting,
    Destroying,
}

pub(super) struct ReadyVm<V> {
    pub(super) vm: V,
    pub(super) uses: u32,
    /// The function whose warm set holds it (scrubbed after serving it);
    /// `None`: fully reset (or fresh), fit for any caller.
    pub(super) warm_for: Option<Arc<str>>,
}

/// Where a claim should look first: the caller's function's warm set, else
/// a VM fit for anyone; a general claim takes only those. `None` when no
/// ready VM fits (one from another set needs a full reset first).
pub(super) fn pick_ready<V>(ready: &VecDeque<ReadyVm<V>>, want: Option<&str>) -> Option<usize> {
    let own = want.and_then(|w| ready.iter().position(|r| r.warm_for.as_deref() == Some(w)));
    own.or_else(|| ready.iter().position(|r| r.warm_for.is_none()))
}

pub(super) struct State<V> {
    pub(super) ready: VecDeque<ReadyVm<V>>,
    pub(super) booting: usize,
    pub(super) claimed: usize,
    pub(super) resetting: usize,
    /// Being destroyed: still uses memory, no longer serves.
    pub(super) destroying: usize,
    pub(super) sessions: HashMap<String, Arc<session::Slot<V>>>,
    /// Sessions (in `sessions`) that are paused: they hold no VM.
    pub(super) paused: usize,
    /// Claims waiting for a VM, by ticket, oldest first: a ready VM goes to
    /// the oldest (a claim that arrives later cannot take it first).
    pub(super) queue: VecDeque<u64>,
    pub(super) next_ticket: u64,
    /// Since when the queue has not been empty, or has been.
    pub(super) queue_standing_since: Option<Instant>,
    pub(super) queue_empty_since: Option<Instant>,
    /// The reset a general call and a function call leave behind (what
    /// their capacity is estimated at).
    pub(super) general_reset: ResetKind,
    pub(super) function_reset: ResetKind,
    /// How often queued claims got their VMs while it stood.
    pub(super) departures: admission::Departures,
    /// VMs being made for a claim that asked (counted in `booting` too).
    pub(super) on_demand: usize,
    /// Claimed VMs of another function's warm set getting a full reset
    /// before their call (counted in `claimed` too).
    pub(super) converting: usize,
    /// Ready VMs the pool must have held once to count as warmed up
    /// (`min_size`; 0 when disabled), and whether it has.
    pub(super) min_ready: usize,
    pub(super) warmed_up: bool,
    pub(super) draining: bool,
    pub(super) target: usize,
    pub(super) rates: RateEstimator,
    pub(super) sizer: SizerState,
    /// Moving average of seconds a VM spends away from the ready set.
    pub(super) out_of_pool_secs: f64,
    /// How much longer queued claims waited than the model said; estimates
    /// are multiplied by its factor.
    pub(super) calibration: admission::Calibration,
    /// Moving average of seconds a successful creation takes (wall time).
    pub(super) create_secs: Option<f64>,
    /// Creations that failed since the last one that worked (backoff).
    pub(super) create_failures_since_success: u32,
    /// After failures, no creation starts before this.
    pub(super) create_retry_at: Option<Instant>,
    /// The most VMs that may exist at once (see `Inner::capacity`).
    pub(super) capacity: usize,
    /// When admission last refused a claim: the pool is past capacity.
    pub(super) last_refusal: Option<Instant>,
    pub(super) counters: PoolCounters,
    pub(super) cpu: CpuSummary,
    /// The host's CPU use at the last sizer decision, and a value tests set.
    pub(super) host_cpu_busy: Option<f64>,
    pub(super) forced_host_cpu: Option<f64>,
    /// The memory budget this pool shares with the other images' pools,
    /// its member id there, and the memory of one of its VMs.
    pub(super) budget: Arc<MemoryBudget>,
    pub(super) budget_id: usize,
    pub(super) vm_memory_mb: u64,
}

impl<V> State<V> {
    /// Whether the host's CPU is too busy to make a VM beyond `min_size`.
    /// The host's CPU use: what tests forced, else the last measurement.
    pub(super) fn host_cpu(&self) -> Option<f64> {
        self.forced_host_cpu.or(self.host_cpu_busy)
    }

    pub(super) fn cpu_saturated(&self, cfg: &PoolConfig) -> bool {
        let busy = self.host_cpu();
        let in_service = self.claimed + self.resetting + self.booting;
        matches!((cfg.max_host_cpu, busy), (Some(max), Some(b)) if b >= max)
            && self.total() >= cfg.min_size
            && in_service > 0
    }

    /// Calls per second the host's CPUs can serve at this pool's measured
    /// costs: a call plus the reset a call of this kind (`function` or not)
    /// leaves behind.
    pub(super) fn capacity_per_sec(&self, function: bool) -> Option<f64> {
        let kind = if function { self.function_reset } else { self.general_reset };
        self.cpu.capacity(ember_sys::procfs::host_cpus(), kind)
    }

    /// What admission sees, for a general claim at `position` in the queue.
    pub(super) fn load(&self, position: usize) -> admission::Load {
        self.load_for(position, false)
    }

    /// What admission sees, for the claim at `position` in the queue (of a
    /// function, or general).
    pub(super) fn load_for(&self, position: usize, function: bool) -> admission::Load {
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
    pub(super) fn calibrate(&mut self, expected: Duration, actual: Duration) {
        self.calibration.note(expected, actual);
    }

    /// The place in the queue of the claim holding `ticket` (1 = next), or
    /// of a claim that would join it now.
    pub(super) fn position(&self, ticket: Option<u64>) -> usize {
        let ahead = ticket.and_then(|t| self.queue.iter().position(|&q| q == t));
        ahead.unwrap_or(self.queue.len()) + 1
    }

    pub(super) fn dequeue(&mut self, ticket: u64) -> bool {
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
    pub(super) fn enqueue(&mut self, ticket: u64) {
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
    pub(super) fn past_capacity(&self) -> bool {
        self.last_refusal.is_some_and(|t| t.elapsed() < OVERLOAD_MEMORY)
    }

    pub(super) fn count(&mut self, p: Phase) -> &mut usize {
        match p {
            Phase::Booting => &mut self.booting,
            Phase::Claimed => &mut self.claimed,
            Phase::Resetting => &mut self.resetting,
            Phase::Destroying => &mut self.destroying,
        }
    }

    pub(super) fn decrement(&mut self, p: Phase) {
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
    pub(super) fn enter(&mut self, p: Phase) {
        *self.count(p) += 1;
        self.check(p);
    }

    /// A VM leaves phase `p` (and the pool).
    pub(super) fn leave(&mut self, p: Phase) {
        self.decrement(p);
        self.check(p);
    }

    /// A VM moves from phase `from` to phase `to`.
    pub(super) fn shift(&mut self, from: Phase, to: Phase) {
        self.decrement(from);
        *self.count(to) += 1;
        self.check(to);
    }

    /// A VM moves from phase `from` into the ready set.
    pub(super) fn shift_to_ready(&mut self, from: Phase, r: ReadyVm<V>) {
        self.decrement(from);
        self.ready.push_back(r);
        self.warmed_up |= self.ready.len() >= self.min_ready;
        self.check(from);
    }

    /// A claimed VM becomes session `key`'s.
    pub(super) fn shift_to_session(&mut self, key: String, slot: Arc<session::Slot<V>>) {
        self.decrement(Phase::Claimed);
        self.sessions.insert(key, slot);
        self.check(Phase::Claimed);
    }

    /// How many more VMs may be made now: this pool's capacity, and the
    /// memory budget every image's pool shares.
    pub(super) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.total()).min(self.budget.room(self.vm_memory_mb))
    }

    /// Count a creation as booting if the shared memory budget has room for
    /// it (reserved first, so that two pools cannot both take the last).
    pub(super) fn start_creation(&mut self) -> bool {
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
    pub(super) fn start_creation_on_demand(&mut self) -> bool {
        let started = self.start_creation();
        if started {
            self.on_demand += 1;
        }
        started
    }

    /// A creation [`State::start_creation_on_demand`] counted has ended.
    pub(super) fn end_creation_on_demand(&mut self) {
        self.on_demand = self.on_demand.saturating_sub(1);
    }

    /// No more VMs exist than the pool may have; the budget learns what
    /// they take.
    pub(super) fn check(&mut self, after: Phase) {
        self.budget.set(self.budget_id, self.total() as u64 * self.vm_memory_mb);
        if self.total() > self.capacity {
            self.violated(format!(
                "after a change of {after:?}: {} VMs, capacity {}",
                self.total(),
                self.capacity
            ));
        }
    }

    pub(super) fn violated(&mut self, what: String) {
        self.counters.invariant_violations += 1;
        tracing::error!("pool bookkeeping broken: {what}");
        debug_assert!(false, "pool bookkeeping broken: {what}");
    }

    /// Whether a creation may start now (not within a failure backoff).
    pub(super) fn may_create(&self, now: Instant) -> bool {
        self.create_retry_at.is_none_or(|t| now >= t)
    }

    /// Nothing is in flight: no VM claimed, being reset, booted or destroyed.
    pub(super) fn is_idle(&self) -> bool {
        self.claimed == 0 && self.resetting == 0 && self.booting == 0 && self.destroying == 0
    }

    /// VMs that exist or are being made (sessions included).
    pub(super) fn total(&self) -> usize {
        self.ready.len()
            + self.booting
            + self.claimed
            + self.resetting
            + self.destroying
            + self.running_sessions()
    }

    /// Sessions that hold a VM.
    pub(super) fn running_sessions(&self) -> usize {
        self.sessions.len().saturating_sub(self.paused)
    }
}
