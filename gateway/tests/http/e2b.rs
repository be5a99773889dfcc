//! The real e2b SDKs against the suite's server: Python's, pinned in
//! `gateway/tests/e2b/requirements*.txt` and installed into a cached venv
//! by `gateway/tests/e2b/sdk.sh` (PyPI), driving a sandbox's life through
//! the control plane; and the JS SDK, pinned in `js/package-lock.json`,
//! installed by `sdk-js.sh` (npm).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _};

use crate::server::Server;

fn e2b_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b")
}

/// The venv of a pin set (a requirements file), made once per set by
/// `sdk.sh` (the E2B and the MCP tests use it).
pub fn venv_of(requirements: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(e2b_dir().join("sdk.sh")).arg(requirements).output()?;
    ensure!(
        out.status.success(),
        "sdk.sh {}: {}",
        requirements.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn venv(requirements: &str) -> anyhow::Result<PathBuf> {
    venv_of(&e2b_dir().join(requirements))
}

/// Run `script` with the SDK of `requirements` against `s`; its output.
fn run_sdk(s: &Server, requirements: &str, script: &str) -> anyhow::Result<String> {
    let python = venv(requirements)?.join("bin/python");
    let out = Command::new(&python)
        .arg(e2b_dir().join(script))
        .env("E2B_API_URL", &s.url)
        .env("E2B_SANDBOX_URL", &s.url)
        // 2.30.0 checks the key's format client-side: e2b_ and 40 hex digits.
        .env("E2B_API_KEY", "e2b_0000000000000000000000000000000000000000")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{script} with {requirements} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Run the JS `script` (in `js/`) with the pinned JS SDK against `s`.
fn run_js(s: &Server, script: &str) -> anyhow::Result<String> {
    let out = Command::new(e2b_dir().join("sdk-js.sh")).output()?;
    ensure!(out.status.success(), "sdk-js.sh: {}", String::from_utf8_lossy(&out.stderr));
    let sdk = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let source = std::fs::File::open(e2b_dir().join("js").join(script))?;
    let out = Command::new("node")
        .arg("--input-type=module")
        .current_dir(&sdk)
        .stdin(source)
        .env("E2B_API_URL", &s.url)
        .env("E2B_SANDBOX_URL", &s.url)
        .env("E2B_API_KEY", "e2b_0000000000000000000000000000000000000000")
        .env_remove("E2B_DEBUG")
        .env_remove("E2B_DOMAIN")
        .output()
        .context("running node (the machine's Node.js)")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "{script} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

pub fn the_js_sdk_drives_a_sandbox(s: &Server) -> anyhow::Result<()> {
    let out = run_js(s, "sandbox.mjs")?;
    ensure!(out.trim_end().ends_with("ok done"), "{out}");
    println!("    js sandbox.mjs: {} steps", out.lines().count());
    Ok(())
}

pub fn the_python_sdk_drives_a_sandboxs_life(s: &Server) -> anyhow::Result<()> {
    for requirements in ["requirements.txt", "requirements-floor.txt"] {
        for script in ["lifecycle.py", "commands.py", "files.py", "watch_ports.py"] {
            let out = run_sdk(s, requirements, script)?;
            ensure!(out.trim_end().ends_with("ok done"), "{out}");
            println!("    {requirements} {script}: {} steps", out.lines().count());
        }
    }
    // e2b-code-interpreter needs e2b >= 2.55.1: only with the current pins.
    let out = run_sdk(s, "requirements.txt", "interpreter.py")?;
    ensure!(out.trim_end().ends_with("ok done"), "{out}");
    println!("    requirements.txt interpreter.py: {} steps", out.lines().count());
    Ok(())
}
