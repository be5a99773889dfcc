//! What the pool needs from VMs. The real backend boots QEMU microVMs
//! (`vm_backend`); `fake` is for unit tests.

use std::future::Future;
use std::path::Path;

use ember_net::{ConnectTimings, Policy};

use super::PoolError;

/// Where the time of giving a VM its network went: the host's rules and
/// resolver, and the guest's one `configure`, joined.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetTimings {
    pub host: ConnectTimings,
    pub configure: std::time::Duration,
    pub total: std::time::Duration,
}

/// See [`Backend::handle`].
#[derive(Debug, Clone, Default)]
pub struct VmHandle {
    pub usage: ember_vm::UsageProbe,
    pub agent: Option<std::sync::Arc<ember_channel::AgentClient>>,
}

pub trait Backend: Send + Sync + 'static {
    type Vm: Send + Sync + 'static;

    /// Whatever the first creation needs once (a template VM to restore
    /// from). The pool awaits it before it times a creation, so a one-time
    /// start-up cost does not make every later creation look slow.
    fn prepare(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Make a new VM, ready to run commands.
    fn create(&self) -> impl Future<Output = Result<Self::Vm, PoolError>> + Send;

    /// Make a VM for a claim that is waiting for it: as fast as the backend
    /// can, even if the VM then serves only this one call ([`Self::keeps`]).
    fn create_for_claim(&self) -> impl Future<Output = Result<Self::Vm, PoolError>> + Send {
        self.create()
    }

    /// Whether a VM that served a call can be made clean for the next one
    /// (else it is destroyed after the call, which is not a failure).
    fn keeps(&self, _vm: &Self::Vm) -> bool {
        true
    }

    /// Whether used VMs are made clean and reused (else they are destroyed).
    fn recycles(&self) -> bool;

    /// Make a used VM indistinguishable from a fresh one. An error means
    /// the VM is destroyed and replaced.
    fn reset(&self, vm: &mut Self::Vm) -> impl Future<Output = Result<(), PoolError>> + Send;

    /// Whether a used VM may be scrubbed (the in-guest reset) to serve the
    /// same function again.
    fn scrubs(&self) -> bool;

    /// The cheap reset between calls of one function: kill the user's
    /// processes and empty the writable places, leaving the VM's own state
    /// (and its warm caches) alone. An error means a full reset is needed.
    fn scrub(&self, vm: &mut Self::Vm) -> impl Future<Output = Result<(), PoolError>> + Send;

    /// Remove the VM and everything it owns.
    fn destroy(&self, vm: Self::Vm) -> impl Future<Output = ()> + Send;

    /// Give the VM the network `policy` allows, replacing what it had: the
    /// host's rules and resolver and the guest's address, in parallel.
    fn connect(
        &self,
        _vm: &Self::Vm,
        _policy: &Policy,
    ) -> impl Future<Output = Result<NetTimings, PoolError>> + Send {
        async { Err(PoolError::Network("this pool's VMs have no network".into())) }
    }

    /// Take the VM's network away (its rules and resolver): done before a
    /// used VM is reset, so it never reaches its next caller connected.
    fn disconnect(&self, _vm: &Self::Vm) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Whether [`Self::pause`] can work (a channel that survives a migration).
    fn pauses(&self) -> bool {
        false
    }

    /// Save the VM (RAM, devices, disk) into `dir` and end it: a paused
    /// session holds no process and no RAM. The VM is gone either way.
    fn pause(&self, vm: Self::Vm, _dir: &Path) -> impl Future<Output = Result<(), PoolError>> + Send {
        async move {
            self.destroy(vm).await;
            Err(PoolError::Pause("this pool's VMs cannot pause".into()))
        }
    }

    /// Start the VM paused in `dir` where it stopped. `dir` stays (the VM
    /// uses its disk); pausing it again saves over it.
    fn resume(&self, _dir: &Path) -> impl Future<Output = Result<Self::Vm, PoolError>> + Send {
        async { Err(PoolError::Pause("this pool's VMs cannot pause".into())) }
    }

    /// Save a copy of the running VM into `dir` (resumable as [`Self::resume`]
    /// would) and let the VM run on.
    fn fork(&self, _vm: &Self::Vm, _dir: &Path) -> impl Future<Output = Result<(), PoolError>> + Send {
        async { Err(PoolError::Pause("this pool's VMs cannot fork".into())) }
    }

    /// Copy the VM paused in `from` into `to`.
    fn copy_paused(&self, _from: &Path, _to: &Path) -> impl Future<Output = Result<(), PoolError>> + Send {
        async { Err(PoolError::Pause("this pool's VMs cannot fork".into())) }
    }

    /// Remove `dir`, a paused VM's directory (or what is left of one), with
    /// whatever that VM holds elsewhere (a forked disk).
    fn remove_paused(&self, dir: &Path) -> impl Future<Output = ()> + Send {
        let dir = dir.to_path_buf();
        async move {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
    }

    /// Whether `dir` holds a VM this backend can resume (found at start-up).
    fn can_resume(&self, _dir: &Path) -> bool {
        false
    }

    /// A cheap liveness check (is the VM process still there?).
    fn healthy(&self, vm: &mut Self::Vm) -> bool;

    fn vm_id(vm: &Self::Vm) -> &str;

    /// CPU seconds the VM's host processes used so far, for accounting what
    /// a call, a reset and a creation cost; `None` where unknown.
    fn cpu_seconds(_vm: &Self::Vm) -> Option<f64> {
        None
    }

    /// What a session uses of its VM without holding it (a call may be
    /// running): its live figures and its agent connection.
    fn handle(_vm: &Self::Vm) -> VmHandle {
        VmHandle::default()
    }
}
