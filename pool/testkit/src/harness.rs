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

    pub async fn run<'a>(&mut self, name: &str, case: CaseFuture<'a>) {
        if !self.wants(name) {
            return;
        }
        let t = Instant::now();
        match case.await {
            Ok(()) => {
                println!("test {name} ... ok ({} ms)", t.elapsed().as_millis());
                self.passed += 1;
            }
            Err(e) => {
                println!("test {name} ... FAILED ({} ms)\n    {e:#}", t.elapsed().as_millis());
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
