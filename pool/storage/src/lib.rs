//! Where a VM's writable disk comes from and how it is rolled back.
//!
//! - `file` (default): a sparse raw copy of the clean scratch image in the
//!   VM's directory, rolled back in place (see [`file`]).
//! - `zfs`: a clone of `<parent>/base@golden` per VM, rolled back with
//!   `zfs rollback` to the clone's `@clean` snapshot (see [`zfs`]).
//!
//! A [`Disk`] owns what it was made of: releasing it (or dropping it, as a
//! last resort) removes the clone.
#![forbid(unsafe_code)]

pub mod file;
pub mod zfs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

#[cfg(any(test, feature = "test-util"))]
pub use ember_sys::FakeRunner;
pub use ember_sys::{command_line, CommandError, ProcessRunner, Runner};
pub use zfs::ZfsStorage;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A host tool (`zfs`, `qemu-img`) failed, timed out or could not start.
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

/// `[storage] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    File,
    Zfs,
}

/// `[storage.zfs] mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZfsMode {
    /// The disk is the clone's block device (kernel ZFS).
    Zvol,
    /// The disk is a raw image inside the cloned dataset (works on zfs-fuse).
    #[default]
    Dataset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZfsConfig {
    /// `<pool>/<dataset>`; nothing outside it is touched.
    pub parent: String,
    pub mode: ZfsMode,
}

/// Which backend holds VMs' writable disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StorageConfig {
    #[default]
    File,
    Zfs(ZfsConfig),
}

/// An opened storage backend.
#[derive(Debug)]
pub enum Storage {
    File,
    Zfs(Arc<ZfsStorage>),
}

/// A VM's writable disk.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    clone: Option<zfs::Clone>,
}

impl Disk {
    /// What QEMU opens (a raw image or a block device).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a clone in the storage backend (which a paused VM can
    /// [keep](Self::keep)), not a file in the VM's directory.
    pub fn is_clone(&self) -> bool {
        self.clone.is_some()
    }

    /// Keep the disk of a VM that is gone as the disk of the paused VM in
    /// `paused_dir`, without copying it (a ZFS clone becomes a fork).
    pub async fn keep(self, paused_dir: &Path) -> Result<zfs::Fork, StorageError> {
        match self.clone {
            Some(c) => c.keep(paused_dir).await,
            None => Err(StorageError::Setup("only a clone in the storage backend can be kept".into())),
        }
    }

    /// Remove what the disk was made of (a clone; a file goes with its
    /// VM directory).
    pub async fn release(self) {
        if let Some(c) = self.clone {
            c.destroy().await;
        }
    }
}

/// A blocking file operation, off the async threads; its error says `what`.
async fn blocking<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|error| StorageError::Io { what, error }),
        Err(e) => Err(StorageError::Setup(format!("{what}: the task failed: {e}"))),
    }
}

impl Storage {
    /// A fresh writable disk equal to `clean` (a file lives in `vm_dir`).
    pub async fn provision(&self, clean: &Path, vm_dir: &Path) -> Result<Disk, StorageError> {
        match self {
            Storage::File => {
                let path = vm_dir.join("scratch.raw");
                let (src, dst) = (clean.to_path_buf(), path.clone());
                blocking("copying the scratch image".into(), move || file::sparse_copy(&src, &dst)).await?;
                Ok(Disk { path, clone: None })
            }
            Storage::Zfs(z) => {
                let clone = ZfsStorage::clone_for_vm(z).await?;
                Ok(Disk { path: clone.disk_path().to_path_buf(), clone: Some(clone) })
            }
        }
    }

    /// Make `disk` equal to `clean` again; the guest must not have it mounted.
    pub async fn rollback(&self, clean: &Path, disk: &Disk) -> Result<(), StorageError> {
        match (self, &disk.clone) {
            (Storage::Zfs(z), Some(c)) => z.rollback(c.name()).await,
            (Storage::File, None) => {
                let (src, dst) = (clean.to_path_buf(), disk.path.clone());
                let what = format!("rolling back {}", disk.path.display());
                blocking(what, move || file::rollback_in_place(&src, &dst)).await.map(drop)
            }
            _ => Err(StorageError::Setup("the disk does not belong to this storage backend".into())),
        }
    }

    /// Destroy whatever this process made that is still there (clones of
    /// VMs that were not shut down). Called once at shutdown.
    pub async fn close(&self) {
        if let Storage::Zfs(z) = self {
            z.destroy_remaining().await;
        }
    }

    /// A copy-on-write fork of `disk` for the paused VM in `paused_dir`,
    /// where the backend makes them (a ZFS clone's disk); `None` where a
    /// copy must do.
    pub async fn fork(&self, disk: &Disk, paused_dir: &Path) -> Option<Result<zfs::Fork, StorageError>> {
        match (self, &disk.clone) {
            (Storage::Zfs(z), Some(c)) => Some(z.fork(c.name(), paused_dir).await),
            _ => None,
        }
    }

    fn zfs(&self, dataset: &str) -> Result<&Arc<ZfsStorage>, StorageError> {
        match self {
            Storage::Zfs(z) => Ok(z),
            Storage::File => Err(StorageError::Setup(format!(
                "the disk is ZFS dataset {dataset}, but this server's storage backend is `file`"
            ))),
        }
    }

    /// A fork of fork `dataset` (a paused VM's disk) for `paused_dir`.
    pub async fn fork_dataset(&self, dataset: &str, paused_dir: &Path) -> Result<zfs::Fork, StorageError> {
        self.zfs(dataset)?.fork(dataset, paused_dir).await
    }

    /// Where fork `dataset`'s disk is.
    pub async fn fork_disk(&self, dataset: &str) -> Result<PathBuf, StorageError> {
        self.zfs(dataset)?.fork_disk(dataset).await
    }

    /// Fork `dataset` as the disk of a VM now running on it (it goes with
    /// that VM).
    pub async fn adopt(&self, dataset: &str) -> Result<Disk, StorageError> {
        let clone = ZfsStorage::adopt(self.zfs(dataset)?, dataset).await?;
        Ok(Disk { path: clone.disk_path().to_path_buf(), clone: Some(clone) })
    }

    /// Destroy fork `dataset`, a paused VM's disk, when the paused VM goes.
    pub async fn discard(&self, dataset: &str) {
        match self.zfs(dataset) {
            Ok(z) => z.discard_fork(dataset).await,
            Err(e) => tracing::warn!(error = %e, "cannot discard a paused VM's disk"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Storage::File => "file",
            Storage::Zfs(_) => "zfs",
        }
    }
}
