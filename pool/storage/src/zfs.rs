//! The ZFS backend. Under `parent`:
//!
//! - `base` (`base-<image>` for an image other than the default one) holds
//!   the clean writable image (`disk.raw` in dataset mode, the volume itself
//!   in zvol mode), tagged `ember:image=<id of the image>`, and `@golden` of
//!   it is what that image's VMs are cloned from. A stale base is rebuilt.
//! - Each VM gets `warm-<uuid>`, a clone tagged `ember:owner=<owner>` (the
//!   owning process, as in the state directory), plus `warm-<uuid>@clean`,
//!   what `zfs rollback` returns it to. It is never renamed.
//! - A fork of a VM's disk is `fork-<id>`, a clone of `<its dataset>@fork-<id>`
//!   (copy-on-write: it costs a snapshot and a clone, whatever the disk
//!   holds), tagged `ember:paused=<directory>` (the paused VM's, whose
//!   `paused.json` names it). A VM resumed on it tags it `ember:owner` and
//!   owns it from then on, as a VM owns its `warm-*` clone.
//! - A paused VM keeps its VM's clone the same way: `warm-<uuid>` is
//!   renamed `fork-<id>` and tagged, nothing copied (a VM running on a fork
//!   keeps its name).
//! - A dataset with forks is destroyed by promoting them first: each takes
//!   the snapshots it was cloned from and lives on. A fork's own origin
//!   snapshot goes with it.
//! - Start-up destroys `warm-*` and `fork-*` clones whose owner is gone, and
//!   unowned `fork-*` clones no paused VM keeps: the VM layer, which owns
//!   the paused VMs' records, says which ([`Survivors`]); this module never
//!   reads them. Nothing outside `parent` is ever named in a command.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{CommandError, Runner, StorageError, ZfsConfig, ZfsMode};

const ZFS: &str = "zfs";
/// How long a "dataset is busy" destroy (or rename) is retried: zfs-fuse
/// calls a dataset busy for a moment after the last process closed its
/// file (HOST-FACTS).
const DESTROY_PATIENCE: Duration = Duration::from_secs(10);
/// How long a new zvol's device node may take to appear.
const ZVOL_NODE_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct ZfsStorage {
    runner: Arc<dyn Runner>,
    parent: String,
    mode: ZfsMode,
    /// Tag of this process's clones.
    owner: String,
    /// Where `parent` is mounted (dataset mode).
    parent_mount: PathBuf,
    /// The base dataset's name under `parent`.
    base_name: String,
    /// Clones made and not yet destroyed.
    live: Mutex<BTreeSet<String>>,
}

/// What start-up must leave alone, as the layers that own them say: a
/// clone whose owning process is alive, and a fork the paused VM in the
/// directory it is tagged with still has as its disk.
pub struct Survivors<'a> {
    pub owner_alive: &'a (dyn Fn(&str) -> bool + Send + Sync),
    /// (the fork's `ember:paused` directory, the fork's dataset name).
    pub paused_keeps: &'a (dyn Fn(&Path, &str) -> bool + Send + Sync),
}

impl std::fmt::Debug for Survivors<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Survivors")
    }
}

impl Survivors<'static> {
    /// Nothing survives but what `owner_alive` says (no paused VMs).
    pub fn owners_only(owner_alive: &'static (dyn Fn(&str) -> bool + Send + Sync)) -> Self {
        Self { owner_alive, paused_keeps: &|_, _| false }
    }
}

/// One VM's clone. Destroyed by [`Clone::destroy`], or on drop as a last
/// resort.
#[derive(Debug)]
pub struct Clone {
    storage: Arc<ZfsStorage>,
    name: String,
    disk: PathBuf,
    destroyed: bool,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Is `name` a valid dataset path to put under our control?
fn check_parent(parent: &str) -> Result<(), String> {
    let ok = !parent.is_empty()
        && !parent.starts_with('/')
        && !parent.ends_with('/')
        && !parent.contains("//")
        && parent.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("storage.zfs.parent {parent:?} is not a dataset name like \"tank/ember\""))
    }
}

/// The base dataset of `image` under the parent: each image's VMs are
/// cloned from its own (the default image's keeps the name it always had).
pub fn base_dataset(image: &str) -> String {
    if image == ember_image::DEFAULT_IMAGE {
        "base".into()
    } else {
        format!("base-{image}")
    }
}

