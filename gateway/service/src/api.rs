//! What callers send and get back. Request types refuse unknown fields;
//! [`RunRequest::validate`] turns one into an [`Invocation`], naming the
//! first problem it finds. Output that is not UTF-8 is never lost: results
//! carry it as base64 next to the (lossy) text.

mod output;
mod session;
mod views;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use ember_wire::{Command, ExecRequest, FileSpec};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::limits::Limits;

pub use output::{text_and_base64, OutputText, Utf8Chunker};
pub use session::{
    ForkRequest, ProcessRequest, PtyRequest, SessionRequest, SessionSettings, SignalRequest, TimeoutRequest,
};
pub use views::{FileEntry, FileListing, ProcessList, ProcessView, PtyView, Written};

/// Languages `code` may be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    Python,
    Sh,
    Bash,
}

impl Lang {
    pub fn interpreter(self) -> &'static str {
        match self {
            Lang::Python => "python3",
            Lang::Sh => "/bin/sh",
            Lang::Bash => "bash",
        }
    }
    fn extension(self) -> &'static str {
        match self {
            Lang::Python => "py",
            Lang::Sh | Lang::Bash => "sh",
        }
    }
}

impl std::str::FromStr for Lang {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "python" => Ok(Lang::Python),
            "sh" => Ok(Lang::Sh),
            "bash" => Ok(Lang::Bash),
            o => Err(format!("unknown lang {o:?} (python, sh, bash)")),
        }
    }
}

/// `POST /v1/run` with a JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// A shell command line, run by `/bin/sh -c`.
    pub cmd: Option<String>,
    /// A program and its arguments, run directly.
    pub argv: Option<Vec<String>>,
    /// Source code in `lang`.
    pub code: Option<String>,
    pub lang: Option<Lang>,
    pub stdin: Option<String>,
    pub stdin_base64: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub files: Vec<FileInput>,
    /// humantime, e.g. `"10s"`; at most `limits.max_timeout`.
    pub timeout: Option<String>,
    /// The image to run in (`GET /v1/images`); the default image if absent.
    pub image: Option<String>,
    /// `"none"` (default), `"open"` or `{"egress": {"allow": [...], "deny": [...]}}`.
    pub network: Option<ember_net::RawPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInput {
    /// Relative to the workspace (`/home/ember`); `..` is refused.
    pub path: String,
    pub content: Option<String>,
    pub content_base64: Option<String>,
    /// Permission bits, e.g. `493` (0755); default 0644.
    pub mode: Option<u32>,
}

/// What will run, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    Shell(String),
    Argv(Vec<String>),
    Code {
        lang: Lang,
        code: String,
    },
    /// A script file (a function's entry) run by its language.
    Script {
        lang: Lang,
        path: String,
    },
}

impl Lang {
    /// The agent command that runs the script at `path`: Python through
    /// the guest's pre-warmed interpreter, the shells directly.
    pub fn command(self, path: String) -> Command {
        match self {
            Lang::Python => Command::Python(ember_wire::PythonScript { path, args: Vec::new() }),
            other => Command::Argv(vec![other.interpreter().into(), path]),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: Program,
    pub stdin: Vec<u8>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub files: Vec<FileSpec>,
    pub timeout: Duration,
    /// The function this invocation calls: its VM is claimed from (and
    /// scrubbed back into) that function's warm set.
    pub function: Option<String>,
    /// The image it runs in; `None`: the default (or the session's).
    pub image: Option<String>,
    /// The network it gets; `None`: none (or, in a session, what it has).
    pub network: Option<ember_net::Policy>,
    /// Whether a call for a session that does not exist opens it (the
    /// HTTP API's way), or is refused with a 404 (MCP's, and the API's
    /// with `X-Ember-Session-Create: false`): an agent whose session ended
    /// must learn so, not find an empty one under the same name.
    pub open_session: bool,
}

pub use ember_wire::CODE_DIR;

impl Invocation {
    pub fn new(program: Program, timeout: Duration) -> Self {
        Self {
            program,
            stdin: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            files: Vec::new(),
            timeout,
            function: None,
            image: None,
            network: None,
            open_session: true,
        }
    }

    /// The exec request, files included (the agent writes them first).
    pub fn into_exec(self, id: &str, limits: &Limits, keep_processes: bool) -> ExecRequest {
        let mut files = self.files;
        let command = match self.program {
            Program::Shell(line) => Command::Shell(line),
            Program::Argv(argv) => Command::Argv(argv),
            Program::Code { lang, code } => {
                let path = format!("{CODE_DIR}/{id}.{}", lang.extension());
                files.push(FileSpec { path: path.clone(), content: code.into_bytes(), mode: 0o644 });
                lang.command(path)
            }
            Program::Script { lang, path } => lang.command(path),
        };
        let mut req = ExecRequest::new(command);
        req.env = self.env;
        req.cwd = self.cwd;
        req.stdin = self.stdin;
        req.timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        req.output_limit = limits.max_output_bytes;
        req.pids_limit = Some(limits.max_pids);
        req.kill_leftovers = !keep_processes;
        req.files = files;
        req
    }
}

pub fn invalid(message: impl Into<String>) -> Error {
    Error::new(crate::Kind::Invalid, "invalid_request", message)
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| invalid(format!("{field}: not base64: {e}")))
}

/// A `timeout` field or query parameter, checked against the limits.
pub fn parse_timeout(raw: Option<&str>, limits: &Limits) -> Result<Duration, Error> {
    let Some(raw) = raw else { return Ok(limits.default_timeout) };
    let t = humantime::parse_duration(raw)
        .map_err(|e| invalid(format!("timeout {raw:?}: {e} (write it like \"10s\" or \"1m 30s\")")))?;
    if t.is_zero() {
        return Err(invalid("timeout must be above zero"));
    }
    if t > limits.max_timeout {
        return Err(invalid(format!(
            "timeout {} exceeds the limit of {}",
            humantime::format_duration(t),
            humantime::format_duration(limits.max_timeout)
        )));
    }
    Ok(t)
}

pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), Error> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!("env: invalid variable {k:?} (no '=', no NUL, not empty)")));
        }
    }
    Ok(())
}

