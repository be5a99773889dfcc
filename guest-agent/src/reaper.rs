//! Child reaping. The agent is PID 1 (or a subreaper), so every orphan in
//! the guest becomes its child: one loop waits for *any* child and hands the
//! status to whoever spawned that pid; unknown pids are simply reaped.
//!
//! Spawning holds the registry lock across `fork`, so a child that exits at
//! once is still delivered to its owner. The runtime is single-threaded,
//! so this loop never runs while std's `spawn` waits on a failed exec.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Which children the reaper waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Every child, as PID 1 must (the guest).
    All,
    /// Only children spawned through the reaper, so it can share a process
    /// with other code that waits for its own children (host tests).
    Registered,
}

#[derive(Debug)]
pub struct Reaper {
    mode: ReapMode,
    waiting: Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>,
}

impl Reaper {
    /// Create the reaper and start its loop on the current runtime.
    pub fn start(mode: ReapMode) -> io::Result<Arc<Self>> {
        let reaper = Arc::new(Self { mode, waiting: Mutex::default() });
        let mut sigchld = signal(SignalKind::child())?;
        let r = Arc::clone(&reaper);
        tokio::spawn(async move {
            loop {
                r.reap_ready();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawn `cmd` and return the child with a receiver for its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reap every child that has exited.
    pub fn reap_ready(&self) {
        match self.mode {
            ReapMode::All => self.reap(Pid::from_raw(-1)),
            ReapMode::Registered => {
                let pids: Vec<i32> =
                    self.waiting.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
                for pid in pids {
                    self.reap(Pid::from_raw(pid));
                }
            }
        }
    }

    fn reap(&self, which: Pid) {
        loop {
            match waitpid(which, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                        continue;
                    }
                    let owner = self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid.as_raw());
                    if let Some(tx) = owner {
                        let _ = tx.send(status);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn delivers_exit_status_of_a_child_that_exits_at_once() {
        let reaper = Reaper::start(ReapMode::Registered).unwrap();
        let (_child, rx) = reaper.spawn(Command::new("/bin/sh").args(["-c", "exit 7"])).unwrap();
        let status = rx.await.unwrap();
        assert!(matches!(status, WaitStatus::Exited(_, 7)), "{status:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_exec_is_an_error_not_a_panic() {
        let reaper = Reaper::start(ReapMode::Registered).unwrap();
        let err = reaper.spawn(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
