//! `ember serve` as a child process: the one way the HTTP suite and the load
//! test start it, wait for it, stop it and check what it left.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How to start `ember serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The `ember` binary.
    pub ember: PathBuf,
    pub config: PathBuf,
    /// `EMBER_IMAGES`: where the built images are.
    pub images: PathBuf,
    /// `EMBER_STATE_DIR`. Fixed per suite, so a killed run's VMs are reaped
    /// by the next run.
    pub state_dir: PathBuf,
    /// `EMBER_LOG`.
    pub log_level: String,
    /// Where the server's stderr (its log) goes.
    pub log_file: PathBuf,
    /// Print the server's stdout lines with this prefix (None: quiet).
    pub echo: Option<String>,
    /// How long the pool may take to get warm.
    pub ready_within: Duration,
    /// Run it inside this network namespace (`ip netns exec`); its address
    /// is then reachable from that namespace only.
    pub netns: Option<String>,
    /// Where it keeps paused sessions (`EMBER_SESSIONS_DIR`); by default
    /// `sessions` in the state directory.
    pub sessions_dir: PathBuf,
    /// Return once it listens, not once it printed its ready line (then
    /// [`EmberServe::wait_ready`] waits for that).
    pub return_when_listening: bool,
    /// Its keys file (`EMBER_KEYS`); by default `keys.json` in the state
    /// directory, which no test writes: the server needs no key.
    pub keys_file: PathBuf,
    /// Run it as PID 1 of a PID namespace of its own (`unshare --pid`), so
    /// that [`EmberServe::kill_host`] takes its QEMUs with it, as the loss
    /// of its host would.
    pub pid_namespace: bool,
}

impl ServeOptions {
    pub fn new(ember: &Path, config: &Path, images: &Path, state_dir: &Path, log_file: &Path) -> Self {
        Self {
            ember: ember.to_path_buf(),
            config: config.to_path_buf(),
            images: images.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            log_level: "info".into(),
            log_file: log_file.to_path_buf(),
            echo: None,
            ready_within: Duration::from_secs(300),
            netns: None,
            sessions_dir: state_dir.join("sessions"),
            return_when_listening: false,
            keys_file: state_dir.join("keys.json"),
            pid_namespace: false,
        }
    }
}

/// A running `ember serve`; dropping it sends SIGTERM and waits.
#[derive(Debug)]
pub struct EmberServe {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    child: Child,
    /// Its stdout lines not read yet, with when each came.
    lines: mpsc::Receiver<(Instant, String)>,
    /// When its ready line came.
    ready: Option<Instant>,
    /// Its pid as the host sees it, when it runs below `unshare`.
    inner: Option<u32>,
}

impl EmberServe {
    /// Start `ember serve` on a free loopback port and wait for its ready
    /// line (the pool is warm then).
    pub fn start(opts: &ServeOptions) -> anyhow::Result<Self> {
        let log = std::fs::File::create(&opts.log_file)
            .with_context(|| format!("creating {}", opts.log_file.display()))?;
        let mut command = match (&opts.netns, opts.pid_namespace) {
            (Some(ns), _) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&opts.ember);
                c
            }
            (None, true) => {
                let mut c = Command::new("unshare");
                c.args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"]).arg(&opts.ember);
                c
            }
            (None, false) => Command::new(&opts.ember),
        };
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&opts.config)
            .env("EMBER_IMAGES", &opts.images)
            .env("EMBER_STATE_DIR", &opts.state_dir)
            // Paused sessions of test servers stay out of the machine's own.
            .env("EMBER_SESSIONS_DIR", &opts.sessions_dir)
            .env("EMBER_KEYS", &opts.keys_file)
            .env("EMBER_LOG", &opts.log_level)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", opts.ember.display()))?;
        let stdout = child.stdout.take().context("ember serve's stdout")?;
        let (tx, rx) = mpsc::channel();
        let echo = opts.echo.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(prefix) = &echo {
                    println!("{prefix}{line}");
                }
                let _ = tx.send((Instant::now(), line));
            }
        });
        let mut addr = None;
        // Below `unshare --fork`: the server is its only child.
        let inner = opts.pid_namespace.then(|| child_of(child.id())).flatten();
        let mut serve = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: opts.state_dir.clone(),
            child,
            lines: rx,
            ready: None,
            inner,
        };
        let deadline = Instant::now() + opts.ready_within;
        while serve.ready.is_none() && !(opts.return_when_listening && addr.is_some()) {
            let line = serve.next_line(deadline, opts)?;
            let rest = line.strip_prefix("ember: listening on http://");
            if let Some(rest) = rest.or_else(|| line.strip_prefix("ember: listening on https://")) {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
        }
        serve.addr = addr.context("ember serve printed no listening line")?;
        Ok(serve)
    }

    /// Its next stdout line, noting the ready line; past `deadline` it is
    /// killed and the error holds the end of its log.
    fn next_line(&mut self, deadline: Instant, opts: &ServeOptions) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((at, line)) = self.lines.recv_timeout(left) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let log = std::fs::read_to_string(&opts.log_file).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "ember serve did not get ready within {:?}; the end of its log ({}):\n{}",
                opts.ready_within,
                opts.log_file.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        };
        if line.starts_with("ember: ready on") {
            self.ready = Some(at);
        }
        Ok(line)
    }

    /// Wait for the ready line (a server started with
    /// `return_when_listening`); when it came.
    pub fn wait_ready(&mut self, opts: &ServeOptions) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + opts.ready_within;
        loop {
            if let Some(at) = self.ready {
                return Ok(at);
            }
            self.next_line(deadline, opts)?;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's pid (its VMs run below it), as the host sees it.
    pub fn pid(&self) -> u32 {
        self.inner.unwrap_or_else(|| self.child.id())
    }

    /// Ask it to drain and exit.
    pub fn terminate(&self) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).context("SIGTERM to ember serve")?;
        Ok(())
    }

    /// The loss of its host: SIGKILL to its PID namespace (the server and
    /// every QEMU with it), no drain. Only with `pid_namespace`.
    pub fn kill_host(&mut self) -> anyhow::Result<()> {
        ensure!(self.inner.is_some(), "kill_host needs a server started with pid_namespace");
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL).context("SIGKILL to its namespace")?;
        let _ = self.child.wait();
        Ok(())
    }

    /// Wait for the exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(Instant::now() < deadline, "ember serve did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What a stopped server left: processes naming its state directory,
    /// and owner directories in it.
    pub fn leftovers(&self) -> Vec<String> {
        let needle = self.state_dir.to_string_lossy().into_owned();
        let mut left = crate::processes_mentioning(&needle);
        let owners = std::fs::read_dir(self.state_dir.join("owners")).into_iter().flatten().flatten();
        left.extend(owners.map(|e| format!("state left behind: {}", e.path().display())));
        left
    }

    /// SIGTERM, wait for a clean exit, and check nothing is left.
    pub fn stop(mut self, within: Duration) -> anyhow::Result<()> {
        self.terminate()?;
        let status = self.wait_exit(within)?;
        ensure!(status.success(), "ember serve exited with {status}");
        let left = self.leftovers();
        ensure!(left.is_empty(), "left behind: {left:#?}");
        Ok(())
    }
}

/// The first child of process `pid`, waited for a moment (it forks first).
fn child_of(pid: u32) -> Option<u32> {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Some(c);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

impl Drop for EmberServe {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
            let _ = self.child.wait();
        }
    }
}
