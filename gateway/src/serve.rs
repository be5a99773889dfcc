//! `ember serve`: the HTTP gateway over a warm pool of real VMs. SIGTERM
//! or SIGINT drains: new invocations get 503, running ones may finish for
//! up to `pool.drain_timeout`, then every VM is destroyed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ember_pool::pool::VmBackend;
use ember_pool::pool::{Backend, Pool};
use ember_vm::VmHost;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::functions::Functions;
use crate::invocation::Sandbox;
use crate::state::AppState;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file ([gateway], [limits], [pool], [vm]).
    #[arg(long, env = "EMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides gateway.listen; default 127.0.0.1:8080).
    #[arg(long, env = "EMBER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory with vmlinuz, initrd.img, rootfs.ext4, scratch.ext4.
    #[arg(long, env = "EMBER_IMAGES", default_value = "target/images")]
    pub images: PathBuf,
}

/// The functions to serve: a missing default directory means none.
fn load_functions(cfg: &Config) -> anyhow::Result<Functions> {
    let dir = &cfg.gateway.functions_dir;
    if !dir.is_dir() && !cfg.gateway.functions_dir_explicit {
        tracing::warn!(dir = %dir.display(), "no functions directory; serving no functions");
        return Ok(Functions::default());
    }
    Functions::load(dir, cfg.limits.max_timeout).map_err(|p| anyhow::anyhow!("functions: {}", p.join("; ")))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = crate::config::load_or_exit(args.config.as_deref(), &args.images);
    if let Some(listen) = args.listen {
        cfg.gateway.listen = listen;
    }
    let functions = load_functions(&cfg)?;
    let before =
        ember_pool::plan::before_channel(cfg.pool.reset, cfg.pool.replenish, (&cfg.vm.storage).into())
            .map_err(anyhow::Error::msg)?;
    let host = VmHost::new(cfg.vm.clone(), before.need_migratable)?;
    // ZFS: check the parent, reap dead owners' clones, make the base, now.
    let storage = host.open_storage().await?.name();
    let backend =
        VmBackend::new(Arc::clone(&host), cfg.pool.reset, cfg.pool.replenish).map_err(anyhow::Error::msg)?;
    let reset = backend.mode();
    let channel = backend.host().channel();
    // Bind before booting anything: a taken port fails fast.
    let listener = TcpListener::bind(cfg.gateway.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.gateway.listen))?;
    let addr = listener.local_addr()?;
    let pool = Pool::start(backend, cfg.pool.clone(), cfg.vm.memory_mb);
    let state = AppState::new(pool.clone(), cfg.limits.clone(), functions);
    println!(
        "ember: listening on http://{addr} (channel {channel}, reset {}, storage {storage}, {} functions); warming {} VMs",
        reset.name(),
        state.functions.len(),
        cfg.pool.min_size
    );
    tokio::spawn(announce_ready(pool, addr));
    let served = serve(listener, state, cfg.gateway.conn_limits, shutdown_signal()).await;
    host.close().await;
    served?;
    println!("ember: stopped; every VM is gone");
    Ok(ExitCode::SUCCESS)
}

/// Print the ready line once the pool holds its minimum of warm VMs.
async fn announce_ready<B: Backend>(pool: Pool<B>, addr: SocketAddr) {
    let want = pool.config().min_size;
    let started = tokio::time::Instant::now();
    loop {
        let s = pool.status();
        if s.draining {
            return;
        }
        if s.ready >= want {
            println!(
                "ember: ready on http://{addr} with {} warm VMs after {:.1}s. Try:\n  \
                 curl --json '{{\"cmd\":\"echo hello from $(uname -n)\"}}' http://{addr}/v1/run",
                s.ready,
                started.elapsed().as_secs_f64()
            );
            return;
        }
        if s.counters.create_failures > 0 && started.elapsed() > Duration::from_secs(60) {
            tracing::error!(
                failures = s.counters.create_failures,
                "the pool cannot warm up; see the log above"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

/// Serve `state` on `listener` until `stop`, then drain and shut the pool down.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    state: AppState<B>,
    limits: crate::http_server::ConnLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    B::Vm: Sandbox,
{
    let app = crate::routes::router(state.clone());
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let drain_state = state.clone();
    let graceful = async move {
        stop.await;
        drain_state.start_draining();
        let _ = stopping_tx.send(true);
    };
    let mut server = tokio::spawn(async move {
        crate::http_server::serve_http(listener, app, limits, graceful).await;
        Ok::<(), std::io::Error>(())
    });
    let drain_timeout = state.pool.config().drain_timeout;
    tokio::select! {
        r = &mut server => {
            r.context("the server task failed")?.context("serving HTTP")?;
        }
        () = async { let _ = stopping.wait_for(|s| *s).await; } => {
            match tokio::time::timeout(drain_timeout, &mut server).await {
                Ok(r) => r.context("the server task failed")?.context("serving HTTP")?,
                Err(_) => {
                    tracing::warn!("requests still running after {drain_timeout:?}; cutting them off");
                    server.abort();
                }
            }
        }
    }
    state.pool.shutdown().await;
    Ok(())
}
