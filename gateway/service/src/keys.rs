//! API keys. A key is a random secret shown once, at `ember keys create`;
//! the keys file keeps only its SHA-256 (a key is 256 random bits, so a
//! plain hash is as strong as a slow one), with the key's name (its tenant),
//! whether it is an admin key, when it was made and its quotas. The file is
//! written whole (temporary file, then rename) under a lock file, so a
//! running server reading it never sees half of it, and two `ember keys`
//! commands at once do not lose each other's change. `ember serve` reloads
//! it when it changes ([`KeyStore::reload_if_changed`], polled every
//! second), and records when each key was last used in a file beside it
//! (`<keys>.used`), so the keys file stays the CLI's alone.
//!
//! A presented key is hashed and compared with every stored hash in
//! constant time; the secret is never logged or kept.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::quotas::Quotas;

/// What every key starts with, so a leaked one is recognisable.
pub const KEY_PREFIX: &str = "ember_";

/// The keys file: what `ember keys` writes and `ember serve` reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

/// One key as stored: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The key's name, which is its tenant.
    pub name: String,
    /// `sha256:<hex>` of the secret.
    pub hash: String,
    #[serde(default)]
    pub admin: bool,
    /// RFC 3339.
    pub created: String,
    /// This key's own quotas; what it leaves unset comes from the config.
    #[serde(default)]
    pub quotas: Quotas,
}

/// Who a request is: the key it carried, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// The key's name: its tenant.
    pub name: Arc<str>,
    pub admin: bool,
    /// The key's own quotas (unset ones fall back to the config's).
    pub quotas: Quotas,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {}: {error}", path.display())]
    Io { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("the keys file {} is not valid: {error}", path.display())]
    Parse { path: PathBuf, error: serde_json::Error },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KeyError + 'a {
    move |error| KeyError::Io { what, path: path.to_path_buf(), error }
}

/// A key's name: it names a tenant in paths, logs and metric labels.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "key name {name:?} must be 1-32 characters of lowercase letters, digits, '-' and '_' (not starting with '-')"
        )))
    }
}

/// `sha256:<hex>` of a presented secret.
pub fn hash_of(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A new secret: 256 random bits, base64url, after [`KEY_PREFIX`].
pub fn new_secret() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| KeyError::Invalid(format!("the system's random source failed: {e}")))?;
    Ok(format!("{KEY_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

/// Read a keys file; a missing one is an empty one.
pub fn read(path: &Path) -> Result<KeysFile, KeyError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|error| KeyError::Parse { path: path.into(), error })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeysFile::default()),
        Err(e) => Err(io("reading", path)(e)),
    }
}

/// Write `content` to `path` whole: a temporary file beside it (mode 0600),
/// synced, then renamed over it.
fn write_whole(path: &Path, content: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    f.write_all(content).and_then(|()| f.sync_all()).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replacing", path))
}

/// Change the keys file under its lock (`<keys>.lock`).
fn update<T>(path: &Path, change: impl FnOnce(&mut KeysFile) -> Result<T, KeyError>) -> Result<T, KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io("opening", &lock_path))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io("locking", &lock_path)(e.into()))?;
    let mut file = read(path)?;
    let out = change(&mut file)?;
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Invalid(e.to_string()))?;
    json.push(b'\n');
    write_whole(path, &json)?;
    Ok(out)
}

/// Add a key named `name`; answers its secret (shown once, stored nowhere).
pub fn create(path: &Path, name: &str, admin: bool, quotas: Quotas) -> Result<String, KeyError> {
    check_name(name)?;
    quotas.check().map_err(KeyError::Invalid)?;
    let secret = new_secret()?;
    let hash = hash_of(&secret);
    update(path, |file| {
        if file.keys.iter().any(|k| k.name == name) {
            return Err(KeyError::Invalid(format!("a key named {name:?} exists; revoke it first")));
        }
        let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        file.keys.push(KeyRecord { name: name.to_string(), hash, admin, created, quotas });
        Ok(())
    })?;
    Ok(secret)
}

/// Remove the key named `name`.
pub fn revoke(path: &Path, name: &str) -> Result<(), KeyError> {
    update(path, |file| {
        let before = file.keys.len();
        file.keys.retain(|k| k.name != name);
        if file.keys.len() == before {
            return Err(KeyError::Invalid(format!("no key is named {name:?}")));
        }
        Ok(())
    })
}

/// When each key was last used, as the server recorded it (`<keys>.used`).
pub fn last_used(path: &Path) -> BTreeMap<String, String> {
    std::fs::read(used_path(path)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn used_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".used");
    PathBuf::from(p)
}

/// What identifies a version of the keys file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn version_of(path: &Path) -> Option<Version> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Version { modified: m.modified().ok(), len: m.len(), inode: m.ino() })
}

#[derive(Debug)]
struct Loaded {
    keys: Vec<(Vec<u8>, Arc<Principal>)>,
    version: Option<Version>,
}

/// The keys `ember serve` checks requests against, reloaded on change.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    loaded: RwLock<Arc<Loaded>>,
    /// Once a key was seen, a request without one is refused even if every
    /// key is revoked later: revoking the last key does not open the server.
    ever_had_keys: std::sync::atomic::AtomicBool,
    used: Mutex<BTreeMap<String, SystemTime>>,
    used_dirty: std::sync::atomic::AtomicBool,
}

