//! The pre-warmed Python (`/usr/lib/ember/forkserver.py`): started by the
//! agent before the host can snapshot the VM, so every restored or scrubbed
//! VM has it with its modules already imported. A `python` command is
//! forked from it; the agent keeps the pipes, the cgroup and the timeout,
//! exactly as for a command it executes itself.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::oneshot;

use crate::Reaper;

/// Where the guest image has the server, its interpreter, and the
/// root-only directory of its socket.
pub const SCRIPT: &str = "/usr/lib/ember/forkserver.py";
pub const PYTHON: &str = "/usr/bin/python3";
pub const SOCKET_DIR: &str = "/run/ember-agent";
/// Under TCG importing the standard modules takes a second or two, and an
/// image's own preloads (numpy, pandas, matplotlib) tens of seconds.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// The server answers a request with the child's pid at once.
const PID_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest status line the agent reads from the server.
const MAX_LINE: usize = 64;

#[derive(Debug)]
pub struct ForkServer {
    socket: PathBuf,
    pid: i32,
    /// Set once the server has said "ready" (its modules are imported).
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Fires when the server process exits.
    exited: std::sync::Mutex<oneshot::Receiver<WaitStatus>>,
    _child: std::process::Child,
}

/// What the child runs and as whom.
#[derive(Debug)]
pub struct Spec<'a> {
    pub path: &'a str,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a Path,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub cgroup: bool,
}

/// A child forked by the server.
#[derive(Debug)]
pub struct Forked {
    pub pid: i32,
    pub exit: oneshot::Receiver<WaitStatus>,
}

impl ForkServer {
    /// Start the server with `python3`; it becomes usable once it says
    /// "ready" (importing takes seconds under TCG, which a boot should not
    /// wait for). `None` when there is no Python. Until it is ready, or if
    /// it never is, Python calls start an interpreter each.
    pub async fn start(
        reaper: &Reaper,
        python: &Path,
        script: &Path,
        socket_dir: &Path,
        layout: &crate::GuestLayout,
    ) -> Option<Self> {
        if !python.is_file() || !script.is_file() {
            return None;
        }
        match Self::try_start(reaper, python, script, socket_dir, layout).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no python fork server; python calls start an interpreter");
                None
            }
        }
    }

    async fn try_start(
        reaper: &Reaper,
        python: &Path,
        script: &Path,
        socket_dir: &Path,
        layout: &crate::GuestLayout,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(socket_dir)?;
        std::fs::set_permissions(socket_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let socket = socket_dir.join("python.sock");
        // At the lowest priority while it imports (it raises itself to the
        // normal one when ready): a boot and the first commands go first.
        // The image's environment too (matplotlib's backend is chosen at
        // import), and the user's HOME, where the image build left the
        // caches its preloaded modules read (the server only reads them).
        let mut cmd = Command::new("/usr/bin/nice");
        cmd.args(["-n", "19"])
            .arg(python)
            .arg(script)
            .arg(&socket)
            .args(&layout.preload)
            .env_clear()
            .env("PATH", crate::exec::DEFAULT_PATH)
            .env("LANG", "C.UTF-8")
            .envs(&layout.image_env)
            .env("HOME", &layout.workspace)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let (mut child, exited) = reaper.spawn(&mut cmd)?;
        let pid = child.id() as i32;
        let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let stdout = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))?;
        let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&ready);
        tokio::spawn(async move {
            let mut line = String::new();
            let said = tokio::time::timeout(START_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
            match said {
                Ok(Ok(_)) if line.trim() == "ready" => {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(pid, "python fork server ready");
                }
                other => {
                    tracing::warn!(?other, line, "the python fork server did not say ready; killing it");
                    let _ = kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        });
        Ok(Self { socket, pid, ready, exited: std::sync::Mutex::new(exited), _child: child })
    }

    /// Whether the server has imported its modules and listens.
    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wait (bounded) until the server is ready or gone (tests).
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !self.ready() && self.alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.ready()
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the server process still runs.
    pub fn alive(&self) -> bool {
        let mut rx = self.exited.lock().unwrap_or_else(|p| p.into_inner());
        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    /// Fork a child running `spec` with these standard streams (the child's
    /// ends) and, if given, joining the cgroup of `cgroup_procs`.
    pub async fn fork(
        &self,
        spec: &Spec<'_>,
        stdio: [OwnedFd; 3],
        cgroup_procs: Option<&File>,
    ) -> io::Result<Forked> {
        let header = serde_json::to_vec(&serde_json::json!({
            "path": spec.path,
            "args": spec.args,
            "env": spec.env,
            "cwd": spec.cwd,
            "uid": spec.uid,
            "gid": spec.gid,
            "cgroup": spec.cgroup,
        }))
        .map_err(io::Error::other)?;
        let mut msg = Vec::with_capacity(4 + header.len());
        msg.extend_from_slice(&u32::try_from(header.len()).map_err(io::Error::other)?.to_be_bytes());
        msg.extend_from_slice(&header);
        let stream = UnixStream::connect(&self.socket)?;
        let mut fds: Vec<i32> = stdio.iter().map(|f| f.as_raw_fd()).collect();
        if let Some(f) = cgroup_procs {
            fds.push(f.as_fd().as_raw_fd());
        }
        send_with_fds(&stream, &msg, &fds)?;
        // Our copies of the child's ends go now, so EOF works.
        drop(stdio);
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let mut lines = BufReader::new(stream);
        let first = tokio::time::timeout(PID_TIMEOUT, read_line(&mut lines))
            .await
            .map_err(|_| io::Error::other("the fork server did not answer"))??;
        let pid = first
            .strip_prefix("pid ")
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p > 1)
            .ok_or_else(|| io::Error::other(format!("bad reply from the fork server: {first:?}")))?;
        let (tx, exit) = oneshot::channel();
        tokio::spawn(async move {
            // No deadline here: the agent's own timeout kills the child,
            // and then the server reports its exit.
            if let Ok(line) = read_line(&mut lines).await {
                if let Some(status) = line.strip_prefix("exit ").and_then(|s| s.parse::<i32>().ok()) {
                    if let Ok(ws) = WaitStatus::from_raw(Pid::from_raw(pid), status) {
                        let _ = tx.send(ws);
                    }
                }
            }
        });
        Ok(Forked { pid, exit })
    }
}

impl Drop for ForkServer {
    /// Only host tests drop a server; in the guest it lives as long as the
    /// agent.
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), nix::sys::signal::Signal::SIGKILL);
    }
}

async fn read_line(r: &mut BufReader<tokio::net::UnixStream>) -> io::Result<String> {
    let mut buf = Vec::new();
    let mut limited = tokio::io::AsyncReadExt::take(r, MAX_LINE as u64);
    limited.read_until(b'\n', &mut buf).await?;
    if !buf.ends_with(b"\n") {
        return Err(io::Error::other("the fork server closed the connection"));
    }
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

fn send_with_fds(stream: &UnixStream, msg: &[u8], fds: &[i32]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(msg)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let sent =
        sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(io::Error::from)?;
    if sent < msg.len() {
        // The descriptors went with the first bytes; the rest follows.
        io::Write::write_all(&mut &*stream, &msg[sent..])?;
    }
    Ok(())
}
