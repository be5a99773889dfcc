//! Configuration in two layers: [`RawConfig`] is what a TOML file says
//! (every field optional, durations in humantime like `"90s"`), and
//! [`Config`] is the validated result. Defaults live here and nowhere else;
//! validation reports every problem at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::plan::Disks;
use ember_vm::channel::ChannelChoice;
use ember_vm::storage::{BackendKind, StorageConfig, ZfsConfig, ZfsMode};
use ember_vm::vm::{AccelChoice, ImageSet, InitMode, VmConfig};

/// How a used VM is made clean for the next caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResetMode {
    /// `snapshot` where the channel is migratable, else `destroy`.
    Auto,
    /// Restore the memory, device and disk state saved when the VM was ready.
    Snapshot,
    /// Kill user processes, roll the writable layer back, remount.
    Rollback,
    /// Kill the VM; a fresh one replaces it.
    Destroy,
}

impl ResetMode {
    pub fn name(self) -> &'static str {
        match self {
            ResetMode::Auto => "auto",
            ResetMode::Snapshot => "snapshot",
            ResetMode::Rollback => "rollback",
            ResetMode::Destroy => "destroy",
        }
    }
}

impl std::str::FromStr for ResetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "snapshot" => Self::Snapshot,
            "rollback" => Self::Rollback,
            "destroy" => Self::Destroy,
            o => return Err(format!("unknown reset mode {o:?} (auto, snapshot, rollback, destroy)")),
        })
    }
}

/// The reset a VM gets after a general call (`/v1/run`). Function calls
/// always scrub between calls of the same function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunReset {
    /// The reset mode's full reset: every caller may be another party.
    #[default]
    Full,
    /// The in-guest scrub, for single-tenant deployments: cheaper, but it
    /// cannot undo what a guest-kernel exploit did.
    Scrub,
}

/// How the pool makes new VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplenishMode {
    /// `restore` where the channel allows it (serial), else `boot`.
    Auto,
    /// Start new VMs from a saved template (falls back to `boot` on failure).
    Restore,
    /// Cold-boot every VM.
    Boot,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub vm: RawVm,
    #[serde(default)]
    pub storage: RawStorage,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub backend: Option<BackendKind>,
    #[serde(default)]
    pub zfs: RawZfs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZfs {
    pub parent: Option<String>,
    pub mode: Option<ZfsMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub enabled: Option<bool>,
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    pub target_free: Option<usize>,
    pub max_memory_mb: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    pub reset: Option<ResetMode>,
    pub run_reset: Option<RunReset>,
    pub replenish: Option<ReplenishMode>,
    pub max_uses: Option<u32>,
    /// Share of the host's CPUs (0..1) above which no VM beyond min_size
    /// is made; 1 turns the cap off.
    pub max_host_cpu: Option<f64>,
    /// How long a claim waits in the queue when the pool is at its limits.
    #[serde(default, with = "humantime_serde")]
    pub claim_timeout: Option<Duration>,
    /// Claims that may wait at once; more are refused at once.
    pub max_waiters: Option<usize>,
    /// VMs created at the same time by the replenisher.
    pub replenish_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub sizer_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub sessions: RawSessions,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub max: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub idle_ttl: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub memory_mb: Option<u32>,
    pub vcpus: Option<u32>,
    pub channel: Option<ChannelChoice>,
    pub init_mode: Option<InitMode>,
    pub accel: Option<AccelChoice>,
    #[serde(default, with = "humantime_serde")]
    pub boot_timeout: Option<Duration>,
    pub images: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// Unprivileged user namespaces in the guest (off by default).
    pub user_namespaces: Option<bool>,
}

