//! Child processes a VM owns (QEMU, vhost-device-vsock): started in their
//! own process group, killed as a group, never outliving their owner.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
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

/// Run a short helper (qemu-img) with a timeout; stderr goes into the error.
pub async fn run_tool(program: &Path, args: &[OsString], timeout: Duration) -> Result<(), String> {
    let what = format!(
        "{} {}",
        program.display(),
        args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    let out = Command::new(program).args(args).stdin(Stdio::null()).kill_on_drop(true).output();
    match tokio::time::timeout(timeout, out).await {
        Err(_) => Err(format!("`{what}` timed out after {timeout:?}")),
        Ok(Err(e)) => Err(format!("`{what}` could not start: {e}")),
        Ok(Ok(o)) if o.status.success() => Ok(()),
        Ok(Ok(o)) => {
            Err(format!("`{what}` failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim()))
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn run_tool_reports_stderr() {
        let err = run_tool(
            Path::new("/bin/sh"),
            &["-c".into(), "echo boom >&2; exit 3".into()],
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.contains("boom") && err.contains("exit status: 3"), "{err}");
        let err =
            run_tool(Path::new("/bin/sleep"), &["5".into()], Duration::from_millis(50)).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }
}
