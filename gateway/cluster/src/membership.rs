//! This node's membership: its lease, kept alive on a thread of its own;
//! its member and load records under that lease; and the watch that keeps
//! [`View`] current. A lapsed lease (a partition longer than the TTL) is
//! noticed by the keep-alive, which joins again as a new incarnation.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};

use crate::config::ClusterConfig;
use crate::keys;
use crate::view::{Load, Member, View};

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd { endpoints: String, source: etcd_client::Error },
    #[error("the keep-alive thread: {0}")]
    Thread(std::io::Error),
}

/// How long one etcd request may take before it is an error (a request to a
/// cluster without quorum must fail, not hang).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The margin under the lease's end at which this node counts itself gone.
const FENCE_MARGIN: Duration = Duration::from_millis(200);
/// How often the load is looked at; it is written only when it changed or
/// when this long has passed since the last write.
const LOAD_EVERY: Duration = Duration::from_secs(1);
const LOAD_REFRESH: Duration = Duration::from_secs(10);

/// What this node publishes as its load, asked once a second.
pub type LoadFn = Box<dyn Fn() -> Load + Send + Sync>;

/// This node in the cluster.
pub struct Membership {
    cfg: ClusterConfig,
    client: Client,
    view: RwLock<View>,
    /// The current lease id: the incarnation.
    lease: AtomicI64,
    /// Until when the lease is surely alive (last acknowledged keep-alive's
    /// send time + TTL - margin).
    deadline: Mutex<Instant>,
    draining: AtomicBool,
    started: String,
    /// Taken on leaving: what it captured (the server's pools) must not
    /// outlive the server because a task of this still runs.
    load: Mutex<Option<LoadFn>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.cfg.node)
            .field("incarnation", &self.incarnation())
            .finish_non_exhaustive()
    }
}

fn etcd_err(cfg: &ClusterConfig) -> impl Fn(etcd_client::Error) -> MembershipError + '_ {
    move |source| MembershipError::Etcd { endpoints: cfg.etcd.join(","), source }
}

