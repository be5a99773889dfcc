//! A minimal test harness for the suites that share booted VMs: named async cases run one
//! after another on one runtime against shared VMs; prints libtest-style
//! lines and an `N passed, M failed` summary.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>;

#[derive(Debug, Default)]
pub struct Report {
    passed: usize,
    failed: Vec<String>,
    filter: Option<String>,
}

impl Report {
    pub fn new() -> Self {
        // `cargo test --test vm -- NAME` runs the cases whose name contains NAME.
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        Self { passed: 0, failed: Vec::new(), filter }
    }

    pub fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// Whether any of `names` runs: a suite boots a shared fixture only
    /// when a case that uses it is wanted, so a filtered run pays for its
    /// own fixtures alone.
    pub fn wants_any<S: AsRef<str>>(&self, names: impl IntoIterator<Item = S>) -> bool {
        names.into_iter().any(|n| self.wants(n.as_ref()))
    }

    pub async fn run<'a>(&mut self, name: &str, case: CaseFuture<'a>) {
        if !self.wants(name) {
            return;
        }
        let t = Instant::now();
        let limit = case_limit();
        let outcome = match tokio::time::timeout(limit, case).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "did not finish within {limit:?} (EMBER_CASE_TIMEOUT_SECS): a hung host part, say zfs-fuse"
            )),
        };
        self.record(name, t, outcome);
    }

    /// [`Self::run`] for a blocking case (no timeout: its own waits are bounded).
    pub fn run_sync(&mut self, name: &str, case: impl FnOnce() -> anyhow::Result<()>) {
        if !self.wants(name) {
            return;
        }
        let t = Instant::now();
        let outcome = case();
        self.record(name, t, outcome);
    }

    fn record(&mut self, name: &str, started: Instant, outcome: anyhow::Result<()>) {
        match outcome {
            Ok(()) => {
                println!("test {name} ... ok ({} ms)", started.elapsed().as_millis());
                self.passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED ({} ms)\n    {e:#}", started.elapsed().as_millis());
                self.failed.push(name.to_string());
            }
        }
    }

    pub fn fail(&mut self, name: &str, e: anyhow::Error) {
        println!("test {name} ... FAILED\n    {e:#}");
        self.failed.push(name.to_string());
    }

    /// Print the summary; the process exit code.
    pub fn finish(self) -> i32 {
        if !self.failed.is_empty() {
            println!("\nfailures:");
            for f in &self.failed {
                println!("    {f}");
            }
        }
        println!("\n{} passed, {} failed", self.passed, self.failed.len());
        i32::from(!self.failed.is_empty())
    }
}

#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {{
        match (&$left, &$right) {
            (l, r) => anyhow::ensure!(l == r, "{} = {:?}, expected {:?}", stringify!($left), l, r),
        }
    }};
}

/// The longest one case may take (`EMBER_CASE_TIMEOUT_SECS`, default 15
/// minutes): a case stuck on a hung host part (zfs-fuse once left every
/// request on its mounts waiting for good) fails instead of holding the
/// whole run until CI's own limit.
fn case_limit() -> std::time::Duration {
    let secs = std::env::var("EMBER_CASE_TIMEOUT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(900);
    std::time::Duration::from_secs(secs)
}

/// Whether a suite that boots real VMs can run here: the images built
/// (`make images`), QEMU installed, and root (TAPs, namespaces, zfs). When
/// it cannot, it says so and the suite passes as skipped, so `cargo test
/// --workspace` works on a machine without them, unless
/// `EMBER_REQUIRE_VMS=1` (as `make test` sets): then it runs and fails.
pub fn vms_can_run(suite: &str, images: &std::path::Path) -> bool {
    if std::env::var_os("EMBER_REQUIRE_VMS").is_some_and(|v| v == "1") {
        return true;
    }
    let qemu_found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-system-x86_64").is_file()));
    let missing = if !images.join("vmlinuz").is_file() || !images.join("default").is_dir() {
        Some(format!("no images in {} (make images)", images.display()))
    } else if !qemu_found {
        Some("no qemu-system-x86_64 (make test-deps)".to_string())
    } else if !nix::unistd::geteuid().is_root() {
        Some("not root".to_string())
    } else {
        None
    };
    match missing {
        Some(why) => {
            println!("SKIP suite {suite}: {why}; `make test` runs it (EMBER_REQUIRE_VMS=1)");
            false
        }
        None => true,
    }
}
