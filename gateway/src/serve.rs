//! `ember serve`: the HTTP gateway over a warm pool of real VMs. SIGTERM
//! or SIGINT drains: new invocations get 503, running ones may finish for
//! up to `pool.drain_timeout`, then every VM is destroyed.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use ember_image::{Catalog, ImageInfo, ImageState, DEFAULT_IMAGE};
use ember_net::Network;
use ember_pool::pool::{Backend, MemoryBudget, Pool, VmBackend};
use ember_vm::VmHost;
use tokio::net::TcpListener;

use crate::auth::Access;
use crate::config::Config;
use crate::functions::Functions;
use crate::invocation::AgentVm;
use crate::pools::{Pools, Readiness};
use crate::state::AppState;
use ember_service::keys::KeyStore;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file ([gateway], [limits], [pool], [vm]).
    #[arg(long, env = "EMBER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides gateway.listen; default 127.0.0.1:8080).
    #[arg(long, env = "EMBER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The images directory (vmlinuz, initrd.img and a directory per image).
    #[arg(long, env = "EMBER_IMAGES", default_value_os_t = ember_image::default_images_dir())]
    pub images: PathBuf,
    /// Serve beyond loopback without API keys: anyone who reaches the port
    /// runs code. Only behind something that authenticates for Ember.
    #[arg(long)]
    pub insecure_no_auth: bool,
}

