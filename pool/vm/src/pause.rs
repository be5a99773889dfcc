//! Pause and resume: a VM's whole state to disk and back. Pausing stops the
//! guest, saves its RAM and devices to a file (a migration to a file), keeps
//! its writable disk next to it and ends QEMU: a paused VM holds no process
//! and no RAM. Resuming starts a new QEMU on that disk and loads the state:
//! the guest's processes, open files and memory carry on; its clock is set
//! to now and its randomness reseeded, as after a template restore.
//!
//! The directory is the caller's (a session's). It holds `state` (RAM and
//! devices), `disk.qcow2` (the VM's writable layer) and, when the disk was
//! an overlay of a template's disk, `base.qcow2` (a copy of that layer, so
//! nothing outside the directory but the image's own clean scratch disk is
//! needed), and `paused.json` (this record), so a paused VM outlives the
//! process that paused it.
//!
//! A VM whose disk is a ZFS clone saves no `disk.qcow2`: paused, it keeps
//! that clone (renamed a fork); forked, it gets a copy-on-write clone of it
//! (`dataset` in the record), which the VM resumed on it then owns.
//! Whoever removes a paused VM's directory calls [`Paused::discard`] first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::argv::{self, MemoryBacking};
use super::{io_err, BootPlan, Vm, VmError, VmHost};
use ember_channel::ChannelKind;
use ember_storage::zfs::Fork;
use ember_storage::Disk;

/// How long writing or loading a paused VM's state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A paused VM, as recorded in its directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paused {
    /// RAM of the VM it resumes into (its RAM blocks must match).
    pub memory: SavedMemory,
    pub memory_mb: u32,
    /// What the disk's overlay is backed by: the image's clean scratch
    /// disk (raw), or `base.qcow2` here (qcow2).
    pub backing_format: String,
    pub paused_unix_ms: u64,
    /// Whether the VM had a bulk lane (its devices must match on resume).
    #[serde(default)]
    pub lane: bool,
    /// The disk, when it is a copy-on-write fork in the storage backend (a
    /// ZFS clone) instead of `disk.qcow2` here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<Fork>,
    #[serde(skip)]
    dir: PathBuf,
}

/// The RAM a VM had, without paths (a template's RAM file is not needed to
/// resume: the state holds every page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavedMemory {
    Private,
    Object,
    SharedMemfd,
}

impl SavedMemory {
    pub(super) fn of(m: &MemoryBacking) -> Self {
        match m {
            MemoryBacking::Private => SavedMemory::Private,
            MemoryBacking::SharedMemfd => SavedMemory::SharedMemfd,
            MemoryBacking::Ram | MemoryBacking::File { .. } => SavedMemory::Object,
        }
    }

    pub(super) fn backing(self) -> MemoryBacking {
        match self {
            SavedMemory::Private => MemoryBacking::Private,
            SavedMemory::SharedMemfd => MemoryBacking::SharedMemfd,
            SavedMemory::Object => MemoryBacking::Ram,
        }
    }
}

/// A paused VM's record in its directory.
const RECORD: &str = "paused.json";

/// Whether the paused VM recorded in `dir` has the storage backend's fork
/// `fork` as its disk: start-up's reaper keeps such a fork
/// ([`ember_storage::zfs::Survivors`]). Read as a typed [`Paused`]; a
/// record that is there but cannot be read keeps the fork too (a disk is
/// never destroyed on a guess; the session's own load reports the record).
pub(crate) fn keeps_fork(dir: &Path, fork: &str) -> bool {
    let text = match std::fs::read_to_string(dir.join(RECORD)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), %fork, error = %e, "cannot read a paused VM's record: its disk is kept");
            return true;
        }
    };
    match serde_json::from_str::<Paused>(&text) {
        Ok(p) => p.dataset.is_some_and(|d| d.name == fork),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), %fork, error = %e, "a paused VM's record does not parse: its disk is kept");
            true
        }
    }
}

impl Paused {
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub(super) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub(super) fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    /// The paused VM recorded in `dir` (after a restart).
    pub fn load(dir: &Path) -> Result<Self, VmError> {
        let text =
            std::fs::read_to_string(dir.join(RECORD)).map_err(io_err("reading a paused VM's record"))?;
        let mut p: Paused = serde_json::from_str(&text)
            .map_err(|e| VmError::Tool(format!("{}: not a paused VM's record: {e}", dir.display())))?;
        p.dir = dir.to_path_buf();
        let disk = p.dataset.as_ref().map_or_else(|| p.disk(), |d| d.disk.clone());
        for f in [p.state(), disk] {
            if !f.is_file() {
                return Err(VmError::Tool(format!(
                    "paused VM {}: {} is missing",
                    dir.display(),
                    f.display()
                )));
            }
        }
        Ok(p)
    }