/// A network policy as a request gives it; the message names the entry.
pub fn check_network(raw: &ember_net::RawPolicy, limits: &Limits) -> Result<ember_net::Policy, Error> {
    raw.check(limits.max_network_rules).map_err(invalid)
}

/// An image name as a request gives it (whether one exists is the pools'
/// to say).
pub fn check_image(image: Option<String>) -> Result<Option<String>, Error> {
    match image {
        Some(i) if i.is_empty() || i.len() > 63 || i.contains('\0') => {
            Err(invalid(format!("image {i:?} is not an image name (see GET /v1/images)")))
        }
        other => Ok(other),
    }
}

/// A path the caller may write: relative, inside the workspace.
fn check_file_path(i: usize, path: &str) -> Result<(), Error> {
    let p = std::path::Path::new(path);
    let bad = path.is_empty()
        || path.contains('\0')
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, std::path::Component::Normal(_)));
    if bad {
        return Err(invalid(format!(
            "files[{i}].path {path:?} must be a relative path inside the workspace (no '..', not absolute)"
        )));
    }
    Ok(())
}

impl RunRequest {
    pub fn validate(self, limits: &Limits) -> Result<Invocation, Error> {
        let program = match (self.cmd, self.argv, self.code) {
            (Some(cmd), None, None) => {
                if self.lang.is_some() {
                    return Err(invalid("lang goes with code, not with cmd"));
                }
                if cmd.trim().is_empty() || cmd.contains('\0') {
                    return Err(invalid("cmd must be a non-empty command line without NUL"));
                }
                Program::Shell(cmd)
            }
            (None, Some(argv), None) => {
                if self.lang.is_some() {
                    return Err(invalid("lang goes with code, not with argv"));
                }
                if argv.first().is_none_or(|a| a.is_empty()) || argv.iter().any(|a| a.contains('\0')) {
                    return Err(invalid("argv must name a program first and hold no NUL"));
                }
                Program::Argv(argv)
            }
            (None, None, Some(code)) => {
                let lang = self.lang.ok_or_else(|| invalid("code needs a lang (python, sh, bash)"))?;
                Program::Code { lang, code }
            }
            (None, None, None) => {
                return Err(invalid("say what to run: one of cmd, argv, or code with lang"))
            }
            _ => return Err(invalid("give exactly one of cmd, argv, code")),
        };
        let stdin = match (self.stdin, self.stdin_base64) {
            (Some(s), None) => s.into_bytes(),
            (None, Some(b)) => b64("stdin_base64", &b)?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => return Err(invalid("give stdin or stdin_base64, not both")),
        };
        check_env(&self.env)?;
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err(invalid("cwd must be a non-empty path"));
            }
        }
        let mut files = Vec::with_capacity(self.files.len());
        for (i, f) in self.files.into_iter().enumerate() {
            check_file_path(i, &f.path)?;
            let content = match (f.content, f.content_base64) {
                (Some(s), None) => s.into_bytes(),
                (None, Some(b)) => b64(&format!("files[{i}].content_base64"), &b)?,
                _ => return Err(invalid(format!("files[{i}]: give exactly one of content, content_base64"))),
            };
            let mode = f.mode.unwrap_or(0o644);
            if mode > 0o777 {
                return Err(invalid(format!(
                    "files[{i}].mode {mode:#o} is not a permission (at most 0o777)"
                )));
            }
            files.push(FileSpec { path: f.path, content, mode });
        }
        let timeout = parse_timeout(self.timeout.as_deref(), limits)?;
        let image = check_image(self.image)?;
        let network = self.network.map(|n| check_network(&n, limits)).transpose()?;
        Ok(Invocation {
            program,
            stdin,
            env: self.env,
            cwd: self.cwd,
            files,
            timeout,
            function: None,
            image,
            network,
            open_session: true,
        })
    }
}

