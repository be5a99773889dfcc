//! A VM's network policy, as a request says it, checked into rules.
//!
//! ```json
//! "none"                                  no address, nothing leaves (default)
//! "open"                                  everything the uplink reaches, except the
//!                                         host, other VMs and link-local/metadata
//! {"egress": {"allow": [...], "deny": [...]}}
//! ```
//!
//! An entry is `CIDR` (`203.0.113.0/24`, or one address), `CIDR:port`,
//! `host:port`, or a domain (`example.com`, `*.example.com`). With `allow`
//! entries, only what they name is reached (and only allowed names resolve);
//! without, everything `open` reaches; `deny` entries are taken out of
//! either. A name's addresses are the ones Ember's resolver gave the VM for
//! it, so a raw-IP connection to an address no allowed name resolved to is
//! dropped.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// What a request says (`"network"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawPolicy {
    /// `"none"` or `"open"`.
    Word(String),
    Egress {
        egress: RawEgress,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    None,
    Open,
    Egress {
        allow: Vec<Rule>,
        deny: Vec<Rule>,
    },
}

impl Policy {
    /// The policy as a request would say it (what [`RawPolicy::check`]
    /// turns back into this).
    pub fn to_raw(&self) -> RawPolicy {
        match self {
            Policy::None => RawPolicy::Word("none".into()),
            Policy::Open => RawPolicy::Word("open".into()),
            Policy::Egress { allow, deny } => RawPolicy::Egress {
                egress: RawEgress {
                    allow: allow.iter().map(ToString::to_string).collect(),
                    deny: deny.iter().map(ToString::to_string).collect(),
                },
            },
        }
    }
}

/// One destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    /// Addresses, on every port or one.
    Net { net: Ipv4Net, port: Option<u16> },
    /// A name (`*.` for its subdomains too), on every port or one.
    Name { name: String, wildcard: bool, port: Option<u16> },
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Net { net, port } => {
                if net.prefix_len() == 32 {
                    write!(f, "{}", net.addr())?;
                } else {
                    write!(f, "{net}")?;
                }
                port.map_or(Ok(()), |p| write!(f, ":{p}"))
            }
            Rule::Name { name, wildcard, port } => {
                write!(f, "{}{name}", if *wildcard { "*." } else { "" })?;
                port.map_or(Ok(()), |p| write!(f, ":{p}"))
            }
        }
    }
}

fn parse_port(entry: &str, p: &str) -> Result<u16, String> {
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        Ok(n) => Err(format!("{entry:?}: port {n} is not between 1 and 65535")),
        Err(_) => Err(format!("{entry:?}: {p:?} is not a port")),
    }
}

/// A DNS name: labels of letters, digits and '-', not starting or ending
/// with '-', at most 253 characters in all, at least two labels.
fn valid_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // A name, not an address written as one.
        && !labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

impl Rule {
    /// Parse one entry; the error names it.
    pub fn parse(entry: &str) -> Result<Rule, String> {
        let e = entry.trim();
        if e.is_empty() {
            return Err("an entry is empty".into());
        }
        if e.contains(':') && e.matches(':').count() > 1 {
            return Err(format!("{entry:?}: IPv6 is not supported (the VMs' network is IPv4)"));
        }
        let (host, port) = match e.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(entry, p)?)),
            None => (e, None),
        };
        if host.is_empty() {
            return Err(format!("{entry:?}: no address or name before the port"));
        }
        let starts_numeric = host.bytes().next().is_some_and(|b| b.is_ascii_digit());
        let looks_like_address =
            starts_numeric && host.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        if looks_like_address {
            let net = if host.contains('/') {
                host.parse::<Ipv4Net>()
                    .map_err(|_| format!("{entry:?}: {host:?} is not a CIDR like 203.0.113.0/24"))?
            } else {
                let a: Ipv4Addr =
                    host.parse().map_err(|_| format!("{entry:?}: {host:?} is not an IPv4 address"))?;
                Ipv4Net::from(a)
            };
            if net.network() != net.addr() {
                return Err(format!("{entry:?}: {net} has host bits set (did you mean {}?)", net.trunc()));
            }
            return Ok(Rule::Net { net, port });
        }
        let (name, wildcard) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !valid_name(&name) {
            return Err(format!("{entry:?}: not a CIDR, an address or a domain name"));
        }
        Ok(Rule::Name { name, wildcard, port })
    }
}

impl RawPolicy {
    /// Check the policy; `max_rules` caps allow + deny entries.
    pub fn check(&self, max_rules: usize) -> Result<Policy, String> {
        match self {
            RawPolicy::Word(w) if w == "none" => Ok(Policy::None),
            RawPolicy::Word(w) if w == "open" => Ok(Policy::Open),
            RawPolicy::Word(w) => {
                Err(format!("network {w:?}: say \"none\", \"open\" or {{\"egress\": {{\"allow\": [...], \"deny\": [...]}}}}"))
            }
            RawPolicy::Egress { egress } => {
                let n = egress.allow.len() + egress.deny.len();
                if n > max_rules {
                    return Err(format!("network: {n} rules, more than limits.max_network_rules ({max_rules})"));
                }
                let parse = |list: &[String], what: &str| -> Result<Vec<Rule>, String> {
                    let mut rules: Vec<Rule> = list
                        .iter()
                        .map(|e| Rule::parse(e).map_err(|m| format!("network.egress.{what}: {m}")))
                        .collect::<Result<_, _>>()?;
                    rules.sort();
                    rules.dedup();
                    Ok(rules)
                };
                Ok(Policy::Egress { allow: parse(&egress.allow, "allow")?, deny: parse(&egress.deny, "deny")? })
            }
        }
    }
}

