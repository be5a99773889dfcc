//! Ember's service layer, below every front end (the HTTP API today; API
//! keys, the E2B-compatible API and MCP on top of it): the image pools and
//! their routing, invocations (claim, run, release or destroy), sessions'
//! agents, functions, limits and metrics, with one error type. It knows
//! nothing of HTTP: a front end parses its requests into these types and
//! maps [`Error`]'s kind to its own statuses.
#![forbid(unsafe_code)]

pub mod api;
pub mod error;
pub mod files;
pub mod functions;
pub mod invocation;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod pools;
pub mod processes;
pub mod quotas;
pub mod sessions;
pub mod state;
pub mod tenant;

pub use error::{Error, ErrorBody, Kind};
pub use limits::Limits;
pub use state::AppState;
pub use tenant::Caller;
