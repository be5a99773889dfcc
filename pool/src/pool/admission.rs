//! Admission: what a claim that found no ready VM for it does. It is queued
//! (and waits for a VM coming back from a call, a reset or a boot), it makes
//! a VM of its own, or it is refused at once with the wait it would have
//! had. Pure functions of what the pool counts, with table tests; the claim
//! loop (`pool.rs`) calls them under the pool's lock.
//!
//! The rules, in the order they apply:
//! - **Nobody ahead, something coming**: a claim with no other claim queued
//!   before it is never refused for its expected wait while a VM is on its
//!   way back. Whatever the estimate says, the next VM to come back is its;
//!   a client calling one call at a time is not overload.
//! - **A boot under way**: a claim whose place in the queue is covered by a
//!   VM being made for the ready set (right after start, an image's first
//!   use) waits for that VM; starting a boot of its own would only slow the
//!   one under way, and a boot slower than the estimate is no reason to
//!   refuse.
//! - **Its VM already on its way**: a claim whose place is within the VMs
//!   in service (each comes back within one cycle of a call and its reset)
//!   is admitted when the model alone (not the calibration's margin) says
//!   it is served within `max_queue_wait`. The margin is for deep queues;
//!   here an error costs at most one cycle, and after a change of workload
//!   (a function's scrubbed calls, then general ones) the margin is stale
//!   for a while and would refuse callers the VMs in service will serve.
//! - **Past that**, the expected wait of its place in the queue (Little's
//!   law: the VMs in service over the time one spends away from the ready
//!   set, capped by what the host's CPUs serve, times the calibration) is
//!   compared with `max_queue_wait`; a claim expected to wait longer is
//!   refused at once with that wait as its `Retry-After`.
//!
//! A claim that would be refused but may make a VM (room, CPU) makes one
//! instead. A claim that was admitted waits up to `claim_timeout` (the
//! caller's patience), not up to the estimate: an estimate that was wrong
//! must not turn a short wait into a refusal. Estimates are calibrated by
//! feedback: what queued claims really waited against what the model said,
//! at the 90th percentile of the recent ratios, never below 1 (`bias`, see
//! [`Calibration`]). Under overload every admitted claim joins the queue at
//! the limit's edge, so an estimate that is right on average still has half
//! of them wait past it; admitting on the 90th percentile is what keeps the
//! waits of those served under `max_queue_wait`.

use std::time::Duration;

use tokio::time::Instant;

use super::ResetKind;

/// Assumed time a VM spends away from the ready set before one was measured.
pub(super) const INITIAL_CYCLE_SECS: f64 = 1.0;

/// The longest wait an estimate may say (a bound for `Retry-After`).
const MAX_ESTIMATE_SECS: f64 = 3600.0;

/// Queued claims whose expected wait was below this do not calibrate:
/// their waits are noise (a reset's jitter) more than the model's error.
const MIN_CALIBRATION_SAMPLE: Duration = Duration::from_millis(250);

/// How far calibration may move the model: not below it (a load whose
/// waits came in under the model, a function's scrubbed calls, must not
/// loosen admission for the next, general calls after an idle spell), up
/// to three times it.
const BIAS_RANGE: (f64, f64) = (1.0, 3.0);

/// Ratios kept, and how many make a calibration.
const SAMPLES: usize = 32;
const MIN_SAMPLES: usize = 5;
/// The share of queued claims an estimate is to cover.
const QUANTILE: f64 = 0.9;

/// What queued claims really waited against what the model said: the
/// last [`SAMPLES`] ratios (actual / expected); estimates are multiplied by
/// their 90th percentile (1 until there are [`MIN_SAMPLES`]).
#[derive(Debug, Clone)]
pub(super) struct Calibration {
    ratios: std::collections::VecDeque<f64>,
    factor: f64,
}

impl Default for Calibration {
    fn default() -> Self {
        Self { ratios: std::collections::VecDeque::with_capacity(SAMPLES), factor: 1.0 }
    }
}

