//! One microVM: a QEMU `-M microvm` process, its QMP connection, its agent
//! channel and every file it needs. A `Vm` owns all of them; dropping it
//! (or a failed boot) kills the processes and removes the files.

mod accel;
mod argv;
mod config;
mod host;
mod process;
mod qmp;
mod state;
mod steps;
mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::time::Instant;

pub use crate::os::{find_program, processes_mentioning, wait_until};
pub use accel::Accel;
pub use argv::{kernel_cmdline, qemu_argv, vhost_vsock_argv, ChannelDevice, MemoryBacking, QemuArgs};
pub use config::{
    default_cache_dir, default_state_dir, AccelChoice, ImageSet, InitMode, ScratchKind, VmConfig,
};
pub use host::VmHost;
pub use process::OwnedProcess;
pub use qmp::{Qmp, QmpError};
pub use state::{ReapReport, StateDir};
pub use steps::{describe as describe_steps, Step, Steps};
pub use template::{BootPlan, Template};

use crate::channel::{self, AgentClient, AgentError, ChannelAddr, ChannelKind, CidLease};
use crate::storage::Disk;

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
    agent: AgentClient,
    agent_addr: ChannelAddr,
    qmp: tokio::sync::Mutex<Qmp<UnixStream>>,
    // Field order is drop order: processes die before their files go.
    qemu: OwnedProcess,
    helper: Option<OwnedProcess>,
    _cid: Option<CidLease>,
    /// The raw writable disk from the storage backend, if any.
    disk: Option<Disk>,
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
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.pid()
    }
    pub fn helper_pid(&self) -> Option<u32> {
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
        self.agent.hello(u64::from(std::process::id())).await.map_err(agent_err(self))?;
        steps.mark("attach");
        tracing::debug!(
            vm = %self.id,
            detach = ?(started - detach),
            rollback = ?took,
            attach = ?attach.elapsed(),
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
        self.agent = agent;
        Ok(())
    }

    /// CPU seconds this VM's host processes (QEMU and its channel helper)
    /// have used since they started.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let helper = self.helper.as_ref().and_then(|h| crate::procfs::cpu_seconds(h.pid())).unwrap_or(0.0);
        Some(crate::procfs::cpu_seconds(self.qemu.pid())? + helper)
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

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.qemu.try_exit().is_none()
    }

    /// Stop the VM: QMP `quit`, then kill whatever is left; remove files.
    pub async fn shutdown(self) {
        let Vm { qmp, qemu, helper, dir, _cid, agent, disk, .. } = self;
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
        drop(dir);
    }

    /// The agent channel's device, address and the memory backing it needs,
    /// with its helper process or CID recorded in `parts`.
    async fn prepare_channel(
        host: &Arc<VmHost>,
        dir: &Path,
        parts: &mut Parts,
        deadline: Instant,
    ) -> Result<(ChannelDevice, ChannelAddr, MemoryBacking), VmError> {
        let cfg = host.config();
        let timeout = deadline.saturating_duration_since(Instant::now());
        Ok(match host.channel() {
            ChannelKind::Serial => {
                let socket = dir.join("agent.sock");
                (
                    ChannelDevice::Serial { socket: socket.clone() },
                    ChannelAddr::Serial { socket },
                    MemoryBacking::Private,
                )
            }
            ChannelKind::HybridVsock => {
                // The helper parses guest-controlled queues: run it as the
                // QEMU user, in a directory of its own for its sockets.
                let user = host.qemu_ids();
                let sockets = dir.join("vhost");
                std::fs::create_dir(&sockets).map_err(io_err("creating the vhost socket directory"))?;
                if let Some((uid, gid)) = user {
                    std::os::unix::fs::chown(&sockets, Some(uid), Some(gid))
                        .map_err(io_err("handing the vhost socket directory to the QEMU user"))?;
                }
                let vhost_socket = sockets.join("vhost.sock");
                let uds = sockets.join("vsock.sock");
                let helper = OwnedProcess::spawn_as(
                    "vhost-device-vsock",
                    &cfg.vhost_device_vsock,
                    &vhost_vsock_argv(3, &vhost_socket, &uds),
                    &dir.join("vhost-device-vsock.log"),
                    user,
                )
                .map_err(io_err(format!("starting {}", cfg.vhost_device_vsock.display())))?;
                state::record_pid(dir, helper.pid()).map_err(io_err("recording a pid"))?;
                parts.helper = Some(helper);
                let ready =
                    wait_until(deadline, Duration::from_millis(2), || vhost_socket.exists().then_some(()))
                        .await;
                if ready.is_none() {
                    return Err(parts.timeout(timeout, "vhost-device-vsock did not create its socket"));
                }
                (
                    ChannelDevice::HybridVsock { vhost_socket },
                    ChannelAddr::HybridVsock { uds, port: ember_wire::AGENT_VSOCK_PORT },
                    MemoryBacking::SharedMemfd,
                )
            }
            ChannelKind::Vsock => {
                let lease = host.cids().allocate().map_err(io_err("allocating a vsock CID"))?;
                let cid = lease.cid();
                parts.cid = Some(lease);
                (
                    ChannelDevice::Vsock { cid },
                    ChannelAddr::Vsock { cid, port: ember_wire::AGENT_VSOCK_PORT },
                    MemoryBacking::Private,
                )
            }
        })
    }

    pub(crate) async fn boot(
        host: Arc<VmHost>,
        accel: Accel,
        timeout: Duration,
        plan: BootPlan<'_>,
    ) -> Result<Vm, VmError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let cfg = host.config();
        let id = format!("vm-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir = host.state().create_vm_dir(&id).map_err(io_err("creating the VM directory"))?;
        let mut parts =
            Parts { id: id.clone(), dir: DirGuard(dir.clone()), helper: None, cid: None, disk: None };
        let span =
            tracing::info_span!("vm_boot", vm_id = %id, channel = %host.channel(), accel = accel.name());
        let _enter = span.enter();

        // The writable disk (a raw disk from the storage backend, or a qcow2
        // overlay) is made while the channel is set up.
        let raw_copy = cfg.scratch == ScratchKind::RawCopy && matches!(plan, BootPlan::Cold);
        let disk_started = Instant::now();
        let make_disk = async {
            if raw_copy {
                let storage = host.open_storage().await?;
                let disk = storage
                    .provision(&cfg.images.scratch, &dir)
                    .await
                    .map_err(|e| VmError::Storage(format!("VM {id}: making its disk: {e}")))?;
                let path = disk.path().to_path_buf();
                return Ok((Some(disk), path, disk_started.elapsed()));
            }
            // A template keeps its disk and RAM in its own directory: they
            // outlive the template VM. A restored VM's disk is an overlay of
            // the template's.
            let (path, backing, backing_format) = match &plan {
                BootPlan::Template(t) => (t.disk.clone(), cfg.images.scratch.clone(), "raw"),
                BootPlan::Restore(t) => (dir.join("scratch.qcow2"), t.disk.clone(), "qcow2"),
                BootPlan::Cold => (dir.join("scratch.qcow2"), cfg.images.scratch.clone(), "raw"),
            };
            let qemu_img = cfg.qemu_img.to_string_lossy();
            host.runner()
                .run(&qemu_img, &argv::qemu_img_overlay_args(&backing, backing_format, &path))
                .await
                .map_err(|e| VmError::Tool(e.to_string()))?;
            Ok::<_, VmError>((None, path, disk_started.elapsed()))
        };
        let (disk, channel) =
            tokio::join!(make_disk, Self::prepare_channel(&host, &dir, &mut parts, deadline));
        let (disk, scratch, disk_took) = disk?;
        parts.disk = disk;
        let (device, addr, memory) = channel?;
        // QEMU may (re)open the disk after dropping to its user: on an
        // incoming migration it opens images only when the VM starts.
        if let Some((uid, gid)) = host.qemu_ids() {
            std::os::unix::fs::chown(&scratch, Some(uid), Some(gid))
                .map_err(io_err("handing the scratch disk to the QEMU user"))?;
        }

        let memory = match &plan {
            BootPlan::Cold => memory,
            BootPlan::Template(t) => MemoryBacking::File { path: t.mem.clone(), shared: true },
            BootPlan::Restore(t) => MemoryBacking::File { path: t.mem.clone(), shared: false },
        };
        let qmp_socket = dir.join("qmp.sock");
        let args = QemuArgs {
            name: id.clone(),
            accel,
            memory_mb: cfg.memory_mb,
            vcpus: cfg.vcpus,
            kernel: cfg.images.kernel.clone(),
            initrd: cfg.images.initrd.clone(),
            cmdline: kernel_cmdline(
                cfg.init_mode == InitMode::Full,
                if accel == Accel::Tcg { accel::host_tsc_khz() } else { None },
                cfg.user_namespaces,
            ),
            rootfs: cfg.images.rootfs.clone(),
            scratch_format: if raw_copy { "raw" } else { "qcow2" },
            scratch,
            console_log: dir.join("console.log"),
            qmp_socket: qmp_socket.clone(),
            channel: device,
            memory,
            isolated_nic: cfg.isolated_nic,
            run_as: cfg.qemu_user.clone(),
            incoming: matches!(plan, BootPlan::Restore(_)),
        };
        let mut qemu = OwnedProcess::spawn("qemu", &cfg.qemu, &qemu_argv(&args), &dir.join("qemu.log"))
            .map_err(io_err(format!("starting {}", cfg.qemu.display())))?;
        state::record_pid(&dir, qemu.pid()).map_err(io_err("recording a pid"))?;
        let prepare_ms = started.elapsed().as_millis() as u64;
        let qemu_started = Instant::now();

        let mut qmp = match connect_qmp(&qmp_socket, &mut qemu, deadline).await {
            Ok(q) => q,
            Err(e) => return Err(parts.fail(&mut qemu, timeout, e)),
        };
        if let BootPlan::Restore(t) = &plan {
            if let Err(e) = template::incoming(&mut qmp, t, deadline).await {
                return Err(parts.fail(&mut qemu, timeout, e));
            }
        }
        if host.channel() == ChannelKind::HybridVsock {
            // vhost-device-vsock 0.3.0 can wedge for good when CONNECTs reach
            // it before the guest's vsock driver is up: wait until the agent
            // says on the console that it listens.
            let console = dir.join("console.log");
            let said = wait_until(deadline, Duration::from_millis(5), || {
                std::fs::read_to_string(&console)
                    .ok()
                    .filter(|c| c.contains(ember_wire::VSOCK_READY_MARKER))
                    .map(|_| ())
            })
            .await;
            if said.is_none() {
                return Err(parts.fail(
                    &mut qemu,
                    timeout,
                    BootFailure::Timeout("the agent never listened on vsock".into()),
                ));
            }
        }
        let (agent, hello) = match connect_agent(&addr, host.channel(), &mut qemu, deadline).await {
            Ok(a) => a,
            Err(e) => return Err(parts.fail(&mut qemu, timeout, e)),
        };
        if let Err(e) = same_protocol(&hello) {
            return Err(VmError::Agent { vm: parts.id.clone(), source: e });
        }
        // A restored guest resumes with the template's clock, and a booted
        // one read a one-second RTC while booting slowly: set it precisely.
        if let Err(e) = agent.configure(template::after_restore()).await {
            return Err(VmError::Agent { vm: parts.id.clone(), source: e });
        }
        let timings = BootTimings {
            prepare_ms,
            disk_ms: disk_took.as_millis() as u64,
            boot_ms: qemu_started.elapsed().as_millis() as u64,
            guest_uptime_ms: hello.uptime_ms,
            total_ms: started.elapsed().as_millis() as u64,
        };
        tracing::info!(?timings, "VM ready");
        let Parts { id, dir, helper, cid, disk } = parts;
        Ok(Vm {
            id,
            channel: host.channel(),
            accel,
            timings,
            agent,
            agent_addr: addr,
            qmp: tokio::sync::Mutex::new(qmp),
            qemu,
            helper,
            _cid: cid,
            disk,
            dir,
            host,
        })
    }
}

