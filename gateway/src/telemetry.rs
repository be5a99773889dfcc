//! Logging setup: `tracing` to stderr, filtered by `EMBER_LOG` (or the
//! level the command picks).

pub fn init(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
