//! VM networking: the policy a request gives a VM's network. Everything a
//! VM's network needs lives in a network namespace Ember owns (see the
//! README's *Networking*).
#![forbid(unsafe_code)]

pub mod host;
pub mod nft;
pub mod policy;

pub use host::{ConnectTimings, GuestNet, NetConfig, NetError, Network, OwnedTap, Tap};
pub use policy::{Policy, RawPolicy, Rule};
