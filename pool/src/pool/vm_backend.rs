//! The pool's real backend: QEMU microVMs from a [`VmHost`], made clean
//! after each use by restoring a snapshot, rolling back their writable disk
//! (raw copy or ZFS), scrubbing in the guest between one function's calls,
//! or destroyed.

use std::sync::Arc;
use std::time::Duration;

use super::{Backend, NetTimings, PoolError};
use crate::config::{ReplenishMode, ResetMode};
use ember_net::Policy;
use ember_vm::{Step, Template, Vm, VmHost};

/// A scrub that takes longer than this is given up (a full reset follows).
const SCRUB_TIMEOUT: Duration = Duration::from_secs(5);

/// The snapshot every pool VM returns to.
pub const CLEAN_SNAPSHOT: &str = "ember-clean";

#[derive(Debug)]
pub struct VmBackend {
    host: Arc<VmHost>,
    mode: ResetMode,
    restore: bool,
    /// Made on first use; `None` if making it failed (then VMs boot cold).
    template: tokio::sync::OnceCell<Option<Template>>,
    reset_timeout: Duration,
    /// Kept only when asked for (benchmarks): a server would grow it forever.
    keep_timings: bool,
    /// VMs restored for a waiting claim without a clean snapshot: they
    /// serve that one call and are destroyed after it.
    single_use: std::sync::Mutex<std::collections::HashSet<String>>,
    timings: std::sync::Mutex<BackendTimings>,
}

/// Durations of the backend's operations, for benchmarks.
#[derive(Debug, Clone, Default)]
pub struct BackendTimings {
    /// Cold boot to agent-ready (and snapshot saved, in snapshot mode).
    pub create: Vec<Duration>,
    /// Restore from the template to agent-ready (and snapshot saved).
    pub restore: Vec<Duration>,
    pub reset: Vec<Duration>,
    /// The storage step of a rollback reset alone (file rewrite or `zfs rollback`).
    pub rollback: Vec<Duration>,
    /// Making a VM's writable disk (copy or clone), part of create.
    pub disk: Vec<Duration>,
    /// In-guest scrubs between calls of one function.
    pub scrub: Vec<Duration>,
    /// Each successful reset, step by step (wall time and CPU).
    pub reset_steps: Vec<Vec<Step>>,
}

impl VmBackend {
    /// Resolve `auto` for this host's channel and refuse what cannot work.
    pub fn new(host: Arc<VmHost>, requested: ResetMode, replenish: ReplenishMode) -> Result<Self, String> {
        let disks = (&host.config().storage).into();
        let mut plan = crate::plan::with_channel(requested, replenish, disks, host.channel())?;
        // A rollback detaches the writable disk under a live guest; a
        // writable root's overlay lives on it and cannot let go.
        if plan.reset == ResetMode::Rollback && host.config().images.writable_root {
            if requested != ResetMode::Auto {
                return Err(format!(
                    "pool.reset = \"rollback\" cannot recycle image {}: its root is writable (an overlay \
                     on the disk a rollback detaches); use \"snapshot\" or \"destroy\"",
                    host.config().image
                ));
            }
            plan.reset = ResetMode::Destroy;
        }
        // Destroy works over either disk; the recycling modes need theirs.
        if plan.reset != ResetMode::Destroy && plan.scratch != host.config().scratch {
            return Err(format!(
                "pool.reset = \"{}\" needs VMs with a {} writable disk",
                plan.reset.name(),
                if plan.scratch == ember_vm::ScratchKind::RawCopy { "raw" } else { "qcow2 overlay" }
            ));
        }
        let (mode, restore) = (plan.reset, plan.restore);
        Ok(Self {
            host,
            mode,
            restore,
            template: tokio::sync::OnceCell::new(),
            reset_timeout: Duration::from_secs(20),
            keep_timings: false,
            single_use: Default::default(),
            timings: Default::default(),
        })
    }

    /// Keep the duration of every create, restore and reset (see [`Self::timings`]).
    pub fn keeping_timings(mut self) -> Self {
        self.keep_timings = true;
        self
    }

    /// Whether new VMs are restored from a template.
    pub fn restores(&self) -> bool {
        self.restore
    }

    async fn template(&self) -> Option<&Template> {
        if !self.restore {
            return None;
        }
        let t = self
            .template
            .get_or_init(|| async {
                let started = tokio::time::Instant::now();
                match self.host.make_template().await {
                    Ok(t) => {
                        self.record(|tm| tm.create.push(started.elapsed()));
                        tracing::info!(took = ?started.elapsed(), "template ready");
                        Some(t)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot make a template; VMs boot cold");
                        None
                    }
                }
            })
            .await;
        t.as_ref()
    }

