//! Configuration in two layers: [`RawConfig`] is what a TOML file says
//! (every field optional, durations in humantime like `"90s"`), and
//! [`Config`] is the validated result. Defaults live here and nowhere else;
//! validation reports every problem at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::plan::Disks;
use ember_channel::ChannelChoice;
use ember_image::ImageSet;
use ember_storage::{BackendKind, StorageConfig, ZfsConfig, ZfsMode};
use ember_vm::{AccelChoice, InitMode, VmConfig};

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
    /// Resets and scrubs run at once (default: the host's CPUs).
    pub reset_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub sizer_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    #[serde(default)]
    pub sessions: RawSessions,
    /// `[pool.images.NAME]`: one image's pool.
    #[serde(default)]
    pub images: BTreeMap<String, RawImagePool>,
}

/// What `[pool.images.NAME]` may override of `[pool]` for one image.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImagePool {
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    pub target_free: Option<usize>,
    pub memory_mb: Option<u32>,
}

/// One image's pool settings beside `[pool]`'s (unset: the rules of
/// [`Config::for_image`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImagePool {
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    pub target_free: Option<usize>,
    pub memory_mb: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub max: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub idle_ttl: Option<Duration>,
    /// The longest lifetime (and idle timeout) a session may ask for.
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Where paused sessions are kept (a disk, not tmpfs); a directory per
    /// image below it.
    pub dir: Option<std::path::PathBuf>,
    /// Pause a session idle this long (instead of ending it at `idle_ttl`).
    #[serde(default, with = "humantime_serde")]
    pub idle_pause: Option<Duration>,
    /// Delete a session paused this long.
    #[serde(default, with = "humantime_serde")]
    pub paused_ttl: Option<Duration>,
    /// Paused sessions kept at once (per image).
    pub max_paused: Option<usize>,
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
    /// The longest a claim that was admitted waits for a VM (the caller's
    /// patience); then it is refused.
    pub claim_timeout: Duration,
    /// Admission by capacity: a claim expected to wait longer than this for
    /// a VM (its place in the queue over the measured service rate) is
    /// refused at once, unless nobody is queued before it or a boot under
    /// way covers its place (see `pool::admission`). `None`: no claim is
    /// refused for its expected wait. The gateway sets it from
    /// `limits.max_queue_wait`.
    pub max_queue_wait: Option<Duration>,
    /// While the host's CPUs are busier than this share (0..=1), the pool
    /// makes no VM beyond `min_size`, on demand or ahead of it. `None`: no
    /// such cap.
    pub max_host_cpu: Option<f64>,
    pub max_waiters: usize,
    pub replenish_concurrency: usize,
    /// Resets (and scrubs) that run at once; `None`: as many as the host
    /// has CPUs. More at once only share the CPUs: every one of them
    /// finishes late, and VMs come back in batches instead of one by one.
    pub reset_concurrency: Option<usize>,
    pub sizer_interval: Duration,
    pub drain_timeout: Duration,
    pub max_sessions: usize,
    pub session_idle_ttl: Duration,
    /// The longest lifetime or idle timeout a session may be opened with
    /// (or extended to).
    pub session_max_lifetime: Duration,
    /// Where this pool keeps its paused sessions; `None`: they cannot pause.
    pub session_dir: Option<std::path::PathBuf>,
    /// Pause sessions idle this long; `None`: idle ones end at their idle
    /// timeout.
    pub session_idle_pause: Option<Duration>,
    pub session_paused_ttl: Duration,
    pub max_paused_sessions: usize,
}

