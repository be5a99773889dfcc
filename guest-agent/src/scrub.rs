//! `scrub`: the in-guest reset between calls of one function. Kills every
//! process that is not the agent's own, empties the writable places and
//! restores their owner and mode, undoes mounts, hostname, DNS and the
//! network (no address, no route), then
//! checks that nothing of the user is left. Any check that fails is an
//! error, and the host falls back to a full reset: a scrub never hands on
//! a VM it has doubts about. It cannot undo what a guest-kernel exploit
//! did; that is what the full reset is for.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_wire::{ErrorCode, ErrorReply};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::reset::empty_dir;
use crate::Agent;

/// How long killed processes may take to disappear (be reaped).
const KILL_DEADLINE: Duration = Duration::from_secs(3);

/// The guest as it was when the agent started: what a scrub restores and
/// checks against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Baseline {
    /// Mount points, in mount order.
    pub mounts: Vec<String>,
    /// Writable directories with their mode, owner and group.
    pub dirs: Vec<(PathBuf, u32, u32, u32)>,
}

impl Baseline {
    pub fn capture(dirs: &[PathBuf]) -> io::Result<Self> {
        let mounts = mount_points(&fs::read_to_string("/proc/self/mountinfo")?);
        let mut out = Vec::new();
        for d in dirs {
            let m = fs::metadata(d)?;
            out.push((d.clone(), m.mode() & 0o7777, m.uid(), m.gid()));
        }
        Ok(Self { mounts, dirs: out })
    }
}

/// The mount points of a `/proc/self/mountinfo` text (field 5).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).map(str::to_string).collect()
}

fn failed(what: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, format!("scrub: {what}"))
}

pub async fn scrub(agent: &Agent) -> Result<(), ErrorReply> {
    let Some(base) = &agent.baseline else {
        return Err(failed("no baseline was recorded at start"));
    };
    if crate::reset::writable_root() {
        return Err(failed("the root is writable: only a reset of the whole VM undoes its changes"));
    }
    if let Some(cgs) = &agent.cgroups {
        cgs.kill_all().await.map_err(|e| failed(format!("killing user cgroups: {e}")))?;
    }
    kill_strays(agent).await?;
    // Mounts a (root) user added, innermost first.
    let now = mount_points(&fs::read_to_string("/proc/self/mountinfo").map_err(failed)?);
    for m in now.iter().rev().filter(|m| !base.mounts.contains(m)) {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
    for (dir, mode, uid, gid) in &base.dirs {
        empty_dir(dir).map_err(|e| failed(format!("emptying {}: {e}", dir.display())))?;
        restore_owner_and_mode(dir, *mode, *uid, *gid)
            .map_err(|e| failed(format!("restoring {}: {e}", dir.display())))?;
    }
    let _ = fs::remove_file("/run/resolv.conf");
    nix::unistd::sethostname(&agent.layout.hostname).map_err(|e| failed(format!("hostname: {e}")))?;
    // Only in a guest (the agent is PID 1): host tests share the host's NICs.
    if std::process::id() == 1 {
        crate::configure::clear_network(agent)
            .await
            .map_err(|e| failed(format!("network: {}", e.message)))?;
    }
    verify(agent, base)
}

/// Processes a scrub must kill: in the guest (the agent is PID 1) every
/// process but the agent, its Python server and kernel threads; elsewhere
/// (full init, host tests) those of the command user only.
fn strays(agent: &Agent) -> io::Result<Vec<i32>> {
    let me = std::process::id() as i32;
    let server = agent.forkserver.as_ref().map(|s| s.pid());
    let pid1 = me == 1;
    let user = agent.layout.user.map(|u| u.0);
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me || Some(pid) == server {
            continue;
        }
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some(ppid) = stat_ppid(&stat) else { continue };
        if pid == 2 || ppid == 2 {
            continue; // kernel threads
        }
        let owned_by_user = entry.metadata().map(|m| Some(m.uid()) == user).unwrap_or(false);
        if pid1 || owned_by_user {
            out.push(pid);
        }
    }
    Ok(out)
}

/// The parent pid in a `/proc/<pid>/stat` line (after the `(comm)`, which
/// may itself hold spaces and parentheses).
pub fn stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

async fn kill_strays(agent: &Agent) -> Result<(), ErrorReply> {
    let deadline = tokio::time::Instant::now() + KILL_DEADLINE;
    loop {
        let left = strays(agent).map_err(|e| failed(format!("listing processes: {e}")))?;
        if left.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(failed(format!("processes still alive after {KILL_DEADLINE:?}: {left:?}")));
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn restore_owner_and_mode(dir: &Path, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let m = fs::symlink_metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::other("no longer a directory"));
    }
    if m.uid() != uid || m.gid() != gid {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    }
    if m.mode() & 0o7777 != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Nothing of the user may be left; every doubt is an error.
fn verify(agent: &Agent, base: &Baseline) -> Result<(), ErrorReply> {
    let left = strays(agent).map_err(|e| failed(format!("listing processes: {e}")))?;
    if !left.is_empty() {
        return Err(failed(format!("processes left: {left:?}")));
    }
    let mounts = mount_points(&fs::read_to_string("/proc/self/mountinfo").map_err(failed)?);
    if mounts != base.mounts {
        return Err(failed(format!("mount table changed: {mounts:?}, expected {:?}", base.mounts)));
    }
    for (dir, mode, uid, gid) in &base.dirs {
        let m = fs::symlink_metadata(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        if (m.mode() & 0o7777, m.uid(), m.gid()) != (*mode, *uid, *gid) {
            return Err(failed(format!("{} has the wrong owner or mode", dir.display())));
        }
        let mut entries = fs::read_dir(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        if entries.next().is_some() {
            return Err(failed(format!("{} is not empty", dir.display())));
        }
    }
    // Commands get IPC namespaces of their own; the guest's must stay empty.
    for kind in ["shm", "sem", "msg"] {
        let path = format!("/proc/sysvipc/{kind}");
        if let Ok(text) = fs::read_to_string(&path) {
            if text.lines().count() > 1 {
                return Err(failed(format!("System V {kind} objects left in the guest's namespace")));
            }
        }
    }
    if let Some(server) = &agent.forkserver {
        if !server.alive() {
            return Err(failed("the python fork server is gone"));
        }
    }
    if nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).as_deref()
        != Some(agent.layout.hostname.as_str())
    {
        return Err(failed("hostname not restored"));
    }
    // The guest's own network state only: host tests share the host's.
    if std::process::id() == 1 {
        crate::configure::network_is_clear().map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mount_points_and_parents() {
        let info = "22 1 254:0 / / ro,relatime - ext4 /dev/vda ro\n\
                    23 22 0:21 / /run rw,nosuid - tmpfs run rw\n\
                    30 22 254:1 /home/ember /home/ember rw - ext4 /dev/vdb rw\n";
        assert_eq!(mount_points(info), ["/", "/run", "/home/ember"]);
        assert_eq!(stat_ppid("42 (a (b) c) S 7 42 42 0 -1"), Some(7));
        assert_eq!(stat_ppid("2 (kthreadd) S 0 0 0"), Some(0));
        assert_eq!(stat_ppid("garbage"), None);
    }
}