impl KeyStore {
    /// The store of the keys file at `path` (missing: no keys yet).
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        let store = Self {
            path: path.to_path_buf(),
            loaded: RwLock::new(Arc::new(Loaded { keys: Vec::new(), version: None })),
            ever_had_keys: Default::default(),
            used: Mutex::default(),
            used_dirty: Default::default(),
        };
        store.load()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<(), KeyError> {
        let version = version_of(&self.path);
        let file = read(&self.path)?;
        let keys: Vec<_> = file
            .keys
            .into_iter()
            .map(|k| {
                let principal =
                    Principal { name: Arc::from(k.name.as_str()), admin: k.admin, quotas: k.quotas };
                (k.hash.into_bytes(), Arc::new(principal))
            })
            .collect();
        if !keys.is_empty() {
            self.ever_had_keys.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Loaded { keys, version });
        Ok(())
    }

    /// Reload if the file changed since it was read; answers whether it did.
    /// A file that fails to parse keeps the keys loaded before (and is
    /// reported): a half-edited file must not open or close the server.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let now = version_of(&self.path);
        if self.current().version == now {
            return Ok(false);
        }
        self.load()?;
        Ok(true)
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.loaded.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether requests must carry a key: some key exists, or one did.
    pub fn required(&self) -> bool {
        self.ever_had_keys.load(std::sync::atomic::Ordering::Relaxed) || !self.current().keys.is_empty()
    }

    /// Mark the store as guarding a server that must never be open (one
    /// listening beyond loopback).
    pub fn require_keys(&self) {
        self.ever_had_keys.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The key `secret` belongs to, if any. Every stored hash is compared,
    /// in constant time, whichever matches.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<Principal>> {
        let presented = hash_of(secret).into_bytes();
        let loaded = self.current();
        let mut found = None;
        for (hash, principal) in &loaded.keys {
            if bool::from(hash.as_slice().ct_eq(presented.as_slice())) {
                found = Some(Arc::clone(principal));
            }
        }
        if let Some(p) = &found {
            self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(p.name.to_string(), SystemTime::now());
            self.used_dirty.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    /// The key named `name`, as loaded now (a revoked one is `None`).
    pub fn principal(&self, name: &str) -> Option<Arc<Principal>> {
        self.current().keys.iter().find(|(_, p)| &*p.name == name).map(|(_, p)| Arc::clone(p))
    }

    /// Write `<keys>.used` if a key was used since the last write.
    pub fn flush_used(&self) {
        if !self.used_dirty.swap(false, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut all = last_used(&self.path);
        for (name, at) in self.used.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            all.insert(name.clone(), humantime::format_rfc3339_seconds(*at).to_string());
        }
        let Ok(json) = serde_json::to_vec_pretty(&all) else { return };
        if let Err(e) = write_whole(&used_path(&self.path), &json) {
            tracing::warn!(error = %e, "cannot record when keys were last used");
        }
    }

    /// Poll the file every `every` (reloading it on change) and record
    /// keys' last use, until the store is dropped by everyone else.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        ember_sys::os::every(self, every, |store| {
            match store.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(keys = store.current().keys.len(), "the keys file changed: reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "the keys file changed but cannot be read; the keys loaded before stay")
                }
            }
            store.flush_used();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_authenticates_and_only_its_hash_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let store = KeyStore::open(&path).unwrap();
        assert!(!store.required());
        let secret = create(&path, "alice", false, Quotas::default()).unwrap();
        assert!(secret.starts_with(KEY_PREFIX) && secret.len() > 40);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&secret) && !text.contains(&secret[KEY_PREFIX.len()..]));
        assert!(text.contains(&hash_of(&secret)));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        assert!(store.reload_if_changed().unwrap());
        assert!(store.required());
        let p = store.authenticate(&secret).unwrap();
        assert_eq!((&*p.name, p.admin), ("alice", false));
        assert!(store.authenticate("ember_wrong").is_none());
        assert!(store.authenticate("").is_none());
        assert!(store.authenticate(&secret[..secret.len() - 1]).is_none());
    }

    #[test]
    fn names_are_checked_and_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/keys.json");
        for bad in ["", "Alice", "a b", "a+b", "-a", "a/b", &"x".repeat(33)] {
            assert!(create(&path, bad, false, Quotas::default()).is_err(), "{bad:?}");
        }
        create(&path, "ci-bot_2", true, Quotas::default()).unwrap();
        let err = create(&path, "ci-bot_2", false, Quotas::default()).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        assert!(revoke(&path, "nobody").unwrap_err().to_string().contains("no key"));
    }

    #[test]
    fn revoking_removes_the_key_but_never_opens_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let secret = create(&path, "bob", false, Quotas::default()).unwrap();
        let store = KeyStore::open(&path).unwrap();
        assert!(store.authenticate(&secret).is_some());
        revoke(&path, "bob").unwrap();
        assert!(store.reload_if_changed().unwrap());
        assert!(store.authenticate(&secret).is_none());
        assert!(store.required(), "the last key revoked leaves the server closed");
    }

    #[test]
    fn a_broken_file_keeps_the_keys_loaded_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let secret = create(&path, "carol", false, Quotas::default()).unwrap();
        let store = KeyStore::open(&path).unwrap();
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(store.authenticate(&secret).is_some());
    }

    #[test]
    fn last_use_is_recorded_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let secret = create(&path, "dave", false, Quotas::default()).unwrap();
        let store = KeyStore::open(&path).unwrap();
        assert!(last_used(&path).is_empty());
        store.authenticate(&secret).unwrap();
        store.flush_used();
        assert!(last_used(&path).contains_key("dave"));
        // The keys file itself is the CLI's alone.
        assert!(!std::fs::read_to_string(&path).unwrap().contains("last"));
    }

    #[test]
    fn concurrent_creates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || create(&path, &format!("t{i}"), false, Quotas::default()).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(read(&path).unwrap().keys.len(), 8);
    }
}