impl Calibration {
    /// A queued claim waited `actual` where the model expected `expected`.
    /// Waits the model put under a quarter second say little (a reset's
    /// jitter) and are left out.
    pub fn note(&mut self, expected: Duration, actual: Duration) {
        if expected < MIN_CALIBRATION_SAMPLE {
            return;
        }
        let ratio = (actual.as_secs_f64() / expected.as_secs_f64()).clamp(BIAS_RANGE.0, BIAS_RANGE.1);
        if self.ratios.len() == SAMPLES {
            self.ratios.pop_front();
        }
        self.ratios.push_back(ratio);
        if self.ratios.len() >= MIN_SAMPLES {
            let mut sorted: Vec<f64> = self.ratios.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            let at = ((QUANTILE * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            self.factor = sorted[at];
        }
    }

    /// What estimates are multiplied by.
    pub fn factor(&self) -> f64 {
        self.factor
    }
}

/// Intervals between queued claims getting their VMs: fewer than this
/// many make no measurement yet.
const MIN_GAPS: usize = 6;
/// The intervals a measurement is the mean of (the last ones).
const GAPS_KEPT: usize = 16;
/// A measurement older than this is of another load.
const GAPS_FRESH: Duration = Duration::from_secs(10);

/// How often queued claims get their VMs while the queue stands: the
/// service rate measured, not modelled. Only intervals over which the
/// queue never emptied count (an idle spell is not service time). The rate
/// is the count over the summed length of the last [`GAPS_KEPT`]: VMs that
/// come back together (the first cycle of a burst) make a run of short
/// intervals that a moving average of them read as a rate five times the
/// real one for a moment (docs/BENCHMARKS.md).
#[derive(Debug, Clone, Default)]
pub(super) struct Departures {
    last: Option<Instant>,
    gaps: std::collections::VecDeque<f64>,
}

impl Departures {
    /// A queued claim got its VM at `now`; the queue has stood (never
    /// empty) since `standing_since`.
    pub fn note(&mut self, now: Instant, standing_since: Option<Instant>) {
        if let (Some(prev), Some(since)) = (self.last, standing_since) {
            if since <= prev {
                if self.gaps.len() == GAPS_KEPT {
                    self.gaps.pop_front();
                }
                self.gaps.push_back(now.saturating_duration_since(prev).as_secs_f64());
            }
        }
        self.last = Some(now);
    }

    /// VMs per second reaching queued claims, if measured lately.
    pub fn rate(&self, now: Instant) -> Option<f64> {
        let fresh = self.last.is_some_and(|t| now.saturating_duration_since(t) < GAPS_FRESH);
        if !fresh || self.gaps.len() < MIN_GAPS {
            return None;
        }
        let span: f64 = self.gaps.iter().sum();
        Some(self.gaps.len() as f64 / span.max(0.001))
    }
}

/// What the pool looks like to one claim that found no ready VM for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Load {
    /// The claim's place in the queue: 1 when no other claim waits before it.
    pub position: usize,
    /// VMs in a call or being reset: they come back to the ready set (or are
    /// replaced) on their own.
    pub returning: usize,
    /// VMs being made for the ready set (not those a claim makes for itself).
    pub boots_for_ready: usize,
    /// VMs a claim is making for itself: in service soon, back after that call.
    pub boots_on_demand: usize,
    /// Mean seconds a VM spends away from the ready set per use; 0 before
    /// one was measured.
    pub cycle_secs: f64,
    /// Mean wall seconds a creation takes, once one was measured.
    pub create_secs: Option<f64>,
    /// How much longer queued claims waited than the model said (1: as
    /// expected); see [`Calibration`].
    pub bias: f64,
    /// Calls per second the host's CPUs can serve at the measured CPU cost
    /// of a call and its reset, once measured.
    pub capacity_per_sec: Option<f64>,
    /// VMs per second reaching queued claims, measured while the queue
    /// stood (see [`Departures`]); when there is one, it is the rate.
    pub measured_rate: Option<f64>,
    /// Claims giving another function's warm VM a full reset before their
    /// call: each is a reset's worth of work ahead of every queued claim.
    pub converting: usize,
}

/// What a claim that found no ready VM for it should do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum NoReady {
    /// Make a VM now.
    Create,
    /// Wait this long for a VM that is coming, then make one if none came.
    Patient(Duration),
    /// Wait, never make one (past capacity, or a creation could not be
    /// ready before the claim gives up).
    Queue,
}

impl Load {
    /// VMs in service: they will be in the ready set again without anyone
    /// making a new one.
    pub fn in_service(&self) -> usize {
        self.returning + self.boots_for_ready + self.boots_on_demand
    }

