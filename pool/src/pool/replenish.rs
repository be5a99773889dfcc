//! The replenisher: on every sizer interval it asks the sizer for a target,
//! and whenever woken (a claim, a VM gone) it creates VMs towards that
//! target, a bounded number at a time, or destroys surplus ready ones.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Backend, Inner, Phase, ReadyVm};
use crate::sizer::{self, Observed, SizerLimits};

/// Assumed time out of the pool before any use was measured.
const INITIAL_OUT_OF_POOL_SECS: f64 = 1.0;

pub(super) async fn run<B: Backend>(inner: Arc<Inner<B>>) {
    let mut next_decision = Instant::now();
    let mut stop = inner.stop.subscribe();
    loop {
        let wake = inner.wake_replenisher.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let now = Instant::now();
        if now >= next_decision {
            decide(&inner, now);
            next_decision = now + inner.cfg.sizer_interval;
        }
        if inner.lock().draining {
            return;
        }
        // After failures, creation pauses (exponential backoff, kept in
        // the pool's state so claims respect it too).
        let (may_create, retry_at) = {
            let st = inner.lock();
            (st.may_create(now), st.create_retry_at.filter(|&t| t > now))
        };
        let (create, surplus) = plan(&inner, may_create);
        for vm in surplus {
            inner.destroy_counted(vm);
        }
        for _ in 0..create {
            let inner = Arc::clone(&inner);
            tokio::spawn(async move { create_one(&inner).await });
        }
        let until = match retry_at {
            Some(t) => t.min(next_decision),
            None => next_decision,
        };
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Run the sizer and store its target.
fn decide<B: Backend>(inner: &Inner<B>, now: Instant) {
    let busy = inner.host_cpu.lock().unwrap_or_else(|p| p.into_inner()).sample();
    let mut st = inner.lock();
    if busy.is_some() {
        st.host_cpu_busy = busy;
    }
    if !inner.cfg.enabled {
        st.target = 0;
        return;
    }
    let limits = SizerLimits {
        min_size: inner.cfg.min_size,
        max_size: inner.cfg.max_size,
        target_free: inner.cfg.target_free,
        max_by_memory: inner.capacity(),
        idle_timeout: inner.cfg.idle_timeout,
    };
    let obs = Observed {
        rates: st.rates.rates(now),
        out_of_pool_secs: if st.out_of_pool_secs > 0.0 {
            st.out_of_pool_secs
        } else {
            INITIAL_OUT_OF_POOL_SECS
        },
        sessions: st.running_sessions(),
        last_arrival: st.rates.last_arrival(),
    };
    let mut sizer_state = st.sizer;
    st.target = sizer::target(&limits, &obs, &mut sizer_state, now);
    st.sizer = sizer_state;
}

/// How many VMs to start now, and which ready ones are surplus.
fn plan<B: Backend>(inner: &Inner<B>, may_create: bool) -> (usize, Vec<B::Vm>) {
    let mut st = inner.lock();
    let current = st.ready.len() + st.booting + st.claimed + st.resetting;
    let room = st.room();
    if current < st.target {
        // Booting more while the CPU is saturated slows the calls running now.
        let may_create = may_create && !st.cpu_saturated(&inner.cfg);
        let want = if may_create {
            (st.target - current).min(inner.cfg.replenish_concurrency.saturating_sub(st.booting)).min(room)
        } else {
            0
        };
        let n = (0..want).take_while(|_| st.start_creation()).count();
        return (n, Vec::new());
    }
    // Never below what is in use right now plus the headroom: the rate
    // estimate lags a rise by its window, and VMs made on demand during the
    // rise would otherwise be destroyed as they come back. An idle pool (no
    // claim for `idle_timeout`) keeps no headroom: it goes back to its
    // `min_size`, 0 for an image nobody calls.
    let idle = st.rates.last_arrival().is_none_or(|t| t.elapsed() >= inner.cfg.idle_timeout);
    let headroom = if idle { 0 } else { inner.cfg.target_free };
    let keep = st.target.max(st.claimed + st.resetting + st.queue.len() + headroom);
    let surplus = current.saturating_sub(keep).min(st.ready.len());
    // Oldest first: they have served the most uses.
    let gone: Vec<B::Vm> = st.ready.drain(..surplus).map(|r: ReadyVm<B::Vm>| r.vm).collect();
    for _ in &gone {
        st.enter(Phase::Destroying);
    }
    (0, gone)
}

/// Create one VM into the ready set.
async fn create_one<B: Backend>(inner: &Arc<Inner<B>>) {
    // Failures are counted, logged and backed off by `create_vm`.
    let _ = inner
        .create_vm(false, |st, vm| st.shift_to_ready(Phase::Booting, ReadyVm { vm, uses: 0, warm_for: None }))
        .await;
}