/// The keys a server checks, and whether it may listen where it is told:
/// beyond loopback only with keys (or `--insecure-no-auth`).
fn open_keys(cfg: &Config, insecure_no_auth: bool) -> anyhow::Result<Result<Arc<KeyStore>, String>> {
    let keys = KeyStore::open(&cfg.keys_file).map_err(|e| anyhow::anyhow!("keys: {e}"))?;
    let loopback = cfg.gateway.listen.ip().is_loopback();
    if !loopback && !keys.required() && !insecure_no_auth {
        return Ok(Err(format!(
            "ember: refusing to listen on {} without API keys: anyone who reaches it could run code.\n\
             Create a key first (`ember keys create NAME --admin`; keys file {}), listen on 127.0.0.1, \
             or pass --insecure-no-auth if something in front authenticates for Ember.",
            cfg.gateway.listen,
            cfg.keys_file.display()
        )));
    }
    if !loopback && !insecure_no_auth {
        // Revoking every key later must not open a server on a network.
        keys.require_keys();
    }
    Ok(Ok(Arc::new(keys)))
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
    // A certificate that does not load stops the start, before any VM boots.
    let cert = match &cfg.gateway.tls {
        Some(files) => Some(crate::tls::ReloadingCert::open(files.clone()).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let keys = match open_keys(&cfg, args.insecure_no_auth)? {
        Ok(k) => k,
        Err(refusal) => {
            eprintln!("{refusal}");
            return Ok(ExitCode::from(64));
        }
    };
    let functions = load_functions(&cfg)?;
    let catalog =
        Catalog::load(cfg.images.clone()).map_err(|p| anyhow::anyhow!("images: {}", p.join("; ")))?;
    // A build at start-up stops (and cleans up) on SIGTERM/SIGINT too.
    let images = tokio::select! {
        i = servable_images(&catalog, cfg.build_on_start) => i?,
        () = shutdown_signal() => anyhow::bail!("interrupted while building images"),
    };
    check_image_names(&cfg, &functions, &images)?;
    let before =
        ember_pool::plan::before_channel(cfg.pool.reset, cfg.pool.replenish, (&cfg.vm.storage).into())
            .map_err(anyhow::Error::msg)?;
    // Bind before booting anything: a taken port fails fast.
    let listener = TcpListener::bind(cfg.gateway.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.gateway.listen))?;
    // Ember's network namespace (reaping what a crashed run left) before any
    // VM boots: every VM then gets its TAP there.
    let network = match &cfg.network {
        Some(nc) => {
            let runner = Arc::new(ember_storage::ProcessRunner { timeout: Duration::from_secs(30) });
            Some(Network::open(nc.clone(), runner).await?)
        }
        None => None,
    };
    let e2b = cfg.e2b.clone().map(|mut e| {
        let port = listener.local_addr().map_or(cfg.gateway.listen.port(), |a| a.port());
        e.domain.get_or_insert_with(|| format!("localhost:{port}"));
        Arc::new(e)
    });
    let access = Access {
        e2b,
        keys: Some(Arc::clone(&keys)),
        allowed_hosts: cfg.gateway.allowed_hosts.clone(),
        allowed_origins: cfg.gateway.allowed_origins.clone(),
        mcp: cfg.mcp.clone().map(Arc::new),
        cluster: None,
    };
    let watcher = keys.watch(Duration::from_secs(1));
    let tls = match cert {
        Some(cert) => Some((
            crate::tls::acceptor(Arc::clone(&cert)).map_err(anyhow::Error::msg)?,
            cert.watch(Duration::from_secs(2)),
        )),
        None => None,
    };
    let (acceptor, tls_watcher) = tls.map_or((None, None), |(a, w)| (Some(a), Some(w)));
    let front = Front { listener, access, tls: acceptor };
    let served = serve_images(&cfg, images, functions, before, front, network.clone()).await;
    watcher.abort();
    if let Some(w) = tls_watcher {
        w.abort();
    }
    keys.flush_used();
    if let Some(n) = network {
        n.close().await;
    }
    served?;
    println!("ember: stopped; every VM is gone");
    Ok(ExitCode::SUCCESS)
}

/// What requests come in through: the bound socket, who may call, and
/// TLS when configured.
struct Front {
    listener: TcpListener,
    access: Access,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// One pool per image over `front` until SIGTERM/SIGINT, then drain.
async fn serve_images(
    cfg: &Config,
    images: BTreeMap<String, ImageInfo>,
    functions: Functions,
    before: ember_pool::plan::Before,
    front: Front,
    network: Option<Arc<Network>>,
) -> anyhow::Result<()> {
    let Front { listener, mut access, tls } = front;
    let addr = listener.local_addr()?;
    let budget = Arc::new(MemoryBudget::new(cfg.pool.max_memory_mb));
    let (mut pools, mut hosts) = (BTreeMap::new(), Vec::new());
    let mut summary = None;
    for info in images.values() {
        let (pool_cfg, mut vm_cfg) = cfg.for_image(&info.name, info.memory_mb).map_err(anyhow::Error::msg)?;
        vm_cfg.warm = info.warm.clone();
        let memory_mb = vm_cfg.memory_mb;
        let host = VmHost::new(vm_cfg, before.need_migratable)?;
        if let Some(n) = &network {
            host.attach_network(Arc::clone(n));
        }
        // ZFS: check the parent, reap dead owners' clones, make the base, now.
        let storage = host.open_storage().await?.name();
        let backend = VmBackend::new(Arc::clone(&host), cfg.pool.reset, cfg.pool.replenish)
            .map_err(anyhow::Error::msg)?;
        summary.get_or_insert((backend.host().channel(), backend.mode(), storage));
        pools.insert(
            info.name.clone(),
            Pool::start_sharing(backend, pool_cfg, memory_mb, Arc::clone(&budget)),
        );
        hosts.push(host);
    }
    let pools = Pools::new(pools, DEFAULT_IMAGE).map_err(anyhow::Error::msg)?;
    let state = AppState::new(pools.clone(), cfg.limits.clone(), functions)
        .with_image_info(images)
        .with_network(network.is_some());
    let state = match &access.keys {
        Some(keys) => state.with_keys(Arc::clone(keys), cfg.quotas),
        None => state,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some((channel, reset, storage)) = summary {
        println!(
            "ember: listening on {scheme}://{addr} (channel {channel}, reset {}, storage {storage}, {} functions, \
             images {}, network {}); warming {} VMs",
            reset.name(),
            state.functions.len(),
            pools.names().join(", "),
            network.as_ref().map_or("off".to_string(), |n| format!("in namespace {}", n.namespace())),
            pools.default_pool().config().min_size
        );
    }
    // Join the cluster once the pools exist (their load is what it publishes).
    if let Some(mut cluster) = cfg.cluster.clone() {
        if cluster.advertise.is_empty() || cluster.advertise.ends_with(":0") {
            cluster.advertise = addr.to_string();
        }
        let st = state.clone();
        let load = Box::new(move || cluster_load(&st));
        let m = ember_cluster::Membership::join(cluster, load).await?;
        println!("ember: node {} joined the cluster (incarnation {})", m.node(), m.incarnation());
        access.cluster = Some(m);
    }
    let member = access.cluster.clone();
    let signal = {
        let member = member.clone();
        async move {
            shutdown_signal().await;
            // Leave placement at once; the lease goes once the drain is done.
            if let Some(m) = member {
                m.start_draining().await;
            }
        }
    };
    tokio::spawn(announce_ready(pools.clone(), addr));
    let served = serve(listener, state, access, cfg.gateway.conn_limits, tls, signal).await;
    if let Some(m) = member {
        m.leave().await;
    }
    for host in hosts {
        host.close().await;
    }
    served
}

/// What this node publishes as its load: per image, VMs ready, VMs it could
/// still make, sessions; calls running.
fn cluster_load(state: &AppState<VmBackend>) -> ember_cluster::Load {
    let images = state
        .pools
        .iter()
        .map(|(name, pool)| {
            let s = pool.status();
            let used = s.ready + s.booting + s.claimed + s.resetting + s.sessions;
            let free = pool.config().max_size.saturating_sub(used);
            let warm = s.warm_sets.clone();
            (name.to_string(), ember_cluster::ImageLoad { ready: s.ready, free, sessions: s.sessions, warm })
        })
        .collect();
    let running = state.limits.max_concurrent_requests.saturating_sub(state.permits.available_permits());
    ember_cluster::Load { images, running }
}

/// Every image the configuration knows that can be served now: built ones,
/// and those `build_on_start` builds here. A missing default image stops
/// the server with the command that makes it; another one is left out
/// (logged).
async fn servable_images(
    catalog: &Catalog,
    build_on_start: bool,
) -> anyhow::Result<BTreeMap<String, ImageInfo>> {
    let mut out = BTreeMap::new();
    for name in catalog.names() {
        let is_default = name == DEFAULT_IMAGE;
        let info = match catalog.state(&name)? {
            ImageState::Built(info) => Some(*info),
            ImageState::Stale(_) | ImageState::Unbuilt if build_on_start => {
                println!("ember: building image {name} (its recipe or Ember's parts changed, or it was never built)");
                match catalog.build(&name).await {
                    Ok(info) => Some(info),
                    Err(e) if is_default => return Err(e.into()),
                    Err(e) => {
                        tracing::error!(image = %name, error = %e, "image not served");
                        None
                    }
                }
            }
            ImageState::Stale(info) => {
                tracing::warn!(image = %name, "serving a stale image; `ember images build {name}` rebuilds it");
                Some(*info)
            }
            ImageState::Unbuilt if is_default => {
                anyhow::bail!(
                    "the default image is not built: run `ember images build {name}` (or `make images`)"
                )
            }
            ImageState::Unbuilt => {
                tracing::warn!(image = %name, "not built, not served: run `ember images build {name}`");
                None
            }
        };
        if let Some(info) = info {
            out.insert(name, info);
        }
    }
    anyhow::ensure!(
        out.contains_key(DEFAULT_IMAGE),
        "no image named {DEFAULT_IMAGE:?} (initrd/images/default)"
    );
    Ok(out)
}

/// `[pool.images.NAME]` and function manifests may name only served images.
fn check_image_names(
    cfg: &Config,
    functions: &Functions,
    images: &BTreeMap<String, ImageInfo>,
) -> anyhow::Result<()> {
    let known = images.keys().cloned().collect::<Vec<_>>().join(", ");
    let mut problems = Vec::new();
    for name in cfg.image_pools.keys().filter(|n| !images.contains_key(*n)) {
        problems.push(format!("[pool.images.{name}]: no such image is served (images: {known})"));
    }
    for f in functions.list() {
        if let Some(i) = f.image.as_deref().filter(|i| !images.contains_key(*i)) {
            problems.push(format!("function {}: image {i:?} is not served (images: {known})", f.name));
        }
    }
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Print the ready line when `/readyz` turns 200: every image's pool has
/// held its `min_size` ready VMs.
async fn announce_ready<B: Backend>(pools: Pools<B>, addr: SocketAddr) {
    let started = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        match pools.readiness() {
            Readiness::Draining => return,
            Readiness::Ready => {
                let warm: usize = pools.iter().map(|(_, p)| p.status().ready).sum();
                println!(
                    "ember: ready on http://{addr} with {warm} warm VMs after {:.1}s. Try:\n  \
                     curl --json '{{\"cmd\":\"echo hello from $(uname -n)\"}}' http://{addr}/v1/run",
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            Readiness::Warming(_) => {}
        }
        let failures: u64 = pools.iter().map(|(_, p)| p.status().counters.create_failures).sum();
        if failures > 0 && started.elapsed() > Duration::from_secs(60) && !warned {
            warned = true;
            tracing::error!(failures, "the pool cannot warm up; see the log above");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM or SIGINT.
pub(crate) async fn shutdown_signal() {
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
    access: Access,
    limits: crate::http_server::ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    B::Vm: AgentVm,
{
    let app = crate::routes::router_with(state.clone(), access);
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let drain_state = state.clone();
    let graceful = async move {
        stop.await;
        drain_state.start_draining();
        let _ = stopping_tx.send(true);
    };
    let mut server = tokio::spawn(async move {
        crate::http_server::serve_http(listener, app, limits, tls, graceful).await;
        Ok::<(), std::io::Error>(())
    });
    let drain_timeout = state.pools.drain_timeout();
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
    state.pools.shutdown().await;
    Ok(())
}
