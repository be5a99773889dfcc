//! Every curl example in README.md, run against the live server, so the
//! README cannot rot. An example is a line in a ```sh block that calls curl,
//! with its `\` continuation lines; it must exit 0 with an HTTP status below
//! 400 (curl runs with --fail-with-body) and print something.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context as _};

use crate::server::Server;

/// The examples, in README order.
pub fn curl_examples(readme: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_sh = false;
    let mut current: Option<String> = None;
    for line in readme.lines() {
        let trimmed = line.trim_end();
        if trimmed.starts_with("```") {
            in_sh = trimmed == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        match current.as_mut() {
            Some(cmd) => cmd.push_str(trimmed.trim_end_matches('\\')),
            None if trimmed.contains("curl ") && !trimmed.trim_start().starts_with('#') => {
                current = Some(trimmed.trim_end_matches('\\').to_string());
            }
            None => continue,
        }
        if !trimmed.ends_with('\\') {
            out.extend(current.take());
        }
    }
    out
}

pub fn examples_work(s: &Server) -> anyhow::Result<()> {
    run_examples(&s.url, None)
}

/// Every example against the server at `url`; with `key`, each curl also
/// sends it (`Authorization: Bearer`) and `EMBER_KEY` holds it.
pub fn run_examples(url: &str, key: Option<&str>) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).context("reading README.md")?;
    let md = "```sh\ncurl -a \\\n  -b x\n# curl no\necho\n```\ncurl outside\n```sh\necho | curl y\n```\n";
    ensure!(curl_examples(md) == ["curl -a   -b x", "echo | curl y"], "the example parser is broken");
    let examples = curl_examples(&readme);
    ensure!(examples.len() >= 10, "only {} curl examples found in the README", examples.len());
    for example in examples {
        let cmd = example.replace("http://127.0.0.1:8080", url);
        let auth = if key.is_some() { "-H \"authorization: Bearer $EMBER_KEY\" " } else { "" };
        let script =
            format!("set -o pipefail\ncurl() {{ command curl {auth}--fail-with-body -sS \"$@\"; }}\n{cmd}");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(root)
            .env("EMBER_KEY", key.unwrap_or(""))
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "README example failed ({}):\n  {example}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // DELETE answers 204 with no body; everything else prints.
        ensure!(example.contains("DELETE") || !stdout.trim().is_empty(), "no output from:\n  {example}");
    }
    Ok(())
}
