//! The `ember serve` process under test, and curl as its client.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use ember_testkit::{EmberServe, ServeOptions};
use serde_json::Value;

/// Fixed, so a killed run's VMs are reaped by the next run.
const STATE_DIR: &str = "ember-http-state";

pub struct Server {
    pub url: String,
    /// `None` for a client of a server a case runs itself.
    serve: Mutex<Option<EmberServe>>,
    dir: tempfile::TempDir,
}

pub struct Answer {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
    /// curl's own exit code (0 unless the transfer failed).
    pub curl_exit: Option<i32>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("curl_exit", &self.curl_exit)
            .finish()
    }
}

impl Answer {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!("HTTP {}: not JSON: {:?}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    /// `name -> ms` from the `Server-Timing` header.
    pub fn server_timing(&self) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
        let line = self
            .headers
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("server-timing")))
            .map(|(_, v)| v.trim().to_string())
            .context("no Server-Timing header")?;
        Ok(ember_gateway::api::Timing::parse_header(&line))
    }

    /// Status and error code of a JSON error answer.
    pub fn error(&self) -> anyhow::Result<(u16, String)> {
        let j = self.json()?;
        let code = j["error"]["code"].as_str().with_context(|| format!("no error code: {j}"))?;
        ensure!(j["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "no message: {j}");
        Ok((self.status, code.to_string()))
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn images() -> PathBuf {
    std::env::var_os("EMBER_IMAGES").map(PathBuf::from).unwrap_or_else(|| repo().join("target/images"))
}

const CONFIG: &str = r#"
[gateway]
functions_dir = "FUNCTIONS"
[limits]
max_body_bytes = 65536
max_output_bytes = 100000
max_timeout = "20s"
default_timeout = "10s"
max_concurrent_requests = 8
# More calls than VMs on purpose (concurrent_requests_all_succeed): they
# queue rather than meet admission by capacity (router tests cover that).
max_queue_wait = "60s"
# The upload test writes exactly this much, then one byte more.
max_upload_bytes = 104857600
[pool]
min_size = 2
# Room for the sessions and E2B sandboxes the cases hold (a resumed one
# needs a VM of its own) beside the two kept free.
max_size = 6
target_free = 2
claim_timeout = "60s"
drain_timeout = "20s"
[pool.sessions]
# Two for the cases, one for the long-lived process that spans the suite.
max = 3
[pool.images.python-data]
max_size = 2
[images]
# A recipe of the test's own: `ember serve` builds it at start (cached by
# its hash after the first run).
dirs = ["RECIPES"]
"#;

/// The test's own recipe: an overlay file, an environment variable and a
/// 40 MB writable disk.
fn write_recipe(dir: &Path) -> anyhow::Result<()> {
    let tiny = dir.join("tiny");
    std::fs::create_dir_all(tiny.join("overlay/etc"))?;
    std::fs::write(
        tiny.join("image.toml"),
        "description = \"test image: an overlay file, an env, a small disk\"\ndisk_mb = 40\n[env]\nEMBER_TINY = \"yes\"\n",
    )?;
    std::fs::write(tiny.join("overlay/etc/tiny-motd"), "tiny overlay\n")?;
    Ok(())
}

impl Server {
    /// Start `ember serve` on a free port and wait until its pool is warm.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("ember.toml");
        let functions = repo().join("functions-examples").canonicalize()?;
        let recipes = dir.path().join("recipes");
        write_recipe(&recipes)?;
        let text = CONFIG
            .replace("FUNCTIONS", &functions.to_string_lossy())
            .replace("RECIPES", &recipes.to_string_lossy());
        std::fs::write(&config, text)?;
        let state = std::env::temp_dir().join(STATE_DIR);
        let mut opts = ServeOptions::new(
            Path::new(env!("CARGO_BIN_EXE_ember")),
            &config,
            &images(),
            &state,
            &dir.path().join("server.log"),
        );
        opts.echo = Some("    [ember] ".into());
        // This run's own: the state directory is fixed (a killed run's VMs
        // are reaped by the next), its paused sessions are not.
        opts.sessions_dir = dir.path().join("sessions");
        let serve = EmberServe::start(&opts)?;
        Ok(Self { url: serve.url(), serve: Mutex::new(Some(serve)), dir })
    }

    /// A client of another server at `url` (its temp files in `dir`), for
    /// cases that run a server of their own; it does not own that server.
    pub fn attach(url: &str, dir: &Path) -> anyhow::Result<Self> {
        Ok(Self { url: url.to_string(), serve: Mutex::new(None), dir: tempfile::tempdir_in(dir)? })
    }

    /// Run curl with `args` against `path`; the status and body come back
    /// whatever the status.
    pub fn curl(&self, args: &[&str], path: &str) -> anyhow::Result<Answer> {
        self.curl_with_stdin(args, path, None)
    }

    fn curl_with_stdin(&self, args: &[&str], path: &str, stdin: Option<&[u8]>) -> anyhow::Result<Answer> {
        let body = tempfile::NamedTempFile::new_in(self.dir.path())?;
        let headers = tempfile::NamedTempFile::new_in(self.dir.path())?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-H", "Expect:", "-w", "%{http_code}", "-o"])
            .arg(body.path())
            .arg("-D")
            .arg(headers.path())
            .args(args)
            .arg(format!("{}{path}", self.url))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().context("running curl (make deps installs it)")?;
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            w.write_all(data)?;
        }
        let out = child.wait_with_output()?;
        Ok(Answer {
            status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0),
            headers: std::fs::read_to_string(headers.path()).unwrap_or_default(),
            body: std::fs::read(body.path()).unwrap_or_default(),
            curl_exit: out.status.code(),
        })
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> anyhow::Result<Answer> {
        let mut args = vec!["-X", method];
        for h in headers {
            args.extend(["-H", h]);
        }
        if body.is_some() {
            args.extend(["--data-binary", "@-"]);
        }
        self.curl_with_stdin(&args, path, body)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.request("GET", path, &[], None)
    }

    pub fn post(&self, path: &str, headers: &[&str], body: &[u8]) -> anyhow::Result<Answer> {
        self.request("POST", path, headers, Some(body))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Answer> {
        self.post(path, &["content-type: application/json"], body.to_string().as_bytes())
    }

    /// `POST /v1/run` expecting a 200 result.
    pub fn run(&self, body: Value) -> anyhow::Result<Value> {
        let a = self.post_json("/v1/run", &body)?;
        ensure!(a.status == 200, "{body} -> {a:?}");
        ensure!(a.headers.to_ascii_lowercase().contains("x-ember-invocation:"), "no invocation header");
        a.json()
    }

    pub fn run_in(&self, session: &str, body: Value) -> anyhow::Result<Value> {
        let h = format!("x-ember-session: {session}");
        let a = self.post("/v1/run", &["content-type: application/json", &h], body.to_string().as_bytes())?;
        ensure!(a.status == 200, "{body} -> {a:?}");
        a.json()
    }

    pub fn pool(&self) -> anyhow::Result<Value> {
        self.get("/v1/pool")?.json()
    }

    pub fn wait_until(&self, what: &str, probe: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = self.pool()?;
            if probe(&p) {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "timed out waiting for {what}: {p}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ndjson_curl(&self, body: &Value) -> anyhow::Result<Child> {
        Ok(Command::new("curl")
            .args(["-sSN", "-H", "accept: application/x-ndjson", "--json"])
            .arg(body.to_string())
            .arg(format!("{}/v1/run", self.url))
            .stdout(Stdio::piped())
            .spawn()?)
    }

    /// NDJSON lines with the time each arrived.
    pub fn stream(&self, body: &Value) -> anyhow::Result<Vec<(Instant, Value)>> {
        let mut child = self.ndjson_curl(body)?;
        let out = child.stdout.take().context("stdout")?;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            lines.push((
                Instant::now(),
                serde_json::from_str(&line).with_context(|| format!("line {line:?}"))?,
            ));
        }
        ensure!(child.wait()?.success(), "curl failed");
        Ok(lines)
    }

    /// Start a streamed command, read its first line, then kill the client.
    pub fn stream_then_hang_up(&self, body: &Value) -> anyhow::Result<()> {
        let mut child = self.ndjson_curl(body)?;
        let out = child.stdout.take().context("stdout")?;
        let mut first = String::new();
        std::io::BufReader::new(out).read_line(&mut first)?;
        ensure!(first.contains("\"started\""), "{first:?}");
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// SIGTERM while a command runs: it finishes, new work is refused, the
    /// server exits, and no VM process or state is left.
    pub fn drain(&self) -> anyhow::Result<()> {
        let mut guard = self.serve.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let serve = guard.as_mut().context("not this client's server")?;
        std::thread::scope(|sc| {
            let running = sc.spawn(|| self.run(serde_json::json!({"cmd": "sleep 3; echo finished"})));
            self.wait_until("the command to run", |p| p["invocations_running"] == 1)?;
            serve.terminate()?;
            std::thread::sleep(Duration::from_millis(300));
            let late = self.post_json("/v1/run", &serde_json::json!({"cmd": "true"}))?;
            ensure!(
                late.curl_exit == Some(7) || late.status == 503,
                "a request after SIGTERM was not refused: {late:?}"
            );
            let r = running.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
            ensure!(r["stdout"] == "finished\n", "the running command was cut off: {r}");
            Ok::<_, anyhow::Error>(())
        })?;
        let status = serve.wait_exit(Duration::from_secs(60))?;
        ensure!(status.success(), "ember serve exited with {status}");
        let left = serve.leftovers();
        ensure!(left.is_empty(), "left behind: {left:#?}");
        Ok(())
    }
}
