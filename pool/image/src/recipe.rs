//! A recipe: `<dir>/<name>/image.toml` and an optional `overlay/` tree that
//! is copied into the image's root. Parsed and checked here, so that a bad
//! recipe is refused with its name and field before any build starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What `image.toml` may say; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub description: Option<String>,
    /// Debian packages (`name` or `name=version`).
    #[serde(default)]
    pub packages: Vec<String>,
    /// pip requirements (`name`, `name==1.2`, `name[extra]>=1`), installed
    /// from the package registry at build time.
    #[serde(default)]
    pub pip: Vec<String>,
    /// Environment of every command in the image.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Python modules the pre-warmed Python imports before the clean
    /// snapshot, so that calls find them imported.
    #[serde(default)]
    pub preload: Vec<String>,
    /// The VM memory of this image's pool unless `[pool.images.NAME]` says.
    pub memory_mb: Option<u32>,
    /// A shell command run once in a booted VM before its clean snapshot
    /// (to fill caches the way a first call would).
    pub warm: Option<String>,
    /// Size of the writable disk every VM (and so every session) of the
    /// image gets: home, /tmp, /var/tmp. 1024 unless said.
    pub disk_mb: Option<u32>,
    /// The root filesystem is writable: an overlay whose changes live on
    /// the writable disk, so they are reset with the VM like home and
    /// /tmp, and kept by a paused session. False unless said.
    #[serde(default)]
    pub writable_root: bool,
    /// The user may run anything as root with `sudo`, without a password
    /// (the `sudo` package is installed). False unless said.
    #[serde(default)]
    pub sudo: bool,
}

/// A checked recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    pub packages: Vec<String>,
    pub pip: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub preload: Vec<String>,
    pub memory_mb: Option<u32>,
    pub warm: Option<String>,
    pub disk_mb: u32,
    pub writable_root: bool,
    pub sudo: bool,
}

/// The writable disk of an image that names none.
pub const DEFAULT_DISK_MB: u32 = 1024;
/// Bounds of `disk_mb`: ext4 and the user's home need a few MB; the
/// scratch disk is a sparse file, but a paused session's copy is not.
pub const MIN_DISK_MB: u32 = 32;
pub const MAX_DISK_MB: u32 = 64 * 1024;

/// The smallest guest the agent and a shell run in.
pub const MIN_MEMORY_MB: u32 = 128;
const MAX_ENTRIES: usize = 512;

/// Whether `name` may name an image: it becomes a directory and a label.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_package(p: &str) -> bool {
    let (name, version) = p.split_once('=').map_or((p, None), |(n, v)| (n, Some(v)));
    let name_ok = name.len() >= 2
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.~:".contains(&b))
    });
    name_ok && version_ok
}

/// A pip requirement of the plain form: a project name, optional extras,
/// optional version specifiers. No options (`-r`, `--index-url`), URLs or
/// paths: the recipe says what, the registry says where.
fn valid_requirement(r: &str) -> bool {
    let name_end = r.find(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c))).unwrap_or(r.len());
    let (name, rest) = r.split_at(name_end);
    let starts_ok = name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok = rest.chars().all(|c| c.is_ascii_alphanumeric() || "[],.-_=<>!~* ".contains(c));
    starts_ok && rest_ok && !rest.contains("://")
}

