//! Booting a VM: its directory, disk and channel prepared in parallel,
//! QEMU started, QMP and then the agent connected, every failure reported
//! with the console's last lines. The `Vm` type itself is in `vm.rs`.

use super::*;

impl Vm {
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
                state_dir::record_pid(dir, helper.pid()).map_err(io_err("recording a pid"))?;
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
                return Ok((Some(disk), path, (cfg.images.scratch.clone(), "raw"), disk_started.elapsed()));
            }
            // A template keeps its disk and RAM in its own directory: they
            // outlive the template VM. A restored VM's disk is an overlay of
            // the template's.
            let (path, backing, backing_format) = match &plan {
                BootPlan::Template(t) => (t.disk.clone(), cfg.images.scratch.clone(), "raw"),
                BootPlan::Restore(t) => (dir.join("scratch.qcow2"), t.disk.clone(), "qcow2"),
                BootPlan::Cold => (dir.join("scratch.qcow2"), cfg.images.scratch.clone(), "raw"),
                // A paused VM's disk is used in place: a dataset of its own
                // in the storage backend (raw), or `disk.qcow2` beside it.
                BootPlan::Resume(Paused { dataset: Some(kept), .. }) => {
                    let storage = host.open_storage().await?;
                    let path = storage
                        .fork_disk(&kept.name)
                        .await
                        .map_err(|e| VmError::Storage(format!("VM {id}: finding its disk: {e}")))?;
                    return Ok((None, path, (cfg.images.scratch.clone(), "raw"), disk_started.elapsed()));
                }
                BootPlan::Resume(p) if p.backing_format == "qcow2" => {
                    return Ok((
                        None,
                        p.disk(),
                        (p.dir().join("base.qcow2"), "qcow2"),
                        disk_started.elapsed(),
                    ));
                }
                BootPlan::Resume(p) => {
                    return Ok((None, p.disk(), (cfg.images.scratch.clone(), "raw"), disk_started.elapsed()));
                }
            };
            let qemu_img = cfg.qemu_img.to_string_lossy();
            host.runner()
                .run(&qemu_img, &argv::qemu_img_overlay_args(&backing, backing_format, &path))
                .await
                .map_err(|e| VmError::Tool(e.to_string()))?;
            Ok::<_, VmError>((None, path, (backing, backing_format), disk_started.elapsed()))
        };
        // With networking, a TAP of its own in Ember's namespace.
        let make_tap = async {
            match host.network() {
                Some(net) => {
                    net.add_owned_tap().await.map(Some).map_err(|e| VmError::Tool(format!("VM {id}: {e}")))
                }
                None => Ok(None),
            }
        };
        let (disk, channel, tap) =
            tokio::join!(make_disk, Self::prepare_channel(&host, &dir, &mut parts, deadline), make_tap);
        let tap = tap?;
        let (disk, scratch, backing, disk_took) = disk?;
        parts.disk = disk;
        let (device, addr, memory) = channel?;
        // The bulk lane (a VM paused before lanes existed resumes without).
        let lane = match &plan {
            BootPlan::Resume(p) if !p.lane => None,
            _ => Some(BulkLane::create(&dir.join("lane.raw")).map_err(io_err("making the bulk lane"))?),
        };
        // QEMU may (re)open its disks after dropping to its user: on an
        // incoming migration it opens images only when the VM starts.
        if let Some((uid, gid)) = host.qemu_ids() {
            for disk in std::iter::once(scratch.as_path()).chain(lane.as_ref().map(|l| l.path())) {
                std::os::unix::fs::chown(disk, Some(uid), Some(gid))
                    .map_err(io_err(format!("handing {} to the QEMU user", disk.display())))?;
            }
        }

        let resumed_fork = match &plan {
            BootPlan::Resume(p) => p.dataset.as_ref().map(|d| d.name.clone()),
            _ => None,
        };
        let memory = match &plan {
            BootPlan::Cold => memory,
            BootPlan::Template(t) => MemoryBacking::File { path: t.mem.clone(), shared: true },
            BootPlan::Restore(t) => MemoryBacking::File { path: t.mem.clone(), shared: false },
            BootPlan::Resume(p) => p.memory.backing(),
        };
        let memory_kind = memory.clone();
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
            scratch_format: if raw_copy || resumed_fork.is_some() { "raw" } else { "qcow2" },
            scratch: scratch.clone(),
            lane: lane.as_ref().map(|l| l.path().to_path_buf()),
            console_log: dir.join("console.log"),
            qmp_socket: qmp_socket.clone(),
            channel: device,
            memory,
            isolated_nic: cfg.isolated_nic,
            tap: tap.as_ref().map(|t| t.tap().name().to_string()),
            run_as: cfg.qemu_user.clone(),
            incoming: matches!(plan, BootPlan::Restore(_) | BootPlan::Resume(_)),
        };
        // With a TAP, QEMU runs in Ember's namespace, where the TAP is.
        let ns = tap.as_ref().map(|t| t.network().namespace().to_string());
        let (program, argv) = argv::in_namespace(ns.as_deref(), &cfg.qemu, qemu_argv(&args));
        let mut qemu = OwnedProcess::spawn("qemu", &program, &argv, &dir.join("qemu.log"))
            .map_err(io_err(format!("starting {}", cfg.qemu.display())))?;
        state_dir::record_pid(&dir, qemu.pid()).map_err(io_err("recording a pid"))?;
        let prepare_ms = started.elapsed().as_millis() as u64;
        let qemu_started = Instant::now();

        let mut qmp = match connect_qmp(&qmp_socket, &mut qemu, deadline).await {
            Ok(q) => q,
            Err(e) => return Err(parts.fail(&mut qemu, timeout, e)),
        };
        let incoming = match &plan {
            BootPlan::Restore(t) => Some((t.state.clone(), true)),
            BootPlan::Resume(p) => Some((p.state(), false)),
            BootPlan::Cold | BootPlan::Template(_) => None,
        };
        if let Some((state, ignore_shared)) = incoming {
            if let Err(e) = template::incoming(&mut qmp, &state, ignore_shared, deadline).await {
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
        if let Some(lane) = &lane {
            agent.attach_lane(Arc::clone(lane));
        }
        // A restored guest resumes with the template's clock, and a booted
        // one read a one-second RTC while booting slowly: set it precisely.
        if let Err(e) = agent.configure(template::after_restore()).await {
            return Err(VmError::Agent { vm: parts.id.clone(), source: e });
        }
        // A VM running on a fork owns it from now on (until then, a failed
        // resume left it to the paused VM).
        if let Some(name) = &resumed_fork {
            match host.open_storage().await?.adopt(name).await {
                Ok(disk) => parts.disk = Some(disk),
                Err(e) => return Err(VmError::Storage(format!("VM {}: owning its disk: {e}", parts.id))),
            }
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
            tap,
            channel: host.channel(),
            accel,
            timings,
            agent: std::sync::Arc::new(agent),
            agent_addr: addr,
            qmp: tokio::sync::Mutex::new(qmp),
            qemu,
            helper,
            _cid: cid,
            disk,
            lane,
            scratch,
            backing,
            memory: memory_kind,
            dir,
            host,
        })
    }
}

