//! Child processes a VM owns (QEMU, vhost-device-vsock): started in their
//! own process group, killed as a group, never outliving their owner.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A child process that is killed (with its process group) when dropped.
#[derive(Debug)]
pub struct OwnedProcess {
    pub name: &'static str,
    child: Child,
    pid: u32,
}

impl OwnedProcess {
    /// Start `program argv`, output appended to `log`.
    pub fn spawn(name: &'static str, program: &Path, argv: &[OsString], log: &Path) -> std::io::Result<Self> {
        Self::spawn_as(name, program, argv, log, None)
    }

    /// Like [`spawn`](Self::spawn), running as `user` (uid, gid) if given.
    pub fn spawn_as(
        name: &'static str,
        program: &Path,
        argv: &[OsString],
        log: &Path,
        user: Option<(u32, u32)>,
    ) -> std::io::Result<Self> {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut cmd = Command::new(program);
        cmd.args(argv)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn()?;
        let pid = child.id().ok_or_else(|| std::io::Error::other(format!("{name} exited at once")))?;
        Ok(Self { name, child, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait up to `grace` for a voluntary exit, then kill the group.
    pub async fn stop(mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            self.kill_group();
        }
        let _ = self.child.wait().await;
    }

    fn kill_group(&self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }
}

impl Drop for OwnedProcess {
    fn drop(&mut self) {
        // kill_on_drop reaches the leader; the group takes any helper it forked.
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_group();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::wait_until;

    #[tokio::test]
    async fn dropping_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let p = OwnedProcess::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), format!("sleep 60 & echo $! > {}/child.pid; wait", dir.path().display()).into()],
            &log,
        )
        .unwrap();
        let pidfile = dir.path().join("child.pid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let child: i32 = wait_until(deadline, Duration::from_millis(10), || {
            std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
        })
        .await
        .unwrap();
        drop(p);
        let gone = wait_until(deadline, Duration::from_millis(10), || {
            // A zombie still has /proc/<pid>; check its state.
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            (stat.is_empty() || stat.contains(") Z")).then_some(())
        })
        .await;
        assert!(gone.is_some(), "grandchild {child} survived its owner");
    }
}