/// What identifies the clean image a base was made from.
pub fn image_id(clean: &Path) -> Result<String, StorageError> {
    let io = |error| StorageError::Io { what: format!("reading {}", clean.display()), error };
    let canonical = clean.canonicalize().map_err(io)?;
    let meta = canonical.metadata().map_err(io)?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    Ok(format!("{}:{}:{}", canonical.display(), meta.len(), mtime.map_or(0, |d| d.as_secs())))
}

impl ZfsStorage {
    /// Check `parent`, destroy dead owners' clones, and make sure
    /// `base@golden` holds `clean` (rebuilding a stale base).
    pub async fn open(
        runner: Arc<dyn Runner>,
        cfg: &ZfsConfig,
        image: &str,
        clean: &Path,
        owner: String,
        file_owner: Option<(u32, u32)>,
        survivors: Survivors<'_>,
    ) -> Result<Self, StorageError> {
        check_parent(&cfg.parent).map_err(StorageError::Setup)?;
        let parent = cfg.parent.clone();
        let kind = runner
            .run(ZFS, &args(&["list", "-H", "-o", "type", &parent]))
            .await
            .map_err(|e| StorageError::Setup(format!("storage.zfs.parent {parent:?} is not usable: {e}")))?;
        if kind.trim() != "filesystem" {
            return Err(StorageError::Setup(format!(
                "storage.zfs.parent {parent:?} is a {}, not a filesystem",
                kind.trim()
            )));
        }
        let parent_mount = PathBuf::from(
            runner.run(ZFS, &args(&["get", "-H", "-o", "value", "mountpoint", &parent])).await?.trim(),
        );
        let base_name = base_dataset(image);
        let me = Self {
            runner,
            parent,
            mode: cfg.mode,
            owner,
            parent_mount,
            base_name,
            live: Mutex::new(BTreeSet::new()),
        };
        me.reap_orphans(&survivors).await?;
        me.ensure_base(clean, file_owner).await?;
        Ok(me)
    }

    async fn zfs(&self, list: &[&str]) -> Result<String, StorageError> {
        Ok(self.runner.run(ZFS, &args(list)).await?)
    }

