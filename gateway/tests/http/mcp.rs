//! The official MCP Python client (pinned in `gateway/tests/mcp/requirements.txt`,
//! installed into a cached venv by `gateway/tests/e2b/sdk.sh`) against the
//! suite's server, in both protocol generations: `acceptance.py` calls every
//! tool on real VMs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context as _};

use crate::server::Server;

fn mcp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp")
}

/// Run `script` (in `tests/mcp`) with `args` against `s`; its output.
pub fn run_client(s: &Server, script: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let python = crate::e2b::venv_of(&mcp_dir().join("requirements.txt"))?.join("bin/python");
    let out = Command::new(&python)
        .arg(mcp_dir().join(script))
        .args(args)
        .env("EMBER_URL", &s.url)
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

pub fn an_mcp_client_uses_every_tool_in_both_protocols(s: &Server) -> anyhow::Result<()> {
    for mode in ["auto", "legacy"] {
        let started = std::time::Instant::now();
        let out = run_client(s, "acceptance.py", &[mode], &[])?;
        ensure!(out.trim_end().ends_with("ok done"), "{out}");
        println!("    {mode}: {} steps in {:.1} s", out.lines().count(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
