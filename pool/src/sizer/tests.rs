//! The sizer driven through recorded traces by a small discrete-event model
//! of the pool: arrivals claim ready VMs (a hit) or wait (a miss); a VM is
//! away for service + reset and then ready again (or destroyed, in destroy
//! mode); every sizer interval the replenisher creates VMs up to the target
//! with bounded concurrency, or destroys surplus ready ones.

use super::*;

const DT: f64 = 0.01;

#[derive(Clone, Copy)]
struct Model {
    limits: SizerLimits,
    service: f64,
    reset: f64,
    replenish: f64,
    recycle: bool,
    concurrency: usize,
    interval: f64,
    vm_mb: u64,
    sessions: usize,
}

fn model() -> Model {
    Model {
        limits: SizerLimits {
            min_size: 2,
            max_size: 10,
            target_free: 3,
            max_by_memory: 32,
            idle_timeout: Duration::from_secs(60),
        },
        service: 0.3,
        reset: 0.15,
        replenish: 0.5,
        recycle: true,
        concurrency: 2,
        interval: 1.0,
        vm_mb: 256,
        sessions: 0,
    }
}

#[derive(Default)]
struct Outcome {
    /// (arrival time, hit)
    requests: Vec<(f64, bool)>,
    /// (time, total VMs, target)
    samples: Vec<(f64, usize, usize)>,
}

impl Outcome {
    fn hit_ratio(&self, from: f64, to: f64) -> f64 {
        let r: Vec<bool> =
            self.requests.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, h)| *h).collect();
        assert!(!r.is_empty(), "no requests in [{from}, {to})");
        r.iter().filter(|h| **h).count() as f64 / r.len() as f64
    }
    fn max_total(&self) -> usize {
        self.samples.iter().map(|s| s.1).max().unwrap_or(0)
    }
    fn total_at(&self, t: f64) -> usize {
        self.samples.iter().rev().find(|s| s.0 <= t).map(|s| s.1).unwrap_or(0)
    }
    fn target_changes(&self, from: f64) -> usize {
        let targets: Vec<usize> = self.samples.iter().filter(|s| s.0 >= from).map(|s| s.2).collect();
        targets.windows(2).filter(|w| w[0] != w[1]).count()
    }
}

/// Arrivals at `rate` per second in [start, end), with deterministic jitter.
fn phase(out: &mut Vec<f64>, start: f64, end: f64, rate: f64, seed: &mut u64) {
    let mut t = start;
    while t < end {
        out.push(t);
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let jitter = 0.5 + (*seed >> 33) as f64 / (1u64 << 31) as f64; // 0.5..1.5
        t += jitter / rate;
    }
}

fn simulate(m: Model, arrivals: &[f64], duration: f64) -> Outcome {
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t);
    let mut est = RateEstimator::new(base);
    let mut state = SizerState::default();
    let mut out = Outcome::default();
    let (mut ready, mut booting, mut busy, mut waiting): (usize, Vec<f64>, Vec<f64>, usize) =
        (m.limits.min_size, Vec::new(), Vec::new(), 0);
    let mut next = arrivals.iter().copied().peekable();
    let mut next_tick = 0.0;
    let mut target_now = m.limits.min_size;
    let steps = (duration / DT) as usize;
    for step in 0..steps {
        let now = step as f64 * DT;
        // VMs finishing a boot or a use.
        booting.retain(|&end| {
            if end <= now {
                ready += 1;
                false
            } else {
                true
            }
        });
        busy.retain(|&end| {
            if end <= now {
                if m.recycle {
                    ready += 1;
                }
                false
            } else {
                true
            }
        });
        // Waiting requests take VMs first (they are misses already).
        while waiting > 0 && ready > 0 {
            waiting -= 1;
            ready -= 1;
            busy.push(now + m.service + if m.recycle { m.reset } else { 0.0 });
        }
        let mut claimed = false;
        while next.peek().is_some_and(|&t| t <= now) {
            claimed = true;
            let t = next.next().unwrap_or(now);
            est.record(at(t));
            if ready > 0 {
                ready -= 1;
                busy.push(now + m.service + if m.recycle { m.reset } else { 0.0 });
                out.requests.push((t, true));
            } else {
                waiting += 1;
                out.requests.push((t, false));
                // A miss creates a VM on demand if there is room.
                let total = ready + booting.len() + busy.len();
                let cap = m.limits.max_size.min(m.limits.max_by_memory) - m.sessions;
                if total < cap {
                    booting.push(now + m.replenish);
                }
            }
        }
        // The sizer decides on its interval; the replenisher also wakes on
        // every claim (as the pool's does) to refill towards that target.
        let tick = now >= next_tick;
        if tick {
            next_tick += m.interval;
            let obs = Observed {
                rates: est.rates(at(now)),
                out_of_pool_secs: m.service + if m.recycle { m.reset } else { m.replenish },
                sessions: m.sessions,
                last_arrival: est.last_arrival(),
            };
            target_now = target(&m.limits, &obs, &mut state, at(now));
        }
        if tick || claimed {
            let total = ready + booting.len() + busy.len();
            if total < target_now {
                let room = m.concurrency.saturating_sub(booting.len());
                for _ in 0..(target_now - total).min(room) {
                    booting.push(now + m.replenish);
                }
            } else if total > target_now && tick {
                ready -= ready.min(total - target_now);
            }
        }
        let total = ready + booting.len() + busy.len();
        out.samples.push((now, total, target_now));
        assert!(total <= m.limits.max_size.min(m.limits.max_by_memory), "over the limits at {now}: {total}");
        assert!(total as u64 * m.vm_mb <= m.limits.max_by_memory as u64 * m.vm_mb);
    }
    out
}

