//! Acceleration: KVM where it really works, TCG otherwise. `/dev/kvm`
//! existing proves little (a nested PVM host has one whose guests hang), so
//! `auto` boots a VM with KVM once, with a timeout, and caches the verdict
//! on disk per host kernel, QEMU binary and guest kernel.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether KVM is worth probing at all.
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Where the verdict for this combination is cached.
pub fn verdict_path(cache_dir: &Path, qemu: &Path, kernel: &Path) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let release =
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    release.hash(&mut h);
    qemu.hash(&mut h);
    std::fs::metadata(qemu).and_then(|m| m.modified()).ok().hash(&mut h);
    kernel.hash(&mut h);
    cache_dir.join(format!("accel-{:016x}", h.finish()))
}

pub fn read_verdict(path: &Path) -> Option<Accel> {
    match std::fs::read_to_string(path).ok()?.trim() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

pub fn write_verdict(path: &Path, accel: Accel) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(path, accel.name()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot cache the acceleration verdict");
    }
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo`, when the TSC is
/// constant (so "cpu MHz" is its rate). TCG guests read the host TSC.
pub fn host_tsc_khz() -> Option<u64> {
    parse_tsc_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn parse_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let field = |name: &str| {
        cpuinfo.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim())
    };
    let flags = field("flags")?;
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_only_when_constant() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2596.100\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
        assert_eq!(parse_tsc_khz(info), Some(2_596_100));
        assert_eq!(parse_tsc_khz(&info.replace(" constant_tsc", "")), None);
        assert_eq!(parse_tsc_khz("flags : constant_tsc\n"), None);
    }

    #[test]
    fn verdict_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = verdict_path(dir.path(), Path::new("/usr/bin/qemu-system-x86_64"), Path::new("/k"));
        assert_eq!(read_verdict(&p), None);
        write_verdict(&p, Accel::Tcg);
        assert_eq!(read_verdict(&p), Some(Accel::Tcg));
        std::fs::write(&p, "maybe").unwrap();
        assert_eq!(read_verdict(&p), None);
        let other = verdict_path(dir.path(), Path::new("/usr/bin/qemu-system-x86_64"), Path::new("/k2"));
        assert_ne!(p, other, "a different guest kernel gets its own verdict");
    }
}