/// Why a boot step failed before the VM existed.
enum BootFailure {
    Timeout(String),
    Exited(String),
    Qmp(QmpError),
}

impl Parts {
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (name, lines) in [("console.log", 25), ("qemu.log", 10), ("vhost-device-vsock.log", 10)] {
            let Ok(text) = std::fs::read_to_string(self.dir.0.join(name)) else { continue };
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            if !tail.is_empty() {
                out.push_str(&format!("--- last lines of {name} ---\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    fn timeout(&self, after: Duration, why: &str) -> VmError {
        VmError::BootTimeout {
            vm: self.id.clone(),
            after,
            diagnostics: format!("{why}\n{}", self.diagnostics()),
        }
    }

    /// A hung guest idles; a slow one burns CPU: say which.
    fn timeout_with_cpu(&self, qemu: &OwnedProcess, after: Duration, why: &str) -> VmError {
        let cpu = crate::procfs::cpu_seconds(qemu.pid())
            .map(|s| format!(" (QEMU used {s:.1} s of CPU)"))
            .unwrap_or_default();
        self.timeout(after, &format!("{why}{cpu}"))
    }

    fn fail(&self, qemu: &mut OwnedProcess, after: Duration, f: BootFailure) -> VmError {
        match f {
            BootFailure::Timeout(why) => self.timeout_with_cpu(qemu, after, &why),
            BootFailure::Exited(status) => {
                let _ = qemu.try_exit();
                VmError::Exited { vm: self.id.clone(), status, diagnostics: self.diagnostics() }
            }
            BootFailure::Qmp(source) => VmError::Qmp { vm: self.id.clone(), source },
        }
    }
}

/// Refuse an agent that speaks another protocol version than this host:
/// images built from other sources.
fn same_protocol(hello: &ember_wire::HelloReply) -> Result<(), AgentError> {
    if hello.protocol == ember_wire::PROTOCOL_VERSION {
        return Ok(());
    }
    Err(AgentError::Protocol(format!(
        "the guest agent speaks protocol {} (version {}), this host {}: the images are stale \
         (make images rebuilds them)",
        hello.protocol,
        hello.agent_version,
        ember_wire::PROTOCOL_VERSION
    )))
}

/// uid and gid of a user name.
pub(crate) fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("user {name:?} (vm.qemu_user) does not exist")),
        Err(e) => Err(format!("looking up user {name:?}: {e}")),
    }
}

