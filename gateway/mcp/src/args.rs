//! The tools' arguments: flat JSON schemas a model fills in (and model
//! providers accept: no `oneOf`, enums as strings), and their mapping to
//! the service layer's requests, which do the real checking.

use std::collections::BTreeMap;

use ember_net::policy::RawEgress;
use ember_net::RawPolicy;
use ember_service::api::{Lang, ProcessRequest, RunRequest, SessionRequest};
use rmcp::schemars::{self, JsonSchema};
use serde::Deserialize;

/// The language of `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeLang {
    Python,
    Sh,
    Bash,
}

/// A network for the command or session: "none" (the default), "open" (the
/// internet, without the host's private ranges) or "policy" (only what `allow`
/// names: host names, CIDRs, `host:port`; minus `deny`).
// No doc comment per variant: schemars would turn the enum into one-of consts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    None,
    Open,
    Policy,
}

/// A file put into the workspace before the command runs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileArg {
    /// Relative to the home directory (/home/ember); `..` is refused.
    pub path: String,
    /// Its text (UTF-8). Give this or `content_base64`.
    pub content: Option<String>,
    /// Its bytes, base64.
    pub content_base64: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct RunArgs {
    /// A shell command line, run by /bin/sh -c. Give exactly one of cmd, argv and code.
    pub cmd: Option<String>,
    /// A program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    /// Source code, run with `lang`.
    pub code: Option<String>,
    /// The language of `code` (python when absent).
    pub lang: Option<CodeLang>,
    /// Text for the command's standard input.
    pub stdin: Option<String>,
    /// Environment variables added for this command.
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory (default: /home/ember).
    pub cwd: Option<String>,
    /// Files written into the workspace first.
    pub files: Option<Vec<FileArg>>,
    /// How long it may run, e.g. "30s" or "2m" (default 30s; the server's maximum applies). It is killed then.
    pub timeout: Option<String>,
    /// The image to run in (see images_list); the default image when absent. A session keeps its own.
    pub image: Option<String>,
    /// Network access for this call (one-shot calls only; a session keeps its own).
    pub network: Option<Network>,
    /// With network "policy": what may be reached (e.g. "pypi.org", "10.0.0.0/8", "example.com:443").
    pub allow: Option<Vec<String>>,
    /// With network "policy": what may not, even if allowed.
    pub deny: Option<Vec<String>>,
    /// Run in this session (from session_create): its files and processes persist between calls.
    /// Without it the call runs in a fresh VM that is reset afterwards.
    pub session: Option<String>,
}

/// `network`, `allow` and `deny` as Ember's policy.
pub fn policy(
    network: Option<Network>,
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
) -> Result<Option<RawPolicy>, String> {
    let lists = allow.is_some() || deny.is_some();
    match network {
        None if !lists => Ok(None),
        Some(Network::None) | Some(Network::Open) if lists => {
            Err("allow and deny go with network \"policy\"".into())
        }
        Some(Network::None) => Ok(Some(RawPolicy::Word("none".into()))),
        Some(Network::Open) => Ok(Some(RawPolicy::Word("open".into()))),
        None | Some(Network::Policy) => Ok(Some(RawPolicy::Egress {
            egress: RawEgress { allow: allow.unwrap_or_default(), deny: deny.unwrap_or_default() },
        })),
    }
}

