//! `[cluster]`, checked.

use std::time::Duration;

/// How this node joins the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster (default: the host name).
    pub node: String,
    /// The address peers reach this node's API at (`host:port`); empty:
    /// the address the server listens on, once it is bound.
    pub advertise: String,
    /// etcd's client endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// The lease a node holds; its keep-alive every third of it. A node is
    /// gone for the others about this long after its last renewal.
    pub lease_ttl: Duration,
    /// The shared secret node-to-node requests are signed with.
    pub secret: Option<String>,
}

/// The shortest lease etcd grants is 1 s (whole seconds); under 2 s a
/// single late keep-alive on a loaded host loses the node.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// Whether `name` may name a node: it becomes an etcd key's last part.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl ClusterConfig {
    /// Every problem at once.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if !valid_node_name(&self.node) {
            problems.push(format!("cluster.node {:?}: 1-63 of A-Z a-z 0-9 - _ .", self.node));
        }
        if !self.advertise.is_empty()
            && self.advertise.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            problems.push(format!("cluster.advertise {:?} is not host:port", self.advertise));
        }
        if self.etcd.is_empty() {
            problems.push("cluster.etcd: at least one endpoint".into());
        }
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                problems.push(format!("cluster.etcd: {e:?} is not an http:// or https:// endpoint"));
            }
        }
        if self.lease_ttl < MIN_LEASE_TTL || self.lease_ttl.subsec_nanos() != 0 {
            problems.push(format!(
                "cluster.lease_ttl {} must be whole seconds, at least {}",
                humantime::format_duration(self.lease_ttl),
                humantime::format_duration(MIN_LEASE_TTL)
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> ClusterConfig {
        ClusterConfig {
            node: "n1".into(),
            advertise: "127.0.0.1:18081".into(),
            etcd: vec!["http://127.0.0.1:2379".into()],
            lease_ttl: Duration::from_secs(3),
            secret: None,
        }
    }

    #[test]
    fn a_good_config_passes_and_every_bad_field_is_named() {
        assert!(good().check().is_ok());
        let bad = ClusterConfig {
            node: "a/b".into(),
            advertise: "nowhere".into(),
            etcd: vec!["127.0.0.1:2379".into()],
            lease_ttl: Duration::from_millis(1500),
            secret: None,
        };
        let p = bad.check().unwrap_err().join("\n");
        for needle in ["cluster.node", "cluster.advertise", "http://", "lease_ttl"] {
            assert!(p.contains(needle), "{needle} missing in {p}");
        }
        assert!(ClusterConfig { etcd: vec![], ..good() }.check().is_err());
    }
}
