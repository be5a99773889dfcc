//! Guest-side setup done once at start, and small guest facts.

use std::path::Path;

use crate::cgroup::Cgroups;

const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The console is a slow emulated UART: keep lines short and few.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .try_init();
}

/// Become the reaper of orphans and set up the cgroup tree for commands.
/// Without cgroup v2 the agent still works, with process-group kills only.
pub fn prepare_guest() -> std::io::Result<Option<Cgroups>> {
    if nix::unistd::getpid().as_raw() != 1 {
        nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
    }
    let mount = Path::new(CGROUP_MOUNT);
    if !mount.join("cgroup.controllers").exists() {
        let _ = std::fs::create_dir_all(mount);
        if let Err(e) = nix::mount::mount(
            Some("cgroup2"),
            mount,
            Some("cgroup2"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            tracing::warn!(error = %e, "cannot mount cgroup2; commands run without cgroups");
            return Ok(None);
        }
    }
    match Cgroups::init(mount) {
        Ok(c) => Ok(Some(c)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up cgroups; commands run without cgroups");
            Ok(None)
        }
    }
}

/// Milliseconds since the guest booted.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse::<f64>().ok()))
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

/// Sync and power off. Only reached on an explicit `shutdown` request.
pub fn power_off() {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    tracing::error!(error = %e, "power off failed");
}
