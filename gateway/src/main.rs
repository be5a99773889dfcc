//! `ember`: parse flags, start telemetry, hand over to the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = ember_gateway::cli::Cli::parse();
    ember_gateway::telemetry::init(cli.log_level());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(ember_gateway::cli::run(cli))
}
