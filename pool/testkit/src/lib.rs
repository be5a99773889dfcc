//! Fixtures shared by Ember's test suites and the load test; never linked
//! into `ember` itself.
//!
//! - [`harness`]: named cases run one after another against shared VMs
//!   (suites with `harness = false`), with libtest-style output.
//! - [`serve`]: `ember serve` as a child process: started, waited for until
//!   its ready line, stopped with SIGTERM, checked for leftovers.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod harness;
pub mod serve;

pub use ember_sys::os::processes_mentioning;
pub use harness::{vms_can_run, CaseFuture, Report};
pub use serve::{EmberServe, ServeOptions};