/// Where paused sessions are kept unless `pool.sessions.dir` says: on disk
/// (`EMBER_SESSIONS_DIR` overrides it; tests use their own).
pub fn default_session_dir() -> std::path::PathBuf {
    std::env::var_os("EMBER_SESSIONS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ember/sessions".into())
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
            // Above an image's first boot here: a cold boot plus its warm-up
            // command, seconds for python-data under TCG (docs/BENCHMARKS.md,
            // Images).
            claim_timeout: Duration::from_secs(30),
            max_queue_wait: None,
            max_host_cpu: Some(crate::pool::DEFAULT_MAX_HOST_CPU),
            max_waiters: 64,
            replenish_concurrency: 2,
            reset_concurrency: None,
            sizer_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            max_sessions: 8,
            session_idle_ttl: Duration::from_secs(600),
            session_max_lifetime: Duration::from_secs(24 * 3600),
            session_dir: None,
            session_idle_pause: None,
            session_paused_ttl: Duration::from_secs(7 * 24 * 3600),
            max_paused_sessions: 64,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The defaults of every image's pool (and the default image's own).
    pub pool: PoolConfig,
    /// How VMs are built; `images` names the default image's files.
    pub vm: VmConfig,
    /// The images directory (`vm.images`, else `EMBER_IMAGES`).
    pub images_dir: PathBuf,
    pub image_pools: BTreeMap<String, ImagePool>,
}

