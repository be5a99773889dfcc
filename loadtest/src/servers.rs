//! The servers under test: `ember serve` (a child process with a config of
//! its own), and the baseline server that runs the scenario's command per
//! request directly on the host or inside `bwrap`, behind the same kind of
//! HTTP call, so oha measures both the same way.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

/// Fixed, so a killed run's VMs are reaped by the next.
pub const STATE_DIR: &str = "/tmp/ember-loadtest-state";

#[derive(Debug)]
pub struct EmberServer {
    pub addr: SocketAddr,
    child: Child,
}

impl EmberServer {
    /// Start `ember serve` and wait for its ready line.
    pub fn start(ember: &Path, config: &Path, images: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(ember)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .env("EMBER_IMAGES", images)
            .env("EMBER_STATE_DIR", STATE_DIR)
            .env("EMBER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", ember.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut addr = None;
        loop {
            let line = rx.recv_timeout(Duration::from_secs(300)).map_err(|_| {
                let _ = child.kill();
                anyhow::anyhow!("ember serve did not get ready; see {}", log.display())
            })?;
            if let Some(rest) = line.strip_prefix("ember: listening on http://") {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            if line.starts_with("ember: ready on") {
                break;
            }
        }
        Ok(Self { addr: addr.context("no listening line")?, child })
    }

    /// The server's pid (its VMs run below it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, wait, and check that no VM process is left.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "ember serve exited with {status}");
        let left = ember_pool::vm::processes_mentioning(STATE_DIR);
        anyhow::ensure!(left.is_empty(), "processes left behind: {left:?}");
        Ok(())
    }
}

impl Drop for EmberServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// How the baseline server runs each request's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Sandbox {
    /// `sh -c CMD` on the host: the floor.
    Host,
    /// `bwrap` with fresh namespaces and a read-only root: a container-style
    /// sandbox made per request.
    Bwrap,
}

impl Sandbox {
    pub fn name(self) -> &'static str {
        match self {
            Sandbox::Host => "host",
            Sandbox::Bwrap => "bwrap",
        }
    }
}

#[derive(Debug)]
struct Job {
    sandbox: Sandbox,
    command: String,
    cwd: PathBuf,
    stdin: String,
}

/// Argv that runs `command` in `cwd` under `sandbox`.
pub fn argv(sandbox: Sandbox, command: &str, cwd: &Path) -> Vec<String> {
    let sh = ["sh".to_string(), "-c".into(), command.into()];
    match sandbox {
        Sandbox::Host => sh.to_vec(),
        Sandbox::Bwrap => {
            let mut v: Vec<String> = [
                "bwrap",
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // The working directory again on top of the fresh /tmp (a
            // checkout under /tmp would be hidden by it).
            let cwd = cwd.display().to_string();
            v.extend(["--ro-bind".into(), cwd.clone(), cwd.clone(), "--chdir".into(), cwd]);
            v.extend(sh);
            v
        }
    }
}

async fn run_job(job: Arc<Job>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let argv = argv(job.sandbox, &job.command, &job.cwd);
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir(&job.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt as _;
        let _ = stdin.write_all(job.stdin.as_bytes()).await;
    }
    match child.wait_with_output().await {
        Ok(out) if out.status.success() => axum::Json(serde_json::json!({
            "exit_code": out.status.code(),
            "stdout": String::from_utf8_lossy(&out.stdout),
            "stderr": String::from_utf8_lossy(&out.stderr),
        }))
        .into_response(),
        Ok(out) => (axum::http::StatusCode::BAD_GATEWAY, String::from_utf8_lossy(&out.stderr).into_owned())
            .into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A baseline server for one scenario; stops when dropped.
#[derive(Debug)]
pub struct BaselineServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BaselineServer {
    pub async fn start(sandbox: Sandbox, command: &str, cwd: &Path, stdin: &str) -> anyhow::Result<Self> {
        let job = Arc::new(Job { sandbox, command: command.into(), cwd: cwd.into(), stdin: stdin.into() });
        // Fail now, not under load, if the sandbox cannot run the command.
        let probe = run_job(Arc::clone(&job)).await;
        anyhow::ensure!(
            probe.status().is_success(),
            "the {} baseline cannot run {command:?}",
            sandbox.name()
        );
        let app = axum::Router::new().fallback(move || run_job(Arc::clone(&job)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, task })
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bwrap_gets_a_read_only_root_and_fresh_namespaces() {
        let v = argv(Sandbox::Bwrap, "true", Path::new("/w"));
        let s = v.join(" ");
        assert!(s.starts_with("bwrap --ro-bind / / "), "{s}");
        assert!(s.contains("--unshare-all") && s.contains("--tmpfs /tmp --"), "{s}");
        assert!(s.contains("--ro-bind /w /w --chdir /w"), "the cwd survives the fresh /tmp: {s}");
        assert!(s.ends_with("sh -c true"), "{s}");
        assert_eq!(argv(Sandbox::Host, "true", Path::new("/w")), ["sh", "-c", "true"]);
    }

    #[tokio::test]
    async fn the_host_baseline_serves_the_command() {
        let b = BaselineServer::start(Sandbox::Host, "cat; echo !", Path::new("/"), "in").await.unwrap();
        let a = crate::http::request(b.addr, "POST", "/v1/run", &[], "{}", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.json().unwrap()["stdout"], "in!\n");
    }
}
