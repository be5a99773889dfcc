//! The runtime state directory. Each ember process owns
//! `<root>/owners/<pid>-<starttime>-<n>/`, and each of its VMs a directory in
//! there with a `pids` file. At start-up, directories of owners that are no
//! longer alive are reaped: their processes killed, their files removed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

#[derive(Debug)]
pub struct StateDir {
    owner_dir: PathBuf,
}

/// What start-up cleaned up.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub vm_dirs: usize,
    pub processes: usize,
}

impl StateDir {
    /// Reap dead owners' leftovers under `root`, then claim a directory for
    /// this process.
    pub fn open(root: &Path) -> io::Result<(Self, ReapReport)> {
        let owners = root.join("owners");
        fs::create_dir_all(&owners)?;
        let report = reap_orphans(&owners)?;
        let me = std::process::id();
        let start = start_time(me).ok_or_else(|| io::Error::other("cannot read own start time"))?;
        // Several hosts may live in one process (tests): number them.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let owner_dir = owners.join(format!("{me}-{start}-{seq}"));
        fs::create_dir_all(owner_dir.join("vms"))?;
        Ok((Self { owner_dir }, report))
    }

    pub fn owner_dir(&self) -> &Path {
        &self.owner_dir
    }

    /// This owner's name (`<pid>-<start>-<n>`), also used to tag what it
    /// makes outside the state directory (ZFS clones).
    pub fn owner_name(&self) -> String {
        self.owner_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// A fresh directory for one VM.
    pub fn create_vm_dir(&self, id: &str) -> io::Result<PathBuf> {
        let dir = self.owner_dir.join("vms").join(id);
        fs::create_dir(&dir)?;
        Ok(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.owner_dir);
    }
}

/// Record a process a VM owns, for reaping after a crash.
pub fn record_pid(vm_dir: &Path, pid: u32) -> io::Result<()> {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new().create(true).append(true).open(vm_dir.join("pids"))?;
    writeln!(f, "{pid}")
}

use ember_sys::procfs::{identity_alive as owner_alive, start_time};

fn reap_orphans(owners: &Path) -> io::Result<ReapReport> {
    let mut report = ReapReport::default();
    for owner in fs::read_dir(owners)? {
        let owner = owner?;
        let name = owner.file_name().to_string_lossy().into_owned();
        if owner_alive(&name) {
            continue;
        }
        let vms = owner.path().join("vms");
        if let Ok(entries) = fs::read_dir(&vms) {
            for vm in entries.flatten() {
                report.processes += kill_recorded(&vm.path());
                report.vm_dirs += 1;
            }
        }
        fs::remove_dir_all(owner.path())?;
        tracing::info!(owner = %name, "reaped state of a dead ember process");
    }
    Ok(report)
}

/// Kill the processes recorded in a VM dir, but only those whose command
/// line still names that dir (a recycled pid belongs to someone else).
fn kill_recorded(vm_dir: &Path) -> usize {
    let pids = fs::read_to_string(vm_dir.join("pids")).unwrap_or_default();
    let needle = vm_dir.to_string_lossy().into_owned();
    let mut killed = 0;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) && killpg(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_owner_liveness_works() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(owner_alive(&format!("{me}-{start}")));
        assert!(!owner_alive(&format!("{me}-{}", start + 1)), "a recycled pid is not the owner");
        assert!(!owner_alive("garbage"));
    }

    #[test]
    fn reaps_dead_owners_and_kills_only_their_processes() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("owners/999999-1/vms/vm-a");
        fs::create_dir_all(&vm).unwrap();
        // A process whose command line names the VM dir, in its own group.
        let mut victim = std::process::Command::new("/bin/sh");
        std::os::unix::process::CommandExt::process_group(&mut victim, 0);
        // Two commands, so the shell stays (a lone `sleep 60` may be exec'd
        // in its place, and then no command line names the VM dir).
        let mut victim = victim.args(["-c", "sleep 60; true", vm.to_str().unwrap()]).spawn().unwrap();
        // And one that does not: a recycled pid must be left alone.
        let mut bystander = std::process::Command::new("/bin/sleep").arg("60").spawn().unwrap();
        record_pid(&vm, victim.id()).unwrap();
        record_pid(&vm, bystander.id()).unwrap();
        // Until the child has exec'd the shell, its command line is still
        // this test binary's.
        let needle = vm.to_string_lossy().into_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read(format!("/proc/{}/cmdline", victim.id()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        {
            assert!(std::time::Instant::now() < deadline, "the victim never ran its shell");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let (state, report) = StateDir::open(root.path()).unwrap();
        assert_eq!(report, ReapReport { vm_dirs: 1, processes: 1 });
        assert!(!root.path().join("owners/999999-1").exists());
        assert!(victim.wait().unwrap().code().is_none(), "victim was killed by a signal");
        assert!(bystander.try_wait().unwrap().is_none(), "bystander still runs");
        bystander.kill().unwrap();
        let _ = bystander.wait();

        // A live owner (this process) is never reaped.
        let (_again, report) = StateDir::open(root.path()).unwrap();
        assert_eq!(report, ReapReport::default());
        assert!(state.owner_dir().exists());
        let owner = state.owner_dir().to_path_buf();
        drop(state);
        assert!(!owner.exists(), "dropping the state dir removes it");
    }
}