#[test]
fn steady_load_is_served_warm_without_flapping() {
    let mut a = Vec::new();
    phase(&mut a, 1.0, 121.0, 5.0, &mut 7);
    let o = simulate(model(), &a, 125.0);
    assert!(o.hit_ratio(10.0, 121.0) >= 0.99, "hit ratio {}", o.hit_ratio(10.0, 121.0));
    assert!(o.target_changes(20.0) <= 2, "target flapped {} times", o.target_changes(20.0));
}

#[test]
fn step_up_is_followed_within_seconds_and_held_after_step_down() {
    let mut a = Vec::new();
    let mut seed = 11;
    phase(&mut a, 0.0, 60.0, 1.0, &mut seed);
    phase(&mut a, 60.0, 120.0, 10.0, &mut seed);
    phase(&mut a, 120.0, 240.0, 1.0, &mut seed);
    let m = model();
    let o = simulate(m, &a, 240.0);
    let during = o.hit_ratio(62.0, 120.0);
    assert!(during >= 0.99, "warm-hit ratio during the high step {during}");
    assert!(o.hit_ratio(0.0, 240.0) >= 0.97);
    // Held for idle_timeout after the step down, then lower.
    let high = o.total_at(119.0);
    assert!(o.total_at(150.0) >= high, "shrank before idle_timeout");
    assert!(o.total_at(200.0) < high, "never shrank after the step down");
}

#[test]
fn burst_from_idle_stays_in_bounds_and_shrinks_back_after_idle_timeout() {
    let m = model();
    let a: Vec<f64> = (0..20).map(|i| 120.0 + i as f64 * 0.005).collect();
    let o = simulate(m, &a, 300.0);
    assert_eq!(o.total_at(119.0), m.limits.min_size, "idle pool sits at min_size");
    assert!(o.max_total() <= m.limits.max_size);
    assert!(o.hit_ratio(120.0, 121.0) < 0.5, "a burst from idle cannot be all warm (sanity)");
    let back = 120.1 + m.limits.idle_timeout.as_secs_f64() + m.interval + DT;
    assert_eq!(o.total_at(back), m.limits.min_size, "not back at min_size by {back}");
}

#[test]
fn an_idle_pool_stays_at_min_size() {
    let o = simulate(model(), &[], 200.0);
    assert!(o.samples.iter().all(|s| s.1 == 2 && s.2 == 2));
}

#[test]
fn memory_limit_caps_the_pool_below_max_size() {
    let mut m = model();
    m.limits.max_by_memory = 4; // e.g. max_memory_mb 1024 / 256 MiB
    let mut a = Vec::new();
    phase(&mut a, 0.0, 60.0, 50.0, &mut 3);
    let o = simulate(m, &a, 70.0);
    assert_eq!(o.max_total(), 4);
}

#[test]
fn sessions_take_capacity() {
    let mut m = model();
    m.sessions = 7;
    let mut a = Vec::new();
    phase(&mut a, 0.0, 30.0, 20.0, &mut 5);
    let o = simulate(m, &a, 35.0);
    assert!(o.max_total() <= 3);
}

#[test]
fn destroy_mode_needs_a_bigger_pool_and_still_serves_warm() {
    let mut m = model();
    m.recycle = false;
    m.concurrency = 4;
    let mut a = Vec::new();
    phase(&mut a, 0.0, 120.0, 3.0, &mut 9);
    let o = simulate(m, &a, 125.0);
    assert!(o.hit_ratio(10.0, 120.0) >= 0.99, "hit ratio {}", o.hit_ratio(10.0, 120.0));
}

#[test]
fn rate_windows() {
    let base = Instant::now();
    let mut e = RateEstimator::new(base);
    for i in 0..120 {
        e.record(base + Duration::from_millis(500 * i)); // 2/s for 60 s
    }
    let r = e.rates(base + Duration::from_secs(60));
    assert!((r.long - 2.0).abs() < 0.1, "{r:?}");
    assert!((r.short - 2.0).abs() < 0.4, "{r:?}");
    let later = e.rates(base + Duration::from_secs(70));
    assert_eq!(later.short, 0.0);
    assert!(later.long > 1.0 && later.long < 2.0, "long window decays slowly: {later:?}");
    assert_eq!(e.rates(base + Duration::from_secs(200)), Rates::default());
}