    /// What creates and resets took so far.
    pub fn timings(&self) -> BackendTimings {
        self.timings.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, f: impl FnOnce(&mut BackendTimings)) {
        if !self.keep_timings {
            return;
        }
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

/// What a warm-up runs: the path the VM's next call most likely takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WarmUp {
    /// `true`: the agent's exec path, fork and exec, the dynamic loader.
    Command,
    /// A no-op script forked from the pre-warmed Python (the fork server's
    /// path and CPython's interpreter loop), for VMs whose last call was
    /// Python: a reset leaves TCG's translations empty, and re-translating
    /// the interpreter would otherwise be paid by the next call.
    Python,
}

/// Run one trivial command so the next one is fast. A restored VM starts
/// with an empty translation cache under TCG (and cold caches under KVM):
/// its first command pays for warming them, better paid here, off the
/// request's path, than by the caller. Only what the next call will
/// likely run is warmed: each warm-up costs CPU on every reset.
async fn warm_up(vm: &Vm, what: WarmUp) -> Result<(), String> {
    // Only a command. Sending a code file with it (and having the agent
    // remove it) would also translate the file-writing path: a `code` call
    // gets faster, but every reset dearer by more than it saves
    // (docs/BENCHMARKS.md, "code and files calls"), and on a TCG host reset
    // capacity decides how many calls a second the pool keeps up with.
    let mut req = match what {
        WarmUp::Command => ember_channel::shell("true"),
        WarmUp::Python => {
            ember_wire::ExecRequest::new(ember_wire::Command::Python(ember_wire::PythonScript {
                path: WARM_UP_SCRIPT.into(),
                args: Vec::new(),
            }))
        }
    };
    // Generous: on slow storage (zfs-fuse) the first disk access after a
    // rollback can take seconds; this is off the request path.
    req.timeout_ms = 20_000;
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(25), vm.agent().run(req)).await {
        Ok(Ok(out)) if out.status.code == Some(0) => {
            tracing::debug!(vm = vm.id(), ?what, took = ?started.elapsed(), "warmed up");
            Ok(())
        }
        Ok(Ok(out)) => Err(format!("warm-up command failed: {:?}", out.status)),
        Ok(Err(e)) => Err(format!("warm-up command: {e}")),
        Err(_) => Err("warm-up command did not answer within 25s".into()),
    }
}

/// For a VM with a NIC: the path a claim with a network takes in the guest
/// (the agent's netlink calls and the kernel's behind them), run once off the
/// request's path: a restore leaves its translations empty under TCG, and
/// the claim's `configure` paid for them (docs/BENCHMARKS.md, Networking). The
/// VM's own address goes on and comes off again, checked by the agent; its
/// TAP has no rules, so nothing can pass meanwhile.
async fn warm_up_nic(vm: &Vm) -> Result<(), String> {
    let Some(tap) = vm.tap() else { return Ok(()) };
    let t = &tap.tap().net;
    let on = ember_wire::Configure {
        network: Some(ember_wire::NetworkConfig {
            interface: "eth0".into(),
            address: format!("{}/30", t.addr),
            gateway: Some(t.gateway.to_string()),
        }),
        ..Default::default()
    };
    let off = ember_wire::Configure { network_off: true, ..Default::default() };
    let started = tokio::time::Instant::now();
    let both = async {
        vm.agent().configure(on).await?;
        vm.agent().configure(off).await
    };
    match tokio::time::timeout(Duration::from_secs(15), both).await {
        Ok(Ok(())) => {
            tracing::debug!(vm = vm.id(), took = ?started.elapsed(), "NIC warmed up");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("NIC warm-up: {e}")),
        Err(_) => Err("NIC warm-up did not answer within 15s".into()),
    }
}

/// A no-op script in the guest image (read-only root).
const WARM_UP_SCRIPT: &str = "/usr/lib/ember/warm-up.py";

fn create_err(e: impl std::fmt::Display) -> PoolError {
    PoolError::Create(e.to_string())
}

impl Backend for VmBackend {
    type Vm = Vm;

    async fn prepare(&self) {
        let _ = self.template().await;
    }

