//! The cluster as this node knows it: every member and its load, a copy
//! kept by a watch. Pure: records in, records out, unit-tested.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys;

/// A member record (`nodes/{node}`), written by the node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: String,
    /// Where peers reach its API.
    pub addr: String,
    /// Its lease id: a node that comes back is a new incarnation.
    pub incarnation: i64,
    pub version: String,
    /// RFC 3339.
    pub started: String,
    /// It takes no new work (a drain).
    pub draining: bool,
}

/// One image's figures in a node's load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLoad {
    /// VMs ready for a call now.
    pub ready: usize,
    /// VMs it could still make (max_size - all it has).
    pub free: usize,
    pub sessions: usize,
    /// Ready VMs per function warm set (scrubbed after serving it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub warm: BTreeMap<String, usize>,
}

/// A node's load record (`load/{node}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    pub images: BTreeMap<String, ImageLoad>,
    /// Calls running now.
    pub running: usize,
}

/// What `GET /v1/cluster` lists of a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberView {
    #[serde(flatten)]
    pub member: Member,
    pub load: Option<Load>,
}

/// Every member and load this node has seen and not seen go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub members: BTreeMap<String, Member>,
    pub loads: BTreeMap<String, Load>,
    /// The etcd revision this view is at.
    pub revision: i64,
}

impl View {
    /// A key was written: a record this view keeps, or nothing. A record
    /// that does not parse is ignored (and logged): a peer of another
    /// version must not stop this one.
    pub fn put(&mut self, key: &str, value: &[u8]) {
        if let Some(name) = key.strip_prefix(keys::NODES) {
            match serde_json::from_slice::<Member>(value) {
                Ok(m) => {
                    self.members.insert(name.to_string(), m);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring a member record that does not parse"),
            }
        } else if let Some(name) = key.strip_prefix(keys::LOAD) {
            match serde_json::from_slice::<Load>(value) {
                Ok(l) => {
                    self.loads.insert(name.to_string(), l);
                }
                Err(e) => tracing::warn!(key, error = %e, "ignoring a load record that does not parse"),
            }
        }
    }

    /// A key was deleted (or its lease lapsed).
    pub fn delete(&mut self, key: &str) {
        if let Some(name) = key.strip_prefix(keys::NODES) {
            self.members.remove(name);
        } else if let Some(name) = key.strip_prefix(keys::LOAD) {
            self.loads.remove(name);
        }
    }

    /// The live members with their loads, by name.
    pub fn listed(&self) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(name, m)| MemberView { member: m.clone(), load: self.loads.get(name).cloned() })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: &str) -> Vec<u8> {
        serde_json::to_vec(&Member {
            node: node.into(),
            addr: "127.0.0.1:1".into(),
            incarnation: 7,
            version: "0.1.0".into(),
            started: "2026-12-07T00:00:00Z".into(),
            draining: false,
        })
        .unwrap()
    }

    #[test]
    fn records_come_and_go() {
        let mut v = View::default();
        v.put(&keys::node("a"), &member("a"));
        v.put(&keys::node("b"), &member("b"));
        let load = Load { running: 2, ..Load::default() };
        v.put(&keys::load("a"), &serde_json::to_vec(&load).unwrap());
        let listed = v.listed();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].load.as_ref().map(|l| l.running), Some(2));
        assert!(listed[1].load.is_none());
        v.delete(&keys::node("a"));
        v.delete(&keys::load("a"));
        assert_eq!(v.members.keys().collect::<Vec<_>>(), ["b"]);
        assert!(v.loads.is_empty());
    }

    #[test]
    fn a_record_that_does_not_parse_or_belongs_elsewhere_is_ignored() {
        let mut v = View::default();
        v.put(&keys::node("a"), b"{not json");
        v.put("/ember/v1/sessions/x", &member("x"));
        v.put("/other/nodes/a", &member("a"));
        assert_eq!(v, View::default());
    }
}
