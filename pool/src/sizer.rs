//! Adaptive pool sizing: a pure function of observed arrival rates, how
//! long a VM is away from the ready set per use, the config and the clock.
//!
//! Little's law: VMs busy = arrival rate x time out of the pool (service
//! plus reset, or plus replacement when VMs are destroyed). The target is
//! that plus `target_free` of headroom, clamped to `min_size`, `max_size`
//! and `max_memory_mb`. Arrivals are estimated over a short and a long
//! window (like Knative's panic and stable windows): the larger wins, so the
//! pool grows within seconds of a step and shrinks slowly. A target is held
//! for `idle_timeout` after it was last needed, and with no arrivals for
//! `idle_timeout` the pool returns to `min_size`: no flapping.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Arrivals counted in one-second buckets over the long window.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    origin: Instant,
    short: Duration,
    long: Duration,
    buckets: VecDeque<(u64, u32)>,
    last_arrival: Option<Instant>,
}

/// Arrivals per second over each window.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Rates {
    pub short: f64,
    pub long: f64,
}

impl RateEstimator {
    pub const SHORT: Duration = Duration::from_secs(6);
    pub const LONG: Duration = Duration::from_secs(60);

    pub fn new(origin: Instant) -> Self {
        Self::with_windows(origin, Self::SHORT, Self::LONG)
    }

    pub fn with_windows(origin: Instant, short: Duration, long: Duration) -> Self {
        Self { origin, short, long, buckets: VecDeque::new(), last_arrival: None }
    }

    fn second(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.origin).as_secs()
    }

    pub fn record(&mut self, now: Instant) {
        let s = self.second(now);
        match self.buckets.back_mut() {
            Some((b, n)) if *b == s => *n += 1,
            _ => self.buckets.push_back((s, 1)),
        }
        let horizon = self.long.as_secs() + 1;
        while self.buckets.front().is_some_and(|(b, _)| b + horizon < s) {
            self.buckets.pop_front();
        }
        self.last_arrival = Some(now);
    }

    pub fn last_arrival(&self) -> Option<Instant> {
        self.last_arrival
    }

    pub fn rates(&self, now: Instant) -> Rates {
        let s = self.second(now);
        let count = |w: Duration| -> f64 {
            let secs = w.as_secs().max(1);
            // Whole seconds before the current one, plus the current partial
            // second, so a new burst is seen at once.
            let n: u32 = self.buckets.iter().filter(|(b, _)| b + secs > s).map(|(_, n)| n).sum();
            f64::from(n) / secs as f64
        };
        Rates { short: count(self.short), long: count(self.long) }
    }
}

/// Limits the sizer respects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizerLimits {
    pub min_size: usize,
    pub max_size: usize,
    pub target_free: usize,
    /// `max_memory_mb / vm memory`.
    pub max_by_memory: usize,
    pub idle_timeout: Duration,
}

/// What the pool observed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    pub rates: Rates,
    /// Mean seconds a VM is away from the ready set per use.
    pub out_of_pool_secs: f64,
    /// Pinned session VMs: not warm, but they take capacity.
    pub sessions: usize,
    pub last_arrival: Option<Instant>,
}

/// The sizer's memory between decisions (for hysteresis).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SizerState {
    held: usize,
    held_since: Option<Instant>,
}

/// Total VMs (warm + in use, sessions excluded) the pool should have.
pub fn target(limits: &SizerLimits, obs: &Observed, state: &mut SizerState, now: Instant) -> usize {
    let capacity = limits.max_size.min(limits.max_by_memory).saturating_sub(obs.sessions);
    let floor = limits.min_size.min(capacity);
    let idle = obs.last_arrival.is_none_or(|t| now.saturating_duration_since(t) >= limits.idle_timeout);
    if idle {
        *state = SizerState::default();
        return floor;
    }
    let rate = obs.rates.short.max(obs.rates.long);
    let busy = (rate * obs.out_of_pool_secs.max(0.0)).ceil() as usize;
    let wanted = (busy + limits.target_free).clamp(floor, capacity.max(floor));
    let held_expired =
        state.held_since.is_none_or(|t| now.saturating_duration_since(t) >= limits.idle_timeout);
    if wanted >= state.held || held_expired {
        *state = SizerState { held: wanted, held_since: Some(now) };
    }
    state.held.clamp(floor, capacity.max(floor))
}

#[cfg(test)]
mod tests;
