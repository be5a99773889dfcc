//! Every per-request limit, as the configuration's `[limits]` sets them.

use std::time::Duration;

/// Every per-request limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body; more is answered with 413.
    pub max_body_bytes: usize,
    /// Bytes of stdout + stderr kept per invocation; the rest is dropped
    /// and the result says `truncated`.
    pub max_output_bytes: u64,
    /// Timeout of a command that names none.
    pub default_timeout: Duration,
    /// Largest timeout a request may ask for; more is answered with 400.
    pub max_timeout: Duration,
    /// Invocations running at once; more are answered with 429.
    pub max_concurrent_requests: usize,
    /// Tasks one command may have in its cgroup (fork-bomb guard).
    pub max_pids: u32,
    /// A call expected to wait longer than this for a VM is answered 429
    /// with `Retry-After` at once (admission by capacity), unless no call
    /// is queued before it or a boot under way covers it; an admitted call
    /// waits up to `pool.claim_timeout`.
    pub max_queue_wait: Duration,
    /// A 429 is answered after this long (at most its Retry-After): a
    /// client that retries at once (oha, a naive loop) then cannot turn
    /// refusals into a storm that takes the CPU the running calls need.
    pub busy_delay: Duration,
    /// Entries (allow + deny) a network policy may have.
    pub max_network_rules: usize,
    /// Output a session's background process keeps for readers who attach
    /// later (its newest bytes; older ones are dropped and counted).
    pub process_output_buffer: u64,
    /// Background processes running at once in one session.
    pub max_processes: u32,
    /// Largest file a `PUT .../files/{path}` may write; more is a 413.
    pub max_upload_bytes: u64,
    /// Directories one recursive watch (`GET .../files/{dir}?watch`) covers;
    /// past it an `overflow` line says the rest are not watched.
    pub max_watched_dirs: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_output_bytes: 1 << 20,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_concurrent_requests: 64,
            max_pids: 1024,
            // Eight Python callers in a closed loop on a 2-core TCG host
            // queue 3-4 s, and up to 5.6 s at their p99 (docs/BENCHMARKS.md):
            // the limit must stand above that, with room for the estimate's
            // error. Overload is what waits longer.
            max_queue_wait: Duration::from_secs(8),
            busy_delay: Duration::from_millis(250),
            max_network_rules: 64,
            process_output_buffer: 1 << 20,
            max_processes: 16,
            max_upload_bytes: 1 << 30,
            max_watched_dirs: 4096,
        }
    }
}
