//! Where things live in etcd.

/// Everything of Ember's, versioned so a later layout can live beside it.
pub const ROOT: &str = "/ember/v1/";
pub const NODES: &str = "/ember/v1/nodes/";
pub const LOAD: &str = "/ember/v1/load/";

pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

pub fn load(name: &str) -> String {
    format!("{LOAD}{name}")
}
