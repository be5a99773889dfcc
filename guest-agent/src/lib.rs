//! The Ember guest agent.
//!
//! It serves the framed protocol of `ember-wire` on every transport the
//! guest has (AF_VSOCK and a virtio-serial port), runs user commands as an
//! unprivileged user in their own process group and cgroup, and reaps every
//! orphan, since it is PID 1 (fast init) or a child subreaper (full init).

mod cgroup;
mod configure;
mod connection;
mod exec;
mod files;
mod forkserver;
mod fs;
mod lane;
mod nic;
mod process;
mod reaper;
mod reset;
mod scrub;
mod setup;
mod streams;
mod sys;
mod transport;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cgroup::Cgroups;
pub use connection::serve;
pub use forkserver::ForkServer;
pub use lane::Lane;
pub use process::Processes;
pub use reaper::{ReapMode, Reaper};
pub use scrub::Baseline;

/// Where and as whom the agent runs user commands. The guest uses
/// [`GuestLayout::guest`]; host tests use a temp dir and the current user.
#[derive(Debug, Clone)]
pub struct GuestLayout {
    /// Default working directory, the user's home.
    pub workspace: PathBuf,
    /// Directories `reset` empties (and the only ones `write_files` may
    /// write to outside the workspace).
    pub scratch_dirs: Vec<PathBuf>,
    /// Run commands as this uid/gid; `None` keeps the agent's own.
    pub user: Option<(u32, u32)>,
    /// Hostname restored by `reset`.
    pub hostname: String,
    /// resolv.conf written by `configure`.
    pub resolv_conf: PathBuf,
    /// The image's environment (`/etc/ember/env`): every command starts
    /// with it, under the request's own.
    pub image_env: BTreeMap<String, String>,
    /// Modules the image's recipe asks the fork server to preload
    /// (`/etc/ember/preload`).
    pub preload: Vec<String>,
    /// The bulk lane's device; `None` finds it by its serial (host tests
    /// name a file).
    pub lane: Option<PathBuf>,
}

impl GuestLayout {
    pub const USER_UID: u32 = 1000;

    pub fn guest() -> Self {
        Self {
            workspace: "/home/ember".into(),
            scratch_dirs: vec!["/home/ember".into(), "/tmp".into(), "/var/tmp".into(), "/dev/shm".into()],
            user: Some((Self::USER_UID, Self::USER_UID)),
            hostname: "ember".into(),
            resolv_conf: "/etc/resolv.conf".into(),
            image_env: BTreeMap::new(),
            preload: Vec::new(),
            lane: None,
        }
    }

    /// [`Self::guest`] with what the image's build left in `/etc/ember`.
    pub fn of_image(dir: &Path) -> Self {
        let mut l = Self::guest();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        l.image_env = parse_env(&read("env"));
        l.preload =
            read("preload").lines().map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
        l
    }
}

/// `KEY=VALUE` lines; anything else is skipped (the build checked them).
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Shared state of one agent process.
#[derive(Debug)]
pub struct Agent {
    pub layout: GuestLayout,
    pub reaper: Arc<Reaper>,
    pub cgroups: Option<Cgroups>,
    /// The guest powers off on `shutdown` only when this is set.
    pub power_off_on_shutdown: bool,
    /// The pre-warmed Python, when the guest has one.
    pub forkserver: Option<ForkServer>,
    /// What `scrub` restores and checks against; `None` refuses scrubs.
    pub baseline: Option<Baseline>,
    /// Background processes (sessions).
    pub processes: Processes,
    /// The bulk lane uploads arrive on, opened on first use.
    pub lane: lane::Lane,
}

impl Agent {
    /// An agent off the guest (host tests, the gateway's router tests):
    /// commands run as the current user under `reaper`, with no cgroups,
    /// no fork server, no scrub baseline, and no power-off.
    pub fn unconfined(layout: GuestLayout, reaper: Arc<Reaper>) -> Self {
        Self {
            layout,
            reaper,
            cgroups: None,
            power_off_on_shutdown: false,
            forkserver: None,
            baseline: None,
            processes: Processes::default(),
            lane: lane::Lane::default(),
        }
    }
}

/// Command-line arguments of `ember-agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub vsock_port: Option<u32>,
    pub serial: bool,
}

impl Args {
    pub const USAGE: &'static str = "usage: ember-agent [--vsock-port PORT | --no-vsock] [--no-serial]";

    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut out = Args { vsock_port: Some(ember_wire::AGENT_VSOCK_PORT), serial: true };
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--vsock-port" => {
                    let v = it.next().ok_or("--vsock-port needs a value")?;
                    out.vsock_port = Some(v.parse().map_err(|_| format!("bad port {v:?}"))?);
                }
                "--no-vsock" => out.vsock_port = None,
                "--no-serial" => out.serial = false,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(out)
    }
}

/// Run the agent inside a guest until it is shut down.
pub async fn run(args: Args) -> std::io::Result<()> {
    setup::init_logging();
    let reaper = Reaper::start(ReapMode::All)?;
    let cgroups = setup::prepare_guest()?;
    setup::limit_user_namespaces();
    let layout = GuestLayout::of_image(Path::new("/etc/ember"));
    let baseline = match Baseline::capture(&layout.scratch_dirs) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(error = %e, "cannot record the guest's baseline; scrub is refused");
            None
        }
    };
    // Started before the host can connect; the host waits for it to be
    // ready before it snapshots the VM, so every restore has it warm.
    let forkserver = ForkServer::start(
        &reaper,
        forkserver::PYTHON.as_ref(),
        forkserver::SCRIPT.as_ref(),
        forkserver::SOCKET_DIR.as_ref(),
        &layout,
    )
    .await;
    let agent = Arc::new(Agent {
        layout,
        reaper,
        cgroups,
        power_off_on_shutdown: true,
        forkserver,
        baseline,
        processes: Processes::default(),
        lane: Lane::default(),
    });
    // Start the blocking-pool thread (file writes) before the host can
    // snapshot this VM: a thread start is dear under TCG (docs/BENCHMARKS.md,
    // "code and files calls"), and a thread in the snapshot is there after
    // every reset.
    let _ = tokio::task::spawn_blocking(|| ()).await;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "agent starting");
    transport::serve_all(agent, args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_env_and_preload_are_read_from_its_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("env"), "MPLBACKEND=Agg\nA=b=c\nbad line\n=x\n").unwrap();
        std::fs::write(d.path().join("preload"), "numpy\n\n pandas \n").unwrap();
        let l = GuestLayout::of_image(d.path());
        assert_eq!(l.image_env.len(), 2);
        assert_eq!(l.image_env["A"], "b=c");
        assert_eq!(l.preload, ["numpy", "pandas"]);
        let none = GuestLayout::of_image(&d.path().join("missing"));
        assert!(none.image_env.is_empty() && none.preload.is_empty());
    }

    #[test]
    fn parses_arguments() {
        let a = Args::parse(["--vsock-port".into(), "5000".into(), "--no-serial".into()]).unwrap();
        assert_eq!(a, Args { vsock_port: Some(5000), serial: false });
        assert!(Args::parse(["--bogus".into()]).is_err());
        assert!(Args::parse(["--vsock-port".into(), "x".into()]).is_err());
    }
}