impl Membership {
    /// Join: a lease, the records under it, the view loaded and watched,
    /// the keep-alive on its own thread and the load published.
    pub async fn join(cfg: ClusterConfig, load: LoadFn) -> Result<Arc<Self>, MembershipError> {
        let opts = ConnectOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(REQUEST_TIMEOUT);
        let client = Client::connect(&cfg.etcd, Some(opts)).await.map_err(etcd_err(&cfg))?;
        let me = Arc::new(Self {
            client,
            view: RwLock::new(View::default()),
            lease: AtomicI64::new(0),
            deadline: Mutex::new(Instant::now()),
            draining: AtomicBool::new(false),
            started: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            load: Mutex::new(Some(load)),
            stopped: AtomicBool::new(false),
            cfg,
        });
        me.register().await?;
        me.reload().await?;
        let keeper = Arc::clone(&me);
        std::thread::Builder::new()
            .name("ember-cluster-lease".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return tracing::error!(error = %e, "cannot run the lease keep-alive"),
                };
                rt.block_on(keeper.keep_alive());
            })
            .map_err(MembershipError::Thread)?;
        tokio::spawn(Arc::clone(&me).watch());
        tokio::spawn(Arc::clone(&me).publish_load());
        tracing::info!(node = %me.cfg.node, incarnation = me.incarnation(), "joined the cluster");
        Ok(me)
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    pub fn incarnation(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// The cluster as this node sees it now.
    pub fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether this node's lease may have lapsed (no acknowledged renewal
    /// within the TTL): it must not act for the cluster then.
    pub fn fenced(&self) -> bool {
        Instant::now() >= *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self) -> Member {
        Member {
            node: self.cfg.node.clone(),
            addr: self.cfg.advertise.clone(),
            incarnation: self.incarnation(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.started.clone(),
            draining: self.draining.load(Ordering::SeqCst),
        }
    }

    async fn put_record(&self, key: String, value: Vec<u8>) -> Result<(), MembershipError> {
        let opts = PutOptions::new().with_lease(self.incarnation());
        self.client.kv_client().put(key, value, Some(opts)).await.map_err(etcd_err(&self.cfg))?;
        Ok(())
    }

    /// A new lease (a new incarnation) and this node's records under it.
    async fn register(&self) -> Result<(), MembershipError> {
        let ttl = i64::try_from(self.cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let lease = self.client.lease_client().grant(ttl, None).await.map_err(etcd_err(&self.cfg))?;
        self.lease.store(lease.id(), Ordering::SeqCst);
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = sent + self.cfg.lease_ttl - FENCE_MARGIN;
        let record = serde_json::to_vec(&self.record()).unwrap_or_default();
        self.put_record(keys::node(&self.cfg.node), record).await?;
        let load = serde_json::to_vec(&self.current_load()).unwrap_or_default();
        self.put_record(keys::load(&self.cfg.node), load).await
    }

    /// The whole view read again, at one revision.
    async fn reload(&self) -> Result<i64, MembershipError> {
        let resp = self
            .client
            .kv_client()
            .get(keys::ROOT, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err(&self.cfg))?;
        let mut view = View::default();
        for kv in resp.kvs() {
            view.put(&String::from_utf8_lossy(kv.key()), kv.value());
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        view.revision = revision;
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        Ok(revision)
    }

    /// Renew the lease every third of its TTL; a lapsed lease (etcd
    /// answers TTL 0, or the deadline passed unrenewed) means joining again.
    async fn keep_alive(self: Arc<Self>) {
        let every = self.cfg.lease_ttl / 3;
        while !self.stopped.load(Ordering::SeqCst) {
            let lease = self.incarnation();
            let (mut keeper, mut stream) = match self.client.lease_client().keep_alive(lease).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster lease: cannot open the keep-alive; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.rejoin_if_lapsed().await;
                    continue;
                }
            };
            loop {
                if self.stopped.load(Ordering::SeqCst) || self.incarnation() != lease {
                    break;
                }
                let sent = Instant::now();
                let acked = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(every, acked).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
                            sent + self.cfg.lease_ttl - FENCE_MARGIN;
                    }
                    Ok(Ok(Some(_))) => {
                        tracing::warn!(node = %self.cfg.node, lease, "cluster lease lapsed; joining again");
                        self.rejoin().await;
                        break;
                    }
                    other => {
                        tracing::warn!(node = %self.cfg.node, outcome = ?other.map(|r| r.map(|_| ())), "cluster lease: renewal failed");
                        break;
                    }
                }
                tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
            }
            self.rejoin_if_lapsed().await;
        }
    }

    async fn rejoin_if_lapsed(&self) {
        if self.fenced() && !self.stopped.load(Ordering::SeqCst) {
            self.rejoin().await;
        }
    }

    async fn rejoin(&self) {
        match self.register().await {
            Ok(()) => {
                tracing::info!(node = %self.cfg.node, incarnation = self.incarnation(), "joined the cluster again")
            }
            Err(e) => {
                tracing::warn!(error = %e, "joining the cluster again failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    /// Follow every change under the root; a broken or compacted watch
    /// reads the whole view again and watches on from there.
    async fn watch(self: Arc<Self>) {
        let mut from = self.view.read().unwrap_or_else(|p| p.into_inner()).revision + 1;
        while !self.stopped.load(Ordering::SeqCst) {
            let opts = WatchOptions::new().with_prefix().with_start_revision(from);
            let mut stream = match self.client.watch_client().watch(keys::ROOT, Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster watch: cannot start; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if resp.compact_revision() > 0 || resp.canceled() => break,
                    Ok(Some(resp)) => {
                        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key());
                            match ev.event_type() {
                                EventType::Put => view.put(&key, kv.value()),
                                EventType::Delete => view.delete(&key),
                            }
                            view.revision = view.revision.max(kv.mod_revision());
                        }
                        from = view.revision + 1;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            match self.reload().await {
                Ok(r) => from = r + 1,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster watch: cannot reload; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Write the load when it changed (at most once a second), or every
    /// ten seconds; never when this node is fenced.
    async fn publish_load(self: Arc<Self>) {
        let mut last: Option<(Load, Instant)> = None;
        while !self.stopped.load(Ordering::SeqCst) {
            tokio::time::sleep(LOAD_EVERY).await;
            let now = self.current_load();
            let due = last.as_ref().is_none_or(|(l, at)| *l != now || at.elapsed() >= LOAD_REFRESH);
            if !due || self.fenced() {
                continue;
            }
            let value = serde_json::to_vec(&now).unwrap_or_default();
            match self.put_record(keys::load(&self.cfg.node), value).await {
                Ok(()) => last = Some((now, Instant::now())),
                Err(e) => tracing::debug!(error = %e, "publishing the load failed"),
            }
        }
    }

    fn current_load(&self) -> Load {
        self.load.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|f| f()).unwrap_or_default()
    }

    /// Leave placement at once (a drain): the member record says so.
    pub async fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let record = serde_json::to_vec(&self.record()).unwrap_or_default();
        if let Err(e) = self.put_record(keys::node(&self.cfg.node), record).await {
            tracing::warn!(error = %e, "could not mark this node draining");
        }
    }

    /// Leave the cluster: the lease revoked, its records gone at once.
    pub async fn leave(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.load.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Err(e) = self.client.lease_client().revoke(self.incarnation()).await {
            tracing::warn!(error = %e, "could not revoke the cluster lease (it lapses by itself)");
        }
    }
}
