//! Ember's VM layer: one QEMU `-M microvm` guest and everything it owns (its
//! processes, files, disk, QMP connection and agent channel), the templates
//! clones are restored from, and the helpers below them. It knows nothing of
//! pools, leases or HTTP; `ember-pool` builds the warm pool on top of it.
#![forbid(unsafe_code)]

pub mod channel;
pub mod image;
pub mod net;
pub use ember_sys::{os, procfs};
pub mod storage;
pub mod vm;

pub use channel::DirWatch;
pub use channel::{
    AgentClient, AgentError, ChannelChoice, ChannelKind, ExecEvent, ExecOutput, FileUpload, Listing,
};
pub use vm::{Vm, VmConfig, VmError, VmHost};
