//! Where an operation's time and CPU went, step by step: wall time and the
//! CPU seconds of the VM's host processes (QEMU and its channel helper),
//! for the reset breakdown in logs and benchmarks.

use std::time::Duration;

use tokio::time::Instant;

/// One finished step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: &'static str,
    pub wall: Duration,
    /// CPU seconds the VM's processes used during the step (`/proc`
    /// granularity: one clock tick, usually 10 ms).
    pub cpu: f64,
}

/// Marks the end of each step of one operation.
#[derive(Debug)]
pub struct Steps {
    pids: Vec<u32>,
    last: (Instant, f64),
    done: Vec<Step>,
}

impl Steps {
    /// Start timing, charging CPU to the processes `pids`.
    pub fn start(pids: Vec<u32>) -> Self {
        let cpu = cpu_of(&pids);
        Self { pids, last: (Instant::now(), cpu), done: Vec::new() }
    }

    /// The step named `name` ends now.
    pub fn mark(&mut self, name: &'static str) {
        let (now, cpu) = (Instant::now(), cpu_of(&self.pids));
        self.done.push(Step { name, wall: now - self.last.0, cpu: (cpu - self.last.1).max(0.0) });
        self.last = (now, cpu);
    }

    pub fn finish(self) -> Vec<Step> {
        self.done
    }
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| ember_sys::procfs::cpu_seconds(p)).sum()
}

/// `name=12ms/0.04s ...` for a log line.
pub fn describe(steps: &[Step]) -> String {
    steps
        .iter()
        .map(|s| format!("{}={}ms/{:.2}s", s.name, s.wall.as_millis(), s.cpu))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_are_timed_in_order_and_charge_the_given_processes() {
        let me = std::process::id();
        let mut steps = Steps::start(vec![me]);
        // Burn 50 ms of this process's CPU (however long that takes on a
        // busy machine), then wait without it.
        let from = ember_sys::procfs::cpu_seconds(me).unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while ember_sys::procfs::cpu_seconds(me).unwrap() - from < 0.05
            && t.elapsed() < Duration::from_secs(20)
        {
            for _ in 0..10_000 {
                x = x.wrapping_mul(31).wrapping_add(7);
            }
        }
        std::hint::black_box(x);
        steps.mark("busy");
        tokio::time::sleep(Duration::from_millis(30)).await;
        steps.mark("idle");
        let done = steps.finish();
        assert_eq!(done.iter().map(|s| s.name).collect::<Vec<_>>(), ["busy", "idle"]);
        assert!(done[0].wall > Duration::ZERO);
        assert!(done[1].wall >= Duration::from_millis(30));
        // Other tests share this process: only the busy step is certain.
        assert!(done[0].cpu >= 0.05, "{done:?}");
        assert!(describe(&done).starts_with("busy="), "{}", describe(&done));
    }
}
