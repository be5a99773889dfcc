//! The pool's real backend: QEMU microVMs from a [`VmHost`], made clean
//! after each use by restoring a snapshot, or destroyed.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ResetMode;
use crate::pool::{Backend, PoolError};
use crate::vm::{Vm, VmHost};

/// The snapshot every pool VM returns to.
pub const CLEAN_SNAPSHOT: &str = "ember-clean";

#[derive(Debug)]
pub struct VmBackend {
    host: Arc<VmHost>,
    mode: ResetMode,
    reset_timeout: Duration,
    timings: std::sync::Mutex<BackendTimings>,
}

/// Durations of the backend's operations, for benchmarks.
#[derive(Debug, Clone, Default)]
pub struct BackendTimings {
    /// Boot to agent-ready (and snapshot saved, in snapshot mode).
    pub create: Vec<Duration>,
    pub reset: Vec<Duration>,
}

impl VmBackend {
    /// Resolve `auto` for this host's channel and refuse what cannot work.
    pub fn new(host: Arc<VmHost>, requested: ResetMode) -> Result<Self, String> {
        let migratable = host.channel().migratable();
        let mode = match requested {
            ResetMode::Auto if migratable => ResetMode::Snapshot,
            ResetMode::Auto => ResetMode::Destroy,
            ResetMode::Snapshot if !migratable => {
                return Err(format!(
                    "pool.reset = \"snapshot\" needs a migratable channel; {} is not (use serial)",
                    host.channel()
                ))
            }
            ResetMode::Rollback => {
                return Err(
                    "pool.reset = \"rollback\" needs the ZFS storage backend, which is not built yet".into()
                )
            }
            m => m,
        };
        Ok(Self { host, mode, reset_timeout: Duration::from_secs(20), timings: Default::default() })
    }

    /// What creates and resets took so far.
    pub fn timings(&self) -> BackendTimings {
        self.timings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, f: impl FnOnce(&mut BackendTimings)) {
        f(&mut self.timings.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The reset mode in force (never `auto`).
    pub fn mode(&self) -> ResetMode {
        self.mode
    }

    pub fn host(&self) -> &Arc<VmHost> {
        &self.host
    }
}

fn create_err(e: impl std::fmt::Display) -> PoolError {
    PoolError::Create(e.to_string())
}

impl Backend for VmBackend {
    type Vm = Vm;

    async fn create(&self) -> Result<Vm, PoolError> {
        let started = tokio::time::Instant::now();
        let vm = self.host.boot().await.map_err(create_err)?;
        if self.mode == ResetMode::Snapshot {
            // Taken while the agent is idle, right after its first hello.
            if let Err(e) = vm.save_snapshot(CLEAN_SNAPSHOT).await {
                vm.shutdown().await;
                return Err(create_err(e));
            }
        }
        self.record(|t| t.create.push(started.elapsed()));
        Ok(vm)
    }

    fn recycles(&self) -> bool {
        self.mode == ResetMode::Snapshot
    }

    async fn reset(&self, vm: &mut Vm) -> Result<(), PoolError> {
        let id = vm.id().to_string();
        let fail = |reason: String| PoolError::Reset { vm: id.clone(), reason };
        match self.mode {
            ResetMode::Snapshot => {
                let started = tokio::time::Instant::now();
                let restore = async {
                    vm.load_snapshot(CLEAN_SNAPSHOT, self.reset_timeout).await.map_err(|e| e.to_string())?;
                    // The snapshot's clock is stale by the VM's age.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_err(|e| e.to_string())?;
                    let clock = ember_wire::Configure {
                        clock_unix_ms: Some(now.as_millis() as u64),
                        ..Default::default()
                    };
                    vm.agent().configure(clock).await.map_err(|e| e.to_string())
                };
                match tokio::time::timeout(self.reset_timeout, restore).await {
                    Ok(Ok(())) => {
                        self.record(|t| t.reset.push(started.elapsed()));
                        Ok(())
                    }
                    Ok(Err(e)) => Err(fail(e)),
                    Err(_) => Err(fail(format!("no answer within {:?}", self.reset_timeout))),
                }
            }
            other => Err(fail(format!("reset mode {} does not recycle", other.name()))),
        }
    }

    async fn destroy(&self, vm: Vm) {
        vm.shutdown().await;
    }

    fn healthy(&self, vm: &mut Vm) -> bool {
        vm.is_running()
    }

    fn vm_id(vm: &Vm) -> &str {
        vm.id()
    }
}