    /// [`Self::zfs`], retried while the dataset is busy (for at most
    /// [`DESTROY_PATIENCE`]).
    async fn zfs_when_free(&self, list: &[&str]) -> Result<String, StorageError> {
        let deadline = tokio::time::Instant::now() + DESTROY_PATIENCE;
        loop {
            match self.zfs(list).await {
                Err(StorageError::Command(CommandError::Failed { ref stderr, .. }))
                    if stderr.contains("busy") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    }

    fn base(&self) -> String {
        format!("{}/{}", self.parent, self.base_name)
    }

    fn golden(&self) -> String {
        format!("{}@golden", self.base())
    }

    /// Destroy `warm-*` and `fork-*` children of `parent` whose owner is not
    /// alive, and unowned forks no paused VM keeps.
    async fn reap_orphans(&self, survivors: &Survivors<'_>) -> Result<usize, StorageError> {
        let mut reaped = 0;
        for row in self.children("name,ember:owner,ember:paused").await? {
            let col = |i: usize| row.get(i).map_or("-", String::as_str);
            let (name, owner, paused) = (col(0), col(1), col(2));
            let Some(kind) = self.kind_of(name) else { continue };
            if owner != "-" && (survivors.owner_alive)(owner) {
                continue;
            }
            let tagged = paused.starts_with('/').then(|| Path::new(paused));
            if kind == Kind::Fork && owner == "-" && tagged.is_some_and(|d| (survivors.paused_keeps)(d, name))
            {
                continue;
            }
            tracing::info!(clone = name, owner, "destroying a clone its owner left behind");
            self.destroy_dataset(name).await?;
            reaped += 1;
        }
        Ok(reaped)
    }

    /// The file systems and volumes directly under the parent (the parent
    /// too), each as its `columns` (`zfs list -o`).
    async fn children(&self, columns: &str) -> Result<Vec<Vec<String>>, StorageError> {
        let list = self
            .zfs(&["list", "-H", "-o", columns, "-t", "filesystem,volume", "-r", "-d", "1", &self.parent])
            .await?;
        Ok(list.lines().map(|l| l.split('\t').map(String::from).collect()).collect())
    }

    /// Whether `name` is a VM's clone or a fork directly under the parent.
    fn kind_of(&self, name: &str) -> Option<Kind> {
        let leaf = name.strip_prefix(&self.parent)?.strip_prefix('/')?;
        if leaf.contains('/') || leaf.contains('@') {
            return None;
        }
        if leaf.starts_with("warm-") {
            Some(Kind::Warm)
        } else if leaf.starts_with("fork-") {
            Some(Kind::Fork)
        } else {
            None
        }
    }

    /// Where a clone's disk is: a file in it (dataset mode) or its volume.
    async fn disk_of(&self, name: &str) -> Result<PathBuf, StorageError> {
        match self.mode {
            ZfsMode::Dataset => {
                let leaf = name.rsplit('/').next().unwrap_or_default();
                Ok(self.parent_mount.join(leaf).join("disk.raw"))
            }
            ZfsMode::Zvol => wait_for_node(&zvol_node(name)).await,
        }
    }

    async fn ensure_base(&self, clean: &Path, file_owner: Option<(u32, u32)>) -> Result<(), StorageError> {
        let id = image_id(clean)?;
        let base = self.base();
        match self.zfs(&["get", "-H", "-o", "value", "ember:image", &base]).await {
            Ok(v) if v.trim() == id => {
                let snaps =
                    self.zfs(&["list", "-H", "-o", "name", "-t", "snapshot", "-r", "-d", "1", &base]).await?;
                if !snaps.lines().any(|l| l.trim() == self.golden()) {
                    self.zfs(&["snapshot", &self.golden()]).await?;
                }
                return Ok(());
            }
            Ok(_) => {
                tracing::info!(base, "the base holds another image; rebuilding it");
                // Paused forks cloned from it are promoted and live on.
                self.destroy_dataset(&base).await.map_err(|e| {
                    StorageError::Setup(format!("cannot replace the stale {base} (clones of live VMs?): {e}"))
                })?;
            }
            Err(_) => {} // no base yet
        }
        match self.mode {
            ZfsMode::Dataset => {
                self.zfs(&["create", &base]).await?;
                let mount =
                    PathBuf::from(self.zfs(&["get", "-H", "-o", "value", "mountpoint", &base]).await?.trim());
                let disk = mount.join("disk.raw");
                copy_image(clean, &disk, true).await?;
                if let Some((uid, gid)) = file_owner {
                    std::os::unix::fs::chown(&disk, Some(uid), Some(gid)).map_err(|error| {
                        StorageError::Io { what: format!("chown {}", disk.display()), error }
                    })?;
                }
            }
            ZfsMode::Zvol => {
                let size = clean
                    .metadata()
                    .map_err(|error| StorageError::Io {
                        what: format!("reading {}", clean.display()),
                        error,
                    })?
                    .len();
                self.zfs(&["create", "-s", "-V", &size.to_string(), &base]).await?;
                let node = wait_for_node(&zvol_node(&base)).await?;
                copy_image(clean, &node, false).await?;
            }
        }
        self.zfs(&["set", &format!("ember:image={id}"), &base]).await?;
        self.zfs(&["snapshot", &self.golden()]).await?;
        Ok(())
    }

    /// A new clone for one VM, with its `@clean` snapshot.
    pub async fn clone_for_vm(self: &Arc<Self>) -> Result<Clone, StorageError> {
        let name = format!("{}/warm-{}", self.parent, uuid::Uuid::new_v4().simple());
        self.zfs(&["clone", "-o", &format!("ember:owner={}", self.owner), &self.golden(), &name]).await?;
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        let mut clone = Clone { storage: Arc::clone(self), name, disk: PathBuf::new(), destroyed: false };
        let ready = async {
            self.zfs(&["snapshot", &format!("{}@clean", clone.name)]).await?;
            self.disk_of(&clone.name).await
        };
        match ready.await {
            Ok(disk) => {
                clone.disk = disk;
                Ok(clone)
            }
            Err(e) => {
                clone.destroy().await;
                Err(e)
            }
        }
    }

    /// Return clone `name` to its `@clean` snapshot.
    pub async fn rollback(&self, name: &str) -> Result<(), StorageError> {
        self.zfs(&["rollback", "-r", &format!("{name}@clean")]).await.map(drop)
    }

    /// A copy-on-write fork of dataset `from` (a VM's clone or another
    /// fork, stopped or not written to meanwhile) for the paused VM in
    /// `paused_dir`: `from@fork-<id>` and its clone `fork-<id>`. Nobody owns
    /// it until a VM resumed on it [adopts](Self::adopt) it; the paused VM's
    /// owner [discards](Self::discard_fork) it.
    pub async fn fork(&self, from: &str, paused_dir: &Path) -> Result<Fork, StorageError> {
        if self.kind_of(from).is_none() {
            return Err(StorageError::Setup(format!("{from} is not a VM's clone under {}", self.parent)));
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let snapshot = format!("{from}@fork-{id}");
        let name = format!("{}/fork-{id}", self.parent);
        self.zfs(&["snapshot", &snapshot]).await?;
        let tag = format!("ember:paused={}", paused_dir.display());
        if let Err(e) = self.zfs(&["clone", "-o", &tag, &snapshot, &name]).await {
            let _ = self.zfs(&["destroy", &snapshot]).await;
            return Err(e);
        }
        match self.disk_of(&name).await {
            Ok(disk) => Ok(Fork { name, disk }),
            Err(e) => {
                self.discard_fork(&name).await;
                Err(e)
            }
        }
    }

    /// Keep clone `name` (a VM's, the VM gone) as the disk of the paused VM
    /// in `paused_dir`: a `warm-*` clone becomes fork `fork-<id>` (renamed,
    /// its snapshots and forks with it), tagged as [`Self::fork`] tags one
    /// and owned by nobody. Nothing is copied. On error the caller still
    /// holds the clone under its old name.
    async fn keep(&self, name: &str, paused_dir: &Path) -> Result<Fork, StorageError> {
        let Some(kind) = self.kind_of(name) else {
            return Err(StorageError::Setup(format!("{name} is not a VM's clone under {}", self.parent)));
        };
        // Untagged before it is renamed: a crash in between leaves an
        // unowned clone the next start-up reaps, never a stale fork.
        self.zfs(&["set", &format!("ember:paused={}", paused_dir.display()), name]).await?;
        self.zfs(&["inherit", "ember:owner", name]).await?;
        let kept = match kind {
            Kind::Fork => name.to_string(),
            Kind::Warm => {
                let to = format!("{}/fork-{}", self.parent, uuid::Uuid::new_v4().simple());
                // The VM's QEMU has just closed the disk.
                self.zfs_when_free(&["rename", name, &to]).await?;
                to
            }
        };
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        match self.disk_of(&kept).await {
            Ok(disk) => Ok(Fork { name: kept, disk }),
            Err(e) => {
                self.discard_fork(&kept).await;
                Err(e)
            }
        }
    }

    /// The disk of fork `name`, as [`Self::fork`] gave it.
    pub async fn fork_disk(&self, name: &str) -> Result<PathBuf, StorageError> {
        match self.kind_of(name) {
            Some(Kind::Fork) => self.disk_of(name).await,
            _ => Err(StorageError::Setup(format!("{name} is not a fork under {}", self.parent))),
        }
    }

    /// Own fork `name` as a running VM's clone: destroyed with the VM (or
    /// at shutdown, or by the next start-up if this process dies).
    pub async fn adopt(self: &Arc<Self>, name: &str) -> Result<Clone, StorageError> {
        let disk = self.fork_disk(name).await?;
        self.zfs(&["set", &format!("ember:owner={}", self.owner), name]).await?;
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
        Ok(Clone { storage: Arc::clone(self), name: name.to_string(), disk, destroyed: false })
    }

    /// Destroy fork `name` (a paused VM's disk nobody runs on), and its
    /// origin snapshot. Errors are logged: it is what a deletion does last.
    pub async fn discard_fork(&self, name: &str) {
        if self.kind_of(name) != Some(Kind::Fork) {
            tracing::warn!(dataset = name, "not discarding what is not a fork");
            return;
        }
        self.forget_and_destroy(name).await;
    }

    /// `zfs destroy -r`, retrying while the dataset is busy; forks of it
    /// are promoted first (they live on), and a fork's origin snapshot goes
    /// with it.
    async fn destroy_dataset(&self, name: &str) -> Result<(), StorageError> {
        let origin = match self.kind_of(name) {
            Some(Kind::Fork) => self.zfs(&["get", "-H", "-o", "value", "origin", name]).await.ok(),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + DESTROY_PATIENCE;
        let mut promoted = Vec::new();
        loop {
            match self.zfs(&["destroy", "-r", name]).await {
                Ok(_) => break,
                Err(StorageError::Command(CommandError::Failed { stderr, .. }))
                    if stderr.contains("does not exist") =>
                {
                    return Ok(())
                }
                Err(StorageError::Command(CommandError::Failed { ref stderr, .. }))
                    if stderr.contains("dependent clones") && promoted.is_empty() =>
                {
                    promoted = self.promote_forks_of(name).await?;
                    if promoted.is_empty() {
                        return Err(StorageError::Setup(format!(
                            "{name} has clones that are not forks: {stderr}"
                        )));
                    }
                }
                Err(StorageError::Command(CommandError::Failed { ref stderr, .. }))
                    if stderr.contains("busy") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        // A promoted fork took the snapshots it came from; those no other
        // clone needs go (ZFS refuses the others).
        for fork in promoted {
            let snaps =
                self.zfs(&["list", "-H", "-o", "name", "-t", "snapshot", "-r", "-d", "1", &fork]).await;
            for snap in snaps.unwrap_or_default().lines().filter(|l| l.starts_with(&format!("{fork}@"))) {
                let _ = self.zfs(&["destroy", snap.trim()]).await;
            }
        }
        if let Some(origin) = origin.map(|o| o.trim().to_string()).filter(|o| o.contains("@fork-")) {
            if let Err(e) = self.zfs(&["destroy", &origin]).await {
                tracing::debug!(snapshot = %origin, error = %e, "a fork's origin snapshot stays");
            }
        }
        Ok(())
    }

    /// Promote every fork cloned from a snapshot of `name`; the forks.
    async fn promote_forks_of(&self, name: &str) -> Result<Vec<String>, StorageError> {
        let mut forks: Vec<String> = Vec::new();
        for row in self.children("name,origin").await? {
            let [fork, origin, ..] = row.as_slice() else { continue };
            if origin.starts_with(&format!("{name}@")) && self.kind_of(fork) == Some(Kind::Fork) {
                forks.push(fork.clone());
            }
        }
        for fork in &forks {
            tracing::info!(dataset = name, fork = %fork, "promoting a fork of a dataset that goes");
            self.zfs(&["promote", fork]).await?;
        }
        Ok(forks)
    }

    async fn forget_and_destroy(&self, name: &str) {
        if let Err(e) = self.destroy_dataset(name).await {
            tracing::error!(clone = name, error = %e, "cannot destroy a VM's clone");
        }
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Destroy every clone this process made that still exists.
    pub async fn destroy_remaining(&self) {
        let left: Vec<String> = self.live.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        for name in left {
            tracing::warn!(clone = %name, "a clone outlived its VM; destroying it");
            self.forget_and_destroy(&name).await;
        }
    }

    /// Clones this process made that still exist.
    pub fn live_clones(&self) -> Vec<String> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

impl Clone {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn disk_path(&self) -> &Path {
        &self.disk
    }
    pub async fn destroy(mut self) {
        self.destroyed = true;
        self.storage.forget_and_destroy(&self.name).await;
    }

    /// Hand this clone (its VM gone) to the paused VM in `paused_dir`
    /// without copying it (see [`ZfsStorage::keep`]); on error it is
    /// destroyed.
    pub async fn keep(mut self, paused_dir: &Path) -> Result<Fork, StorageError> {
        let kept = self.storage.keep(&self.name, paused_dir).await;
        match kept {
            Ok(fork) => {
                self.destroyed = true;
                Ok(fork)
            }
            Err(e) => {
                self.destroy().await;
                Err(e)
            }
        }
    }
}

impl Drop for Clone {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        let (storage, name) = (Arc::clone(&self.storage), self.name.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move { storage.forget_and_destroy(&name).await });
            }
            // No runtime left: the next start-up reaps it (its owner is gone).
            Err(_) => tracing::warn!(clone = %name, "clone dropped without a runtime; left for reaping"),
        }
    }
}

/// What a dataset under the parent is to this backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Warm,
    Fork,
}

/// A fork made by [`ZfsStorage::fork`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fork {
    pub name: String,
    pub disk: PathBuf,
}

fn zvol_node(dataset: &str) -> PathBuf {
    Path::new("/dev/zvol").join(dataset)
}

async fn wait_for_node(node: &Path) -> Result<PathBuf, StorageError> {
    let deadline = tokio::time::Instant::now() + ZVOL_NODE_PATIENCE;
    while !node.exists() {
        if tokio::time::Instant::now() >= deadline {
            return Err(StorageError::Setup(format!("{} did not appear", node.display())));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(node.to_path_buf())
}

/// Copy the clean image into a new file (sparse) or onto a zeroed volume.
async fn copy_image(clean: &Path, dst: &Path, new_file: bool) -> Result<(), StorageError> {
    let (src, to) = (clean.to_path_buf(), dst.to_path_buf());
    let what = format!("copying {} to {}", clean.display(), dst.display());
    super::blocking(what, move || {
        if new_file {
            super::file::sparse_copy(&src, &to)
        } else {
            super::file::copy_onto(&src, &to)
        }
    })
    .await
}

#[cfg(test)]
mod tests;