/// The answer to a finished invocation (HTTP 200 whatever the exit code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    pub id: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    /// The exact bytes of stdout, when they are not valid UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub timed_out: bool,
    pub truncated: bool,
    /// The command's run time inside the VM.
    pub duration_ms: u64,
    pub duration_us: u64,
    /// Whether a ready VM was waiting (no boot in the request's path).
    pub warm: bool,
    pub vm_id: String,
    /// The image the command ran in.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Where the time went; sent as a `Server-Timing` header, not in the body.
    #[serde(skip)]
    pub timing: Timing,
}

/// The server's side of an invocation's latency. The client's own total
/// minus `claim` and `vm` is HTTP and the gateway; `vm` minus `run` is the
/// agent channel both ways and the agent's work around the command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// Waiting for a VM (pool claim or session lookup).
    pub claim: std::time::Duration,
    /// From the VM being claimed to the command's exit arriving (files
    /// written, exec sent, output and exit received).
    pub vm: std::time::Duration,
    /// The command's run time measured by the agent inside the VM.
    pub run: std::time::Duration,
    /// Giving the VM its network, when the call asked for one.
    pub net: Option<NetTiming>,
}

/// Where the time of a VM's network went: the host's rules and resolver,
/// joined with the guest's one `configure`; `total` is the three at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetTiming {
    pub total: std::time::Duration,
    pub rules: std::time::Duration,
    pub resolver: std::time::Duration,
    pub configure: std::time::Duration,
}

impl From<ember_pool::pool::NetTimings> for NetTiming {
    fn from(t: ember_pool::pool::NetTimings) -> Self {
        Self { total: t.total, rules: t.host.rules, resolver: t.host.resolver, configure: t.configure }
    }
}

impl Timing {
    /// The value of a `Server-Timing` header (W3C Server Timing), in ms.
    pub fn header_value(&self) -> String {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let mut v = format!(
            "claim;dur={:.3};desc=\"waiting for a VM\", vm;dur={:.3};desc=\"claimed VM to exit received\", \
             run;dur={:.3};desc=\"command inside the VM\"",
            ms(self.claim),
            ms(self.vm),
            ms(self.run)
        );
        if let Some(n) = &self.net {
            v.push_str(&format!(
                ", net;dur={:.3};desc=\"the VM's network (inside vm)\", net-rules;dur={:.3}, net-dns;dur={:.3}, \
                 net-guest;dur={:.3}",
                ms(n.total),
                ms(n.rules),
                ms(n.resolver),
                ms(n.configure)
            ));
        }
        v
    }

    /// `name -> dur` (ms) from a `Server-Timing` value as
    /// [`Timing::header_value`] writes it; metrics without `dur` are left out.
    pub fn parse_header(value: &str) -> std::collections::BTreeMap<String, f64> {
        value
            .split(", ")
            .filter_map(|metric| {
                let mut parts = metric.split(';');
                let name = parts.next()?.trim().to_string();
                let dur = parts.find_map(|p| p.strip_prefix("dur="))?.parse().ok()?;
                Some((name, dur))
            })
            .collect()
    }
}

/// One line of an NDJSON stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Started {
        id: String,
        vm_id: String,
        warm: bool,
        image: String,
    },
    Stdout(OutputText),
    Stderr(OutputText),
    /// Output of a background process this reader missed (its buffer
    /// keeps the newest `limits.process_output_buffer` bytes).
    Dropped {
        bytes: u64,
    },
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        truncated: bool,
        duration_ms: u64,
        duration_us: u64,
    },
    Error {
        error: ErrorBody,
    },
}

pub use crate::error::ErrorBody;

/// Session keys: what a header may carry, and short enough to log.
pub fn check_session_key(key: &str) -> Result<(), Error> {
    let ok = !key.is_empty()
        && key.len() <= 64
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "session key {key:?} must be 1-64 characters of letters, digits, '-', '_' and '.'"
        )))
    }
}

#[cfg(test)]
mod tests;
