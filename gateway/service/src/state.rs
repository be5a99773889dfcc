//! What every route shares: the pools (one per image), the limits, the
//! functions, metrics, the concurrency permits and the draining flag.
//! Cheap to clone.

use std::collections::BTreeMap;
use std::sync::Arc;

use ember_image::ImageInfo;
use ember_pool::pool::Backend;
use tokio::sync::Semaphore;

use crate::functions::Functions;
use crate::keys::KeyStore;
use crate::limits::Limits;
use crate::metrics::{Metrics, TenantLabels, TenantStateLabels};
use crate::pools::Pools;
use crate::quotas::{Quotas, Tenants};

pub struct AppState<B: Backend> {
    pub pools: Pools<B>,
    pub limits: Arc<Limits>,
    pub functions: Arc<Functions>,
    pub metrics: Arc<Metrics>,
    pub permits: Arc<Semaphore>,
    /// What each image is (from its build), for `GET /v1/images`.
    pub image_info: Arc<BTreeMap<String, ImageInfo>>,
    /// Whether VMs have NICs (`[network] enabled`).
    pub network_enabled: bool,
    /// The API keys (`None`: no keys file, every request is `Caller::Open`).
    pub keys: Option<Arc<KeyStore>>,
    /// Quotas of a key that sets none of its own (`[quotas]`).
    pub quotas: Arc<Quotas>,
    /// What each tenant runs now, for its quotas.
    pub tenants: Arc<Tenants>,
    /// Cancelled when the drain starts.
    draining: tokio_util::sync::CancellationToken,
}

impl<B: Backend> Clone for AppState<B> {
    fn clone(&self) -> Self {
        Self {
            pools: self.pools.clone(),
            limits: Arc::clone(&self.limits),
            functions: Arc::clone(&self.functions),
            metrics: Arc::clone(&self.metrics),
            permits: Arc::clone(&self.permits),
            image_info: Arc::clone(&self.image_info),
            network_enabled: self.network_enabled,
            keys: self.keys.clone(),
            quotas: Arc::clone(&self.quotas),
            tenants: Arc::clone(&self.tenants),
            draining: self.draining.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for AppState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("limits", &self.limits)
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl<B: Backend> AppState<B> {
    /// Shared state over started pools; pool events feed the metrics.
    pub fn new(pools: Pools<B>, limits: Limits, functions: Functions) -> Self {
        let metrics = Metrics::new();
        for (image, pool) in pools.iter() {
            pool.observe(metrics.observe_pool(image));
        }
        Self {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            pools,
            limits: Arc::new(limits),
            functions: Arc::new(functions),
            metrics,
            image_info: Arc::default(),
            network_enabled: false,
            keys: None,
            quotas: Arc::default(),
            tenants: Arc::default(),
            draining: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// With API keys and the quotas of a key that sets none.
    pub fn with_keys(mut self, keys: Arc<KeyStore>, quotas: Quotas) -> Self {
        self.keys = Some(keys);
        self.quotas = Arc::new(quotas);
        self
    }

    /// The Prometheus text: the pools' state, and each tenant's running
    /// calls and sessions as they are now.
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        m.tenant_calls.clear();
        for (tenant, n) in self.tenants.snapshot() {
            m.tenant_calls.get_or_create(&TenantLabels { tenant: tenant.to_string() }).set(i64::from(n));
        }
        m.tenant_sessions.clear();
        for (_, pool) in self.pools.iter() {
            for s in pool.sessions() {
                let tenant = crate::tenant::tenant_of(&s.key).unwrap_or("-").to_string();
                m.tenant_sessions.get_or_create(&TenantStateLabels { tenant, state: s.state }).inc();
            }
        }
        m.encode(self.pools.iter().map(|(n, p)| (n.to_string(), p.status())).collect())
    }

    /// With networking on (VMs have NICs).
    pub fn with_network(mut self, enabled: bool) -> Self {
        self.network_enabled = enabled;
        self
    }

    /// With what each image is (from its build).
    pub fn with_image_info(mut self, info: BTreeMap<String, ImageInfo>) -> Self {
        self.image_info = Arc::new(info);
        self
    }

    /// From now on new invocations are refused with 503.
    pub fn start_draining(&self) {
        self.draining.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// A token cancelled when the drain starts (for front ends that hold
    /// requests open: MCP's streams end with it).
    pub fn drain_token(&self) -> tokio_util::sync::CancellationToken {
        self.draining.child_token()
    }
}
