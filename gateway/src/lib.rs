//! The `ember` binary's library: the HTTP gateway (`ember serve`), the
//! command-line tools, configuration and telemetry.
#![forbid(unsafe_code)]

/// The service layer's modules, under the paths the gateway has always used.
pub use ember_service::{api, functions, invocation, metrics, pools, state};

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod http_server;
pub mod routes;
pub mod serve;
pub mod telemetry;
#[cfg(test)]
mod testing;
pub mod tls;
