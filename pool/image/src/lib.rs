//! Guest images. A recipe (`initrd/images/<name>/image.toml` and an
//! optional `overlay/`, or one in a directory of `[images] dirs`) is built
//! by `initrd/image.sh` on top of the shared debootstrap base, into the
//! cache under a hash of every input (the recipe, the base, the agent, the
//! script and Ember's own overlay), so a rebuild happens when, and only
//! when, one of them changes. `ember images import` turns a root tarball
//! into an image the same way. Each built image is linked into the images
//! directory as `<name>/` beside the kernel and initrd all images share.
//!
//! ```text
//! $EMBER_IMAGES/vmlinuz, initrd.img, base.tar, ember-agent   (initrd/images.sh)
//! $EMBER_IMAGES/<name> -> $EMBER_CACHE/images/image-<name>-<hash>/
//!     rootfs.ext4  scratch.ext4  image.json  packages.txt  build.log
//! ```
#![forbid(unsafe_code)]

mod hash;
pub mod import;
mod recipe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use hash::InputHash;
pub use import::{ImportError, ImportLimits};
pub use recipe::{valid_name, RawRecipe, Recipe, MIN_MEMORY_MB};

/// The image a request gets when it names none.
pub const DEFAULT_IMAGE: &str = "default";

/// The guest images, as built by `make images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    /// Template of the per-VM scratch disk.
    pub scratch: PathBuf,
    /// The root is an overlay whose changes live on the scratch disk (the
    /// image's `writable_root`): only a reset of the whole VM undoes them.
    pub writable_root: bool,
}

impl ImageSet {
    /// Where image `name`'s files are in `dir`, unchecked.
    pub fn paths(dir: &Path, name: &str) -> Self {
        Self {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            rootfs: dir.join(name).join("rootfs.ext4"),
            scratch: dir.join(name).join("scratch.ext4"),
            writable_root: false,
        }
    }

    /// The files of image `name` in the images directory `dir`: the shared
    /// kernel and initrd, and the image's own root and scratch template
    /// (symlinks into the image cache, resolved).
    pub fn for_image(dir: &Path, name: &str) -> Result<Self, String> {
        let get = |file: &str| {
            let p = dir.join(file);
            p.canonicalize()
                .map_err(|e| format!("guest image file {} is missing ({e}); run `make images`", p.display()))
        };
        let mut problems = Vec::new();
        let mut take = |name| get(name).map_err(|e| problems.push(e)).unwrap_or_default();
        let set = Self {
            kernel: take("vmlinuz"),
            initrd: take("initrd.img"),
            rootfs: take(&format!("{name}/rootfs.ext4")),
            scratch: take(&format!("{name}/scratch.ext4")),
            writable_root: read_info(&dir.join(name)).is_some_and(|i| i.writable_root),
        };
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    Recipe,
    Import,
}

/// What a built image is (its `image.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub source: ImageSource,
    pub description: String,
    /// Debian packages the recipe asked for.
    pub packages: Vec<String>,
    pub pip: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub preload: Vec<String>,
    pub memory_mb: Option<u32>,
    pub warm: Option<String>,
    /// Size of its writable (scratch) disk.
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u32,
    /// Its root is a writable overlay, reset with the VM.
    #[serde(default)]
    pub writable_root: bool,
    /// Its user has passwordless sudo.
    #[serde(default)]
    pub sudo: bool,
    /// The input hash it was built from.
    pub hash: String,
    /// Size of the root image file.
    pub rootfs_bytes: u64,
    pub build_secs: f64,
    /// Unix time of the build.
    pub built_at: u64,
}

fn default_disk_mb() -> u32 {
    recipe::DEFAULT_DISK_MB
}