impl Config {
    /// The pool and VM configuration of image `name`: `[pool.images.NAME]`
    /// first; else the default image keeps `[pool]`'s `min_size` and any
    /// other image starts at 0 (its sizer follows its own requests); the
    /// memory is the override's, else the recipe's (`recipe_memory_mb`),
    /// else `vm.memory_mb`. The image files are checked to exist.
    pub fn for_image(
        &self,
        name: &str,
        recipe_memory_mb: Option<u32>,
    ) -> Result<(PoolConfig, VmConfig), String> {
        let o = self.image_pools.get(name).copied().unwrap_or_default();
        let default = name == ember_image::DEFAULT_IMAGE;
        let mut pool = self.pool.clone();
        pool.min_size = o.min_size.unwrap_or(if default { self.pool.min_size } else { 0 });
        pool.max_size = o.max_size.unwrap_or(self.pool.max_size);
        pool.target_free = o.target_free.unwrap_or(self.pool.target_free).min(pool.max_size);
        // Each image's paused sessions in a directory of their own.
        pool.session_dir = self.pool.session_dir.as_ref().map(|d| d.join(name));
        let mut vm = self.vm.clone();
        vm.memory_mb = o.memory_mb.or(recipe_memory_mb).unwrap_or(self.vm.memory_mb);
        vm.images = ImageSet::for_image(&self.images_dir, name)?;
        vm.image = name.to_string();
        let min_memory = pool.min_size as u64 * u64::from(vm.memory_mb);
        if min_memory > pool.max_memory_mb {
            return Err(format!(
                "image {name}: min_size ({}) x memory_mb ({}) = {min_memory} MiB exceeds pool.max_memory_mb ({})",
                pool.min_size, vm.memory_mb, pool.max_memory_mb
            ));
        }
        vm.validate().map_err(|p| format!("image {name}: {}", p.join("; ")))?;
        Ok((pool, vm))
    }
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
    for image in ["default", "python-data"] {
        std::fs::create_dir(d.path().join(image)).unwrap();
        for f in ["rootfs.ext4", "scratch.ext4"] {
            std::fs::write(d.path().join(image).join(f), "").unwrap();
        }
    }
    for f in ["vmlinuz", "initrd.img"] {
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
            reset_concurrency: p.reset_concurrency.or(d.reset_concurrency),
            sizer_interval: p.sizer_interval.unwrap_or(d.sizer_interval),
            drain_timeout: p.drain_timeout.unwrap_or(d.drain_timeout),
            max_sessions: p.sessions.max.unwrap_or(d.max_sessions),
            session_idle_ttl: p.sessions.idle_ttl.unwrap_or(d.session_idle_ttl),
            session_max_lifetime: p.sessions.max_lifetime.unwrap_or(d.session_max_lifetime),
            session_dir: p.sessions.dir.clone().or_else(|| Some(default_session_dir())),
            session_idle_pause: p.sessions.idle_pause.or(d.session_idle_pause),
            session_paused_ttl: p.sessions.paused_ttl.unwrap_or(d.session_paused_ttl),
            max_paused_sessions: p.sessions.max_paused.unwrap_or(d.max_paused_sessions),
        };
        if pool.max_size == 0 {
            problems.push("pool.max_size must be at least 1".into());
        }
        if pool.session_max_lifetime < crate::pool::MIN_SESSION_TIMEOUT {
            problems.push("pool.sessions.max_lifetime must be at least 1s".into());
        }
        if pool.session_idle_pause.is_some_and(|p| p < crate::pool::MIN_SESSION_TIMEOUT) {
            problems.push("pool.sessions.idle_pause must be at least 1s".into());
        }
        if pool.session_idle_pause.is_some() && pool.session_dir.is_none() {
            problems.push(
                "pool.sessions.idle_pause needs pool.sessions.dir (where paused sessions are kept)".into(),
            );
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
        if pool.reset_concurrency == Some(0) {
            problems.push("pool.reset_concurrency must be at least 1".into());
        }
        if pool.replenish_concurrency == 0 {
            problems.push("pool.replenish_concurrency must be at least 1".into());
        }
        if pool.sizer_interval < Duration::from_millis(10) {
            problems.push("pool.sizer_interval must be at least 10ms".into());
        }

        let v = self.vm;
        let images_dir = v.images.unwrap_or_else(|| images_default.to_path_buf());
        // Named, not checked: `ember serve` builds a missing image first.
        let images = ImageSet::paths(&images_dir, ember_image::DEFAULT_IMAGE);
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
        let mut image_pools = BTreeMap::new();
        for (name, o) in p.images {
            let ip = ImagePool {
                min_size: o.min_size,
                max_size: o.max_size,
                target_free: o.target_free,
                memory_mb: o.memory_mb,
            };
            if !ember_image::valid_name(&name) {
                problems.push(format!("pool.images.{name}: not an image name"));
            }
            let (min, max) = (ip.min_size.unwrap_or(0), ip.max_size.unwrap_or(pool.max_size));
            if max == 0 {
                problems.push(format!("pool.images.{name}.max_size must be at least 1"));
            }
            if min > max {
                problems.push(format!("pool.images.{name}: min_size ({min}) exceeds max_size ({max})"));
            }
            if let Some(m) = ip.memory_mb.filter(|m| *m < VmConfig::MIN_MEMORY_MB) {
                problems.push(format!(
                    "pool.images.{name}.memory_mb = {m} is below the minimum of {}",
                    VmConfig::MIN_MEMORY_MB
                ));
            }
            image_pools.insert(name, ip);
        }
        if problems.is_empty() {
            Ok(Config { pool, vm, images_dir, image_pools })
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
        // A server keeps paused sessions on disk; the library default has none.
        assert_eq!(c.pool, PoolConfig { session_dir: Some(default_session_dir()), ..PoolConfig::default() });
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
    fn each_image_gets_its_pool_from_its_override_recipe_and_the_defaults() {
        let img = images();
        let text = r#"
            [pool]
            min_size = 2
            max_size = 6
            target_free = 3
            [pool.images.python-data]
            max_size = 2
            [vm]
            memory_mb = 256
        "#;
        let c = RawConfig::parse(text).unwrap().validate(img.path()).unwrap();
        let (p, v) = c.for_image("default", None).unwrap();
        assert_eq!((p.min_size, p.max_size, p.target_free, v.memory_mb), (2, 6, 3, 256));
        assert_eq!((v.image.as_str(), v.images.rootfs.ends_with("default/rootfs.ext4")), ("default", true));
        // Not the default image: starts at 0; the recipe's memory; target_free within max_size.
        let (p, v) = c.for_image("python-data", Some(512)).unwrap();
        assert_eq!((p.min_size, p.max_size, p.target_free, v.memory_mb), (0, 2, 2, 512));
        assert!(v.images.rootfs.ends_with("python-data/rootfs.ext4"));
        // An image whose files are missing is named.
        let e = c.for_image("nope", None).unwrap_err();
        assert!(e.contains("nope/rootfs.ext4"), "{e}");
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
            [pool.images.python-data]
            min_size = 3
            max_size = 2
            memory_mb = 100
            [pool.images."Bad/Name"]
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
            "pool.images.python-data: min_size (3) exceeds max_size (2)",
            "pool.images.python-data.memory_mb = 100",
            "pool.images.Bad/Name: not an image name",
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
        assert_eq!(c.vm.scratch, ember_vm::ScratchKind::RawCopy, "ZFS disks are raw");
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
