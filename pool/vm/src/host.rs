//! Per-host context shared by every VM: validated config, the state
//! directory, the CID allocator, the chosen channel and acceleration.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::accel::{self, Accel};
use super::config::{AccelChoice, VmConfig};
use super::state_dir::StateDir;
use super::{Vm, VmError};
use ember_channel::{self as channel, ChannelKind, CidAllocator, HostChannels};
use ember_storage::{ProcessRunner, Runner, Storage, StorageConfig, ZfsStorage};
use ember_sys::os::find_program;

#[derive(Debug)]
pub struct VmHost {
    config: VmConfig,
    state: StateDir,
    cids: CidAllocator,
    channel: ChannelKind,
    accel: OnceCell<Accel>,
    /// uid/gid of `config.qemu_user`, resolved once.
    qemu_ids: Option<(u32, u32)>,
    /// Opened on first use (or by `open_storage` at start-up).
    storage: OnceCell<Storage>,
    runner: Arc<dyn Runner>,
    /// Ember's network namespace, when networking is on: every VM then
    /// boots with a NIC on a TAP of its own there.
    network: std::sync::OnceLock<Arc<ember_net::Network>>,
}

impl VmHost {
    /// Validate the config, check the programs exist, reap what a crashed
    /// earlier run left in the state directory.
    pub fn new(config: VmConfig, need_migratable: bool) -> Result<Arc<Self>, VmError> {
        let mut problems = config.validate().err().unwrap_or_default();
        for (what, prog) in [("qemu", &config.qemu), ("qemu-img", &config.qemu_img)] {
            if find_program(prog).is_none() {
                problems.push(format!("{what} program {} not found (make up installs it)", prog.display()));
            }
        }
        let host = HostChannels::probe(&config.vhost_device_vsock);
        let channel = match channel::choose(config.channel, host, need_migratable) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let qemu_ids = match config.qemu_user.as_deref().map(super::lookup_user).transpose() {
            Ok(ids) => ids,
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let Some(channel) = channel.filter(|_| problems.is_empty()) else {
            return Err(VmError::Config(problems));
        };
        let (state, reaped) = StateDir::open(&config.state_dir).map_err(|e| VmError::Io {
            what: format!("state directory {}", config.state_dir.display()),
            error: e,
        })?;
        let cids = CidAllocator::new(config.state_dir.join("cids"), 3..u32::MAX);
        let accel = OnceCell::new_with(match config.accel {
            AccelChoice::Kvm => Some(Accel::Kvm),
            AccelChoice::Tcg => Some(Accel::Tcg),
            AccelChoice::Auto => None,
        });
        let storage = OnceCell::new();
        let runner: Arc<dyn Runner> = Arc::new(ProcessRunner { timeout: std::time::Duration::from_secs(60) });
        if reaped.vm_dirs > 0 || reaped.processes > 0 {
            tracing::info!(
                vm_dirs = reaped.vm_dirs,
                processes = reaped.processes,
                "reaped what a crashed run left behind"
            );
        }
        Ok(Arc::new(Self {
            config,
            state,
            cids,
            channel,
            accel,
            qemu_ids,
            storage,
            runner,
            network: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    pub fn channel(&self) -> ChannelKind {
        self.channel
    }
    /// The user QEMU and its helpers drop to, if any.
    pub fn qemu_ids(&self) -> Option<(u32, u32)> {
        self.qemu_ids
    }
    /// Give this host's VMs a NIC in `net` (from the next boot on).
    pub fn attach_network(&self, net: Arc<ember_net::Network>) {
        let _ = self.network.set(net);
    }

    pub fn network(&self) -> Option<&Arc<ember_net::Network>> {
        self.network.get()
    }

    pub(crate) fn state(&self) -> &StateDir {
        &self.state
    }
    pub(crate) fn cids(&self) -> &CidAllocator {
        &self.cids
    }

    /// The storage backend, opened (checked, orphans reaped, base made) on
    /// first use. Call it at start-up to fail early.
    pub async fn open_storage(&self) -> Result<&Storage, VmError> {
        self.storage
            .get_or_try_init(|| async {
                match &self.config.storage {
                    StorageConfig::File => Ok(Storage::File),
                    StorageConfig::Zfs(z) => {
                        let owner = self.state.owner_name();
                        let started = std::time::Instant::now();
                        let survivors = ember_storage::zfs::Survivors {
                            owner_alive: &ember_sys::procfs::identity_alive,
                            paused_keeps: &super::pause::keeps_fork,
                        };
                        let zfs = ZfsStorage::open(
                            Arc::clone(&self.runner),
                            z,
                            &self.config.image,
                            &self.config.images.scratch,
                            owner,
                            self.qemu_ids,
                            survivors,
                        )
                        .await
                        .map_err(|e| VmError::Storage(e.to_string()))?;
                        tracing::info!(parent = %z.parent, took = ?started.elapsed(), "zfs storage ready");
                        Ok(Storage::Zfs(Arc::new(zfs)))
                    }
                }
            })
            .await
    }

    /// Release what the storage backend still holds for this process (at
    /// shutdown, after every VM is gone).
    pub async fn close(&self) {
        if let Some(s) = self.storage.get() {
            s.close().await;
        }
    }

    /// How short host tools (`zfs`, `qemu-img`) are run: a timeout, stderr
    /// kept in the error.
    pub fn runner(&self) -> &dyn Runner {
        self.runner.as_ref()
    }

    /// The acceleration VMs use, probing KVM on first use under `auto`.
    pub async fn accel(self: &Arc<Self>) -> Accel {
        *self.accel.get_or_init(|| self.probe_accel()).await
    }

    async fn probe_accel(self: &Arc<Self>) -> Accel {
        if !accel::kvm_device_usable() {
            return Accel::Tcg;
        }
        let path = accel::verdict_path(&self.config.cache_dir, &self.config.qemu, &self.config.images.kernel);
        if let Some(v) = accel::read_verdict(&path) {
            return v;
        }
        let timeout = self.config.kvm_probe_timeout;
        tracing::info!(?timeout, "probing KVM with a test boot");
        let verdict = match Vm::boot(Arc::clone(self), Accel::Kvm, timeout, super::BootPlan::Cold).await {
            Ok(vm) => {
                vm.shutdown().await;
                Accel::Kvm
            }
            Err(e) => {
                tracing::info!(error = %e.to_string().lines().next().unwrap_or_default(), "KVM boot failed; using TCG");
                Accel::Tcg
            }
        };
        accel::write_verdict(&path, verdict);
        verdict
    }

    /// Boot a VM and wait for its agent.
    pub async fn boot(self: &Arc<Self>) -> Result<Vm, VmError> {
        let accel = self.accel().await;
        Vm::boot(Arc::clone(self), accel, self.config.boot_timeout, super::BootPlan::Cold).await
    }
}
