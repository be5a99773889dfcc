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

/// The MCP Inspector's CLI (pinned in `tests/mcp/inspector`, installed by
/// `tests/e2b/sdk-js.sh` from npm), as a client built on the TypeScript SDK
/// (what Claude Code and Cursor use): it lists the tools and calls `run`.
pub fn the_mcp_inspector_cli_lists_and_calls_tools(s: &Server) -> anyhow::Result<()> {
    let e2b = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b");
    let out = Command::new(e2b.join("sdk-js.sh")).arg(mcp_dir().join("inspector")).output()?;
    ensure!(out.status.success(), "sdk-js.sh inspector: {}", String::from_utf8_lossy(&out.stderr));
    let inspector =
        PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("node_modules/.bin/mcp-inspector");
    let url = format!("{}/mcp", s.url);
    let cli = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&inspector)
            .args(["--cli", &url, "--transport", "http"])
            .args(args)
            .output()
            .context("running the MCP Inspector (node)")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "inspector {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).with_context(|| format!("inspector {args:?} printed {stdout}"))
    };
    let list = cli(&["--method", "tools/list"])?;
    let names: Vec<&str> =
        list["tools"].as_array().context("tools")?.iter().filter_map(|t| t["name"].as_str()).collect();
    ensure!(names.len() == 20 && names.contains(&"run") && names.contains(&"process_output"), "{names:?}");
    let r = cli(&["--method", "tools/call", "--tool-name", "run", "--tool-arg", "cmd=echo inspected"])?;
    ensure!(r["isError"] == false && r["structuredContent"]["stdout"] == "inspected\n", "{r}");
    println!("    the Inspector CLI listed {} tools and ran a command", names.len());
    Ok(())
}

/// A client script running in the background, its stdout read line by line.
pub struct Spawned {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Spawned {
    /// The first line from now that starts with `prefix`.
    pub fn wait_for_line(&mut self, prefix: &str, within: std::time::Duration) -> anyhow::Result<String> {
        let until = std::time::Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => anyhow::bail!("no line starting {prefix:?} within {within:?}"),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `script` (in `tests/mcp`) against `s` without waiting for it.
pub fn spawn_client(s: &Server, script: &str, env: &[(&str, &str)]) -> anyhow::Result<Spawned> {
    let python = crate::e2b::venv_of(&mcp_dir().join("requirements.txt"))?.join("bin/python");
    let mut child = Command::new(&python)
        .arg(mcp_dir().join(script))
        .env("EMBER_URL", &s.url)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", python.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Spawned { child, lines })
}