fn valid_env_key(k: &str) -> bool {
    k.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_module(m: &str) -> bool {
    !m.is_empty()
        && m.split('.').all(|part| {
            part.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

impl RawRecipe {
    /// Check every field; all problems at once, each naming the recipe.
    pub fn validate(self, name: &str, dir: &Path) -> Result<Recipe, Vec<String>> {
        let mut problems = Vec::new();
        let mut bad = |what: String| problems.push(format!("image {name}: {what}"));
        if !valid_name(name) {
            bad("the name must be 1-63 of a-z, 0-9, '-' and '_', starting with a letter or digit".into());
        }
        for p in self.packages.iter().filter(|p| !valid_package(p)) {
            bad(format!("packages: {p:?} is not a Debian package name (or name=version)"));
        }
        for r in self.pip.iter().filter(|r| !valid_requirement(r)) {
            bad(format!("pip: {r:?} is not a plain requirement (name, extras, version specifiers)"));
        }
        for (k, v) in &self.env {
            if !valid_env_key(k) {
                bad(format!("env: {k:?} is not a variable name"));
            }
            if v.contains(['\0', '\n']) {
                bad(format!("env: the value of {k} has a NUL or newline"));
            }
        }
        for m in self.preload.iter().filter(|m| !valid_module(m)) {
            bad(format!("preload: {m:?} is not a Python module name"));
        }
        if self.packages.len() + self.pip.len() + self.env.len() + self.preload.len() > MAX_ENTRIES {
            bad(format!("more than {MAX_ENTRIES} packages, requirements, variables and modules"));
        }
        if let Some(m) = self.memory_mb.filter(|m| *m < MIN_MEMORY_MB) {
            bad(format!("memory_mb = {m} is below {MIN_MEMORY_MB}"));
        }
        if let Some(d) = self.disk_mb.filter(|d| !(MIN_DISK_MB..=MAX_DISK_MB).contains(d)) {
            bad(format!("disk_mb = {d} must be between {MIN_DISK_MB} and {MAX_DISK_MB}"));
        }
        if let Some(w) = &self.warm {
            if w.trim().is_empty() || w.contains('\0') {
                bad("warm must be a non-empty command".into());
            }
        }
        if !self.pip.is_empty()
            && !self.packages.iter().any(|p| p == "python3-pip" || p.starts_with("python3-pip="))
        {
            bad("pip requirements need \"python3-pip\" in packages".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Recipe {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            description: self.description.unwrap_or_default(),
            packages: self.packages,
            pip: self.pip,
            env: self.env,
            preload: self.preload,
            memory_mb: self.memory_mb,
            warm: self.warm,
            disk_mb: self.disk_mb.unwrap_or(DEFAULT_DISK_MB),
            writable_root: self.writable_root,
            sudo: self.sudo,
        })
    }
}

impl Recipe {
    /// Read `dir/image.toml`; the directory's name is the image's.
    pub fn load(dir: &Path) -> Result<Self, Vec<String>> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let file = dir.join("image.toml");
        let text = std::fs::read_to_string(&file)
            .map_err(|e| vec![format!("image {name}: cannot read {}: {e}", file.display())])?;
        let raw: RawRecipe = toml::from_str(&text)
            .map_err(|e| vec![format!("image {name}: {}: {}", file.display(), e.to_string().trim())])?;
        raw.validate(&name, dir)
    }

    /// Every recipe in `dirs` (each holds one directory per recipe). A name
    /// defined twice is a problem, as is any bad recipe.
    pub fn load_all(dirs: &[PathBuf]) -> Result<BTreeMap<String, Recipe>, Vec<String>> {
        let mut found = BTreeMap::new();
        let mut problems = Vec::new();
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("images: cannot read recipe directory {}: {e}", dir.display()));
                    continue;
                }
            };
            let mut subdirs: Vec<PathBuf> =
                entries.flatten().map(|e| e.path()).filter(|p| p.join("image.toml").is_file()).collect();
            subdirs.sort();
            for sub in subdirs {
                match Recipe::load(&sub) {
                    Ok(r) => {
                        if let Some(first) = found.get(&r.name).map(|f: &Recipe| f.dir.clone()) {
                            problems.push(format!(
                                "image {}: defined twice ({} and {})",
                                r.name,
                                first.display(),
                                sub.display()
                            ));
                        } else {
                            found.insert(r.name.clone(), r);
                        }
                    }
                    Err(p) => problems.extend(p),
                }
            }
        }
        if problems.is_empty() {
            Ok(found)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Recipe, Vec<String>> {
        let raw: RawRecipe = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        raw.validate("x", Path::new("/r/x"))
    }

    #[test]
    fn a_full_recipe_parses() {
        let r = check(
            r#"
            description = "numbers"
            packages = ["python3-pip", "libgomp1=12.2.0-14"]
            pip = ["numpy==1.26.4", "pandas[performance]>=2,<3"]
            preload = ["numpy", "matplotlib.pyplot"]
            memory_mb = 512
            warm = "python3 -c 'import numpy'"
            disk_mb = 4096
            writable_root = true
            sudo = true
            [env]
            MPLBACKEND = "Agg"
            "#,
        )
        .unwrap();
        assert_eq!(r.pip.len(), 2);
        assert_eq!(r.env["MPLBACKEND"], "Agg");
        assert_eq!(r.memory_mb, Some(512));
        assert_eq!(r.disk_mb, 4096);
        assert!(r.writable_root && r.sudo);
        let plain = check("").unwrap();
        assert_eq!(plain.disk_mb, DEFAULT_DISK_MB);
        assert!(!plain.writable_root && !plain.sudo);
    }

    #[test]
    fn every_bad_field_is_named() {
        let e = check(
            r#"
            packages = ["Bad Name", "ok"]
            pip = ["numpy", "--index-url=http://evil", "https://x/y.whl"]
            preload = ["1abc"]
            memory_mb = 64
            disk_mb = 8
            warm = " "
            [env]
            "A-B" = "x"
            C = "line\nbreak"
            "#,
        )
        .unwrap_err()
        .join("\n");
        for needle in [
            "\"Bad Name\"",
            "--index-url",
            "https://x/y.whl",
            "\"1abc\"",
            "memory_mb = 64",
            "disk_mb = 8",
            "warm",
            "\"A-B\"",
            "value of C",
            "python3-pip",
        ] {
            assert!(e.contains(needle), "missing {needle:?} in:\n{e}");
        }
        assert!(e.lines().all(|l| l.starts_with("image x: ")), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = check("packges = [\"curl\"]").unwrap_err().join("\n");
        assert!(e.contains("packges"), "{e}");
    }

    #[test]
    fn names() {
        for ok in ["default", "python-data", "a", "x_1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Default", "-x", "a/b", "..", "a b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn load_all_finds_recipes_and_refuses_a_name_twice() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("same")).unwrap();
            std::fs::write(d.join("same/image.toml"), "description = \"d\"").unwrap();
        }
        std::fs::create_dir(a.path().join("other")).unwrap();
        std::fs::write(a.path().join("other/image.toml"), "").unwrap();
        std::fs::create_dir(a.path().join("not-a-recipe")).unwrap();
        let one = Recipe::load_all(&[a.path().to_path_buf()]).unwrap();
        assert_eq!(one.keys().collect::<Vec<_>>(), ["other", "same"]);
        let e = Recipe::load_all(&[a.path().to_path_buf(), b.path().to_path_buf()]).unwrap_err();
        assert!(e[0].contains("defined twice"), "{e:?}");
    }
}