    /// Bytes its files take on disk, with its disk in the storage backend
    /// (see [`paused_bytes`]).
    pub fn disk_bytes(&self) -> u64 {
        let kept = self.dataset.as_ref().and_then(|d| ember_sys::os::file_bytes(&d.disk));
        ember_sys::os::dir_bytes(&self.dir) + kept.unwrap_or(0)
    }

    /// Remove what this paused VM holds outside its directory (a forked
    /// disk); the directory is the caller's to remove.
    pub async fn discard(&self, host: &VmHost) {
        let Some(fork) = &self.dataset else { return };
        match host.open_storage().await {
            Ok(storage) => storage.discard(&fork.name).await,
            Err(e) => tracing::warn!(dataset = %fork.name, error = %e, "cannot discard a paused VM's disk"),
        }
    }
}

/// Bytes the paused VM in `dir` takes on disk: its files there and, when
/// its disk is a dataset (ZFS), that disk file's allocated blocks, as a
/// running VM's disk is counted (a volume is not counted).
pub fn paused_bytes(dir: &Path) -> u64 {
    let record = std::fs::read_to_string(dir.join(RECORD)).ok();
    match record.and_then(|t| serde_json::from_str::<Paused>(&t).ok()) {
        Some(p) => Paused { dir: dir.to_path_buf(), ..p }.disk_bytes(),
        None => ember_sys::os::dir_bytes(dir),
    }
}

impl Vm {
    /// Save this VM into `dir` (made if missing) and end it. On error the
    /// VM is gone too (it was stopped); `dir` is left for the caller.
    pub async fn pause(mut self, dir: &Path) -> Result<Paused, VmError> {
        let mut p = self.record_in(dir)?;
        let (backing, backing_format) = self.backing.clone();
        let host = Arc::clone(&self.host);
        // A clone in the storage backend (ZFS) is kept as it is; any other
        // disk is saved as `disk.qcow2` here.
        let keep_clone = self.disk.as_ref().is_some_and(Disk::is_clone);
        let saved = self.migrate_to_file(&p.state(), false, SAVE_TIMEOUT).await;
        // QEMU flushed and let go of the disk when the migration completed.
        let kept = match saved {
            Ok(()) if keep_clone => Ok(self.disk.take()),
            Ok(()) => self.save_disk(&p.disk(), false).await.map(|()| None),
            Err(e) => Err(e),
        };
        self.shutdown().await;
        if let Some(disk) = kept? {
            let fork = disk.keep(dir).await;
            p.dataset = Some(fork.map_err(|e| VmError::Storage(format!("keeping the disk: {e}")))?);
            p.backing_format = "raw".into();
            if let Err(e) = p.write() {
                p.discard(&host).await;
                return Err(e);
            }
            return Ok(p);
        }
        drop_internal_snapshots(&host, &p.disk()).await?;
        copy_base(&host, &p, &backing, backing_format).await?;
        p.write()?;
        Ok(p)
    }
}

/// Delete the internal snapshots of a saved disk (a pool's clean snapshot,
/// RAM included): the saved state file is what a resume loads, so they
/// would only double what a paused VM takes on disk. Their clusters are
/// discarded, so the file shrinks.
async fn drop_internal_snapshots(host: &VmHost, disk: &Path) -> Result<(), VmError> {
    let qemu_img = host.config().qemu_img.to_string_lossy().to_string();
    let run = |args: Vec<String>| {
        let qemu_img = qemu_img.clone();
        async move { host.runner().run(&qemu_img, &args).await.map_err(|e| VmError::Tool(e.to_string())) }
    };
    let disk_arg = disk.to_string_lossy().to_string();
    let info = run(vec!["info".into(), "--output=json".into(), disk_arg.clone()]).await?;
    for tag in snapshot_names(&info) {
        run(vec!["snapshot".into(), "-d".into(), tag, disk_arg.clone()]).await?;
    }
    Ok(())
}

