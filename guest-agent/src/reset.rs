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

pub async fn reset(agent: &Agent) -> Result<(), ErrorReply> {
    let internal = |what: &str, e: io::Error| ErrorReply::new(ErrorCode::Internal, format!("{what}: {e}"));
    if let Some(cgs) = &agent.cgroups {
        cgs.kill_all().await.map_err(|e| internal("killing user cgroups", e))?;
    }
    if let Some((uid, _)) = agent.layout.user {
        kill_user_processes(uid).map_err(|e| internal("killing user processes", e))?;
    }
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
