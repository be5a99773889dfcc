//! `ember-agent`: started by `/sbin/init-fast` (as PID 1) or by systemd in
//! the guest. Everything but argument parsing lives in the library.

use std::process::ExitCode;
use std::time::Duration;

/// How long an idle blocking-pool thread stays (a VM rarely lives longer).
const BLOCKING_THREAD_KEEP_ALIVE: Duration = Duration::from_secs(24 * 3600);

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "watch") {
        // A directory watch for the host, run as the guest's user.
        let code = ember_guest_agent::watch::main(&argv[1..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let args = match ember_guest_agent::Args::parse(argv) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("ember-agent: {msg}\n{}", ember_guest_agent::Args::USAGE);
            return ExitCode::from(64);
        }
    };
    // One vCPU per guest, and the reaper must never race std's own waitpid
    // after a failed exec: a current-thread runtime gives both.
    // Blocking work (file writes as the user) runs on a pool thread; keep it
    // rather than start one per call: a thread start costs milliseconds
    // under TCG, and a thread that exists when the pool snapshots the VM is
    // there after every reset.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ember-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ember_guest_agent::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
