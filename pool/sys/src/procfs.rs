//! What Ember reads from `/proc`: a process's CPU time and start time
//! (`/proc/<pid>/stat`), its resident memory (`/proc/<pid>/status`) and the
//! host's CPU use (`/proc/stat`). Parsers are pure functions of the text,
//! tested on samples.

/// The fields of a `/proc/<pid>/stat` line after the command name, which
/// may itself contain spaces and parentheses (field 3, the state, first).
fn fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    Some(stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect())
}

/// utime + stime (fields 14 and 15), in clock ticks.
pub fn cpu_ticks_of(stat: &str) -> Option<u64> {
    let f = fields_after_comm(stat)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// cutime + cstime (fields 16 and 17): the CPU of the process's children
/// that it has reaped, in clock ticks.
pub fn reaped_children_ticks_of(stat: &str) -> Option<u64> {
    let f = fields_after_comm(stat)?;
    Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?)
}

/// The parent's pid (field 4).
pub fn parent_pid_of(stat: &str) -> Option<u32> {
    fields_after_comm(stat)?.get(1)?.parse().ok()
}

/// Start time (field 22), in clock ticks since boot.
pub fn start_ticks_of(stat: &str) -> Option<u64> {
    fields_after_comm(stat)?.get(19)?.parse().ok()
}

fn clock_ticks_per_sec() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100, |t| t.max(1) as u64)
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(cpu_ticks_of(&read_stat(pid)?)? as f64 / clock_ticks_per_sec() as f64)
}

/// Resident memory (`VmRSS`) of a `/proc/<pid>/status` text, in bytes.
pub fn rss_bytes_of(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut f = line.split_whitespace().skip(1);
    let n: u64 = f.next()?.parse().ok()?;
    match f.next() {
        Some("kB") => n.checked_mul(1024),
        _ => None,
    }
}

/// A process's resident memory, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    rss_bytes_of(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Every process's parent, from /proc.
pub fn parents() -> std::collections::BTreeMap<u32, u32> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some(ppid) = read_stat(pid).as_deref().and_then(parent_pid_of) {
            out.insert(pid, ppid);
        }
    }
    out
}

/// CPU seconds of the children a process has reaped (they are gone from
/// /proc; their time stays with their parent).
pub fn reaped_children_cpu_seconds(pid: u32) -> Option<f64> {
    Some(reaped_children_ticks_of(&read_stat(pid)?)? as f64 / clock_ticks_per_sec() as f64)
}

/// A process's start time in clock ticks since boot (with its pid, an
/// identity that survives pid reuse).
pub fn start_time(pid: u32) -> Option<u64> {
    start_ticks_of(&read_stat(pid)?)
}

/// This process's identity that survives pid reuse, `<pid>-<start>`: what
/// Ember writes beside what it owns (state directories, namespaces, ZFS
/// clones), so a later run can tell a live owner from a dead one.
pub fn own_identity() -> String {
    let pid = std::process::id();
    format!("{pid}-{}", start_time(pid).unwrap_or(0))
}

/// Whether the process an identity names (`<pid>-<start>`, anything after
/// a further `-` ignored) is still alive.
pub fn identity_alive(identity: &str) -> bool {
    let mut fields = identity.split('-');
    let (Some(pid), Some(start)) = (fields.next(), fields.next()) else { return false };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) == Some(start),
        _ => false,
    }
}

/// Busy and total ticks of all CPUs from the `cpu` line of `/proc/stat`
/// (idle and iowait count as not busy).
pub fn host_ticks_of(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already inside user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The host's CPU use between two calls of [`HostCpu::sample`].
#[derive(Debug, Default)]
pub struct HostCpu {
    last: Option<(u64, u64)>,
}

impl HostCpu {
    /// The fraction of all CPUs busy since the previous sample (0..=1);
    /// `None` on the first call or when /proc/stat cannot be read.
    pub fn sample(&mut self) -> Option<f64> {
        let now = host_ticks_of(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let prev = self.last.replace(now)?;
        let total = now.1.saturating_sub(prev.1);
        (total > 0).then(|| now.0.saturating_sub(prev.0) as f64 / total as f64)
    }
}

/// CPUs the host has (for capacity estimates). Read once: the standard
/// library reads the cgroup's files on every call, and admission asks on
/// every claim, under the pool's lock.
pub fn host_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_resident_memory() {
        let status = "Name:\tqemu\nVmPeak:\t  900 kB\nVmRSS:\t  265432 kB\nThreads:\t5\n";
        assert_eq!(rss_bytes_of(status), Some(265_432 * 1024));
        assert_eq!(rss_bytes_of("Name:\tkthreadd\n"), None);
        assert_eq!(rss_bytes_of("VmRSS:\t12 MB\n"), None);
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn parses_process_and_host_stat() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 98765 1 2";
        assert_eq!(cpu_ticks_of(stat), Some(300));
        assert_eq!(reaped_children_ticks_of(stat), Some(0));
        assert_eq!(parent_pid_of(stat), Some(1));
        assert_eq!(start_ticks_of(stat), Some(98765));
        assert_eq!(cpu_ticks_of("garbage"), None);
        let host = "cpu  100 5 45 800 50 0 0 0 0 0\ncpu0 50 2 20 400 25 0 0 0 0 0\n";
        assert_eq!(host_ticks_of(host), Some((150, 1000)));
        assert_eq!(host_ticks_of("intr 1 2 3"), None);
    }

    #[test]
    fn samples_this_host() {
        let mut h = HostCpu::default();
        assert_eq!(h.sample(), None, "the first sample has nothing to compare with");
        assert!(cpu_seconds(std::process::id()).is_some());
        assert!(start_time(std::process::id()).is_some());
        assert!(host_cpus() >= 1);
        assert_eq!(parents().get(&std::process::id()), Some(&(nix::unistd::getppid().as_raw() as u32)));
    }
}
