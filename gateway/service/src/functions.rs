//! Functions: named programs shipped with the server. Each directory under
//! the functions directory holds a `function.toml` and its code; every file
//! of the directory is copied into the VM's workspace before it runs.
//!
//! ```toml
//! description = "Word frequencies of a text"
//! lang = "sh"            # python, sh or bash
//! entry = "main.sh"      # run by the language's interpreter
//! timeout = "10s"        # optional; capped at limits.max_timeout
//! input = "stdin"        # the request body goes to stdin, or
//! # input = "file"       # is written to `input_file` in the workspace
//! # input_file = "input.bin"
//! image = "python-data"  # optional; the default image when absent
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ember_wire::FileSpec;
use serde::{Deserialize, Serialize};

use crate::api::{Invocation, Lang, Program};

/// Manifest file name in each function directory.
pub const MANIFEST: &str = "function.toml";
/// Largest total size of a function's files.
const MAX_FUNCTION_BYTES: u64 = 4 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    description: String,
    lang: Lang,
    entry: String,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    input: Input,
    input_file: Option<String>,
    image: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    #[default]
    Stdin,
    File,
}

/// A loaded function, as `GET /v1/functions` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Function {
    pub name: String,
    pub description: String,
    pub lang: Lang,
    pub entry: String,
    pub input: Input,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_file: Option<String>,
    /// Listed as `timeout_ms`; the server's default when absent.
    #[serde(rename = "timeout_ms", serialize_with = "as_millis", skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    /// The image it runs in (the default one when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip)]
    files: Vec<FileSpec>,
}