/// The internal snapshots `qemu-img info --output=json` lists.
fn snapshot_names(info_json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(info_json).unwrap_or_default();
    v["snapshots"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

impl Vm {
    /// Save a copy of this VM into `dir` (as [`Vm::pause`] would) and let it
    /// run on: resumed, the copy is a second VM with the same memory,
    /// processes and files, and the two diverge from then on.
    pub async fn fork_into(&self, dir: &Path) -> Result<Paused, VmError> {
        let mut p = self.record_in(dir)?;
        let (backing, backing_format) = self.backing.clone();
        let storage = match &self.disk {
            Some(_) => Some(self.host.open_storage().await?),
            None => None,
        };
        // Stopped (QEMU flushes the disk as it stops), the disk is
        // consistent: fork or copy it while the RAM is being saved, not
        // after. A ZFS clone forks copy-on-write; anything else is copied.
        let stopped = self.qmp.lock().await.execute("stop", None).await;
        stopped.map_err(|source| VmError::Qmp { vm: self.id.clone(), source })?;
        let (state, disk) = (p.state(), p.disk());
        let fork_disk = async {
            if let (Some(storage), Some(d)) = (storage, &self.disk) {
                if let Some(forked) = storage.fork(d, dir).await {
                    return forked.map(Some).map_err(|e| VmError::Storage(format!("forking the disk: {e}")));
                }
            }
            self.save_disk(&disk, true).await.map(|()| None)
        };
        let started = Instant::now();
        let (saved, forked) = tokio::join!(self.migrate_to_file(&state, false, SAVE_TIMEOUT), fork_disk);
        let saved_ms = started.elapsed().as_millis() as u64;
        // The original runs on either way.
        let resumed = self.qmp.lock().await.execute("cont", None).await;
        if let Ok(fork) = &forked {
            p.dataset = fork.clone();
        }
        let finished = async {
            saved?;
            forked?;
            resumed.map_err(|source| VmError::Qmp { vm: self.id.clone(), source })?;
            if p.dataset.is_some() {
                p.backing_format = "raw".into();
            } else {
                drop_internal_snapshots(&self.host, &p.disk()).await?;
                copy_base(&self.host, &p, &backing, backing_format).await?;
            }
            p.write()
        };
        // A forked disk is nobody's until the record naming it is written.
        if let Err(e) = finished.await {
            p.discard(&self.host).await;
            return Err(e);
        }
        tracing::debug!(vm = %self.id, saved_ms, total_ms = started.elapsed().as_millis() as u64, "forked");
        Ok(p)
    }

    /// The record of this VM saved into `dir` (made if missing), once the
    /// checks a save needs pass.
    fn record_in(&self, dir: &Path) -> Result<Paused, VmError> {
        self.check_pausable()?;
        std::fs::create_dir_all(dir).map_err(io_err("making the saved VM's directory"))?;
        Ok(Paused {
            memory: SavedMemory::of(&self.memory),
            memory_mb: self.host.config().memory_mb,
            backing_format: self.backing.1.to_string(),
            paused_unix_ms: unix_ms(),
            lane: self.lane.is_some(),
            dataset: None,
            dir: dir.to_path_buf(),
        })
    }

    fn check_pausable(&self) -> Result<(), VmError> {
        if !matches!(self.channel, ChannelKind::Serial | ChannelKind::Vsock) {
            return Err(VmError::Config(vec![format!(
                "pausing needs a channel that survives a migration (serial or vsock), not {}",
                self.channel
            )]));
        }
        Ok(())
    }

    /// Save the stopped VM's writable disk as qcow2 file `to`: a qcow2
    /// overlay is moved there (or copied, to `keep` it); a raw disk from
    /// the storage backend (the file backend's raw copy) is converted, its
    /// holes left out, and resumes on an overlay.
    async fn save_disk(&self, to: &Path, keep: bool) -> Result<(), VmError> {
        if self.disk.is_some() {
            let qemu_img = self.host.config().qemu_img.to_string_lossy().to_string();
            return self
                .host
                .runner()
                .run(&qemu_img, &argv::qemu_img_raw_to_qcow2_args(&self.scratch, to))
                .await
                .map(drop)
                .map_err(|e| VmError::Tool(format!("saving the raw disk: {e}")));
        }
        if keep {
            let (from, to) = (self.scratch.clone(), to.to_path_buf());
            let copied = tokio::task::spawn_blocking(move || std::fs::copy(from, to).map(drop)).await;
            copied.map_err(std::io::Error::other).and_then(|r| r).map_err(io_err("copying the disk"))
        } else {
            std::fs::rename(&self.scratch, to).map_err(io_err("keeping the paused VM's disk"))
        }
    }
}

/// Point the saved disk at a copy of its backing layer in the paused VM's
/// directory when that layer is a template's (it may go).
async fn copy_base(host: &VmHost, p: &Paused, backing: &Path, backing_format: &str) -> Result<(), VmError> {
    let base = p.dir.join("base.qcow2");
    if backing_format != "qcow2" || backing == base {
        return Ok(());
    }
    std::fs::copy(backing, &base).map_err(io_err("copying the template's disk layer"))?;
    let qemu_img = host.config().qemu_img.to_string_lossy().to_string();
    host.runner()
        .run(&qemu_img, &argv::qemu_img_repoint_args(&p.disk(), &base, "qcow2"))
        .await
        .map(drop)
        .map_err(|e| VmError::Tool(e.to_string()))
}

impl Paused {
    fn write(&self) -> Result<(), VmError> {
        let record = serde_json::to_vec_pretty(self).map_err(|e| VmError::Tool(e.to_string()))?;
        std::fs::write(self.dir.join(RECORD), record).map_err(io_err("writing the paused VM's record"))
    }

    /// Copy this paused VM into `dir`: a second one, resumable on its own
    /// (a forked disk is forked again, copy-on-write).
    pub async fn copy_to(&self, host: &VmHost, dir: &Path) -> Result<Paused, VmError> {
        std::fs::create_dir_all(dir).map_err(io_err("making the copy's directory"))?;
        let mut p = self.clone();
        p.dir = dir.to_path_buf();
        std::fs::copy(self.state(), p.state()).map_err(io_err("copying a paused VM"))?;
        if let Some(fork) = &self.dataset {
            let storage = host.open_storage().await?;
            let forked = storage.fork_dataset(&fork.name, dir).await;
            p.dataset = Some(forked.map_err(|e| VmError::Storage(format!("forking the disk: {e}")))?);
        } else {
            std::fs::copy(self.disk(), p.disk()).map_err(io_err("copying a paused VM"))?;
            if self.backing_format == "qcow2" {
                copy_base(host, &p, &self.dir.join("base.qcow2"), "qcow2").await?;
            }
        }
        if let Err(e) = p.write() {
            p.discard(host).await;
            return Err(e);
        }
        Ok(p)
    }
}

impl VmHost {
    /// Remove directory `dir` and the paused VM in it, if any: what its
    /// record names outside it (a forked disk) first. Never fails: what
    /// cannot go is logged (and a fork left is reaped at the next start).
    pub async fn remove_paused(&self, dir: &Path) {
        let record = std::fs::read_to_string(dir.join(RECORD))
            .ok()
            .and_then(|t| serde_json::from_str::<Paused>(&t).ok());
        if let Some(mut p) = record {
            p.dir = dir.to_path_buf();
            p.discard(self).await;
        }
        if let Err(e) = tokio::fs::remove_dir_all(dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a paused VM's directory");
            }
        }
    }

    /// Start the VM `paused` holds. Its directory keeps the disk, which the
    /// new VM uses in place; pausing it again saves over the state.
    pub async fn resume(self: &Arc<Self>, paused: &Paused) -> Result<Vm, VmError> {
        if paused.memory_mb != self.config().memory_mb {
            return Err(VmError::Config(vec![format!(
                "the paused VM has {} MiB of RAM, this host's VMs {} MiB",
                paused.memory_mb,
                self.config().memory_mb
            )]));
        }
        let accel = self.accel().await;
        let started = Instant::now();
        let vm =
            Vm::boot(Arc::clone(self), accel, self.config().boot_timeout, BootPlan::Resume(paused)).await?;
        tracing::info!(vm = %vm.id(), took_ms = started.elapsed().as_millis() as u64, "VM resumed");
        Ok(vm)
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_kinds_resume_as_the_same_ram_blocks() {
        assert_eq!(SavedMemory::of(&MemoryBacking::Private).backing(), MemoryBacking::Private);
        assert_eq!(SavedMemory::of(&MemoryBacking::SharedMemfd).backing(), MemoryBacking::SharedMemfd);
        let file = MemoryBacking::File { path: "/t/mem".into(), shared: false };
        assert_eq!(SavedMemory::of(&file).backing(), MemoryBacking::Ram, "the id `mem`, no file");
    }

    #[test]
    fn snapshot_names_are_read_from_qemu_img_info() {
        let info =
            r#"{"format": "qcow2", "snapshots": [{"id": "1", "name": "ember-clean", "vm-state-size": 9}]}"#;
        assert_eq!(snapshot_names(info), ["ember-clean"]);
        assert!(snapshot_names(r#"{"format": "qcow2"}"#).is_empty());
        assert!(snapshot_names("not json").is_empty());
    }

    #[test]
    fn a_record_round_trips_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = Paused {
            memory: SavedMemory::Object,
            memory_mb: 256,
            backing_format: "qcow2".into(),
            paused_unix_ms: 1,
            lane: true,
            dataset: None,
            dir: dir.path().to_path_buf(),
        };
        std::fs::write(dir.path().join(RECORD), serde_json::to_vec(&p).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let err = Paused::load(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("state is missing"), "{err}");
        for f in ["state", "disk.qcow2"] {
            std::fs::write(dir.path().join(f), b"x").unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(Paused::load(dir.path()).ok(), Some(p.clone()));
        let files = paused_bytes(dir.path());
        // A disk kept in the storage backend is counted with the files.
        let kept = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let disk = kept.path().join("disk.raw");
        std::fs::write(&disk, vec![1u8; 64 * 1024]).unwrap_or_else(|e| panic!("{e}"));
        let with = Paused { dataset: Some(Fork { name: "tank/ember/fork-a".into(), disk }), ..p };
        std::fs::write(dir.path().join(RECORD), serde_json::to_vec(&with).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(paused_bytes(dir.path()) >= files + 64 * 1024, "{} vs {files}", paused_bytes(dir.path()));
        std::fs::write(dir.path().join(RECORD), b"{").unwrap_or_else(|e| panic!("{e}"));
        assert!(Paused::load(dir.path()).is_err());
        // A record from before lanes resumes its VM without one.
        let old = r#"{"memory":"object","memory_mb":256,"backing_format":"raw","paused_unix_ms":1}"#;
        std::fs::write(dir.path().join(RECORD), old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Paused::load(dir.path()).map(|p| p.lane).ok(), Some(false));
    }

    /// A paused VM's record, written as pausing writes it, keeps its fork
    /// through a restart's reaping (a real `ZfsStorage::open` over a fake
    /// `zfs`); a fork no record names goes. Renaming a field of `Paused`
    /// cannot silently turn its disk into an orphan: the reaper reads the
    /// same type.
    #[tokio::test]
    async fn a_paused_vms_fork_survives_a_restart() {
        use ember_storage::zfs::Survivors;
        use ember_storage::{ZfsConfig, ZfsMode, ZfsStorage};
        use ember_sys::{FakeRunner, Runner};
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (paused_dir, unreadable, empty) =
            (tmp.path().join("s1"), tmp.path().join("s2"), tmp.path().join("s3"));
        for d in [&paused_dir, &unreadable, &empty] {
            std::fs::create_dir(d).unwrap_or_else(|e| panic!("{e}"));
        }
        let p = Paused {
            memory: SavedMemory::Object,
            memory_mb: 256,
            backing_format: "raw".into(),
            paused_unix_ms: 1,
            lane: false,
            dataset: Some(Fork { name: "tank/ember/fork-a".into(), disk: "/x/disk.raw".into() }),
            dir: paused_dir.clone(),
        };
        p.write().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(unreadable.join(RECORD), b"{\"memory\": 7").unwrap_or_else(|e| panic!("{e}"));
        let clean = tmp.path().join("scratch.ext4");
        std::fs::write(&clean, b"clean").unwrap_or_else(|e| panic!("{e}"));
        let runner = Arc::new(FakeRunner::default());
        let id = ember_storage::zfs::image_id(&clean).unwrap_or_default();
        runner
            .ok("zfs list -H -o type tank/ember", "filesystem\n")
            .ok("zfs get -H -o value mountpoint tank/ember", &format!("{}\n", tmp.path().display()))
            .ok(
                "zfs list -H -o name,ember:owner",
                &format!(
                    "tank/ember\t-\t-\n\
                     tank/ember/fork-a\t-\t{a}\n\
                     tank/ember/fork-b\t-\t{a}\n\
                     tank/ember/fork-c\t-\t{b}\n\
                     tank/ember/fork-d\t-\t{c}\n",
                    a = paused_dir.display(),
                    b = unreadable.display(),
                    c = empty.display()
                ),
            )
            .ok("zfs get -H -o value ember:image tank/ember/base", &format!("{id}\n"))
            .ok("zfs list -H -o name -t snapshot", "tank/ember/base@golden\n");
        let dyn_runner: Arc<dyn Runner> = runner.clone();
        let cfg = ZfsConfig { parent: "tank/ember".into(), mode: ZfsMode::Dataset };
        let survivors = Survivors { owner_alive: &|_| false, paused_keeps: &keeps_fork };
        ZfsStorage::open(dyn_runner, &cfg, "default", &clean, "me".into(), None, survivors)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let destroyed: Vec<String> =
            runner.calls().into_iter().filter(|c| c.starts_with("zfs destroy")).collect();
        assert_eq!(destroyed, ["zfs destroy -r tank/ember/fork-b", "zfs destroy -r tank/ember/fork-d"]);
    }
}
