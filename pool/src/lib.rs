//! Ember's warm pool, on top of the VM layer (`ember-vm`): claims and
//! leases, recycling (reset or scrub), replenishment, sessions, the sizer,
//! the pool's configuration and the one planner of reset, channel and disk.
#![forbid(unsafe_code)]

pub mod config;
pub mod plan;
pub mod pool;
pub mod sizer;
