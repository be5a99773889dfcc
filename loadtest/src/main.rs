//! `ember-loadtest`: flags, then `ember_loadtest::run_all`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ember_loadtest::run::Options;
use ember_loadtest::scenario::{Profile, Scenario};

#[derive(Debug, Parser)]
#[command(name = "ember-loadtest", about = "Load tests of ember serve with oha")]
struct Args {
    /// quick: seconds per scenario (make test); full: as the scenarios say (make bench-load).
    #[arg(long, value_enum, default_value = "full")]
    profile: Profile,
    /// The ember binary.
    #[arg(long, default_value = "target/release/ember")]
    ember: PathBuf,
    #[arg(long, env = "EMBER_IMAGES", default_value = "target/images")]
    images: PathBuf,
    #[arg(long, default_value = "loadtest/scenarios")]
    scenarios: PathBuf,
    /// Only the scenarios whose name contains one of these (comma-separated).
    #[arg(long)]
    only: Option<String>,
    #[arg(long, default_value = "loadtest/ember.toml")]
    config: PathBuf,
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
    /// Fail (exit 1) when a target is missed, not only on errors.
    #[arg(long)]
    strict: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember-loadtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let oha = ember_loadtest::oha::Oha::ensure_installed()?;
        let mut scenarios = Scenario::load_dir(&args.scenarios)?;
        if let Some(only) = &args.only {
            scenarios.retain(|s| only.split(',').any(|o| s.name.contains(o.trim())));
        }
        let opts = Options {
            profile: args.profile,
            repo: ember_loadtest::repo_root(),
            ember: args.ember,
            images: args.images,
            oha,
            out: args.out,
            config: args.config,
            scenarios,
        };
        ember_loadtest::run_all(opts).await
    });
    match result {
        Ok(missed) if missed.is_empty() => ExitCode::SUCCESS,
        Ok(missed) => {
            for c in &missed {
                let kind = if c.hard { "correctness target not met" } else { "target not met" };
                eprintln!("ember-loadtest: {kind}: {} (measured {})", c.target, c.measured);
            }
            if args.strict || missed.iter().any(|c| c.hard) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("ember-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
