//! Which plane a request is for, decided before any path routing (a guest
//! app behind the port proxy may have a `/v1/...` or `/metrics` of its own):
//! the `E2b-Sandbox-Id` header (port from `E2b-Sandbox-Port`, default
//! envd's 49983), else a `Host: <port>-<id>.<domain>` header (the first `-`
//! splits the port from the id), else Ember's own routes. Headers win.

use axum::http::HeaderMap;

/// envd's port: the in-sandbox daemon this crate emulates.
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port.
pub const CODE_INTERPRETER_PORT: u16 = 49999;

/// A request for a sandbox: its id and the port it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxTarget {
    pub id: String,
    pub port: u16,
}

/// A sandbox id: what E2B hands out and a DNS label can carry.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// The sandbox a request is for, if any; an unusable sandbox header is an
/// error (named), a Host that does not have the shape is simply not one.
pub fn target(headers: &HeaderMap) -> Result<Option<SandboxTarget>, String> {
    if let Some(id) = headers.get("e2b-sandbox-id") {
        let id = id.to_str().map_err(|_| "E2b-Sandbox-Id is not ASCII".to_string())?.trim();
        if !valid_id(id) {
            return Err(format!("E2b-Sandbox-Id {id:?} is not a sandbox id"));
        }
        let port = match headers.get("e2b-sandbox-port") {
            None => ENVD_PORT,
            Some(p) => p
                .to_str()
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("E2b-Sandbox-Port {p:?} is not a port"))?,
        };
        return Ok(Some(SandboxTarget { id: id.to_string(), port }));
    }
    let Some(host) = headers.get(axum::http::header::HOST).and_then(|h| h.to_str().ok()) else {
        return Ok(None);
    };
    Ok(from_host(host))
}

/// `<port>-<id>.<domain>[:port]`, lower case as DNS leaves it.
pub fn from_host(host: &str) -> Option<SandboxTarget> {
    let (label, rest) = host.split_once('.')?;
    if rest.is_empty() {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0 && port.bytes().all(|b| b.is_ascii_digit()))?;
    let id = id.to_ascii_lowercase();
    valid_id(&id).then_some(SandboxTarget { id, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    fn t(id: &str, port: u16) -> Option<SandboxTarget> {
        Some(SandboxTarget { id: id.into(), port })
    }

    #[test]
    fn headers_then_host_then_nothing() {
        assert_eq!(target(&h(&[("e2b-sandbox-id", "abc1")])).unwrap(), t("abc1", 49983));
        assert_eq!(
            target(&h(&[("e2b-sandbox-id", "abc1"), ("e2b-sandbox-port", "49999")])).unwrap(),
            t("abc1", 49999)
        );
        // Headers win over the Host.
        let both = h(&[
            ("e2b-sandbox-id", "abc1"),
            ("e2b-sandbox-port", "8000"),
            ("host", "3000-zzz.localhost:8080"),
        ]);
        assert_eq!(target(&both).unwrap(), t("abc1", 8000));
        assert_eq!(target(&h(&[("host", "8000-i3a4x.localhost:8080")])).unwrap(), t("i3a4x", 8000));
        // Only the first '-' splits: an id may hold more.
        assert_eq!(target(&h(&[("host", "49983-e2b-sb-1.e2b.app")])).unwrap(), t("e2b-sb-1", 49983));
        for plain in [
            "127.0.0.1:8080",
            "localhost:8080",
            "localhost",
            "api.e2b.app",
            "8000-x",
            "x-8000.localhost",
            "0-abc.localhost",
        ] {
            assert_eq!(target(&h(&[("host", plain)])).unwrap(), None, "{plain}");
        }
        assert_eq!(target(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn a_bad_sandbox_header_is_named() {
        assert!(target(&h(&[("e2b-sandbox-id", "ABC")])).unwrap_err().contains("E2b-Sandbox-Id"));
        assert!(target(&h(&[("e2b-sandbox-id", "a/b")])).is_err());
        let e = target(&h(&[("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "99999")])).unwrap_err();
        assert!(e.contains("E2b-Sandbox-Port"), "{e}");
    }
}
