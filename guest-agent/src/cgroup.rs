//! cgroup v2 sandboxes for user commands: one cgroup per exec under
//! `<root>/ember`, with a pids limit, killed as a whole with `cgroup.kill`
//! so daemonized grandchildren die with the command.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The parent cgroup of every exec's cgroup.
#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// Cgroups of finished commands whose processes were allowed to live on;
    /// removed once they are empty.
    lingering: std::sync::Mutex<Vec<PathBuf>>,
}

/// One exec's cgroup. The child joins it through [`ExecCgroup::procs_fd`]
/// before `exec`, so nothing it forks can start outside.
#[derive(Debug)]
pub struct ExecCgroup {
    path: PathBuf,
    procs: File,
}

impl Cgroups {
    /// Use (creating it) `<mount>/ember`, enabling the pids and memory
    /// controllers for its children.
    pub fn init(mount: &Path) -> io::Result<Self> {
        enable_controllers(mount)?;
        let root = mount.join("ember");
        match fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        enable_controllers(&root)?;
        Ok(Self { root, lingering: Default::default() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn create(&self, name: &str, pids_limit: Option<u32>) -> io::Result<ExecCgroup> {
        let path = self.root.join(name);
        fs::create_dir(&path)?;
        let cg = (|| {
            if let Some(limit) = pids_limit {
                fs::write(path.join("pids.max"), limit.to_string())?;
            }
            let procs = OpenOptions::new().write(true).open(path.join("cgroup.procs"))?;
            Ok(ExecCgroup { path: path.clone(), procs })
        })();
        if cg.is_err() {
            let _ = fs::remove_dir(&path);
        }
        cg
    }

    /// Keep `cg` (still populated) until its processes are gone.
    pub fn linger(&self, cg: ExecCgroup) {
        self.lingering.lock().unwrap_or_else(|p| p.into_inner()).push(cg.path);
    }

    /// Remove lingering cgroups that have emptied. Returns how many remain.
    pub fn sweep(&self) -> usize {
        let mut list = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|path| populated(path) || std::fs::remove_dir(path).is_err() && path.exists());
        list.len()
    }

    /// Kill every process in every exec cgroup and remove the cgroups.
    pub async fn kill_all(&self) -> io::Result<()> {
        self.lingering.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for entry in fs::read_dir(&self.root)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                kill_and_remove(&entry.path()).await?;
            }
        }
        Ok(())
    }
}

impl ExecCgroup {
    pub fn procs_fd(&self) -> &File {
        &self.procs
    }

    pub fn kill(&self) -> io::Result<()> {
        fs::write(self.path.join("cgroup.kill"), "1")
    }

    pub fn populated(&self) -> bool {
        populated(&self.path)
    }

    /// Kill what is left and remove the cgroup once it is empty.
    pub async fn destroy(self) -> io::Result<()> {
        kill_and_remove(&self.path).await
    }
}

fn enable_controllers(dir: &Path) -> io::Result<()> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))?;
    let wanted: Vec<String> = ["pids", "memory"]
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let mut f = OpenOptions::new().write(true).open(dir.join("cgroup.subtree_control"))?;
    f.write_all(wanted.join(" ").as_bytes())
}

fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|ev| ev.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

async fn kill_and_remove(path: &Path) -> io::Result<()> {
    // A session may nest cgroups; children go first.
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                Box::pin(kill_and_remove(&entry.path())).await?;
            }
        }
    }
    if populated(path) {
        fs::write(path.join("cgroup.kill"), "1")?;
    }
    // Killing is asynchronous: wait (bounded) for the cgroup to empty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
