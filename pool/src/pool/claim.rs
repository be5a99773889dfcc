//! Claiming a VM: a ready one that fits, one made on demand, one of
//! another function's warm set converted, or a place in the FIFO queue
//! until one comes back (admission decides which, `admission.rs`); queued
//! claims are woken as VMs come back and re-checked under overload.

use super::*;

/// How often a claim past `claim_timeout` that a boot under way covers
/// looks again.
const BOOT_RECHECK: Duration = Duration::from_secs(1);

/// How often a queued claim looks at its expected wait again while the
/// pool is refusing claims (between VMs coming back, which wake it too).
const OVERLOAD_RECHECK: Duration = Duration::from_millis(250);

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

impl<B: Backend> Pool<B> {
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
