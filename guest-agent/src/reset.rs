//! `reset`: make the guest look fresh again for the next caller. Kills every
//! user process (whole cgroups, then anything else owned by the user) and
//! empties the scratch directories. The pool's reset modes build on this.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use ember_wire::{ErrorCode, ErrorReply};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::Agent;

fn internal(what: &str, e: io::Error) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, format!("{what}: {e}"))
}

/// Kill every user process: whole cgroups first, then anything the user owns.
async fn kill_everything(agent: &Agent) -> Result<(), ErrorReply> {
    if let Some(cgs) = &agent.cgroups {
        cgs.kill_all().await.map_err(|e| internal("killing user cgroups", e))?;
    }
    if let Some((uid, _)) = agent.layout.user {
        kill_user_processes(uid).map_err(|e| internal("killing user processes", e))?;
    }
    Ok(())
}

/// Mount points of the scratch layer, innermost first.
const SCRATCH_MOUNTS: [&str; 4] = ["/home/ember", "/tmp", "/var/tmp", "/mnt/scratch"];

/// Whether the image's root is an overlay on the scratch disk (the initrd
/// made it so): the scratch disk cannot be detached or emptied under it.
pub fn writable_root() -> bool {
    Path::new("/etc/ember/writable-root").exists()
}

pub async fn detach_scratch(agent: &Agent) -> Result<(), ErrorReply> {
    if writable_root() {
        return Err(ErrorReply::new(
            ErrorCode::Internal,
            "the root is writable: its changes live on the scratch disk, which cannot be detached",
        ));
    }
    kill_everything(agent).await?;
    // State outside the scratch layer that a user or configure may change.
    empty_dir(Path::new("/dev/shm")).map_err(|e| internal("emptying /dev/shm", e))?;
    let _ = std::fs::remove_file("/run/resolv.conf");
    nix::unistd::sethostname(&agent.layout.hostname)
        .map_err(|e| internal("restoring hostname", io::Error::from(e)))?;
    // The next caller gets no network unless its claim gives one.
    if std::process::id() == 1 {
        crate::configure::clear_network(agent).await?;
        crate::configure::network_is_clear().map_err(|e| ErrorReply::new(ErrorCode::Internal, e))?;
    }
    for m in SCRATCH_MOUNTS {
        // SIGKILLed processes may hold files for a moment: retry, bounded.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match nix::mount::umount(m) {
                Ok(()) => break,
                Err(nix::errno::Errno::EBUSY) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => return Err(internal(&format!("unmounting {m}"), io::Error::from(e))),
            }
        }
    }
    // The block device's cached pages would hide the host's rollback.
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| internal("dropping caches", e))?;
    Ok(())
}

pub async fn attach_scratch(agent: &Agent) -> Result<(), ErrorReply> {
    let mut cmd = std::process::Command::new("/usr/lib/ember/mount-scratch");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    let (_child, rx) = agent.reaper.spawn(&mut cmd).map_err(|e| internal("running mount-scratch", e))?;
    match rx.await {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        other => Err(ErrorReply::new(ErrorCode::Internal, format!("mount-scratch failed: {other:?}"))),
    }
}

pub async fn reset(agent: &Agent) -> Result<(), ErrorReply> {
    kill_everything(agent).await?;
    for dir in &agent.layout.scratch_dirs {
        empty_dir(dir).map_err(|e| internal(&format!("emptying {}", dir.display()), e))?;
    }
    nix::unistd::sethostname(&agent.layout.hostname)
        .map_err(|e| internal("restoring hostname", io::Error::from(e)))?;
    Ok(())
}

/// SIGKILL every process whose owner is `uid` (anything that escaped its
/// cgroup, which only root could have arranged, but be thorough).
fn kill_user_processes(uid: u32) -> io::Result<()> {
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if entry.metadata().map(|m| m.uid() == uid).unwrap_or(false) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    Ok(())
}

/// Remove everything inside `dir` but keep `dir` itself.
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_keeps_the_dir_and_does_not_follow_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), "x").unwrap();
        fs::write(dir.path().join(".hidden"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        empty_dir(dir.path()).unwrap();
        assert!(dir.path().is_dir());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(outside.path().join("keep").exists());
    }
}
