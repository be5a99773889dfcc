//! VM configuration: what to boot and how.

use std::path::PathBuf;
use std::time::Duration;

use ember_channel::ChannelChoice;
use ember_image::ImageSet;

/// Which init the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitMode {
    /// `/sbin/init-fast`: mount, hostname, exec the agent. No init system.
    Fast,
    /// The image's real init (systemd) starts the agent as a service.
    Full,
}

impl std::str::FromStr for InitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Self::Fast),
            "full" => Ok(Self::Full),
            o => Err(format!("unknown init mode {o:?} (fast, full)")),
        }
    }
}

/// How a VM's writable layer is stored (the file backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScratchKind {
    /// A qcow2 overlay of the clean image, cheap to create; snapshots live in it.
    Overlay,
    /// A sparse raw copy of the clean image, rolled back in place.
    RawCopy,
}

/// Requested acceleration; `auto` probes KVM once and caches the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            o => Err(format!("unknown accel {o:?} (auto, kvm, tcg)")),
        }
    }
}

/// How VMs are built on this host.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub memory_mb: u32,
    pub vcpus: u32,
    pub channel: ChannelChoice,
    pub init_mode: InitMode,
    pub accel: AccelChoice,
    /// From QEMU start to the agent's first reply.
    pub boot_timeout: Duration,
    /// Boot timeout of the one-off KVM probe behind `accel = auto`.
    pub kvm_probe_timeout: Duration,
    pub images: ImageSet,
    /// The image's name (labels, per-image storage such as a ZFS base).
    pub image: String,
    /// The image's `warm` command, run once in a booted VM before its clean
    /// snapshot or template ([`crate::Vm::settle`]).
    pub warm: Option<String>,
    /// Runtime state (sockets, overlays, pid files); tmpfs is best.
    pub state_dir: PathBuf,
    /// Where the KVM verdict is cached across runs.
    pub cache_dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub vhost_device_vsock: PathBuf,
    /// Give the guest a NIC on an isolated hub (for `configure` tests).
    pub isolated_nic: bool,
    /// Let unprivileged guest users create user namespaces. Off by default:
    /// they are where most guest-kernel privilege escalations start, and a
    /// guest root is one step closer to the host's QEMU.
    pub user_namespaces: bool,
    /// QEMU drops to this user after start-up (only when ember runs as root).
    pub qemu_user: Option<String>,
    pub scratch: ScratchKind,
    /// Where raw scratch disks come from (`ScratchKind::RawCopy`).
    pub storage: ember_storage::StorageConfig,
}

impl VmConfig {
    pub const DEFAULT_MEMORY_MB: u32 = 256;
    pub const MIN_MEMORY_MB: u32 = 128;

    /// Defaults for everything but the images.
    pub fn with_images(images: ImageSet) -> Self {
        Self {
            memory_mb: Self::DEFAULT_MEMORY_MB,
            vcpus: 1,
            channel: ChannelChoice::Auto,
            init_mode: InitMode::Fast,
            accel: AccelChoice::Auto,
            boot_timeout: Duration::from_secs(30),
            kvm_probe_timeout: Duration::from_secs(8),
            images,
            image: ember_image::DEFAULT_IMAGE.to_string(),
            warm: None,
            state_dir: default_state_dir(),
            cache_dir: default_cache_dir(),
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
            isolated_nic: false,
            user_namespaces: false,
            qemu_user: nix::unistd::geteuid().is_root().then(|| "nobody".to_string()),
            scratch: ScratchKind::Overlay,
            storage: ember_storage::StorageConfig::File,
        }
    }

    /// Every problem at once, so a user fixes them in one go.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.memory_mb < Self::MIN_MEMORY_MB {
            p.push(format!(
                "vm.memory_mb = {} is below the minimum of {}",
                self.memory_mb,
                Self::MIN_MEMORY_MB
            ));
        }
        if !(1..=64).contains(&self.vcpus) {
            p.push(format!("vm.vcpus = {} must be between 1 and 64", self.vcpus));
        }
        if self.boot_timeout < Duration::from_millis(100) {
            p.push("vm.boot_timeout must be at least 100ms".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

pub fn default_state_dir() -> PathBuf {
    std::env::var_os("EMBER_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| "/run/ember".into())
}

pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("EMBER_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/ember".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lists_every_problem() {
        let mut c = VmConfig::with_images(ImageSet {
            kernel: "k".into(),
            initrd: "i".into(),
            rootfs: "r".into(),
            scratch: "s".into(),
            writable_root: false,
        });
        assert!(c.validate().is_ok());
        c.memory_mb = 64;
        c.vcpus = 0;
        c.boot_timeout = Duration::ZERO;
        assert_eq!(c.validate().unwrap_err().len(), 3);
    }

    #[test]
    fn parses_choices() {
        assert_eq!("full".parse::<InitMode>(), Ok(InitMode::Full));
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("fast2".parse::<InitMode>().is_err());
    }
}