    async fn create(&self) -> Result<Vm, PoolError> {
        let started = tokio::time::Instant::now();
        let (vm, restored) = match self.template().await {
            Some(t) => match self.host.restore(t).await {
                Ok(vm) => (vm, true),
                Err(e) => {
                    tracing::warn!(error = %e, "restore from the template failed; booting cold");
                    (self.host.boot().await.map_err(create_err)?, false)
                }
            },
            None => (self.host.boot().await.map_err(create_err)?, false),
        };
        // Every reset returns to the state the VM has now: its Python warm,
        // the image's warm command run (a restored VM has both from its
        // template).
        let settled = if restored {
            vm.wait_python_ready(self.host.config().boot_timeout).await
        } else {
            vm.settle(self.host.config().boot_timeout).await
        };
        if let Err(e) = settled {
            vm.shutdown().await;
            return Err(create_err(e));
        }
        if self.mode == ResetMode::Snapshot {
            // Taken while the agent is idle, right after its first hello.
            if let Err(e) = vm.save_snapshot(CLEAN_SNAPSHOT).await {
                vm.shutdown().await;
                return Err(create_err(e));
            }
        }
        if let Err(e) = warm_up(&vm, WarmUp::Command).await {
            vm.shutdown().await;
            return Err(create_err(e));
        }
        if let Err(e) = warm_up_nic(&vm).await {
            vm.shutdown().await;
            return Err(create_err(e));
        }
        let took = started.elapsed();
        let disk = Duration::from_millis(vm.timings().disk_ms);
        self.record(|t| {
            if restored {
                t.restore.push(took)
            } else {
                t.create.push(took)
            }
            t.disk.push(disk);
        });
        Ok(vm)
    }

    /// With a template, a claim that waits gets a VM straight from the
    /// restore: no clean snapshot saved first (the whole RAM written out,
    /// seconds for a large guest) and no warm-up. It serves this one call
    /// and is destroyed after it; the replenisher makes reusable ones.
    async fn create_for_claim(&self) -> Result<Vm, PoolError> {
        if self.mode != ResetMode::Snapshot {
            return self.create().await;
        }
        let Some(t) = self.template().await else { return self.create().await };
        let vm = match self.host.restore(t).await {
            Ok(vm) => vm,
            Err(e) => {
                tracing::warn!(error = %e, "restore from the template failed; booting cold");
                return self.create().await;
            }
        };
        if let Err(e) = vm.wait_python_ready(self.host.config().boot_timeout).await {
            vm.shutdown().await;
            return Err(create_err(e));
        }
        self.single_use.lock().unwrap_or_else(|p| p.into_inner()).insert(vm.id().to_string());
        Ok(vm)
    }

    fn keeps(&self, vm: &Vm) -> bool {
        !self.single_use.lock().unwrap_or_else(|p| p.into_inner()).contains(vm.id())
    }

    fn recycles(&self) -> bool {
        matches!(self.mode, ResetMode::Snapshot | ResetMode::Rollback)
    }

    async fn connect(&self, vm: &Vm, policy: &Policy) -> Result<NetTimings, PoolError> {
        let started = tokio::time::Instant::now();
        let Some(tap) = vm.tap() else {
            return Err(PoolError::Network(format!("VM {} has no NIC: networking is off", vm.id())));
        };
        let t = tap.tap();
        // The guest's side is known before the host's is made: both at once.
        let guest = ember_wire::Configure {
            hostname: Some(vm.id().to_string()),
            network: policy.connected().then(|| ember_wire::NetworkConfig {
                interface: "eth0".into(),
                address: format!("{}/30", t.net.addr),
                gateway: Some(t.net.gateway.to_string()),
            }),
            network_off: !policy.connected(),
            dns: if policy.connected() { vec![t.net.gateway.to_string()] } else { Vec::new() },
            ..Default::default()
        };
        let configure = async {
            let t = tokio::time::Instant::now();
            let r = vm.agent().configure(guest).await;
            (r, t.elapsed())
        };
        let (host, (configured, configure_took)) = tokio::join!(tap.network().connect(t, policy), configure);
        let (_, host) = host.map_err(|e| PoolError::Network(format!("VM {}: {e}", vm.id())))?;
        configured
            .map_err(|e| PoolError::Network(format!("VM {}: configuring its network: {e}", vm.id())))?;
        let timings = NetTimings { host, configure: configure_took, total: started.elapsed() };
        tracing::debug!(vm = vm.id(), ?timings, "network connected");
        Ok(timings)
    }

    async fn disconnect(&self, vm: &Vm) {
        if let Some(tap) = vm.tap() {
            tap.network().disconnect(tap.tap()).await;
        }
    }

