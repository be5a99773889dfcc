//! `POST /v1/sessions` and `POST /v1/sessions/{key}/timeout` bodies, and
//! their checks (which need no pool: whether the image exists and what its
//! VMs hold is the route's to say).

use std::collections::BTreeMap;
use std::time::Duration;

use ember_pool::pool::{SessionSpec, MIN_SESSION_TIMEOUT};
use serde::Deserialize;

use super::{check_env, check_image, check_network, check_session_key, invalid};
use crate::error::Error;
use crate::limits::Limits;

/// Metadata a session may carry: entries, and bytes of a key and a value.
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The session's key (what `X-Ember-Session` names); a new UUID if absent.
    pub key: Option<String>,
    pub image: Option<String>,
    /// The memory the session needs; at most what the image's VMs have.
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub network: Option<ember_net::RawPolicy>,
    /// humantime: ended after this long without calls; `"off"`: never for
    /// idleness (then `timeout` is required).
    pub idle_timeout: Option<String>,
    /// humantime: ended this long after it opens (its maximum lifetime).
    pub timeout: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// A checked [`SessionRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSettings {
    pub key: String,
    pub image: Option<String>,
    pub memory_mb: Option<u64>,
    pub network: Option<(ember_net::RawPolicy, ember_net::Policy)>,
    pub spec: SessionSpec,
}

impl SessionRequest {
    pub fn check(self, limits: &Limits, max_lifetime: Duration) -> Result<SessionSettings, Error> {
        let key = match self.key {
            Some(k) => {
                check_session_key(&k)?;
                k
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        check_env(&self.env)?;
        check_metadata(&self.metadata)?;
        if self.memory_mb == Some(0) {
            return Err(invalid("memory_mb must be above zero"));
        }
        let network = match self.network {
            Some(raw) => {
                let policy = check_network(&raw, limits)?;
                Some((raw, policy))
            }
            None => None,
        };
        let idle_never = self.idle_timeout.as_deref() == Some("off");
        let idle = if idle_never { None } else { self.idle_timeout.as_deref() };
        let idle_timeout = session_duration("idle_timeout", idle, max_lifetime)?;
        let lifetime = session_duration("timeout", self.timeout.as_deref(), max_lifetime)?;
        if idle_never && lifetime.is_none() {
            return Err(invalid("idle_timeout \"off\" needs a timeout: a session must end some time"));
        }
        Ok(SessionSettings {
            key,
            image: check_image(self.image)?,
            memory_mb: self.memory_mb,
            network,
            spec: SessionSpec { idle_timeout, lifetime, idle_never, env: self.env, metadata: self.metadata },
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// humantime: the session now ends this long from now.
    pub timeout: String,
}

impl TimeoutRequest {
    pub fn check(&self, max_lifetime: Duration) -> Result<Duration, Error> {
        match session_duration("timeout", Some(&self.timeout), max_lifetime)? {
            Some(d) => Ok(d),
            None => Err(invalid("timeout is required")),
        }
    }
}

/// A session's idle timeout or lifetime: humantime, from 1 s to
/// `pool.sessions.max_lifetime`.
fn session_duration(field: &str, raw: Option<&str>, max: Duration) -> Result<Option<Duration>, Error> {
    let Some(raw) = raw else { return Ok(None) };
    let d = humantime::parse_duration(raw)
        .map_err(|e| invalid(format!("{field} {raw:?}: {e} (write it like \"10m\" or \"1h 30m\")")))?;
    if d < MIN_SESSION_TIMEOUT || d > max {
        return Err(invalid(format!(
            "{field} {raw:?} must be between {} and {} (pool.sessions.max_lifetime)",
            humantime::format_duration(MIN_SESSION_TIMEOUT),
            humantime::format_duration(max)
        )));
    }
    Ok(Some(d))
}

fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), Error> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(invalid(format!("metadata has {} entries; at most {MAX_METADATA_ENTRIES}", m.len())));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY {
            return Err(invalid(format!("metadata key {k:?} must be 1-{MAX_METADATA_KEY} bytes")));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(invalid(format!("metadata {k:?}: the value is over {MAX_METADATA_VALUE} bytes")));
        }
    }
    Ok(())
}

/// `POST /v1/sessions/{key}/fork`: the new session's key (a UUID if absent).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    pub key: Option<String>,
}

/// `POST /v1/sessions/{key}/processes`: a background process.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRequest {
    /// A shell command line, run by `/bin/sh -c`.
    pub cmd: Option<String>,
    /// A program and its arguments.
    pub argv: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Keep stdin open for `POST .../stdin`; else it reads EOF at once.
    #[serde(default)]
    pub stdin: bool,
    /// A label, listed with it (at most 64 bytes).
    pub tag: Option<String>,
    /// Run it on a pseudo-terminal of this size: stdin, stdout and stderr
    /// are the terminal (output comes as stdout), stdin stays open.
    pub pty: Option<PtyRequest>,
}