/// Where images come from and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagesConfig {
    /// The images directory (`EMBER_IMAGES`).
    pub out: PathBuf,
    /// Cache root (`EMBER_CACHE`); images go to its `images/`.
    pub cache: PathBuf,
    /// The build scripts (`initrd/` of the repository).
    pub scripts: PathBuf,
    /// Directories of recipes: the shipped ones, then `[images] dirs`.
    pub recipe_dirs: Vec<PathBuf>,
    pub import_limits: ImportLimits,
    /// A build that takes longer is killed.
    pub build_timeout: Duration,
    /// The static busybox put into every image as Ember's own.
    pub busybox: PathBuf,
}

/// Where Ember's own files are: the build scripts and shipped recipes
/// (`initrd/`), the example functions, and the images, wherever the binary
/// is run from. In order: `EMBER_HOME`; an install prefix the binary sits
/// in (`PREFIX/bin/ember` with `PREFIX/share/ember/initrd/image.sh`); a
/// checkout the binary was built in (`target/*/ember` below a directory with
/// `initrd/image.sh`); the checkout it was compiled from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub dir: PathBuf,
    /// A checkout (images in `target/images`) or an install (`images`).
    pub checkout: bool,
}

impl Home {
    pub fn find() -> Self {
        let exe = std::env::current_exe().ok().and_then(|e| e.canonicalize().ok());
        Self::find_from(std::env::var_os("EMBER_HOME").map(PathBuf::from), exe.as_deref())
    }

    fn find_from(env: Option<PathBuf>, exe: Option<&Path>) -> Self {
        let is_home = |d: &Path| d.join("initrd/image.sh").is_file();
        let checkout = |d: &Path| d.join("Cargo.toml").is_file();
        if let Some(dir) = env {
            return Self { checkout: checkout(&dir), dir };
        }
        if let Some(bin) = exe.and_then(Path::parent) {
            if let Some(share) = bin.parent().map(|p| p.join("share/ember")).filter(|d| is_home(d)) {
                return Self { dir: share, checkout: false };
            }
            if let Some(repo) = bin.ancestors().find(|d| is_home(d) && checkout(d)) {
                return Self { dir: repo.to_path_buf(), checkout: true };
            }
        }
        let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = built_from.canonicalize().unwrap_or(built_from);
        Self { checkout: true, dir }
    }

    /// The build scripts and shipped recipes.
    pub fn scripts(&self) -> PathBuf {
        self.dir.join("initrd")
    }

    /// The images directory unless `EMBER_IMAGES` says.
    pub fn images(&self) -> PathBuf {
        if self.checkout {
            self.dir.join("target/images")
        } else {
            self.dir.join("images")
        }
    }

    /// The example functions (`functions-examples`).
    pub fn functions(&self) -> PathBuf {
        self.dir.join("functions-examples")
    }
}

/// The images directory a command uses unless told (`--images`, `EMBER_IMAGES`).
pub fn default_images_dir() -> PathBuf {
    Home::find().images()
}

impl ImagesConfig {
    /// The build scripts (`initrd/`) of Ember's home ([`Home`]).
    pub fn default_scripts() -> PathBuf {
        Home::find().scripts()
    }

    /// The shipped recipes.
    pub fn shipped_recipes() -> PathBuf {
        Self::default_scripts().join("images")
    }

    pub fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            cache: std::env::var_os("EMBER_CACHE").map_or_else(|| "/var/cache/ember".into(), PathBuf::from),
            scripts: Self::default_scripts(),
            recipe_dirs: vec![Self::shipped_recipes()],
            import_limits: ImportLimits::default(),
            build_timeout: Duration::from_secs(45 * 60),
            busybox: PathBuf::from("/bin/busybox"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {name:?}; known: {}", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
    #[error("{0}")]
    Setup(String),
    #[error("building image {image} failed at step {step:?} (log: {log}):\n{tail}")]
    Build { image: String, step: String, log: String, tail: String },
    #[error("importing image {image}: {source}")]
    Import { image: String, source: ImportError },
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |error| ImageError::Io { what, error }
}

/// Whether an image is ready to boot.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageState {
    /// Built from the current inputs.
    Built(Box<ImageInfo>),
    /// Built, but its recipe or a shared input changed since.
    Stale(Box<ImageInfo>),
    /// A recipe that was never built.
    Unbuilt,
}

