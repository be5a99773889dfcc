//! Ember's host side below the HTTP gateway: the VM layer (QEMU microVMs,
//! QMP, process and file ownership) and the agent channels. The warm pool
//! builds on these.
#![forbid(unsafe_code)]

pub mod channel;
pub mod config;
pub mod os;
pub mod plan;
pub mod pool;
pub mod procfs;
pub mod sizer;
pub mod storage;
pub mod vm;

pub use channel::{AgentClient, AgentError, ChannelChoice, ChannelKind, ExecEvent, ExecOutput};
pub use vm::{Vm, VmConfig, VmError, VmHost};