/// A terminal's size (`pty` of a process, the body of `.../resize`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtyRequest {
    pub cols: u16,
    pub rows: u16,
}

/// Columns or rows a terminal may have.
pub const MAX_PTY_SIDE: u16 = 1000;

impl PtyRequest {
    pub fn check(self) -> Result<ember_wire::PtySize, Error> {
        for (name, v) in [("cols", self.cols), ("rows", self.rows)] {
            if v == 0 || v > MAX_PTY_SIDE {
                return Err(invalid(format!("pty {name} {v} must be between 1 and {MAX_PTY_SIDE}")));
            }
        }
        Ok(ember_wire::PtySize { cols: self.cols, rows: self.rows })
    }
}

impl ProcessRequest {
    pub fn check(self, limits: &Limits) -> Result<ember_wire::SpawnRequest, Error> {
        let pty = self.pty.map(PtyRequest::check).transpose()?;
        let command = match (self.cmd, self.argv) {
            (Some(c), None) if !c.is_empty() => ember_wire::Command::Shell(c),
            (None, Some(a)) if a.first().is_some_and(|p| !p.is_empty()) => ember_wire::Command::Argv(a),
            _ => return Err(invalid("give exactly one of cmd (a non-empty string) or argv (non-empty)")),
        };
        check_env(&self.env)?;
        if let Some(t) = &self.tag {
            if t.len() > MAX_METADATA_KEY {
                return Err(invalid(format!("tag is over {MAX_METADATA_KEY} bytes")));
            }
        }
        Ok(ember_wire::SpawnRequest {
            command,
            env: self.env,
            cwd: self.cwd,
            stdin: self.stdin,
            tag: self.tag,
            buffer_bytes: limits.process_output_buffer,
            pids_limit: Some(limits.max_pids),
            max_processes: limits.max_processes,
            pty,
        })
    }
}

/// `POST .../processes/{pid}/signal`: `{"signal": "TERM"}` (a name, with
/// or without `SIG`, or a number).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: serde_json::Value,
}