impl Policy {
    /// Whether the VM gets an address at all.
    pub fn connected(&self) -> bool {
        !matches!(self, Policy::None)
    }

    /// Names whose lookups the VM's resolver answers (`None`: every name).
    pub fn resolvable(&self) -> Option<Vec<&Rule>> {
        match self {
            Policy::None => Some(Vec::new()),
            Policy::Open => None,
            Policy::Egress { allow, .. } if allow.is_empty() => None,
            Policy::Egress { allow, .. } => {
                Some(allow.iter().filter(|r| matches!(r, Rule::Name { .. })).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        Rule::parse(s).unwrap()
    }

    #[test]
    fn a_policy_said_again_checks_to_itself() {
        let raw = RawPolicy::Egress {
            egress: RawEgress {
                allow: vec![
                    "203.0.113.0/24:443".into(),
                    "*.example.org".into(),
                    "pypi.org:443".into(),
                    "198.51.100.7".into(),
                ],
                deny: vec!["203.0.113.9".into()],
            },
        };
        for raw in [raw, RawPolicy::Word("open".into()), RawPolicy::Word("none".into())] {
            let p = raw.check(64).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.to_raw().check(64).ok(), Some(p));
        }
    }

    #[test]
    fn every_entry_form_parses() {
        assert_eq!(rule("203.0.113.10"), Rule::Net { net: "203.0.113.10/32".parse().unwrap(), port: None });
        assert_eq!(
            rule("203.0.113.10:8080"),
            Rule::Net { net: "203.0.113.10/32".parse().unwrap(), port: Some(8080) }
        );
        assert_eq!(rule("10.0.0.0/8:443"), Rule::Net { net: "10.0.0.0/8".parse().unwrap(), port: Some(443) });
        assert_eq!(
            rule("Example.COM"),
            Rule::Name { name: "example.com".into(), wildcard: false, port: None }
        );
        assert_eq!(
            rule("*.example.com"),
            Rule::Name { name: "example.com".into(), wildcard: true, port: None }
        );
        assert_eq!(
            rule("api.example.com:443"),
            Rule::Name { name: "api.example.com".into(), wildcard: false, port: Some(443) }
        );
        for s in ["203.0.113.10:8080", "10.0.0.0/8", "*.example.com:443", "example.com"] {
            assert_eq!(rule(s).to_string(), s, "round trip");
        }
    }

    #[test]
    fn bad_entries_are_named() {
        for (entry, needle) in [
            ("203.0.113.0/33", "not a CIDR"),
            ("203.0.113.1/24", "host bits set (did you mean 203.0.113.0/24?)"),
            ("203.0.113.10:0", "port 0 is not between 1 and 65535"),
            ("203.0.113.10:65536", "port 65536"),
            ("example.com:http", "\"http\" is not a port"),
            ("", "empty"),
            ("   ", "empty"),
            (":80", "no address or name"),
            ("999.1.1.1", "not an IPv4 address"),
            ("localhost", "not a CIDR, an address or a domain name"),
            ("-bad-.com", "domain name"),
            ("a..b", "domain name"),
            ("2001:db8::1", "IPv6"),
        ] {
            let e = Rule::parse(entry).unwrap_err();
            assert!(e.contains(needle), "{entry:?}: {e}");
        }
    }

    #[test]
    fn policies_and_their_limits() {
        let p = |j: &str| serde_json::from_str::<RawPolicy>(j).unwrap();
        assert_eq!(p(r#""none""#).check(8).unwrap(), Policy::None);
        assert_eq!(p(r#""open""#).check(8).unwrap(), Policy::Open);
        assert!(p(r#""everything""#).check(8).unwrap_err().contains("\"everything\""));
        let e = p(r#"{"egress": {"allow": ["203.0.113.10:8080", "example.com", "203.0.113.10:8080"], "deny": ["203.0.113.20"]}}"#)
            .check(8)
            .unwrap();
        let Policy::Egress { allow, deny } = &e else { panic!("{e:?}") };
        assert_eq!((allow.len(), deny.len()), (2, 1), "duplicates dropped");
        assert_eq!(e.resolvable().unwrap().len(), 1);
        assert!(Policy::Open.resolvable().is_none());
        let err = p(r#"{"egress": {"allow": ["a.com", "b.com", "c.com"]}}"#).check(2).unwrap_err();
        assert!(err.contains("max_network_rules (2)"), "{err}");
        let err = p(r#"{"egress": {"deny": ["ok.com", "203.0.113.0/99"]}}"#).check(8).unwrap_err();
        assert!(err.contains("network.egress.deny") && err.contains("203.0.113.0/99"), "{err}");
        assert!(serde_json::from_str::<RawPolicy>(r#"{"egress": {"allw": []}}"#).is_err());
    }
}
