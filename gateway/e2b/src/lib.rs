//! The E2B-compatible front end. The unchanged `e2b` SDKs (Python, JS) talk
//! to two planes, both on Ember's listener:
//!
//! - the **control plane** (`/sandboxes`, `/v2/sandboxes`, with the API
//!   key): a sandbox is an Ember session of the key's tenant, a template an
//!   Ember image;
//! - the **sandbox plane**, chosen before any path routing by the
//!   `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers or a
//!   `Host: <port>-<id>.<domain>` header: port 49983 is an emulation of
//!   E2B's in-sandbox daemon (envd: Connect RPCs over the session's
//!   processes and files), any other port Ember's port proxy.
//!
//! `connect.rs` is the Connect protocol's JSON framing, without I/O.
#![forbid(unsafe_code)]

pub mod connect;
pub mod control;
pub mod route;