impl SignalRequest {
    pub fn check(&self) -> Result<i32, Error> {
        let bad = || {
            invalid(format!("signal {}: give a name such as \"TERM\" or \"KILL\", or a number", self.signal))
        };
        let sig = match &self.signal {
            serde_json::Value::Number(n) => {
                let n = n.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(bad)?;
                nix::sys::signal::Signal::try_from(n).map_err(|_| bad())?
            }
            serde_json::Value::String(s) => {
                let name = s.trim().to_ascii_uppercase();
                let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
                name.parse::<nix::sys::signal::Signal>().map_err(|_| bad())?
            }
            _ => return Err(bad()),
        };
        Ok(sig as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<SessionSettings, Error> {
        let req: SessionRequest = serde_json::from_str(body).map_err(|e| invalid(e.to_string()))?;
        req.check(&Limits::default(), Duration::from_secs(3600))
    }

    fn message(body: &str) -> String {
        match parse(body) {
            Ok(s) => panic!("{body} was accepted: {s:?}"),
            Err(e) => {
                assert_eq!(e.kind, crate::Kind::Invalid, "{body}");
                e.message
            }
        }
    }

    #[test]
    fn idle_timeout_off_needs_a_lifetime() {
        assert!(message(r#"{"idle_timeout": "off"}"#).contains("needs a timeout"));
        let s = parse(r#"{"idle_timeout": "off", "timeout": "5m"}"#).unwrap();
        assert!(s.spec.idle_never && s.spec.idle_timeout.is_none());
        assert!(!parse(r#"{"idle_timeout": "5m"}"#).unwrap().spec.idle_never);
    }

    #[test]
    fn a_full_request_and_an_empty_one() {
        let s = parse(
            r#"{"key":"ws-1","image":"python-data","memory_mb":256,"env":{"A":"1"},"network":"open",
                "idle_timeout":"5m","timeout":"1h","metadata":{"owner":"me"}}"#,
        )
        .expect("valid");
        assert_eq!(s.key, "ws-1");
        assert_eq!(s.image.as_deref(), Some("python-data"));
        assert_eq!(s.memory_mb, Some(256));
        assert!(s.network.is_some_and(|(_, p)| p.connected()));
        assert_eq!(s.spec.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(s.spec.lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(s.spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.spec.metadata.get("owner").map(String::as_str), Some("me"));

        let s = parse("{}").expect("valid");
        assert!(uuid::Uuid::parse_str(&s.key).is_ok(), "{}", s.key);
        assert_eq!(s.spec, SessionSpec::default());
        assert!(s.network.is_none());
    }

    #[test]
    fn every_bad_field_is_named() {
        assert!(message(r#"{"key":"a b"}"#).contains("session key"));
        assert!(message(r#"{"timeout":"soon"}"#).contains("timeout \"soon\""));
        assert!(message(r#"{"timeout":"2h"}"#).contains("between 1s and 1h"));
        assert!(message(r#"{"idle_timeout":"500ms"}"#).contains("idle_timeout"));
        assert!(message(r#"{"memory_mb":0}"#).contains("memory_mb"));
        assert!(message(r#"{"env":{"A=B":"1"}}"#).contains("env"));
        assert!(message(r#"{"network":{"egress":{"allow":["not an address!"]}}}"#).contains("not an address"));
        let long_value = format!(r#"{{"metadata":{{"k":"{}"}}}}"#, "x".repeat(MAX_METADATA_VALUE + 1));
        assert!(message(&long_value).contains("metadata \"k\""));
        let many: Vec<String> = (0..=MAX_METADATA_ENTRIES).map(|i| format!(r#""k{i}":"v""#)).collect();
        assert!(message(&format!(r#"{{"metadata":{{{}}}}}"#, many.join(","))).contains("entries"));
        assert!(message(r#"{"image":""}"#).contains("image"));
    }

    #[test]
    fn processes_and_signals_are_checked() {
        let p = |body: &str| serde_json::from_str::<ProcessRequest>(body).unwrap().check(&Limits::default());
        let spawn = p(r#"{"cmd":"sleep 1","stdin":true,"tag":"w"}"#).unwrap();
        assert_eq!(spawn.command, ember_wire::Command::Shell("sleep 1".into()));
        assert!(spawn.stdin && spawn.buffer_bytes == Limits::default().process_output_buffer);
        assert!(p(r#"{"argv":["ls","-l"]}"#).is_ok());
        let tty = p(r#"{"cmd":"sh","pty":{"cols":100,"rows":30}}"#).unwrap();
        assert_eq!(tty.pty, Some(ember_wire::PtySize { cols: 100, rows: 30 }));
        assert!(serde_json::from_str::<ProcessRequest>(r#"{"cmd":"a","pty":{}}"#).is_err());
        for bad in [
            r#"{}"#,
            r#"{"cmd":""}"#,
            r#"{"argv":[]}"#,
            r#"{"cmd":"a","argv":["b"]}"#,
            r#"{"cmd":"a","pty":{"cols":0,"rows":24}}"#,
            r#"{"cmd":"a","pty":{"cols":80,"rows":1001}}"#,
        ] {
            assert_eq!(p(bad).unwrap_err().kind, crate::Kind::Invalid, "{bad}");
        }
        let s = |v: serde_json::Value| SignalRequest { signal: v }.check();
        assert_eq!(s(serde_json::json!("TERM")).ok(), Some(15));
        assert_eq!(s(serde_json::json!("sigkill")).ok(), Some(9));
        assert_eq!(s(serde_json::json!(2)).ok(), Some(2));
        for bad in
            [serde_json::json!("NOPE"), serde_json::json!(0), serde_json::json!(999), serde_json::json!([])]
        {
            assert!(s(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_timeout_extension_is_bounded() {
        let max = Duration::from_secs(600);
        assert_eq!(TimeoutRequest { timeout: "5m".into() }.check(max).ok(), Some(Duration::from_secs(300)));
        assert!(TimeoutRequest { timeout: "11m".into() }.check(max).is_err());
        assert!(TimeoutRequest { timeout: "0s".into() }.check(max).is_err());
    }
}