/// The validated pool configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub enabled: bool,
    pub min_size: usize,
    pub max_size: usize,
    pub target_free: usize,
    pub max_memory_mb: u64,
    pub idle_timeout: Duration,
    pub reset: ResetMode,
    pub run_reset: RunReset,
    pub replenish: ReplenishMode,
    pub max_uses: u32,
    pub claim_timeout: Duration,
    /// Admission by capacity: a claim that would wait longer than this for
    /// a VM (at the measured service rate) is refused at once, and queued
    /// claims give up after it. `None`: wait up to `claim_timeout`. The
    /// gateway sets it from `limits.max_queue_wait`.
    pub max_queue_wait: Option<Duration>,
    /// While the host's CPUs are busier than this share (0..=1), the pool
    /// makes no VM beyond `min_size`, on demand or ahead of it. `None`: no
    /// such cap.
    pub max_host_cpu: Option<f64>,
    pub max_waiters: usize,
    pub replenish_concurrency: usize,
    pub sizer_interval: Duration,
    pub drain_timeout: Duration,
    pub max_sessions: usize,
    pub session_idle_ttl: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_size: 2,
            max_size: 10,
            target_free: 3,
            max_memory_mb: 8192,
            idle_timeout: Duration::from_secs(300),
            reset: ResetMode::Auto,
            run_reset: RunReset::Full,
            replenish: ReplenishMode::Auto,
            max_uses: 100,
            claim_timeout: Duration::from_secs(10),
            max_queue_wait: None,
            max_host_cpu: Some(crate::pool::DEFAULT_MAX_HOST_CPU),
            max_waiters: 64,
            replenish_concurrency: 2,
            sizer_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            max_sessions: 8,
            session_idle_ttl: Duration::from_secs(600),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub pool: PoolConfig,
    pub vm: VmConfig,
}

/// Parse TOML text into a raw config type; the error names the key and line.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<String>> {
    toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_string()])
}

/// [`parse_toml`] on a file; errors start with its path.
pub fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    parse_toml(&text).map_err(|p| p.into_iter().map(|m| format!("{}: {m}", path.display())).collect())
}

/// A directory holding empty image files, enough to pass config validation.
#[cfg(any(test, feature = "test-util"))]
#[allow(clippy::unwrap_used)]
pub fn empty_image_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["vmlinuz", "initrd.img", "rootfs.ext4", "scratch.ext4"] {
        std::fs::write(d.path().join(f), "").unwrap();
    }
    d
}

