//! Ember's VM layer: one QEMU `-M microvm` guest and everything it owns (its
//! processes, files, disk, QMP connection and agent channel) and the
//! templates clones are restored from. A `Vm` owns all of them; dropping it
//! (or a failed boot) kills the processes and removes the files. It builds
//! on the subsystem crates (`ember-channel`, `ember-image`, `ember-net`,
//! `ember-storage`) and knows nothing of pools, leases or HTTP; `ember-pool`
//! builds the warm pool on top of it.
#![forbid(unsafe_code)]

mod accel;
mod boot;
pub(crate) use boot::lookup_user;
use boot::{connect_agent, BootFailure};
mod argv;
mod config;
mod host;
mod pause;
mod qmp;
pub(crate) mod state_dir;
mod steps;
mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::time::Instant;

pub use accel::Accel;
pub use argv::{kernel_cmdline, qemu_argv, vhost_vsock_argv, ChannelDevice, MemoryBacking, QemuArgs};
pub use config::{default_cache_dir, default_state_dir, AccelChoice, InitMode, ScratchKind, VmConfig};
pub use ember_sys::os::{find_program, processes_mentioning, wait_until};
pub use ember_sys::OwnedProcess;
pub use host::VmHost;
pub use pause::{paused_bytes, Paused, SavedMemory};
pub use qmp::{Qmp, QmpError};
pub use state_dir::{ReapReport, StateDir};
pub use steps::{describe as describe_steps, Step, Steps};
pub use template::{BootPlan, Template};

use ember_channel::{self as channel, AgentClient, AgentError, BulkLane, ChannelAddr, ChannelKind, CidLease};
use ember_storage::Disk;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Tool(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("VM {vm} did not answer within {after:?}\n{diagnostics}")]
    BootTimeout { vm: String, after: Duration, diagnostics: String },
    #[error("VM {vm} exited during boot ({status})\n{diagnostics}")]
    Exited { vm: String, status: String, diagnostics: String },
    #[error("VM {vm}: {source}")]
    Qmp { vm: String, source: QmpError },
    #[error("VM {vm}: {source}")]
    Agent { vm: String, source: AgentError },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |error| VmError::Io { what, error }
}

/// Removes a directory tree when dropped.
#[derive(Debug)]
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove VM directory");
            }
        }
    }
}

/// How long [`Vm::settle`] waits for the guest's pre-warmed Python at least.
const PRELOAD_PATIENCE: Duration = Duration::from_secs(240);

/// Where the time of one boot went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BootTimings {
    /// Disk overlay and helper processes ready, QEMU started.
    pub prepare_ms: u64,
    /// Making the writable disk (a clone or copy), alongside the channel.
    pub disk_ms: u64,
    /// QEMU started until the agent's first reply.
    pub boot_ms: u64,
    /// The guest's own uptime at that reply.
    pub guest_uptime_ms: u64,
    pub total_ms: u64,
}

/// A booted VM with a live agent.
#[derive(Debug)]
pub struct Vm {
    id: String,
    channel: ChannelKind,
    accel: Accel,
    timings: BootTimings,
    /// Shared so that long reads (a session's process output) need not hold
    /// the VM.
    agent: std::sync::Arc<AgentClient>,
    agent_addr: ChannelAddr,
    qmp: tokio::sync::Mutex<Qmp<UnixStream>>,
    // Field order is drop order: processes die before their files go.
    qemu: OwnedProcess,
    helper: Option<OwnedProcess>,
    _cid: Option<CidLease>,
    /// The raw writable disk from the storage backend, if any.
    disk: Option<Disk>,
    /// The bulk lane uploads reach the guest on.
    lane: Option<Arc<BulkLane>>,
    /// Its NIC's TAP (with networking on), removed after QEMU.
    tap: Option<ember_net::OwnedTap>,
    /// Its writable disk's file, and what that overlay is backed by (a
    /// pause keeps the one and may need the other).
    scratch: PathBuf,
    backing: (PathBuf, &'static str),
    /// Its RAM, as a resume must recreate it.
    memory: argv::MemoryBacking,
    dir: DirGuard,
    host: Arc<VmHost>,
}

/// A VM being built; whatever exists is cleaned up if boot fails.
struct Parts {
    id: String,
    dir: DirGuard,
    helper: Option<OwnedProcess>,
    cid: Option<CidLease>,
    /// Dropped on failure: a clone destroys itself.
    disk: Option<Disk>,
}

impl Vm {
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn channel(&self) -> ChannelKind {
        self.channel
    }
    pub fn accel(&self) -> Accel {
        self.accel
    }
    pub fn timings(&self) -> BootTimings {
        self.timings
    }
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The agent connection, to use without holding the VM. A snapshot
    /// reset (`load_snapshot`, then a new connection) replaces it; the old
    /// one then fails every call. A rollback keeps it.
    pub fn shared_agent(&self) -> std::sync::Arc<AgentClient> {
        std::sync::Arc::clone(&self.agent)
    }
    /// Its NIC's TAP in Ember's namespace, with networking on.
    pub fn tap(&self) -> Option<&ember_net::OwnedTap> {
        self.tap.as_ref()
    }
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.pid()
    }
    fn helper_pid(&self) -> Option<u32> {
        self.helper.as_ref().map(OwnedProcess::pid)
    }