    fn cycle(&self) -> f64 {
        if self.cycle_secs > 0.0 {
            self.cycle_secs
        } else {
            INITIAL_CYCLE_SECS
        }
    }

    /// VMs per second that come back to the ready set now: the VMs in
    /// service over the time one spends away (Little's law), but never more
    /// than the host's CPUs can serve. The cycle was measured with as many
    /// VMs as were busy then; on a CPU-bound host more VMs do not serve
    /// more calls, they only share the CPU, so Little's law alone promises
    /// too much right when the queue grows. With none in service it counts
    /// one, so that an estimate always exists.
    pub fn service_rate(&self) -> f64 {
        if let Some(measured) = self.measured_rate {
            return measured;
        }
        let little = self.in_service().max(1) as f64 / self.cycle();
        match self.capacity_per_sec {
            Some(cap) if cap > 0.0 => little.min(cap),
            _ => little,
        }
    }

    /// How long the claim at `position` can expect to wait for a VM: the
    /// model, calibrated.
    pub fn expected_wait_at(&self, position: usize) -> Duration {
        let model = (position + self.converting) as f64 / self.service_rate();
        Duration::from_secs_f64((model * self.bias).min(MAX_ESTIMATE_SECS))
    }

    /// What the model alone says this claim waits (what calibration holds
    /// the real wait against).
    pub fn model_wait(&self) -> Duration {
        let places = (self.position + self.converting) as f64;
        Duration::from_secs_f64((places / self.service_rate()).min(MAX_ESTIMATE_SECS))
    }

    /// How long this claim can expect to wait for a VM.
    pub fn expected_wait(&self) -> Duration {
        self.expected_wait_at(self.position)
    }