impl RawConfig {
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        parse_toml(text)
    }

    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        load_toml(path)
    }

    /// Apply defaults and check everything; `images_default` is used when
    /// the file names no image directory.
    pub fn validate(self, images_default: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let d = PoolConfig::default();
        let p = self.pool;
        let pool = PoolConfig {
            enabled: p.enabled.unwrap_or(d.enabled),
            min_size: p.min_size.unwrap_or(d.min_size),
            max_size: p.max_size.unwrap_or(d.max_size),
            target_free: p.target_free.unwrap_or(d.target_free),
            max_memory_mb: p.max_memory_mb.unwrap_or(d.max_memory_mb),
            idle_timeout: p.idle_timeout.unwrap_or(d.idle_timeout),
            reset: p.reset.unwrap_or(d.reset),
            run_reset: p.run_reset.unwrap_or(d.run_reset),
            replenish: p.replenish.unwrap_or(d.replenish),
            max_uses: p.max_uses.unwrap_or(d.max_uses),
            claim_timeout: p.claim_timeout.unwrap_or(d.claim_timeout),
            max_queue_wait: d.max_queue_wait,
            max_host_cpu: match p.max_host_cpu {
                Some(v) if v >= 1.0 => None,
                Some(v) => Some(v),
                None => d.max_host_cpu,
            },
            max_waiters: p.max_waiters.unwrap_or(d.max_waiters),
            replenish_concurrency: p.replenish_concurrency.unwrap_or(d.replenish_concurrency),
            sizer_interval: p.sizer_interval.unwrap_or(d.sizer_interval),
            drain_timeout: p.drain_timeout.unwrap_or(d.drain_timeout),
            max_sessions: p.sessions.max.unwrap_or(d.max_sessions),
            session_idle_ttl: p.sessions.idle_ttl.unwrap_or(d.session_idle_ttl),
        };
        if pool.max_size == 0 {
            problems.push("pool.max_size must be at least 1".into());
        }
        if pool.min_size > pool.max_size {
            problems
                .push(format!("pool.min_size ({}) exceeds pool.max_size ({})", pool.min_size, pool.max_size));
        }
        if pool.target_free > pool.max_size {
            problems.push(format!(
                "pool.target_free ({}) exceeds pool.max_size ({})",
                pool.target_free, pool.max_size
            ));
        }
        if let Some(v) = p.max_host_cpu {
            if !(v > 0.0 && v <= 1.0) {
                problems.push(format!("pool.max_host_cpu ({v}) must be above 0 and at most 1"));
            }
        }
        if pool.max_uses == 0 {
            problems.push("pool.max_uses must be at least 1".into());
        }
        if pool.replenish_concurrency == 0 {
            problems.push("pool.replenish_concurrency must be at least 1".into());
        }
        if pool.sizer_interval < Duration::from_millis(10) {
            problems.push("pool.sizer_interval must be at least 10ms".into());
        }

        let v = self.vm;
        let images_dir = v.images.unwrap_or_else(|| images_default.to_path_buf());
        let images = ImageSet::from_dir(&images_dir).unwrap_or_else(|e| {
            problems.push(e);
            ImageSet {
                kernel: PathBuf::new(),
                initrd: PathBuf::new(),
                rootfs: PathBuf::new(),
                scratch: PathBuf::new(),
            }
        });
        let mut vm = VmConfig::with_images(images);
        vm.memory_mb = v.memory_mb.unwrap_or(vm.memory_mb);
        vm.vcpus = v.vcpus.unwrap_or(vm.vcpus);
        vm.channel = v.channel.unwrap_or(vm.channel);
        vm.init_mode = v.init_mode.unwrap_or(vm.init_mode);
        vm.user_namespaces = v.user_namespaces.unwrap_or(vm.user_namespaces);
        vm.accel = v.accel.unwrap_or(vm.accel);
        vm.boot_timeout = v.boot_timeout.unwrap_or(vm.boot_timeout);
        vm.state_dir = v.state_dir.unwrap_or(vm.state_dir);
        let st = self.storage;
        vm.storage = match st.backend.unwrap_or_default() {
            BackendKind::File => {
                if st.zfs.parent.is_some() || st.zfs.mode.is_some() {
                    problems.push("[storage.zfs] is set but storage.backend is not \"zfs\"".into());
                }
                StorageConfig::File
            }
            BackendKind::Zfs => match st.zfs.parent {
                Some(parent) => {
                    StorageConfig::Zfs(ZfsConfig { parent, mode: st.zfs.mode.unwrap_or_default() })
                }
                None => {
                    problems.push(
                        "storage.backend = \"zfs\" needs storage.zfs.parent (\"<pool>/<dataset>\")".into(),
                    );
                    StorageConfig::File
                }
            },
        };
        let disks = if st.backend == Some(BackendKind::Zfs) { Disks::Zfs } else { Disks::File };
        match crate::plan::before_channel(pool.reset, pool.replenish, disks) {
            Ok(before) => vm.scratch = before.scratch,
            Err(e) => problems.push(e),
        }
        if let Err(p) = vm.validate() {
            problems.extend(p);
        }
        let min_memory = pool.min_size as u64 * u64::from(vm.memory_mb);
        if min_memory > pool.max_memory_mb {
            problems.push(format!(
                "pool.min_size ({}) x vm.memory_mb ({}) = {min_memory} MiB exceeds pool.max_memory_mb ({})",
                pool.min_size, vm.memory_mb, pool.max_memory_mb
            ));
        }
        if pool.replenish == ReplenishMode::Restore && vm.channel != ChannelChoice::Serial {
            problems.push("pool.replenish = \"restore\" needs vm.channel = \"serial\"".into());
        }
        if pool.reset == ResetMode::Snapshot && vm.channel == ChannelChoice::HybridVsock {
            problems.push(
                "pool.reset = \"snapshot\" needs a migratable channel; vm.channel = \"hybrid-vsock\" is not"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(Config { pool, vm })
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::empty_image_dir as images;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let img = images();
        let c = RawConfig::parse("").unwrap().validate(img.path()).unwrap();
        assert_eq!(c.pool, PoolConfig::default());
        assert_eq!(
            (c.pool.min_size, c.pool.max_size, c.pool.target_free, c.pool.max_memory_mb),
            (2, 10, 3, 8192)
        );
        assert_eq!(c.vm.memory_mb, 256);
    }

    #[test]
    fn parses_every_key_with_humantime_durations() {
        let img = images();
        let text = format!(
            r#"
            [pool]
            enabled = false
            min_size = 1
            max_size = 4
            target_free = 2
            max_memory_mb = 2048
            idle_timeout = "90s"
            reset = "destroy"
            replenish = "boot"
            max_uses = 7
            claim_timeout = "1500ms"
            max_waiters = 3
            replenish_concurrency = 1
            sizer_interval = "250ms"
            drain_timeout = "5s"
            [pool.sessions]
            max = 2
            idle_ttl = "1m 30s"
            [vm]
            memory_mb = 512
            vcpus = 2
            channel = "serial"
            init_mode = "full"
            accel = "tcg"
            boot_timeout = "20s"
            images = "{}"
            state_dir = "/tmp/x"
            "#,
            img.path().display()
        );
        let c = RawConfig::parse(&text).unwrap().validate(Path::new("/nonexistent")).unwrap();
        assert!(!c.pool.enabled);
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.pool.claim_timeout, Duration::from_millis(1500));
        assert_eq!(c.pool.session_idle_ttl, Duration::from_secs(90));
        assert_eq!(c.pool.reset, ResetMode::Destroy);
        assert_eq!(c.pool.replenish, ReplenishMode::Boot);
        assert_eq!((c.vm.memory_mb, c.vm.vcpus, c.vm.channel), (512, 2, ChannelChoice::Serial));
        assert_eq!(c.vm.boot_timeout, Duration::from_secs(20));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [pool]
            min_size = 20
            max_size = 10
            max_uses = 0
            max_memory_mb = 1024
            reset = "snapshot"
            [vm]
            memory_mb = 64
            channel = "hybrid-vsock"
            images = "/nonexistent"
        "#;
        let problems = RawConfig::parse(text).unwrap().validate(Path::new("/x")).unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "min_size (20) exceeds",
            "max_uses",
            "memory_mb = 64",
            "exceeds pool.max_memory_mb",
            "migratable",
            "make images",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn zfs_storage_is_parsed_and_its_conflicts_reported() {
        let img = images();
        let text = "[storage]\nbackend = \"zfs\"\n[storage.zfs]\nparent = \"tank/ember\"\nmode = \"zvol\"";
        let c = RawConfig::parse(text).unwrap().validate(img.path()).unwrap();
        assert_eq!(
            c.vm.storage,
            StorageConfig::Zfs(ZfsConfig { parent: "tank/ember".into(), mode: ZfsMode::Zvol })
        );
        assert_eq!(c.vm.scratch, ember_vm::vm::ScratchKind::RawCopy, "ZFS disks are raw");
        let c = RawConfig::parse("[storage]\nbackend = \"zfs\"\n[storage.zfs]\nparent = \"t/e\"")
            .unwrap()
            .validate(img.path())
            .unwrap();
        assert_eq!(
            c.vm.storage,
            StorageConfig::Zfs(ZfsConfig { parent: "t/e".into(), mode: ZfsMode::Dataset })
        );
        for (text, needle) in [
            ("[storage]\nbackend = \"zfs\"", "needs storage.zfs.parent"),
            ("[storage.zfs]\nparent = \"t/e\"", "storage.backend is not"),
            (
                "[pool]\nreset = \"snapshot\"\n[storage]\nbackend = \"zfs\"\n[storage.zfs]\nparent = \"t/e\"",
                "snapshot",
            ),
            ("[storage]\nbackend = \"btrfs\"", "btrfs"),
        ] {
            let e = match RawConfig::parse(text) {
                Ok(raw) => raw.validate(img.path()).unwrap_err().join("\n"),
                Err(e) => e.join("\n"),
            };
            assert!(e.contains(needle), "{text:?} -> {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_their_location() {
        for (text, needle) in [
            ("[pool]\nmin_sise = 1", "min_sise"),
            ("[pool]\nidle_timeout = \"soon\"", "idle_timeout"),
            ("[pool]\nreset = \"reboot\"", "reboot"),
            ("[vm]\nchannel = \"tcp\"", "tcp"),
            ("[gateway]\nlisten = 1", "gateway"),
        ] {
            let e = RawConfig::parse(text).unwrap_err().join("\n");
            assert!(e.contains(needle), "{text:?} -> {e}");
        }
    }
}
