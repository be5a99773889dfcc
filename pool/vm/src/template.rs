//! Template restore (the idea behind Kata's VM templating): one VM is booted
//! with its RAM in a shared file and saved with `x-ignore-shared`, so the
//! saved state is only device state (tens of KiB) while RAM stays in the
//! file. A new VM maps that file privately (copy-on-write), gets its own
//! qcow2 overlay of the template's disk and loads the device state: it is
//! running in a fraction of a cold boot, and template pages are shared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::UnixStream;
use tokio::time::Instant;

use super::{BootFailure, DirGuard, Qmp, Vm, VmError, VmHost};
use ember_channel::ChannelKind;

/// How a VM starts.
#[derive(Debug, Clone, Copy)]
pub enum BootPlan<'a> {
    /// Boot the kernel.
    Cold,
    /// Boot the template itself (RAM in the template's shared file).
    Template(&'a Template),
    /// Start from a saved template.
    Restore(&'a Template),
    /// Resume a paused VM (its disk in place, its RAM from its state).
    Resume(&'a super::pause::Paused),
}

/// A saved template; its files are removed when it is dropped.
#[derive(Debug)]
pub struct Template {
    pub(super) mem: PathBuf,
    pub(super) disk: PathBuf,
    pub(super) state: PathBuf,
    _dir: DirGuard,
}

pub(super) const FD_NAME: &str = "ember-template";
pub(super) const POLL: Duration = Duration::from_millis(5);

impl VmHost {
    /// Boot a template VM and save it. Needs the (migratable) serial channel.
    pub async fn make_template(self: &Arc<Self>) -> Result<Template, VmError> {
        if self.channel() != ChannelKind::Serial {
            return Err(VmError::Config(vec![format!(
                "template restore needs the serial channel, not {}",
                self.channel()
            )]));
        }
        let id = format!("tmpl-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let dir =
            self.state().create_vm_dir(&id).map_err(super::io_err("creating the template directory"))?;
        let t = Template {
            mem: dir.join("mem"),
            disk: dir.join("disk.qcow2"),
            state: dir.join("state"),
            _dir: DirGuard(dir),
        };
        let accel = self.accel().await;
        let vm =
            Vm::boot(Arc::clone(self), accel, self.config().boot_timeout, BootPlan::Template(&t)).await?;
        let saved = match vm.settle(self.config().boot_timeout).await {
            Ok(()) => save(&vm, &t).await,
            Err(e) => Err(e),
        };
        vm.shutdown().await;
        saved?;
        Ok(t)
    }

    /// Start a VM from `template`.
    pub async fn restore(self: &Arc<Self>, template: &Template) -> Result<Vm, VmError> {
        let accel = self.accel().await;
        Vm::boot(Arc::clone(self), accel, self.config().boot_timeout, BootPlan::Restore(template)).await
    }
}

/// Pause the template and write its device state (RAM stays in the file).
async fn save(vm: &Vm, t: &Template) -> Result<(), VmError> {
    vm.migrate_to_file(&t.state, true, Duration::from_secs(60)).await
}

pub(super) async fn set_ignore_shared(qmp: &mut Qmp<UnixStream>, on: bool) -> Result<(), super::QmpError> {
    let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] });
    qmp.execute("migrate-set-capabilities", Some(caps)).await.map(|_| ())
}

/// Load the template's device state into a VM started with `-incoming defer`
/// and let it run.
pub(super) async fn incoming(
    qmp: &mut Qmp<UnixStream>,
    state: &std::path::Path,
    ignore_shared: bool,
    deadline: Instant,
) -> Result<(), BootFailure> {
    if ignore_shared {
        set_ignore_shared(qmp, true).await.map_err(BootFailure::Qmp)?;
    }
    let file = std::fs::File::open(state)
        .map_err(|e| BootFailure::Timeout(format!("cannot open the template state: {e}")))?;
    qmp.send_fd(FD_NAME, std::os::fd::AsFd::as_fd(&file)).await.map_err(BootFailure::Qmp)?;
    qmp.execute("migrate-incoming", Some(json!({ "uri": format!("fd:{FD_NAME}") })))
        .await
        .map_err(BootFailure::Qmp)?;
    loop {
        match qmp.status().await.map_err(BootFailure::Qmp)?.as_str() {
            "running" => return Ok(()),
            // Loaded but not started (autostart off): start it.
            "paused" | "postmigrate" => {
                qmp.execute("cont", None).await.map_err(BootFailure::Qmp)?;
            }
            "inmigrate" | "prelaunch" if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            other => {
                return Err(BootFailure::Timeout(format!("loading the saved state ended in state {other:?}")))
            }
        }
    }
}

/// The `configure` a restored VM needs: the clock set to now and the
/// random generator reseeded (both resume as they were saved).
pub(super) fn after_restore() -> ember_wire::Configure {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Two v4 UUIDs: 32 bytes from the host's own generator (getrandom).
    let entropy = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()].iter().flat_map(|u| *u.as_bytes()).collect();
    ember_wire::Configure { clock_unix_ms: Some(ms), entropy, ..Default::default() }
}
