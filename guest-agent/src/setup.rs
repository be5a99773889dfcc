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

/// Turn unprivileged user namespaces off unless the host asked for them
/// (`ember.userns=on` on the kernel command line, `[vm] user_namespaces`):
/// most guest-kernel privilege escalations start in one. Only in an Ember
/// guest, whose command line names `ember.init=`.
pub fn limit_user_namespaces() {
    let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") else { return };
    if user_namespaces_wanted(&cmdline) != Some(false) {
        return;
    }
    if let Err(e) = std::fs::write("/proc/sys/user/max_user_namespaces", "0") {
        tracing::warn!(error = %e, "cannot turn user namespaces off");
    }
}

/// `None` outside an Ember guest; else whether user namespaces stay on.
fn user_namespaces_wanted(cmdline: &str) -> Option<bool> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.iter().any(|w| w.starts_with("ember.init=")) {
        return None;
    }
    Some(words.contains(&"ember.userns=on"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_namespaces_are_off_in_an_ember_guest_unless_asked_for() {
        assert_eq!(user_namespaces_wanted("BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet"), None, "not a guest");
        assert_eq!(user_namespaces_wanted("console=ttyS0 ember.init=fast"), Some(false));
        assert_eq!(user_namespaces_wanted("console=ttyS0 ember.init=full ember.userns=on"), Some(true));
        assert_eq!(user_namespaces_wanted("ember.init=fast ember.userns=onx"), Some(false));
    }
}