    /// Whether this claim may queue: `Err` holds its expected wait when it
    /// is to be refused at once (see the module's rules).
    pub fn admit(&self, max_wait: Option<Duration>) -> Result<(), Duration> {
        let expected = self.expected_wait();
        let nobody_ahead = self.position == 1 && self.in_service() > 0;
        let boot_under_way = self.position <= self.boots_for_ready;
        match max_wait {
            Some(max) if expected > max && !nobody_ahead && !boot_under_way => {
                let on_its_way = self.position <= self.in_service() && self.model_wait() <= max;
                if on_its_way {
                    Ok(())
                } else {
                    Err(expected)
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether a queued claim that has `waited` so far should stay in the
    /// queue while the pool is refusing claims (overload): `Err` holds its
    /// expected wait when it has waited `max_wait` already, or when the
    /// service rate was measured and what it waited plus what that rate
    /// says it still waits is past `max_wait`. Not on the model's guess (a
    /// cycle not yet measured): the guess does not shrink as the VMs in
    /// service near their end, and would refuse the claims at the head of
    /// the queue just before their VMs come back. Nor with the
    /// calibration: what the model missed is in `waited` already. A boot
    /// under way that covers its place is waited for, as at admission.
    pub fn keep(&self, waited: Duration, max_wait: Duration) -> Result<(), Duration> {
        if self.position <= self.boots_for_ready {
            return Ok(());
        }
        let measured_too_long = self.measured_rate.is_some() && waited + self.model_wait() > max_wait;
        if waited >= max_wait || measured_too_long {
            Err(self.expected_wait())
        } else {
            Ok(())
        }
    }

    /// Whether a claim that may make a VM, and has `left` before it gives
    /// up, should do so now. A VM coming back from a call is warm and costs
    /// a reset; a new one costs a boot's CPU while the host is busiest, so
    /// the claim waits for one that is due sooner than a creation would take
    /// (for at most half of its time, so that it can still make one after).
    /// A VM being made for the ready set that this claim's place covers is
    /// waited for. `past_capacity` (admission refused claims lately): boots
    /// would only take the CPU the running calls need, so none is started;
    /// nor when both a boot and the queue are slower than `max_wait` (the
    /// claim is refused instead: the measured overload served 40-50% more
    /// calls without such boots, docs/BENCHMARKS.md).
    pub fn on_no_ready(
        &self,
        recycles: bool,
        left: Duration,
        past_capacity: bool,
        max_wait: Option<Duration>,
    ) -> NoReady {
        let left = left.as_secs_f64();
        if self.position <= self.boots_for_ready {
            return NoReady::Patient(Duration::from_secs_f64(left));
        }
        let Some(create) = self.create_secs.filter(|_| recycles && self.returning > 0) else {
            return NoReady::Create;
        };
        let expected = self.expected_wait().as_secs_f64();
        let limit = if create < left { create.min(left / 2.0) } else { left };
        let both_too_slow = max_wait.is_some_and(|m| create > m.as_secs_f64() && expected > m.as_secs_f64());
        if expected < limit {
            NoReady::Patient(Duration::from_secs_f64(limit))
        } else if past_capacity || create >= left || both_too_slow {
            NoReady::Queue
        } else {
            NoReady::Create
        }
    }
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
    pub(super) fn add(slot: &mut Option<f64>, v: f64) {
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
    pub(super) fn capacity(&self, cpus: usize, kind: ResetKind) -> Option<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(position: usize, returning: usize, boots_for_ready: usize, cycle_secs: f64) -> Load {
        Load {
            position,
            returning,
            boots_for_ready,
            boots_on_demand: 0,
            cycle_secs,
            create_secs: Some(2.0),
            bias: 1.0,
            capacity_per_sec: None,
            measured_rate: None,
            converting: 0,
        }
    }

    const S2: Option<Duration> = Some(Duration::from_secs(2));

    #[test]
    fn expected_wait_is_the_place_in_the_queue_over_the_service_rate() {
        // Two VMs in service, 1 s away each: one back every half second.
        let l = load(3, 2, 0, 1.0);
        assert_eq!(l.service_rate(), 2.0);
        assert_eq!(l.expected_wait(), Duration::from_millis(1500));
        // Nothing measured yet: a second a cycle.
        assert_eq!(load(1, 1, 0, 0.0).expected_wait(), Duration::from_secs(1));
        // Nothing in service: counted as one, so that there is an estimate.
        assert_eq!(load(2, 0, 0, 3.0).expected_wait(), Duration::from_secs(6));
        // Bounded.
        assert_eq!(load(1_000_000, 1, 0, 100.0).expected_wait(), Duration::from_secs(3600));
        // Ten VMs, a 1 s cycle measured when fewer were busy: Little says
        // ten a second, but the CPUs serve three.
        let cpu_bound = Load { capacity_per_sec: Some(3.0), ..load(6, 10, 0, 1.0) };
        assert_eq!(cpu_bound.service_rate(), 3.0);
        assert_eq!(cpu_bound.expected_wait(), Duration::from_secs(2));
        let light = Load { capacity_per_sec: Some(3.0), ..load(1, 1, 0, 1.0) };
        assert_eq!(light.service_rate(), 1.0, "below capacity, Little's law");
    }

    #[test]
    fn the_measured_rate_counts_only_while_the_queue_stands() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut d = Departures::default();
        // A queue standing from t0: a VM reaches it every 400 ms.
        for i in 0..=6 {
            d.note(at(400 * i), Some(t0));
        }
        let rate = d.rate(at(2500)).expect("six intervals");
        assert!((rate - 2.5).abs() < 1e-9, "{rate}");
        // The queue emptied and stood again from 10 s: the 8 s between is
        // not an interval.
        d.note(at(10_500), Some(at(10_000)));
        assert!((d.rate(at(10_600)).unwrap() - 2.5).abs() < 1e-9);
        d.note(at(10_700), Some(at(10_000)));
        assert!((d.rate(at(10_800)).unwrap() - 7.0 / (6.0 * 0.4 + 0.2)).abs() < 1e-9);
        // Stale after 10 s without one.
        assert_eq!(d.rate(at(21_000)), None);
        // Too few intervals: none.
        let mut d = Departures::default();
        for i in 0..6 {
            d.note(at(100 * i), Some(t0));
        }
        assert_eq!(d.rate(at(500)), None);
        // Ten VMs that come back together after a steady 2 a second: the
        // measurement stays near the steady rate (a moving average of the
        // intervals read over 10 a second here).
        let mut d = Departures::default();
        for i in 0..=8 {
            d.note(at(500 * i), Some(t0));
        }
        for i in 1..=8 {
            d.note(at(4000 + 20 * i), Some(t0));
        }
        let rate = d.rate(at(4200)).unwrap();
        assert!(rate < 4.0, "{rate}");
        // It is the rate when there is one.
        let l = Load { measured_rate: Some(2.0), capacity_per_sec: Some(9.0), ..load(4, 10, 0, 1.0) };
        assert_eq!(l.expected_wait(), Duration::from_secs(2));
        // Conversions under way are work ahead of every queued claim.
        let l = Load { converting: 6, ..l };
        assert_eq!((l.expected_wait(), l.model_wait()), (Duration::from_secs(5), Duration::from_secs(5)));
    }

    #[test]
    fn under_overload_a_queued_claim_stays_while_its_whole_wait_fits() {
        let max = Duration::from_secs(8);
        let secs = Duration::from_secs_f64;
        // Ten in service at two a second: the claim at place 6 has 3 s to go.
        let l = Load { measured_rate: Some(2.0), ..load(6, 10, 0, 1.0) };
        assert_eq!(l.keep(secs(4.0), max), Ok(()));
        assert_eq!(l.keep(secs(5.0), max), Ok(()), "8 s in all: at the limit, kept");
        assert!(l.keep(secs(5.5), max).is_err(), "8.5 s in all");
        // The calibration does not count: what the model missed is in the
        // wait so far.
        assert_eq!(Load { bias: 3.0, ..l }.keep(secs(4.0), max), Ok(()));
        // No rate measured yet: only the limit itself, not the guess.
        let guessed = load(6, 10, 0, 1.0);
        assert_eq!(guessed.keep(secs(7.5), max), Ok(()));
        assert!(guessed.keep(secs(8.0), max).is_err());
        // Past the limit already, even the next in line goes.
        let next = Load { measured_rate: Some(2.0), ..load(1, 10, 0, 1.0) };
        assert!(next.keep(secs(8.0), max).is_err());
        // A boot under way that covers its place is waited for.
        let covered = Load { measured_rate: Some(2.0), ..load(2, 0, 3, 1.0) };
        assert_eq!(covered.keep(secs(20.0), max), Ok(()));
    }

    #[test]
    fn calibration_covers_nine_queued_claims_in_ten() {
        let secs = Duration::from_secs_f64;
        let mut c = Calibration::default();
        // Too few samples: the model as it is.
        for _ in 0..4 {
            c.note(secs(2.0), secs(4.0));
        }
        assert_eq!(c.factor(), 1.0);
        // Twenty waits as expected and three twice as long: one in eight
        // waited twice the estimate, so estimates double.
        let mut c = Calibration::default();
        for _ in 0..20 {
            c.note(secs(2.0), secs(2.0));
        }
        assert_eq!(c.factor(), 1.0);
        for _ in 0..3 {
            c.note(secs(2.0), secs(4.0));
        }
        assert_eq!(c.factor(), 2.0);
        // Only the last 32 count: a regime that passed is forgotten. Waits
        // shorter than the model never loosen it.
        for _ in 0..32 {
            c.note(secs(2.0), secs(1.0));
        }
        assert_eq!(c.factor(), 1.0);
        // Short estimates are left out; wild ratios are clamped.
        c.note(secs(0.1), secs(60.0));
        assert_eq!(c.factor(), 1.0);
        for _ in 0..32 {
            c.note(secs(1.0), secs(100.0));
        }
        assert_eq!(c.factor(), 3.0);
        let l = Load { bias: 2.0, ..load(3, 2, 0, 1.0) };
        assert_eq!(l.model_wait(), Duration::from_millis(1500));
        assert_eq!(l.expected_wait(), Duration::from_secs(3));
    }

    #[test]
    fn admission_table() {
        type Case = (&'static str, Load, Option<Duration>, Result<(), Duration>);
        let ok = Ok(());
        let table: [Case; 12] = [
            ("within the limit", load(2, 2, 0, 1.0), S2, ok),
            ("past it, several ahead", load(5, 2, 0, 1.0), S2, Err(Duration::from_millis(2500))),
            // A sequential caller on a one-VM pool whose reset (with its
            // network) takes longer than the limit: nobody ahead.
            ("nobody ahead, a slow reset coming", load(1, 1, 0, 2.09), S2, ok),
            ("nobody ahead, nothing coming", load(1, 0, 0, 3.0), S2, Err(Duration::from_secs(3))),
            // Right after start / an image's first use: the boots under
            // way cover the first two places, however slow they are.
            ("a boot under way covers it", load(2, 0, 2, 6.0), S2, ok),
            ("past the boots under way", load(3, 0, 2, 6.0), S2, Err(Duration::from_secs(9))),
            ("no limit", load(50, 1, 0, 10.0), None, ok),
            // Overload: ten VMs cycling every 4 s, the eleventh in line.
            ("overload, deep queue", load(11, 10, 0, 4.0), S2, Err(Duration::from_millis(4400))),
            ("overload, near the front", load(4, 10, 0, 4.0), S2, ok),
            // A stale margin (estimates doubled) does not refuse a claim
            // the VMs in service cover, if the model alone says it is in time.
            ("covered, margin stale", Load { bias: 2.0, ..load(3, 4, 0, 2.0) }, S2, ok),
            (
                "not covered, margin stale",
                Load { bias: 2.0, ..load(5, 4, 0, 1.0) },
                S2,
                Err(Duration::from_millis(2500)),
            ),
            // Covered, but the model alone says too long (long calls).
            ("covered, long calls", load(3, 4, 0, 60.0), S2, Err(Duration::from_secs(45))),
        ];
        for (what, l, max, want) in table {
            assert_eq!(l.admit(max), want, "{what}: {l:?}");
        }
    }

    #[test]
    fn on_no_ready_table() {
        let secs = Duration::from_secs_f64;
        let l = |position, returning, boots, create: Option<f64>| Load {
            position,
            returning,
            boots_for_ready: boots,
            boots_on_demand: 0,
            cycle_secs: 1.0,
            create_secs: create,
            bias: 1.0,
            capacity_per_sec: None,
            measured_rate: None,
            converting: 0,
        };
        let ten = secs(10.0);
        let two = Some(secs(2.0));
        let table = [
            ("nothing measured: create", l(1, 1, 0, None), true, ten, false, NoReady::Create),
            ("nothing returning: create", l(1, 0, 0, Some(2.0)), true, ten, false, NoReady::Create),
            ("destroy mode: create", l(1, 1, 0, Some(2.0)), false, ten, false, NoReady::Create),
            // One VM back every second, a creation takes 2 s.
            (
                "a VM back sooner than a boot",
                l(1, 1, 0, Some(2.0)),
                true,
                ten,
                false,
                NoReady::Patient(secs(2.0)),
            ),
            ("a boot sooner", l(3, 1, 0, Some(2.0)), true, ten, false, NoReady::Create),
            ("a boot sooner, past capacity", l(3, 1, 0, Some(2.0)), true, ten, true, NoReady::Queue),
            ("a boot not ready in time", l(12, 1, 0, Some(12.0)), true, ten, false, NoReady::Queue),
            (
                "a boot not ready in time, a VM back sooner",
                l(3, 1, 0, Some(12.0)),
                true,
                ten,
                false,
                NoReady::Patient(ten),
            ),
            // At most half the claim's time is spent waiting.
            (
                "patience is half the time left",
                l(1, 2, 0, Some(2.0)),
                true,
                secs(3.0),
                false,
                NoReady::Patient(secs(1.5)),
            ),
            ("a boot under way covers it", l(2, 0, 2, None), true, ten, false, NoReady::Patient(ten)),
            ("past the boots under way", l(3, 0, 2, None), true, ten, false, NoReady::Create),
        ];
        for (what, load, recycles, left, past, want) in table {
            assert_eq!(load.on_no_ready(recycles, left, past, None), want, "{what}: {load:?}");
        }
        // With a queue limit: a boot slower than it, for a claim whose queue
        // is slower too, is not started (admission refuses the claim).
        let table = [
            ("both slower than 2 s", l(3, 1, 0, Some(3.0)), NoReady::Queue),
            ("a boot within it", l(3, 1, 0, Some(1.5)), NoReady::Create),
            ("the queue within it, a boot not", l(2, 2, 0, Some(3.0)), NoReady::Patient(secs(3.0))),
            ("a VM back sooner than the boot", l(1, 1, 0, Some(3.0)), NoReady::Patient(secs(3.0))),
        ];
        for (what, load, want) in table {
            assert_eq!(load.on_no_ready(true, ten, false, two), want, "{what}: {load:?}");
        }
    }
}
