//! Small helpers over the host OS, below both the VM layer and the
//! channels: finding a program, polling until something holds, and listing
//! processes (for leak checks).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Resolve a program name against PATH (or check an explicit path).
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file())
}

/// Poll `probe` until it returns `Some` or `deadline` passes.
pub async fn wait_until<T>(
    deadline: tokio::time::Instant,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Run `tick` on `owner` every `every` (a missed tick is not made up) for
/// as long as anyone else holds it: the watchers of files a server reloads
/// (its keys, its certificate) end with what they watch.
pub fn every<T: Send + Sync + 'static>(
    owner: &std::sync::Arc<T>,
    every: std::time::Duration,
    tick: impl Fn(&T) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let weak = std::sync::Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            tick(&owner);
        }
    })
}

/// Processes whose command line mentions `needle` (a state directory, a
/// VM id): what leak checks look for after a shutdown.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Bytes regular file `path` takes on disk (its allocated blocks); `None`
/// for anything else (a block device) or a file that cannot be read.
pub fn file_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().filter(|m| m.file_type().is_file()).map(|m| m.blocks() * 512)
}

/// Bytes the files directly in `dir` take on disk (allocated blocks).
pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}