/// Optional fields as plain types: `"type": "string"`, not `["string",
/// "null"]`, and no `null` among enum values or `anyOf` branches. A tool's
/// optional argument is left out, never null; and some model providers
/// refuse type lists in function schemas.
pub fn plain_optionals(schema: &mut schemars::Schema) {
    fn walk(v: &mut serde_json::Value) {
        use serde_json::Value;
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(types)) = m.get("type") {
                    let rest: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                    if rest.len() == 1 {
                        m.insert("type".into(), rest[0].clone());
                    }
                }
                if let Some(Value::Array(values)) = m.get_mut("enum") {
                    values.retain(|x| !x.is_null());
                }
                let null = serde_json::json!({"type": "null"});
                if let Some(Value::Array(any)) = m.get("anyOf") {
                    let rest: Vec<Value> = any.iter().filter(|b| **b != null).cloned().collect();
                    if rest.len() == 1 {
                        m.remove("anyOf");
                        if let Value::Object(inner) = &rest[0] {
                            for (k, x) in inner {
                                m.entry(k.clone()).or_insert_with(|| x.clone());
                            }
                        }
                    }
                }
                m.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    if let Some(m) = schema.as_object_mut() {
        m.values_mut().for_each(walk);
    }
}

impl RunArgs {
    /// The session named, and the run request the service checks.
    pub fn into_request(self) -> Result<(Option<String>, RunRequest), String> {
        let network = policy(self.network, self.allow, self.deny)?;
        let lang = self.lang.map(|l| match l {
            CodeLang::Python => Lang::Python,
            CodeLang::Sh => Lang::Sh,
            CodeLang::Bash => Lang::Bash,
        });
        let lang = lang.or(self.code.as_ref().map(|_| Lang::Python));
        let files = self
            .files
            .unwrap_or_default()
            .into_iter()
            .map(|f| ember_service::api::FileInput {
                path: f.path,
                content: f.content,
                content_base64: f.content_base64,
                mode: None,
            })
            .collect();
        let req = RunRequest {
            cmd: self.cmd,
            argv: self.argv,
            code: self.code,
            lang,
            stdin: self.stdin,
            stdin_base64: None,
            env: self.env.unwrap_or_default(),
            cwd: self.cwd,
            files,
            timeout: self.timeout,
            image: self.image,
            network,
        };
        Ok((self.session, req))
    }
}

/// A session, by the key session_create gave.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct SessionArg {
    /// The session's key.
    pub session: String,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct SessionCreateArgs {
    /// Its key (1-64 of A-Z a-z 0-9 - _ .); a new UUID when absent.
    pub key: Option<String>,
    /// The image (see images_list); the default image when absent.
    pub image: Option<String>,
    /// Memory in MiB, at most what the image's VMs have.
    pub memory_mb: Option<u64>,
    /// Environment variables of every command and process in it.
    pub env: Option<BTreeMap<String, String>>,
    /// Its network (none unless said).
    pub network: Option<Network>,
    /// With network "policy": what may be reached.
    pub allow: Option<Vec<String>>,
    /// With network "policy": what may not.
    pub deny: Option<Vec<String>>,
    /// It ends after this long without use, e.g. "30m" (default: the server's, 30m for MCP sessions).
    pub idle_timeout: Option<String>,
    /// It ends this long after it opens, busy or not, e.g. "4h".
    pub timeout: Option<String>,
    /// Labels shown with it.
    pub metadata: Option<BTreeMap<String, String>>,
}