    async fn reset(&self, vm: &mut Vm) -> Result<(), PoolError> {
        let id = vm.id().to_string();
        let fail = |reason: String| PoolError::Reset { vm: id.clone(), reason };
        let started = tokio::time::Instant::now();
        let mut steps = vm.steps();
        // Read before a snapshot restore replaces the agent connection.
        let what = if vm.agent().last_exec_was_python() { WarmUp::Python } else { WarmUp::Command };
        let outcome = match self.mode {
            ResetMode::Snapshot => {
                tokio::time::timeout(
                    self.reset_timeout,
                    vm.load_snapshot(CLEAN_SNAPSHOT, self.reset_timeout, &mut steps),
                )
                .await
            }
            ResetMode::Rollback => {
                let rolled = tokio::time::timeout(self.reset_timeout, vm.rollback_scratch(&mut steps)).await;
                if let Ok(Ok(took)) = &rolled {
                    self.record(|t| t.rollback.push(*took));
                }
                rolled.map(|r| r.map(drop))
            }
            other => return Err(fail(format!("reset mode {} does not recycle", other.name()))),
        };
        match outcome {
            Ok(Ok(())) => {
                warm_up(vm, what).await.map_err(fail)?;
                warm_up_nic(vm).await.map_err(fail)?;
                steps.mark("warm-up");
                let steps = steps.finish();
                tracing::debug!(vm = %id, mode = self.mode.name(), steps = %ember_vm::describe_steps(&steps), "reset");
                self.record(|t| {
                    t.reset.push(started.elapsed());
                    t.reset_steps.push(steps);
                });
                Ok(())
            }
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!("no answer within {:?}", self.reset_timeout))),
        }
    }

    fn scrubs(&self) -> bool {
        // A scrub empties home and /tmp; a writable root keeps the rest.
        self.recycles() && !self.host.config().images.writable_root
    }

    async fn scrub(&self, vm: &mut Vm) -> Result<(), PoolError> {
        let fail = |reason: String| PoolError::Reset { vm: vm.id().to_string(), reason };
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(SCRUB_TIMEOUT, vm.agent().scrub()).await {
            Ok(Ok(())) => {
                self.record(|t| t.scrub.push(started.elapsed()));
                Ok(())
            }
            Ok(Err(e)) => Err(fail(format!("scrub: {e}"))),
            Err(_) => Err(fail(format!("scrub: no answer within {SCRUB_TIMEOUT:?}"))),
        }
    }

    fn pauses(&self) -> bool {
        use ember_channel::ChannelKind;
        matches!(self.host.channel(), ChannelKind::Serial | ChannelKind::Vsock)
    }

    async fn pause(&self, vm: Vm, dir: &std::path::Path) -> Result<(), PoolError> {
        // Its host rules and resolver go with it; a resume makes them anew.
        self.disconnect(&vm).await;
        vm.pause(dir).await.map(drop).map_err(|e| PoolError::Pause(e.to_string()))
    }

    async fn resume(&self, dir: &std::path::Path) -> Result<Vm, PoolError> {
        let paused = ember_vm::Paused::load(dir).map_err(|e| PoolError::Pause(e.to_string()))?;
        self.host.resume(&paused).await.map_err(|e| PoolError::Pause(format!("resuming: {e}")))
    }

    async fn fork(&self, vm: &Vm, dir: &std::path::Path) -> Result<(), PoolError> {
        vm.fork_into(dir).await.map(drop).map_err(|e| PoolError::Pause(format!("forking: {e}")))
    }

    async fn copy_paused(&self, from: &std::path::Path, to: &std::path::Path) -> Result<(), PoolError> {
        let paused = ember_vm::Paused::load(from).map_err(|e| PoolError::Pause(e.to_string()))?;
        paused.copy_to(&self.host, to).await.map(drop).map_err(|e| PoolError::Pause(format!("forking: {e}")))
    }

    async fn remove_paused(&self, dir: &std::path::Path) {
        self.host.remove_paused(dir).await;
    }

    fn can_resume(&self, dir: &std::path::Path) -> bool {
        ember_vm::Paused::load(dir).is_ok()
    }

    async fn destroy(&self, vm: Vm) {
        self.single_use.lock().unwrap_or_else(|p| p.into_inner()).remove(vm.id());
        vm.shutdown().await;
    }

    fn healthy(&self, vm: &mut Vm) -> bool {
        vm.is_running()
    }

    fn vm_id(vm: &Vm) -> &str {
        vm.id()
    }

    fn cpu_seconds(vm: &Vm) -> Option<f64> {
        vm.cpu_seconds()
    }

    fn handle(vm: &Vm) -> super::VmHandle {
        super::VmHandle { usage: vm.usage_probe(), agent: Some(vm.shared_agent()) }
    }
}
