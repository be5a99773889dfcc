//! The servers under test: `ember serve` (a child process with a config of
//! its own), and the baseline server that runs the scenario's command per
//! request directly on the host or inside `bwrap`, behind the same kind of
//! HTTP call, so oha measures both the same way.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ember_testkit::{EmberServe, ServeOptions};

/// Fixed, so a killed run's VMs are reaped by the next.
pub const STATE_DIR: &str = "/tmp/ember-loadtest-state";

/// `ember serve` with the load test's state directory and a quiet log.
#[derive(Debug)]
pub struct EmberServer(EmberServe);

impl std::ops::Deref for EmberServer {
    type Target = EmberServe;
    fn deref(&self) -> &EmberServe {
        &self.0
    }
}

impl EmberServer {
    /// Start `ember serve` and wait for its ready line.
    pub fn start(ember: &Path, config: &Path, images: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut opts = ServeOptions::new(ember, config, images, Path::new(STATE_DIR), log);
        opts.log_level = "warn".into();
        Ok(Self(EmberServe::start(&opts)?))
    }

    /// SIGTERM, wait, and check that no VM process is left.
    pub fn stop(self) -> anyhow::Result<()> {
        self.0.stop(Duration::from_secs(120))
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
