//! Host helpers every layer above uses and none owns: what Ember reads from
//! `/proc` ([`procfs`]), child processes killed as a group with their owner
//! ([`child`]), the one way host tools are run ([`runner`]: `zfs`, `ip`,
//! `nft`, `qemu-img`, with a timeout, and a fake for tests), and small OS
//! helpers ([`os`]). No VM, pool or HTTP concept lives here: the load test
//! links this crate, not the VM layer.
#![forbid(unsafe_code)]

pub mod child;
pub mod os;
pub mod procfs;
pub mod runner;

pub use child::OwnedProcess;
#[cfg(any(test, feature = "test-util"))]
pub use runner::FakeRunner;
pub use runner::{command_line, CommandError, ProcessRunner, Runner};
