//! What every route shares: the pool, the limits, the functions, metrics,
//! the concurrency permits and the draining flag. Cheap to clone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ember_pool::pool::{Backend, Pool};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::functions::Functions;
use crate::metrics::Metrics;

pub struct AppState<B: Backend> {
    pub pool: Pool<B>,
    pub limits: Arc<Limits>,
    pub functions: Arc<Functions>,
    pub metrics: Arc<Metrics>,
    pub permits: Arc<Semaphore>,
    draining: Arc<AtomicBool>,
}

impl<B: Backend> Clone for AppState<B> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            limits: Arc::clone(&self.limits),
            functions: Arc::clone(&self.functions),
            metrics: Arc::clone(&self.metrics),
            permits: Arc::clone(&self.permits),
            draining: Arc::clone(&self.draining),
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
    /// Shared state over a started pool; pool events feed the metrics.
    pub fn new(pool: Pool<B>, limits: Limits, functions: Functions) -> Self {
        let metrics = Metrics::new();
        pool.observe(metrics.observe_pool());
        Self {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            pool,
            limits: Arc::new(limits),
            functions: Arc::new(functions),
            metrics,
            draining: Arc::default(),
        }
    }

    /// From now on new invocations are refused with 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