impl SessionCreateArgs {
    pub fn into_request(self, default_idle: Option<&str>) -> Result<SessionRequest, String> {
        let mut metadata = self.metadata.unwrap_or_default();
        metadata.entry("created_via".into()).or_insert_with(|| "mcp".into());
        Ok(SessionRequest {
            key: self.key,
            image: self.image,
            memory_mb: self.memory_mb,
            env: self.env.unwrap_or_default(),
            network: policy(self.network, self.allow, self.deny)?,
            idle_timeout: self.idle_timeout.or(default_idle.map(str::to_string)),
            timeout: self.timeout,
            metadata,
        })
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct ForkArgs {
    /// The session to copy (memory, processes, files).
    pub session: String,
    /// The new session's key; a new UUID when absent.
    pub new_key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct TimeoutArgs {
    pub session: String,
    /// The session now ends this long from now, e.g. "2h".
    pub timeout: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct ProcessStartArgs {
    pub session: String,
    /// A shell command line. Give cmd or argv.
    pub cmd: Option<String>,
    /// A program and its arguments.
    pub argv: Option<Vec<String>>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<String>,
    /// Keep its standard input open for process_write_stdin (else it reads end-of-file).
    pub stdin: Option<bool>,
    /// A label shown in process_list.
    pub tag: Option<String>,
}

impl ProcessStartArgs {
    pub fn into_request(self) -> ProcessRequest {
        ProcessRequest {
            cmd: self.cmd,
            argv: self.argv,
            env: self.env.unwrap_or_default(),
            cwd: self.cwd,
            stdin: self.stdin.unwrap_or(false),
            tag: self.tag,
            pty: None,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct ProcessOutputArgs {
    pub session: String,
    pub pid: u32,
    /// Where to read from: 0 for the start, then the next_cursor of the previous answer.
    pub cursor: Option<u64>,
    /// Wait up to this long for new output or the exit, e.g. "10s" (default "0s", at most "30s").
    pub wait: Option<String>,
    /// The most bytes to return (default 16384).
    pub max_bytes: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct StdinArgs {
    pub session: String,
    pub pid: u32,
    /// Text to write.
    pub data: Option<String>,
    /// Bytes to write, base64.
    pub data_base64: Option<String>,
    /// Close its standard input afterwards (end-of-file).
    pub eof: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct SignalArgs {
    pub session: String,
    pub pid: u32,
    /// A signal name such as "TERM", "KILL", "INT", "HUP", or its number (default "TERM").
    pub signal: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileReadArgs {
    pub session: String,
    /// Relative to /home/ember, or absolute.
    pub path: String,
    /// The byte to start at (default 0).
    pub offset: Option<u64>,
    /// The most bytes to return (default 65536).
    pub max_bytes: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileWriteArgs {
    pub session: String,
    /// Relative to /home/ember, or absolute; parent directories are made.
    pub path: String,
    /// Its text. Give this or content_base64.
    pub content: Option<String>,
    /// Its bytes, base64.
    pub content_base64: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileListArgs {
    pub session: String,
    /// A directory (default: /home/ember).
    pub path: Option<String>,
    /// How deep to list (default 1).
    pub depth: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileDeleteArgs {
    pub session: String,
    pub path: String,
    /// Delete a directory with everything in it.
    pub recursive: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = plain_optionals)]
pub struct FileEditArgs {
    pub session: String,
    pub path: String,
    /// The exact text to replace; it must occur once (or use replace_all).
    pub old_text: String,
    /// What replaces it.
    pub new_text: String,
    /// Replace every occurrence instead of exactly one.
    pub replace_all: Option<bool>,
}

/// `text` with `old` replaced by `new`: exactly one occurrence unless
/// `all`; the count replaced, or why not.
pub fn edit(text: &str, old: &str, new: &str, all: bool) -> Result<(String, usize), String> {
    if old.is_empty() {
        return Err("old_text is empty".into());
    }
    let n = text.matches(old).count();
    match (n, all) {
        (0, _) => Err("old_text does not occur in the file".into()),
        (1, _) | (_, true) => Ok((text.replace(old, new), n)),
        (n, false) => Err(format!(
            "old_text occurs {n} times; give more context to make it unique, or replace_all: true"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(v: serde_json::Value) -> Result<(Option<String>, RunRequest), String> {
        serde_json::from_value::<RunArgs>(v).map_err(|e| e.to_string())?.into_request()
    }

    #[test]
    fn run_arguments_become_the_services_request() {
        let (session, r) = run(serde_json::json!({
            "code": "print(1)", "stdin": "in", "env": {"A": "1"}, "cwd": "/tmp", "timeout": "5s",
            "image": "python-data", "session": "s1",
            "files": [{"path": "a.txt", "content": "x"}, {"path": "b.bin", "content_base64": "AA=="}]
        }))
        .unwrap();
        assert_eq!(session.as_deref(), Some("s1"));
        assert_eq!(r.code.as_deref(), Some("print(1)"));
        assert!(matches!(r.lang, Some(Lang::Python)), "code defaults to python");
        assert_eq!(
            (r.stdin.as_deref(), r.cwd.as_deref(), r.timeout.as_deref()),
            (Some("in"), Some("/tmp"), Some("5s"))
        );
        assert_eq!(r.env["A"], "1");
        assert_eq!(r.files.len(), 2);
        assert_eq!(r.files[1].content_base64.as_deref(), Some("AA=="));
        let (_, r) = run(serde_json::json!({"cmd": "true"})).unwrap();
        assert!(r.lang.is_none() && r.network.is_none());
        let (_, r) = run(serde_json::json!({"code": "echo", "lang": "bash"})).unwrap();
        assert!(matches!(r.lang, Some(Lang::Bash)));
    }

    #[test]
    fn networks_flatten_to_embers_policy() {
        assert_eq!(policy(None, None, None), Ok(None));
        assert_eq!(policy(Some(Network::Open), None, None), Ok(Some(RawPolicy::Word("open".into()))));
        let p = policy(Some(Network::Policy), Some(vec!["pypi.org".into()]), None).unwrap();
        assert_eq!(
            p,
            Some(RawPolicy::Egress { egress: RawEgress { allow: vec!["pypi.org".into()], deny: vec![] } })
        );
        // allow alone means a policy.
        assert!(matches!(
            policy(None, Some(vec![]), Some(vec!["x".into()])),
            Ok(Some(RawPolicy::Egress { .. }))
        ));
        assert!(policy(Some(Network::Open), Some(vec!["x".into()]), None).unwrap_err().contains("policy"));
    }

    #[test]
    fn optional_arguments_are_plain_types_in_the_schema() {
        for schema in [
            serde_json::to_value(schemars::schema_for!(RunArgs)).unwrap(),
            serde_json::to_value(schemars::schema_for!(SessionCreateArgs)).unwrap(),
            serde_json::to_value(schemars::schema_for!(ProcessOutputArgs)).unwrap(),
        ] {
            let text = schema.to_string();
            assert!(!text.contains("\"null\""), "{text}");
            assert!(!text.contains("oneOf"), "{text}");
        }
        let run = serde_json::to_value(schemars::schema_for!(RunArgs)).unwrap();
        assert_eq!(run["properties"]["cmd"]["type"], "string");
        assert_eq!(run["properties"]["argv"]["type"], "array");
        assert_eq!(run["properties"]["files"]["items"]["$ref"], "#/$defs/FileArg");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(run(serde_json::json!({"cmdd": "true"})).unwrap_err().contains("cmdd"));
        assert!(run(serde_json::json!({"cmd": "true", "lang": "cobol"})).is_err());
    }

    #[test]
    fn sessions_made_here_say_so() {
        let r = SessionCreateArgs::default().into_request(Some("30m")).unwrap();
        assert_eq!(r.metadata["created_via"], "mcp");
        assert_eq!(r.idle_timeout.as_deref(), Some("30m"));
        let own = SessionCreateArgs { idle_timeout: Some("5m".into()), ..Default::default() };
        assert_eq!(own.into_request(Some("30m")).unwrap().idle_timeout.as_deref(), Some("5m"));
    }

    #[test]
    fn an_edit_replaces_exactly_what_it_names() {
        assert_eq!(edit("a b a", "b", "c", false), Ok(("a c a".into(), 1)));
        assert!(edit("a b a", "a", "c", false).unwrap_err().contains("2 times"));
        assert_eq!(edit("a b a", "a", "c", true), Ok(("c b c".into(), 2)));
        assert!(edit("a", "z", "c", false).unwrap_err().contains("does not occur"));
        assert!(edit("a", "", "c", false).is_err());
    }
}