/// The images this configuration knows: recipes and imported images.
#[derive(Debug, Clone)]
pub struct Catalog {
    cfg: ImagesConfig,
    recipes: BTreeMap<String, Recipe>,
}

impl Catalog {
    /// Read every recipe; every bad one is reported.
    pub fn load(cfg: ImagesConfig) -> Result<Self, Vec<String>> {
        let recipes = Recipe::load_all(&cfg.recipe_dirs)?;
        Ok(Self { cfg, recipes })
    }

    pub fn config(&self) -> &ImagesConfig {
        &self.cfg
    }

    pub fn recipe(&self, name: &str) -> Option<&Recipe> {
        self.recipes.get(name)
    }

    /// Every image by name: recipes, and imported images in the images dir.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.recipes.keys().cloned().collect();
        for e in std::fs::read_dir(&self.cfg.out).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.recipes.contains_key(&name)
                && valid_name(&name)
                && read_info(&e.path()).is_some_and(|i| i.source == ImageSource::Import)
            {
                names.push(name);
            }
        }
        names.sort();
        names
    }

    pub fn knows(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }

    fn unknown(&self, name: &str) -> ImageError {
        ImageError::Unknown { name: name.to_string(), known: self.names() }
    }

    /// The shared parts `initrd/images.sh` makes.
    fn shared(&self, what: &str) -> Result<PathBuf, ImageError> {
        let p = self.cfg.out.join(what);
        p.canonicalize().map_err(|_| {
            ImageError::Setup(format!(
                "{} is missing: run `make images` (or initrd/images.sh AGENT) first",
                p.display()
            ))
        })
    }

    /// The input hash of recipe `r` now.
    pub fn recipe_hash(&self, r: &Recipe) -> Result<String, ImageError> {
        let base = self.shared("base.tar")?;
        let agent = self.shared("ember-agent")?;
        let mut h = InputHash::new("ember-image-recipe-1");
        // The base and agent live in cache dirs named by their own hash.
        h.text("base", &cache_dir_name(&base)).text("agent", &cache_dir_name(&agent));
        self.hash_ember_parts(&mut h)?;
        h.tree("recipe", &r.dir).map_err(io_err(format!("reading recipe {}", r.dir.display())))?;
        Ok(h.finish())
    }

    fn hash_ember_parts(&self, h: &mut InputHash) -> Result<(), ImageError> {
        let s = &self.cfg.scripts;
        h.file("image.sh", &s.join("image.sh")).map_err(io_err("reading initrd/image.sh"))?;
        h.tree("overlay-rootfs", &s.join("overlay-rootfs"))
            .map_err(io_err("reading initrd/overlay-rootfs"))?;
        let bb = &self.cfg.busybox;
        h.file("busybox", bb).map_err(io_err(format!("reading {} (busybox-static)", bb.display())))?;
        Ok(())
    }

    /// Built, stale or unbuilt; an error for a name nobody knows.
    pub fn state(&self, name: &str) -> Result<ImageState, ImageError> {
        let info = read_info(&self.cfg.out.join(name));
        match (self.recipes.get(name), info) {
            (Some(r), Some(info)) => {
                let now = self.recipe_hash(r)?;
                Ok(if info.hash == now {
                    ImageState::Built(Box::new(info))
                } else {
                    ImageState::Stale(Box::new(info))
                })
            }
            (Some(_), None) => Ok(ImageState::Unbuilt),
            (None, Some(info)) if info.source == ImageSource::Import => Ok(ImageState::Built(Box::new(info))),
            (None, _) => Err(self.unknown(name)),
        }
    }

    /// The built image's info, if it is built and current.
    pub fn built(&self, name: &str) -> Option<ImageInfo> {
        match self.state(name) {
            Ok(ImageState::Built(i)) => Some(*i),
            _ => None,
        }
    }

    /// The files a VM of image `name` boots from.
    pub fn image_set(&self, name: &str) -> Result<ImageSet, String> {
        ImageSet::for_image(&self.cfg.out, name)
    }

    /// Build recipe `name` (a no-op when the cache has it), and link it.
    pub async fn build(&self, name: &str) -> Result<ImageInfo, ImageError> {
        let r = self.recipes.get(name).ok_or_else(|| self.unknown(name))?;
        let hash = self.recipe_hash(r)?;
        let env = vec![
            ("EMBER_IMAGE_RECIPE".to_string(), r.dir.to_string_lossy().into_owned()),
            ("EMBER_IMAGE_PACKAGES".to_string(), r.packages.join(" ")),
            ("EMBER_IMAGE_PIP".to_string(), r.pip.join("\n")),
            ("EMBER_IMAGE_DISK_MB".to_string(), r.disk_mb.to_string()),
            ("EMBER_IMAGE_WRITABLE_ROOT".to_string(), u8::from(r.writable_root).to_string()),
            ("EMBER_IMAGE_SUDO".to_string(), u8::from(r.sudo).to_string()),
        ];
        let info = ImageInfo {
            name: r.name.clone(),
            source: ImageSource::Recipe,
            description: r.description.clone(),
            packages: r.packages.clone(),
            pip: r.pip.clone(),
            env: r.env.clone(),
            preload: r.preload.clone(),
            memory_mb: r.memory_mb,
            warm: r.warm.clone(),
            disk_mb: r.disk_mb,
            writable_root: r.writable_root,
            sudo: r.sudo,
            hash,
            rootfs_bytes: 0,
            build_secs: 0.0,
            built_at: 0,
        };
        let base = self.shared("base.tar")?;
        self.run_build(info, &base, env).await
    }

    /// Turn a root filesystem tarball into image `name`.
    pub async fn import(&self, name: &str, tarball: &Path) -> Result<ImageInfo, ImageError> {
        if !valid_name(name) {
            return Err(ImageError::Setup(format!(
                "{name:?} cannot name an image: use 1-63 of a-z, 0-9, '-' and '_'"
            )));
        }
        if self.recipes.contains_key(name) {
            return Err(ImageError::Setup(format!(
                "a recipe already defines image {name}; import under another name"
            )));
        }
        let import_err = |source| ImageError::Import { image: name.to_string(), source };
        let size =
            std::fs::metadata(tarball).map_err(io_err(format!("reading {}", tarball.display())))?.len();
        let limit = self.cfg.import_limits.max_bytes;
        if size > limit {
            return Err(import_err(ImportError::TooLarge { size, limit }));
        }
        let mut h = InputHash::new("ember-image-import-1");
        h.file("tarball", tarball).map_err(io_err(format!("reading {}", tarball.display())))?;
        h.text("agent", &cache_dir_name(&self.shared("ember-agent")?));
        self.hash_ember_parts(&mut h)?;
        let hash = h.finish();
        let images = self.cfg.cache.join("images");
        std::fs::create_dir_all(&images).map_err(io_err(format!("creating {}", images.display())))?;
        let unpacked = tempdir_in(&images, &format!("import-{name}"))?;
        let root = unpacked.0.join("root");
        std::fs::create_dir(&root).map_err(io_err("creating the import root"))?;
        let (tar, dest, limits) = (tarball.to_path_buf(), root.clone(), self.cfg.import_limits);
        tokio::task::spawn_blocking(move || {
            import::unpack(&tar, &dest, limits)?;
            import::check_shell(&dest)
        })
        .await
        .map_err(|e| ImageError::Setup(format!("the unpacking task failed: {e}")))?
        .map_err(import_err)?;
        let info = ImageInfo {
            name: name.to_string(),
            source: ImageSource::Import,
            description: format!("imported from {}", tarball.display()),
            packages: Vec::new(),
            pip: Vec::new(),
            env: BTreeMap::new(),
            preload: Vec::new(),
            memory_mb: None,
            warm: None,
            disk_mb: recipe::DEFAULT_DISK_MB,
            writable_root: false,
            sudo: false,
            hash,
            rootfs_bytes: 0,
            build_secs: 0.0,
            built_at: 0,
        };
        self.run_build(info, &root, Vec::new()).await
    }

    /// Run `image.sh` for `info` unless the cache holds its hash; link the
    /// result as `<out>/<name>`. One build per image at a time (a lock
    /// file), so `ember serve` and `make images` never race.
    async fn run_build(
        &self,
        mut info: ImageInfo,
        source: &Path,
        mut env: Vec<(String, String)>,
    ) -> Result<ImageInfo, ImageError> {
        let images = self.cfg.cache.join("images");
        std::fs::create_dir_all(&images).map_err(io_err(format!("creating {}", images.display())))?;
        let lock_path = images.join(format!("image-{}.lock", info.name));
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        let _lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
        })
        .await
        .map_err(|e| ImageError::Setup(format!("the lock task failed: {e}")))?
        .map_err(|e| ImageError::Setup(format!("locking {}: {e}", lock_path.display())))?;

        reap_leftovers(&images, &info.name);
        let dest = images.join(format!("image-{}-{}", info.name, info.hash));
        if let Some(cached) = read_info(&dest).filter(|_| dest.join(".complete").exists()) {
            self.link(&cached.name, &dest)?;
            return Ok(cached);
        }
        let tmp = tempdir_in(&images, &format!("image-{}-{}", info.name, info.hash))?;
        let agent = self.shared("ember-agent")?;
        env.extend([
            ("EMBER_IMAGE_NAME".to_string(), info.name.clone()),
            ("EMBER_IMAGE_ENV".to_string(), info.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()),
            ("EMBER_IMAGE_PRELOAD".to_string(), info.preload.join("\n")),
            ("EMBER_BUSYBOX".to_string(), self.cfg.busybox.to_string_lossy().into_owned()),
            ("TMPDIR".to_string(), images.to_string_lossy().into_owned()),
        ]);
        let log_path = tmp.0.join("build.log");
        let started = std::time::Instant::now();
        tracing::info!(image = %info.name, hash = %info.hash, "building image");
        let ok = run_script(
            &self.cfg.scripts.join("image.sh"),
            &[tmp.0.as_os_str(), agent.as_os_str(), source.as_os_str()],
            &env,
            &log_path,
            self.cfg.build_timeout,
        )
        .await?;
        if !ok {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let kept = images.join(format!("image-{}.failed.log", info.name));
            let _ = std::fs::copy(&log_path, &kept);
            let (step, tail) = failure_of(&log);
            return Err(ImageError::Build {
                image: info.name.clone(),
                step,
                log: kept.display().to_string(),
                tail,
            });
        }
        info.build_secs = started.elapsed().as_secs_f64();
        info.built_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        info.rootfs_bytes = std::fs::metadata(tmp.0.join("rootfs.ext4")).map(|m| m.len()).unwrap_or(0);
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ImageError::Setup(e.to_string()))?;
        std::fs::write(tmp.0.join("image.json"), json).map_err(io_err("writing image.json"))?;
        std::fs::write(tmp.0.join(".complete"), b"").map_err(io_err("marking the image complete"))?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp.0, &dest).map_err(io_err(format!("moving the image to {}", dest.display())))?;
        tmp.forget();
        self.link(&info.name, &dest)?;
        tracing::info!(image = %info.name, secs = info.build_secs, bytes = info.rootfs_bytes, "image built");
        Ok(info)
    }

    /// Point `<out>/<name>` at `dest`, atomically.
    fn link(&self, name: &str, dest: &Path) -> Result<(), ImageError> {
        std::fs::create_dir_all(&self.cfg.out)
            .map_err(io_err(format!("creating {}", self.cfg.out.display())))?;
        let link = self.cfg.out.join(name);
        let tmp = self.cfg.out.join(format!(".{name}.link.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(dest, &tmp).map_err(io_err(format!("linking {}", link.display())))?;
        std::fs::rename(&tmp, &link).map_err(io_err(format!("linking {}", link.display())))
    }
}

fn cache_dir_name(p: &Path) -> String {
    p.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// An image directory's `image.json`.
pub fn read_info(dir: &Path) -> Option<ImageInfo> {
    let text = std::fs::read(dir.join("image.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The step a failed build was in and the last lines of its log.
fn failure_of(log: &str) -> (String, String) {
    let step =
        log.lines().rev().find_map(|l| l.strip_prefix("[image] step: ")).unwrap_or("start").to_string();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    (step, tail)
}

/// A temporary directory removed on drop unless forgotten.
struct TempDir(PathBuf);

impl TempDir {
    fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(parent: &Path, prefix: &str) -> Result<TempDir, ImageError> {
    let p = parent.join(format!("{prefix}.tmp.{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
    Ok(TempDir(p))
}

/// Remove what a killed build of image `name` left in `images`: its
/// half-made cache entries and the script's work directory, unmounting
/// what the build chroot had mounted there first. The caller holds the
/// image's build lock, so no live build owns them.
fn reap_leftovers(images: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(images) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        if !is_leftover_of(&file, name) {
            continue;
        }
        let dir = e.path();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(&dir))
            .collect();
        // Innermost first.
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            if let Err(e) = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(mount = m, error = %e, "cannot unmount a killed build's mount; leaving its directory");
                return;
            }
        }
        tracing::info!(dir = %dir.display(), "removing what a killed image build left");
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a killed build's directory");
        }
    }
}

/// Whether `file` in the image cache is a half-made entry or work directory
/// of image `name` (and of no other image whose name starts the same).
fn is_leftover_of(file: &str, name: &str) -> bool {
    if let Some(rest) = file.strip_prefix(&format!("image-{name}-")) {
        let (hash, tail) = rest.split_at(rest.len().min(16));
        return hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && tail.starts_with(".tmp.");
    }
    // Image names hold no '.', so the one after the name ends it.
    file.starts_with(&format!("ember-image-{name}."))
}

/// Run a build script in its own process group, output to `log`. Past
/// `timeout`, or when the future is dropped (the caller was interrupted),
/// the whole group gets SIGTERM: the script's trap then unmounts and
/// removes its work directory (a SIGKILL would leave them).
async fn run_script(
    script: &Path,
    args: &[&std::ffi::OsStr],
    env: &[(String, String)],
    log: &Path,
    timeout: Duration,
) -> Result<bool, ImageError> {
    let out = std::fs::File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io_err("duplicating the log file"))?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let mut child = cmd.spawn().map_err(io_err(format!("running {}", script.display())))?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let guard = GroupKiller(pid);
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.map_err(io_err("waiting for the build"))?,
        Err(_) => {
            drop(guard);
            let _ = child.wait().await;
            std::fs::write(log.with_extension("timeout"), b"").ok();
            return Err(ImageError::Setup(format!(
                "the build took longer than {timeout:?} and was killed; see {}",
                log.display()
            )));
        }
    };
    std::mem::forget(guard);
    Ok(status.success())
}

/// Kills a process group when dropped.
struct GroupKiller(Option<nix::unistd::Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageSet::for_image(dir.path(), "default").unwrap_err();
        for name in ["vmlinuz", "initrd.img", "default/rootfs.ext4", "default/scratch.ext4"] {
            assert!(err.contains(name), "{err}");
        }
        assert!(err.contains("make images"));
    }

    #[test]
    fn home_is_found_from_the_env_an_install_prefix_or_a_checkout() {
        let t = tempfile::tempdir().unwrap();
        let prefix = t.path().join("usr");
        std::fs::create_dir_all(prefix.join("share/ember/initrd")).unwrap();
        std::fs::write(prefix.join("share/ember/initrd/image.sh"), b"").unwrap();
        let installed = Home::find_from(None, Some(&prefix.join("bin/ember")));
        assert_eq!(installed, Home { dir: prefix.join("share/ember"), checkout: false });
        assert_eq!(installed.images(), prefix.join("share/ember/images"));
        let repo = t.path().join("src/ember");
        std::fs::create_dir_all(repo.join("initrd")).unwrap();
        std::fs::create_dir_all(repo.join("target/release")).unwrap();
        std::fs::write(repo.join("initrd/image.sh"), b"").unwrap();
        std::fs::write(repo.join("Cargo.toml"), b"").unwrap();
        let checkout = Home::find_from(None, Some(&repo.join("target/release/ember")));
        assert_eq!(checkout, Home { dir: repo.clone(), checkout: true });
        assert_eq!(
            (checkout.images(), checkout.scripts()),
            (repo.join("target/images"), repo.join("initrd"))
        );
        let told =
            Home::find_from(Some(t.path().join("elsewhere")), Some(&repo.join("target/release/ember")));
        assert_eq!(told.dir, t.path().join("elsewhere"));
        // A binary anywhere else: the checkout it was compiled from.
        let stray = Home::find_from(None, Some(&t.path().join("bin/ember")));
        assert!(stray.scripts().join("image.sh").is_file(), "{stray:?}");
    }

    #[test]
    fn leftovers_are_told_apart_by_the_whole_image_name() {
        let h = "0123456789abcdef";
        assert!(is_leftover_of(&format!("image-python-{h}.tmp.xyz"), "python"));
        assert!(!is_leftover_of(&format!("image-python-data-{h}.tmp.xyz"), "python"));
        assert!(!is_leftover_of(&format!("image-python-{h}"), "python"), "a complete entry stays");
        assert!(is_leftover_of("ember-image-python.Ab12Cd", "python"));
        assert!(!is_leftover_of("ember-image-python-data.Ab12Cd", "python"));
        assert!(!is_leftover_of("image-python.lock", "python"));
    }

    #[test]
    fn a_failure_names_the_last_step_and_the_end_of_the_log() {
        let log = "[image] step: unpack the root\nok\n[image] step: install packages: nosuchpkg\n\
                   E: Unable to locate package nosuchpkg\n";
        let (step, tail) = failure_of(log);
        assert_eq!(step, "install packages: nosuchpkg");
        assert!(tail.ends_with("E: Unable to locate package nosuchpkg"), "{tail}");
        assert_eq!(failure_of("boom").0, "start");
    }

    /// A catalog over temp dirs with fake shared parts, as images.sh
    /// leaves them (links into cache dirs named by their hash).
    fn fixture() -> (tempfile::TempDir, Catalog) {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let recipes = t.path().join("recipes");
        let scripts = t.path().join("scripts");
        for d in [&out, &recipes, &scripts.join("overlay-rootfs"), &t.path().join("cache/base-aaaa")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(t.path().join("cache/agent-bbbb")).unwrap();
        std::fs::write(t.path().join("cache/base-aaaa/base.tar"), "base").unwrap();
        std::fs::write(t.path().join("cache/agent-bbbb/ember-agent"), "agent").unwrap();
        std::os::unix::fs::symlink(t.path().join("cache/base-aaaa/base.tar"), out.join("base.tar")).unwrap();
        std::os::unix::fs::symlink(t.path().join("cache/agent-bbbb/ember-agent"), out.join("ember-agent"))
            .unwrap();
        std::fs::write(scripts.join("image.sh"), "#!/bin/sh\n").unwrap();
        std::fs::write(scripts.join("busybox"), "bb").unwrap();
        for name in ["one", "two"] {
            std::fs::create_dir_all(recipes.join(name).join("overlay/etc")).unwrap();
            std::fs::write(recipes.join(name).join("image.toml"), "packages = [\"curl\"]\n").unwrap();
        }
        let cfg = ImagesConfig {
            out,
            cache: t.path().join("cache"),
            scripts,
            recipe_dirs: vec![recipes],
            import_limits: ImportLimits::default(),
            build_timeout: Duration::from_secs(60),
            busybox: t.path().join("scripts/busybox"),
        };
        (t, Catalog::load(cfg).unwrap())
    }

    fn hashes(c: &Catalog) -> (String, String) {
        let h = |n| c.recipe_hash(c.recipe(n).unwrap()).unwrap();
        (h("one"), h("two"))
    }

    #[test]
    fn the_hash_changes_with_its_own_recipe_and_shared_inputs_only() {
        let (t, c) = fixture();
        let (one, two) = hashes(&c);
        assert_eq!(hashes(&c), (one.clone(), two.clone()), "stable");
        let recipes = t.path().join("recipes");
        // The recipe file of one: only one changes.
        std::fs::write(recipes.join("one/image.toml"), "packages = [\"curl\", \"jq\"]\n").unwrap();
        let c = Catalog::load(c.config().clone()).unwrap();
        let (one2, two2) = hashes(&c);
        assert!(one2 != one && two2 == two);
        // A file in two's overlay: only two changes.
        std::fs::write(recipes.join("two/overlay/etc/motd"), "hi").unwrap();
        let (one3, two3) = hashes(&c);
        assert!(one3 == one2 && two3 != two2);
        // A shared input (Ember's overlay, the script, the base): both change.
        std::fs::write(t.path().join("scripts/overlay-rootfs/x"), "1").unwrap();
        let (one4, two4) = hashes(&c);
        assert!(one4 != one3 && two4 != two3);
        std::fs::write(t.path().join("scripts/image.sh"), "#!/bin/sh\n# changed\n").unwrap();
        let (one5, two5) = hashes(&c);
        assert!(one5 != one4 && two5 != two4);
        let base = t.path().join("cache/base-cccc");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("base.tar"), "base").unwrap();
        let link = t.path().join("out/base.tar");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(base.join("base.tar"), &link).unwrap();
        let (one6, two6) = hashes(&c);
        assert!(one6 != one5 && two6 != two5);
    }

    #[test]
    fn states_and_unknown_names() {
        let (_t, c) = fixture();
        assert_eq!(c.state("one").unwrap(), ImageState::Unbuilt);
        let e = c.state("nope").unwrap_err().to_string();
        assert!(e.contains("unknown image \"nope\"") && e.contains("one, two"), "{e}");
        // A built image.json with the current hash is built; another is stale.
        let dir = c.config().out.join("one");
        std::fs::create_dir_all(&dir).unwrap();
        let mut info = ImageInfo {
            name: "one".into(),
            source: ImageSource::Recipe,
            description: String::new(),
            packages: vec![],
            pip: vec![],
            env: BTreeMap::new(),
            preload: vec![],
            memory_mb: None,
            warm: None,
            disk_mb: 1024,
            writable_root: false,
            sudo: false,
            hash: c.recipe_hash(c.recipe("one").unwrap()).unwrap(),
            rootfs_bytes: 1,
            build_secs: 1.0,
            built_at: 1,
        };
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        assert!(matches!(c.state("one").unwrap(), ImageState::Built(_)));
        info.hash = "0000".into();
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        assert!(matches!(c.state("one").unwrap(), ImageState::Stale(_)));
        // An imported image is known by its image.json alone.
        let imp = c.config().out.join("mine");
        std::fs::create_dir_all(&imp).unwrap();
        info.name = "mine".into();
        info.source = ImageSource::Import;
        std::fs::write(imp.join("image.json"), serde_json::to_vec(&info).unwrap()).unwrap();
        assert_eq!(c.names(), ["mine", "one", "two"]);
        assert!(matches!(c.state("mine").unwrap(), ImageState::Built(_)));
    }
}