impl Function {
    /// An invocation of this function with `input` (the request body).
    pub fn invocation(&self, input: Vec<u8>, timeout: Duration) -> Invocation {
        let mut inv = Invocation::new(Program::Script { lang: self.lang, path: self.entry.clone() }, timeout);
        inv.files = self.files.clone();
        inv.function = Some(self.name.clone());
        inv.image = self.image.clone();
        match (self.input, &self.input_file) {
            (Input::File, Some(path)) => {
                inv.files.push(FileSpec { path: path.clone(), content: input, mode: 0o644 })
            }
            _ => inv.stdin = input,
        }
        inv
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

/// Every function, by name.
#[derive(Debug, Clone, Default)]
pub struct Functions {
    by_name: BTreeMap<String, Function>,
}

impl Functions {
    /// Load every function under `dir`. A broken function is an error
    /// naming it: the server should not start half-configured.
    pub fn load(dir: &Path, max_timeout: Duration) -> Result<Self, Vec<String>> {
        let mut by_name = BTreeMap::new();
        let mut problems = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(|e| vec![format!("cannot read {}: {e}", dir.display())])?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join(MANIFEST).is_file() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match load_one(&name, &path, max_timeout) {
                Ok(f) => {
                    by_name.insert(name, f);
                }
                Err(e) => problems.push(format!("function {name} ({}): {e}", path.display())),
            }
        }
        if problems.is_empty() {
            Ok(Self { by_name })
        } else {
            Err(problems)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Function> {
        self.by_name.get(name)
    }

    pub fn list(&self) -> Vec<&Function> {
        self.by_name.values().collect()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

fn as_millis<S: serde::Serializer>(t: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(t.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

fn load_one(name: &str, dir: &Path, max_timeout: Duration) -> Result<Function, String> {
    if !valid_name(name) {
        return Err("names are letters, digits, '-' and '_'".into());
    }
    let text =
        std::fs::read_to_string(dir.join(MANIFEST)).map_err(|e| format!("cannot read {MANIFEST}: {e}"))?;
    let m: Manifest = toml::from_str(&text).map_err(|e| format!("{MANIFEST}: {}", e.to_string().trim()))?;
    if m.timeout.is_some_and(|t| t.is_zero()) {
        return Err("timeout must be above zero".into());
    }
    if m.image.as_deref().is_some_and(|i| !ember_image::valid_name(i)) {
        return Err(format!("image {:?} is not an image name", m.image.unwrap_or_default()));
    }
    let timeout = m.timeout.map(|t| {
        if t > max_timeout {
            tracing::warn!(function = name, "timeout {t:?} capped at limits.max_timeout ({max_timeout:?})");
        }
        t.min(max_timeout)
    });
    let input_file = match (m.input, m.input_file) {
        (Input::File, Some(f)) if !f.is_empty() && !f.contains("..") && !f.starts_with('/') => Some(f),
        (Input::File, _) => return Err("input = \"file\" needs a relative input_file".into()),
        (Input::Stdin, Some(_)) => return Err("input_file goes with input = \"file\"".into()),
        (Input::Stdin, None) => None,
    };
    let mut files = Vec::new();
    let mut total = 0u64;
    collect_files(dir, dir, &mut files, &mut total)?;
    if !files.iter().any(|f| f.path == m.entry) {
        return Err(format!("entry {:?} is not a file of the function", m.entry));
    }
    Ok(Function {
        name: name.to_string(),
        description: m.description,
        lang: m.lang,
        entry: m.entry,
        input: m.input,
        input_file,
        timeout,
        image: m.image,
        files,
    })
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<FileSpec>, total: &mut u64) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            collect_files(root, &path, out, total)?;
            continue;
        }
        let rel = path.strip_prefix(root).map_err(|e| e.to_string())?;
        let rel = rel.to_str().ok_or_else(|| format!("{} is not a UTF-8 name", rel.display()))?;
        if rel == MANIFEST {
            continue;
        }
        *total += meta.len();
        if *total > MAX_FUNCTION_BYTES {
            return Err(format!("its files exceed {MAX_FUNCTION_BYTES} bytes"));
        }
        let content = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        out.push(FileSpec { path: rel.to_string(), content, mode: meta.permissions().mode() & 0o755 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, manifest: &str, files: &[(&str, &str)]) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(MANIFEST), manifest).unwrap();
        for (p, c) in files {
            let p = d.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
    }

    #[test]
    fn loads_functions_with_their_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "upper",
            "description = \"d\"\nlang = \"sh\"\nentry = \"main.sh\"\ntimeout = \"5s\"",
            &[("main.sh", "tr a-z A-Z"), ("lib/x.txt", "x")],
        );
        write(
            dir.path(),
            "inspect",
            "description = \"d\"\nlang = \"python\"\nentry = \"m.py\"\ninput = \"file\"\ninput_file = \"in.bin\"",
            &[("m.py", "")],
        );
        std::fs::create_dir(dir.path().join("not-a-function")).unwrap();
        let fns = Functions::load(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(fns.len(), 2);
        let up = fns.get("upper").unwrap();
        let inv = up.invocation(b"abc".to_vec(), up.timeout().unwrap());
        assert_eq!(inv.stdin, b"abc");
        assert_eq!(inv.program, Program::Script { lang: Lang::Sh, path: "main.sh".into() });
        let paths: Vec<&str> = inv.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["lib/x.txt", "main.sh"]);
        let capped = Functions::load(dir.path(), Duration::from_secs(2)).unwrap();
        assert_eq!(capped.get("upper").unwrap().timeout(), Some(Duration::from_secs(2)));
        let insp = fns.get("inspect").unwrap();
        let inv = insp.invocation(vec![0xff], Duration::from_secs(1));
        assert!(inv.stdin.is_empty());
        assert_eq!((inv.files[1].path.as_str(), inv.files[1].content.as_slice()), ("in.bin", &[0xffu8][..]));
    }

    #[test]
    fn broken_manifests_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a", "description = \"d\"\nlang = \"ruby\"\nentry = \"m\"", &[("m", "")]);
        write(dir.path(), "b", "description = \"d\"\nlang = \"sh\"\nentry = \"missing.sh\"", &[]);
        write(
            dir.path(),
            "c",
            "description = \"d\"\nlang = \"sh\"\nentry = \"m\"\ntimeout = \"0s\"",
            &[("m", "")],
        );
        write(
            dir.path(),
            "d",
            "description = \"d\"\nlang = \"sh\"\nentry = \"m\"\ninput = \"file\"",
            &[("m", "")],
        );
        let all = Functions::load(dir.path(), Duration::from_secs(60)).unwrap_err().join("\n");
        for needle in
            ["function a", "ruby", "function b", "missing.sh", "function c", "function d", "input_file"]
        {
            assert!(all.contains(needle), "missing {needle:?} in {all}");
        }
    }
}