    /// Run a QMP command.
    pub async fn qmp(
        &self,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, VmError> {
        self.qmp
            .lock()
            .await
            .execute(command, args)
            .await
            .map_err(|source| VmError::Qmp { vm: self.id.clone(), source })
    }

    /// Run a human-monitor command (for what QMP lacks in QEMU 7.2, such as
    /// `savevm`). HMP reports errors as output text, so any output is one.
    pub async fn hmp(&self, command_line: &str) -> Result<(), VmError> {
        let out = self
            .qmp("human-monitor-command", Some(serde_json::json!({ "command-line": command_line })))
            .await?;
        match out.as_str().map(str::trim) {
            Some("") | None => Ok(()),
            Some(text) => Err(VmError::Tool(format!("VM {}: `{command_line}`: {text}", self.id))),
        }
    }

    /// Save memory, devices and the scratch disk as snapshot `tag`.
    pub async fn save_snapshot(&self, tag: &str) -> Result<(), VmError> {
        self.hmp(&format!("savevm {tag}")).await
    }

    /// Return to snapshot `tag`, then reconnect to the agent: bytes in flight
    /// at the restore may be lost, and a fresh connection (plus a hello with
    /// a new nonce) leaves no doubt about where frames begin.
    pub async fn load_snapshot(
        &mut self,
        tag: &str,
        timeout: Duration,
        steps: &mut Steps,
    ) -> Result<(), VmError> {
        self.hmp(&format!("loadvm {tag}")).await?;
        steps.mark("loadvm");
        self.reconnect_agent(timeout).await?;
        steps.mark("reconnect");
        // The snapshot's clock is stale by the time since it was saved.
        self.agent.configure(template::after_restore()).await.map_err(agent_err(self))?;
        steps.mark("configure");
        Ok(())
    }

    /// Stop the VM and save its state to `path` (a template's, or a paused
    /// VM's); with `ignore_shared`, RAM in a shared file stays out of it
    /// (`x-ignore-shared`: a template's RAM stays in its memory file).
    pub(crate) async fn migrate_to_file(
        &self,
        path: &Path,
        ignore_shared: bool,
        within: Duration,
    ) -> Result<(), VmError> {
        use template::{FD_NAME, POLL};
        let id = self.id.as_str();
        let qmp_err = |source| VmError::Qmp { vm: id.to_string(), source };
        let mut qmp = self.qmp.lock().await;
        qmp.execute("stop", None).await.map_err(qmp_err)?;
        // Set either way: a VM restored from a template has it on.
        template::set_ignore_shared(&mut qmp, ignore_shared).await.map_err(qmp_err)?;
        let unlimited = serde_json::json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 100_000 });
        qmp.execute("migrate-set-parameters", Some(unlimited)).await.map_err(qmp_err)?;
        let file = std::fs::File::create(path).map_err(io_err("creating the VM's state file"))?;
        qmp.send_fd(FD_NAME, std::os::fd::AsFd::as_fd(&file)).await.map_err(qmp_err)?;
        qmp.execute("migrate", Some(serde_json::json!({ "uri": format!("fd:{FD_NAME}") })))
            .await
            .map_err(qmp_err)?;
        let deadline = Instant::now() + within;
        loop {
            let st = qmp.execute("query-migrate", None).await.map_err(qmp_err)?;
            match st.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => return Err(VmError::Tool(format!("saving VM {id} failed: {st}"))),
                _ if Instant::now() >= deadline => {
                    return Err(VmError::Tool(format!("saving VM {id} did not finish: {st}")))
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Start timing an operation on this VM, step by step (see [`Steps`]).
    pub fn steps(&self) -> Steps {
        Steps::start(std::iter::once(self.qemu.pid()).chain(self.helper_pid()).collect())
    }

    /// Roll the writable layer back to the clean image under the running VM:
    /// the agent kills user processes and unmounts, the file is rolled back
    /// in place, the agent remounts and must answer hello.
    pub async fn rollback_scratch(&self, steps: &mut Steps) -> Result<Duration, VmError> {
        let Some(disk) = &self.disk else {
            return Err(VmError::Tool(format!("VM {} has no raw scratch disk to roll back", self.id)));
        };
        let storage = self.host.open_storage().await?;
        let detach = Instant::now();
        self.agent.detach_scratch().await.map_err(agent_err(self))?;
        steps.mark("detach");
        let started = Instant::now();
        storage
            .rollback(&self.host.config().images.scratch, disk)
            .await
            .map_err(|e| VmError::Storage(format!("rolling back VM {}'s disk: {e}", self.id)))?;
        let took = started.elapsed();
        steps.mark("rollback");
        let attach = Instant::now();
        self.agent.attach_scratch().await.map_err(agent_err(self))?;
        let mounted = attach.elapsed();
        steps.mark("attach");
        self.agent.hello(u64::from(std::process::id())).await.map_err(agent_err(self))?;
        steps.mark("hello");
        tracing::debug!(
            vm = %self.id,
            detach = ?(started - detach),
            rollback = ?took,
            attach = ?mounted,
            hello = ?(attach.elapsed() - mounted),
            backend = storage.name(),
            "scratch rolled back"
        );
        Ok(took)
    }

    /// Replace the agent connection with a fresh one that answered hello.
    pub async fn reconnect_agent(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        let kind = self.channel;
        let addr = self.agent_addr.clone();
        // QEMU's chardev socket serves one client at a time: hang up first.
        self.agent.close();
        let (agent, _hello) =
            connect_agent(&addr, kind, &mut self.qemu, deadline).await.map_err(|f| match f {
                BootFailure::Timeout(why) => {
                    VmError::BootTimeout { vm: self.id.clone(), after: timeout, diagnostics: why }
                }
                BootFailure::Exited(status) => {
                    VmError::Exited { vm: self.id.clone(), status, diagnostics: String::new() }
                }
                BootFailure::Qmp(source) => VmError::Qmp { vm: self.id.clone(), source },
            })?;
        if let Some(lane) = &self.lane {
            agent.attach_lane(Arc::clone(lane));
        }
        self.agent = std::sync::Arc::new(agent);
        Ok(())
    }

    /// CPU seconds this VM's host processes (QEMU and its channel helper)
    /// have used since they started.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let helper =
            self.helper.as_ref().and_then(|h| ember_sys::procfs::cpu_seconds(h.pid())).unwrap_or(0.0);
        Some(ember_sys::procfs::cpu_seconds(self.qemu.pid())? + helper)
    }

    /// What reads this VM's live figures without holding the VM (its host
    /// processes and its disk file stay the same for the VM's life).
    pub fn usage_probe(&self) -> UsageProbe {
        UsageProbe {
            pids: std::iter::once(self.qemu.pid())
                .chain(self.helper.as_ref().map(OwnedProcess::pid))
                .collect(),
            disk: Some(self.disk.as_ref().map_or_else(|| self.scratch.clone(), |d| d.path().to_path_buf())),
        }
    }

    /// Wait until the guest's pre-warmed Python is ready (or the image has
    /// none), so that a snapshot or template taken next has it warm. Past
    /// `within` the VM is still used: its Python calls then start an
    /// interpreter each (logged).
    pub async fn wait_python_ready(&self, within: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + within;
        loop {
            let hello = self.agent.hello(u64::from(std::process::id())).await.map_err(agent_err(self))?;
            match hello.python_ready {
                None | Some(true) => return Ok(()),
                Some(false) if Instant::now() >= deadline => {
                    tracing::warn!(vm = %self.id, "the guest's python fork server is not ready after {within:?}");
                    return Ok(());
                }
                Some(false) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Make a freshly booted VM what its clean state should hold: the
    /// guest's pre-warmed Python ready, and the image's `warm` command run
    /// (it fills caches the way a first call would), before a snapshot or
    /// template is taken of it.
    pub async fn settle(&self, within: Duration) -> Result<(), VmError> {
        // An image's preloads (pandas, matplotlib) take tens of seconds to
        // import under TCG; a snapshot taken before they are in would make
        // every call of the image pay them.
        self.wait_python_ready(within.max(PRELOAD_PATIENCE)).await?;
        let Some(cmd) = self.host.config().warm.clone() else { return Ok(()) };
        let limit = within.max(Duration::from_secs(120));
        let mut req = ember_channel::shell(&cmd);
        req.timeout_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let started = Instant::now();
        let out = tokio::time::timeout(limit + Duration::from_secs(5), self.agent.run(req))
            .await
            .map_err(|_| {
                VmError::Tool(format!("VM {}: the image's warm command did not end in {limit:?}", self.id))
            })?
            .map_err(agent_err(self))?;
        if out.status.code != Some(0) {
            let tail = String::from_utf8_lossy(&out.stderr);
            let tail: String = tail.chars().rev().take(2000).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(VmError::Tool(format!(
                "VM {}: the image's warm command {cmd:?} failed ({:?}): {tail}",
                self.id, out.status
            )));
        }
        tracing::info!(vm = %self.id, took = ?started.elapsed(), "image warm command done");
        Ok(())
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.qemu.try_exit().is_none()
    }

    /// Stop the VM: QMP `quit`, then kill whatever is left; remove files.
    pub async fn shutdown(self) {
        let Vm { qmp, qemu, helper, dir, _cid, agent, disk, tap, .. } = self;
        drop(agent);
        let quit = async { qmp.lock().await.quit().await };
        let _ = tokio::time::timeout(Duration::from_secs(2), quit).await;
        qemu.stop(Duration::from_secs(2)).await;
        if let Some(h) = helper {
            h.stop(Duration::ZERO).await;
        }
        // QEMU is gone: nothing holds the disk any more.
        if let Some(d) = disk {
            d.release().await;
        }
        if let Some(t) = tap {
            t.remove().await;
        }
        drop(dir);
    }
}

/// The error an agent call returned, tagged with its VM.
pub fn agent_err(vm: &Vm) -> impl FnOnce(AgentError) -> VmError + '_ {
    move |source| VmError::Agent { vm: vm.id.clone(), source }
}

/// A VM's live figures as the host sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Usage {
    /// CPU time its host processes used since they started.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of its host processes (the guest's RAM it touched).
    pub memory_bytes: Option<u64>,
    /// Bytes its writable disk holds on the host (a sparse file's
    /// allocated blocks); `None` for a block device (a ZFS volume).
    pub disk_bytes: Option<u64>,
}

/// Reads a VM's [`Usage`] from `/proc` and its disk file.
#[derive(Debug, Clone, Default)]
pub struct UsageProbe {
    pids: Vec<u32>,
    disk: Option<std::path::PathBuf>,
}

impl UsageProbe {
    pub fn read(&self) -> Usage {
        let sum_f = |f: fn(u32) -> Option<f64>| self.pids.iter().map(|p| f(*p)).sum::<Option<f64>>();
        let rss = self.pids.iter().map(|p| ember_sys::procfs::rss_bytes(*p)).sum::<Option<u64>>();
        let disk = self.disk.as_deref().and_then(ember_sys::os::file_bytes);
        Usage { cpu_seconds: sum_f(ember_sys::procfs::cpu_seconds), memory_bytes: rss, disk_bytes: disk }
    }
}