/// Why a boot step failed before the VM existed.
pub(super) enum BootFailure {
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
        let cpu = ember_sys::procfs::cpu_seconds(qemu.pid())
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
            // QMP broke because QEMU died: say why, from its logs.
            BootFailure::Qmp(source) => match exited_soon(qemu) {
                Some(status) => VmError::Exited {
                    vm: self.id.clone(),
                    status: format!("{status} (QMP: {source})"),
                    diagnostics: self.diagnostics(),
                },
                _ => VmError::Qmp { vm: self.id.clone(), source },
            },
        }
    }
}

/// QEMU's exit status if it exits within a moment (a broken QMP
/// connection is usually QEMU dying; its status and logs say why).
fn exited_soon(qemu: &mut OwnedProcess) -> Option<std::process::ExitStatus> {
    for _ in 0..10 {
        if let Some(st) = qemu.try_exit() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Refuse an agent that speaks another protocol version than this host:
/// images built from other sources.
pub(super) fn same_protocol(hello: &ember_wire::HelloReply) -> Result<(), AgentError> {
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

pub(super) fn exited(qemu: &mut OwnedProcess) -> Option<BootFailure> {
    qemu.try_exit().map(|st| BootFailure::Exited(st.to_string()))
}

pub(super) async fn connect_qmp(
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
pub(super) async fn connect_agent(
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