fn exited(qemu: &mut OwnedProcess) -> Option<BootFailure> {
    qemu.try_exit().map(|st| BootFailure::Exited(st.to_string()))
}

async fn connect_qmp(
    path: &Path,
    qemu: &mut OwnedProcess,
    deadline: Instant,
) -> Result<Qmp<UnixStream>, BootFailure> {
    loop {
        if let Some(f) = exited(qemu) {
            return Err(f);
        }
        if let Ok(s) = UnixStream::connect(path).await {
            let remaining = deadline.saturating_duration_since(Instant::now());
            return match tokio::time::timeout(remaining, Qmp::handshake(s)).await {
                Ok(r) => r.map_err(BootFailure::Qmp),
                Err(_) => Err(BootFailure::Timeout("QMP handshake timed out".into())),
            };
        }
        if Instant::now() >= deadline {
            return Err(BootFailure::Timeout("QMP socket never appeared".into()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Connect to the agent and get its hello, retrying until the guest is up.
/// Over virtio-serial the connection succeeds at once and the hello waits in
/// QEMU until the agent opens its port; over vsock, connecting fails until
/// the agent listens.
async fn connect_agent(
    addr: &ChannelAddr,
    kind: ChannelKind,
    qemu: &mut OwnedProcess,
    deadline: Instant,
) -> Result<(AgentClient, ember_wire::HelloReply), BootFailure> {
    let retry = Duration::from_millis(10);
    let (mut attempts, mut connected, mut last_error) = (0u32, 0u32, String::from("none"));
    loop {
        if let Some(f) = exited(qemu) {
            return Err(f);
        }
        if Instant::now() >= deadline {
            return Err(BootFailure::Timeout(format!(
                "the agent never answered hello ({attempts} connection attempts, {connected} connected, \
                 last error: {last_error})"
            )));
        }
        attempts += 1;
        let patience = deadline.saturating_duration_since(Instant::now());
        let stream = match channel::connect(addr, patience).await {
            Ok(s) => s,
            Err(e) => {
                tracing::trace!(error = %e, "agent channel not up yet");
                last_error = e.to_string();
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        connected += 1;
        tracing::debug!("agent channel connected; sending hello");
        let client = AgentClient::new(stream);
        let nonce = u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or_default());
        let per_try = match kind {
            ChannelKind::Serial => deadline.saturating_duration_since(Instant::now()),
            _ => Duration::from_secs(2),
        };
        let try_deadline = Instant::now() + per_try;
        let reply = {
            let hello = client.hello(nonce);
            tokio::pin!(hello);
            // Watch QEMU while waiting, so a crash is reported at once.
            loop {
                tokio::select! {
                    r = &mut hello => break r.ok(),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        if let Some(f) = exited(qemu) {
                            return Err(f);
                        }
                        if Instant::now() >= try_deadline {
                            break None;
                        }
                    }
                }
            }
        };
        if let Some(h) = reply {
            return Ok((client, h));
        }
        tracing::debug!("no hello reply on this connection; reconnecting");
        last_error = "connected, but no hello reply".into();
        tokio::time::sleep(retry).await;
    }
}

/// Run a `sh -c` command with defaults, for tests and the CLI.
pub fn shell(cmd: &str) -> ember_wire::ExecRequest {
    ember_wire::ExecRequest::new(ember_wire::Command::Shell(cmd.into()))
}

/// The error an agent call returned, tagged with its VM.
pub fn agent_err(vm: &Vm) -> impl FnOnce(AgentError) -> VmError + '_ {
    move |source| VmError::Agent { vm: vm.id.clone(), source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_of_another_protocol_is_refused_with_a_hint() {
        let hello = |protocol| ember_wire::HelloReply {
            nonce: 1,
            protocol,
            agent_version: "0.0.9".into(),
            uptime_ms: 5,
            python_ready: None,
        };
        assert!(same_protocol(&hello(ember_wire::PROTOCOL_VERSION)).is_ok());
        let err = same_protocol(&hello(ember_wire::PROTOCOL_VERSION - 1)).unwrap_err().to_string();
        assert!(err.contains("stale") && err.contains("make images") && err.contains("0.0.9"), "{err}");
    }
}
