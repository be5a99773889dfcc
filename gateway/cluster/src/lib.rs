//! Many hosts as one Ember, coordinated through etcd (never a home-made
//! consensus, gossip or failure detector). Each node holds a lease (TTL
//! `lease_ttl`, kept alive every third of it on a thread of its own, so a
//! busy host does not starve it) and publishes under it its member record
//! and its load; every node keeps a watch-fed copy of all of them
//! ([`view::View`]), so placement and routing read memory: no etcd
//! operation per one-shot call. A node whose lease lapses is gone for the
//! others within about the TTL; a node that cannot renew knows its own
//! deadline ([`Membership::fenced`]) without asking anyone.
//!
//! Key layout, under `/ember/v1/`: `nodes/{node}` (the member record) and
//! `load/{node}` (its load), both under the node's lease.

pub mod config;
pub mod keys;
pub mod membership;
pub mod placement;
pub mod view;

pub use config::ClusterConfig;
pub use membership::{Membership, MembershipError};
pub use view::{ImageLoad, Load, Member, View};
