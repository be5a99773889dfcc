//! The `ember` binary's library: the HTTP gateway (`ember serve`), the
//! command-line tools, configuration and telemetry.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod functions;
pub mod http_server;
pub mod invocation;
pub mod metrics;
pub mod pools;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod testing;
