//! Who is calling, and the namespace their sessions and functions live in.
//!
//! A key's name is its tenant. Each tenant has its own session keys: the
//! pools know a tenant's session `demo` as `alice+demo` (`+` is in no
//! session key or key name, so the two parts never mix), and a function's
//! warm set is per tenant and function (`alice+primes`): a VM passes from
//! one tenant to another only through a full reset. An admin key names its
//! own sessions plainly and another tenant's as `tenant+key`. Without keys
//! (a server on loopback) there is one namespace, the plain keys, as before
//! keys existed.

use std::sync::Arc;

use crate::api::check_session_key;
use crate::error::{Error, Kind};
use crate::keys::Principal;
use crate::quotas::Quotas;

/// Splits a pool's session key into tenant and key.
pub const SEPARATOR: char = '+';

/// The caller of an operation.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No keys are configured: one namespace, every right.
    Open,
    /// A request with a valid key.
    Key(Arc<Principal>),
}

impl Caller {
    /// The tenant, `None` without keys.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Open => None,
            Caller::Key(p) => Some(&p.name),
        }
    }

    /// For logs and metric labels: the key's name, `-` without keys.
    pub fn label(&self) -> &str {
        self.tenant().unwrap_or("-")
    }

    /// Whether it may see and do everything.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Key(p) => p.admin,
        }
    }

    /// Refuse a non-admin caller (`403`).
    pub fn require_admin(&self, what: &str) -> Result<(), Error> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::new(Kind::Forbidden, "admin_only", format!("{what} needs an admin key")))
        }
    }

    /// This caller's quotas over the configured defaults (`None` without keys).
    pub fn quotas(&self, defaults: &Quotas) -> Option<Quotas> {
        match self {
            Caller::Open => None,
            Caller::Key(p) => Some(p.quotas.or(defaults)),
        }
    }

    /// The pools' key of the session this caller calls `key`, checked.
    pub fn session_key(&self, key: &str) -> Result<String, Error> {
        match self {
            Caller::Open => check_session_key(key).map(|()| key.to_string()),
            Caller::Key(p) => match key.split_once(SEPARATOR) {
                Some((tenant, rest)) if p.admin => {
                    crate::keys::check_name(tenant).map_err(|e| crate::api::invalid(e.to_string()))?;
                    check_session_key(rest)?;
                    Ok(key.to_string())
                }
                _ => {
                    check_session_key(key)?;
                    Ok(format!("{}{SEPARATOR}{key}", p.name))
                }
            },
        }
    }

    /// How this caller sees the pools' session key `full`: `None` if it is
    /// not this caller's to see (then it does not exist for it).
    pub fn shown_key(&self, full: &str) -> Option<String> {
        match self {
            Caller::Open => Some(full.to_string()),
            Caller::Key(p) => match full.split_once(SEPARATOR) {
                Some((tenant, rest)) if tenant == &*p.name => Some(rest.to_string()),
                _ if p.admin => Some(full.to_string()),
                _ => None,
            },
        }
    }

    /// The warm set of function `name` for this caller.
    pub fn function_set(&self, name: &str) -> String {
        match self.tenant() {
            None => name.to_string(),
            Some(t) => format!("{t}{SEPARATOR}{name}"),
        }
    }
}

/// The tenant a pools' session key belongs to (`None`: made without keys).
pub fn tenant_of(full: &str) -> Option<&str> {
    full.split_once(SEPARATOR).map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, admin: bool) -> Caller {
        Caller::Key(Arc::new(Principal { name: Arc::from(name), admin, quotas: Quotas::default() }))
    }

    #[test]
    fn each_tenant_has_its_own_session_keys() {
        let (alice, bob) = (key("alice", false), key("bob", false));
        assert_eq!(alice.session_key("demo").unwrap(), "alice+demo");
        assert_eq!(bob.session_key("demo").unwrap(), "bob+demo");
        assert_eq!(Caller::Open.session_key("demo").unwrap(), "demo");
        // A tenant cannot reach into another's namespace.
        assert!(alice.session_key("bob+demo").is_err());
        assert_eq!(alice.shown_key("alice+demo").as_deref(), Some("demo"));
        assert_eq!(alice.shown_key("bob+demo"), None);
        assert_eq!(alice.shown_key("demo"), None, "a session made without keys is no tenant's");
        assert_eq!(alice.function_set("primes"), "alice+primes");
        assert_eq!(Caller::Open.function_set("primes"), "primes");
        assert_eq!(tenant_of("alice+demo"), Some("alice"));
    }

    #[test]
    fn an_admin_names_other_tenants_sessions_qualified() {
        let root = key("root", true);
        assert_eq!(root.session_key("demo").unwrap(), "root+demo");
        assert_eq!(root.session_key("bob+demo").unwrap(), "bob+demo");
        assert!(root.session_key("Bob+demo").is_err());
        assert!(root.session_key("bob+").is_err());
        assert_eq!(root.shown_key("root+demo").as_deref(), Some("demo"));
        assert_eq!(root.shown_key("bob+demo").as_deref(), Some("bob+demo"));
        assert!(root.require_admin("x").is_ok());
        assert_eq!(key("a", false).require_admin("/v1/pool").unwrap_err().kind, Kind::Forbidden);
    }
}
