//! Loading the configuration file (see `ember_pool::config` for the keys).

use std::path::Path;

use ember_pool::config::{Config, RawConfig};

/// Load `path` (or the defaults), then validate. Every problem is listed.
pub fn load(path: Option<&Path>, images_default: &Path) -> Result<Config, Vec<String>> {
    let raw = match path {
        Some(p) => RawConfig::load(p)?,
        None => RawConfig::default(),
    };
    raw.validate(images_default)
}

/// `load`, or print every problem and exit 64 (EX_USAGE).
pub fn load_or_exit(path: Option<&Path>, images_default: &Path) -> Config {
    match load(path, images_default) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("ember: invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            std::process::exit(64);
        }
    }
}
