//! The `ember` binary's library: command-line interface and telemetry.
//! The HTTP gateway (`ember serve`) lands here too.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod telemetry;
