//! Prometheus metrics (text format at `GET /metrics`). Request counts and
//! latency histograms are recorded as things happen; pool sizes and
//! counters are a snapshot of each image's pool taken at scrape time (the
//! metrics never hold the pools: the pools hold them, as their observer).
//! Everything about a pool or a VM carries an `image` label.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_pool::pool::{PoolEvent, PoolStatus, ResetKind};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantStatusLabels {
    pub tenant: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantQuotaLabels {
    pub tenant: String,
    pub quota: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantStateLabels {
    pub tenant: String,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImageLabels {
    pub image: String,
}

/// A histogram of seconds per image.
pub type Seconds = Family<ImageLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub invocations: Family<OutcomeLabels, Counter>,
    /// Requests by the key's name (`-` without keys) and status.
    pub tenant_requests: Family<TenantStatusLabels, Counter>,
    pub quota_refusals: Family<TenantQuotaLabels, Counter>,
    /// Set at each scrape.
    pub tenant_calls: Family<TenantLabels, Gauge>,
    pub tenant_sessions: Family<TenantStateLabels, Gauge>,
    pub claim_seconds: Seconds,
    pub exec_seconds: Seconds,
    pub reset_seconds: Seconds,
    pub scrub_seconds: Seconds,
    pub create_seconds: Seconds,
    pool_status: Arc<Mutex<Vec<(String, PoolStatus)>>>,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(seconds_buckets())
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. ~65 s
    exponential_buckets(0.001, 2.0, 17)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "ember_http_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let invocations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "ember_invocations",
            "Commands run, by outcome (exited, timed_out, error)",
            invocations.clone(),
        );
        let tenant_requests = Family::<TenantStatusLabels, Counter>::default();
        registry.register(
            "ember_tenant_requests",
            "HTTP requests answered, by tenant (the key's name; - without keys) and status",
            tenant_requests.clone(),
        );
        let quota_refusals = Family::<TenantQuotaLabels, Counter>::default();
        registry.register(
            "ember_quota_refusals",
            "Requests refused by a tenant's quota",
            quota_refusals.clone(),
        );
        let tenant_calls = Family::<TenantLabels, Gauge>::default();
        registry.register("ember_tenant_calls_running", "Calls running, by tenant", tenant_calls.clone());
        let tenant_sessions = Family::<TenantStateLabels, Gauge>::default();
        registry.register("ember_tenant_sessions", "Sessions by tenant and state", tenant_sessions.clone());
        let mut seconds = |name: &str, help: &str| {
            let h: Seconds = Family::new_with_constructor(seconds_histogram);
            registry.register(name, help, h.clone());
            h
        };
        let claim_seconds = seconds("ember_claim_seconds", "Time to get a VM for an invocation");
        let exec_seconds = seconds("ember_exec_seconds", "Time from claim to the command's exit");
        let reset_seconds = seconds("ember_reset_seconds", "Time to make a used VM clean (full reset)");
        let scrub_seconds = seconds(
            "ember_scrub_seconds",
            "Time to scrub a VM between calls of one function (in-guest reset)",
        );
        let create_seconds = seconds("ember_vm_create_seconds", "Time to boot or restore a VM");
        let pool_status = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(PoolCollector { status: Arc::clone(&pool_status) }));
        Arc::new(Self {
            registry,
            requests,
            invocations,
            tenant_requests,
            quota_refusals,
            tenant_calls,
            tenant_sessions,
            claim_seconds,
            exec_seconds,
            reset_seconds,
            scrub_seconds,
            create_seconds,
            pool_status,
        })
    }

    /// For [`ember_pool::pool::Pool::observe`] of image `image`'s pool.
    pub fn observe_pool(self: &Arc<Self>, image: &str) -> ember_pool::pool::Observer {
        let m = Arc::clone(self);
        let labels = ImageLabels { image: image.to_string() };
        Arc::new(move |event| match event {
            PoolEvent::Reset { took, ok: true, kind: ResetKind::Full } => {
                m.reset_seconds.get_or_create(&labels).observe(took.as_secs_f64())
            }
            PoolEvent::Reset { took, ok: true, kind: ResetKind::Scrub } => {
                m.scrub_seconds.get_or_create(&labels).observe(took.as_secs_f64())
            }
            PoolEvent::Created { took, ok: true } => {
                m.create_seconds.get_or_create(&labels).observe(took.as_secs_f64())
            }
            // Failures show in the pool's counters.
            PoolEvent::Reset { .. } | PoolEvent::Created { .. } => {}
        })
    }

    /// How long a claim on image `image`'s pool took.
    pub fn claim(&self, image: &str, took: Duration) {
        self.claim_seconds
            .get_or_create(&ImageLabels { image: image.to_string() })
            .observe(took.as_secs_f64());
    }

    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route: route.into(), method: method.into(), status })
            .inc();
    }

    pub fn tenant_request(&self, tenant: &str, status: u16) {
        self.tenant_requests.get_or_create(&TenantStatusLabels { tenant: tenant.into(), status }).inc();
    }

    pub fn quota_refused(&self, tenant: &str, quota: &'static str) {
        self.quota_refusals.get_or_create(&TenantQuotaLabels { tenant: tenant.into(), quota }).inc();
    }

    pub fn invocation(&self, image: &str, outcome: &'static str, exec: Option<Duration>) {
        self.invocations.get_or_create(&OutcomeLabels { outcome }).inc();
        if let Some(d) = exec {
            self.exec_seconds
                .get_or_create(&ImageLabels { image: image.to_string() })
                .observe(d.as_secs_f64());
        }
    }

    /// The text exposition, with `pools` as each image's pool's state.
    pub fn encode(&self, pools: Vec<(String, PoolStatus)>) -> String {
        // One scrape at a time sees its own snapshot.
        let mut slot = self.pool_status.lock().unwrap_or_else(|p| p.into_inner());
        *slot = pools;
        drop(slot);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[derive(Debug)]
struct PoolCollector {
    status: Arc<Mutex<Vec<(String, PoolStatus)>>>,
}

/// One metric family with a value per image (and per extra label).
fn per_image<F>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    pools: &[(String, PoolStatus)],
    values: F,
) -> Result<(), std::fmt::Error>
where
    F: Fn(&PoolStatus) -> Vec<(Option<(&'static str, &'static str)>, Value)>,
{
    let kind = match pools.first().map(|(_, s)| values(s)) {
        Some(v) if v.iter().any(|(_, x)| matches!(x, Value::Gauge(_))) => ConstGauge::new(0.0).metric_type(),
        _ => ConstCounter::new(0u64).metric_type(),
    };
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (image, s) in pools {
        for (extra, v) in values(s) {
            let mut labels = vec![("image", image.as_str())];
            if let Some(l) = extra {
                labels.push(l);
            }
            match v {
                Value::Counter(c) => ConstCounter::new(c).encode(family.encode_family(&labels)?)?,
                Value::Gauge(g) => ConstGauge::new(g).encode(family.encode_family(&labels)?)?,
            }
        }
    }
    Ok(())
}

/// A metric's name, help, and how to read it off a pool's status.
type Described<T> = (&'static str, &'static str, fn(&PoolStatus) -> T);

/// A sample of a per-image family.
#[derive(Debug, Clone, Copy)]
enum Value {
    Counter(u64),
    Gauge(f64),
}

fn one(v: Value) -> Vec<(Option<(&'static str, &'static str)>, Value)> {
    vec![(None, v)]
}

impl Collector for PoolCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if pools.is_empty() {
            return Ok(());
        }
        use Value::{Counter as C, Gauge as G};
        let counters: [Described<u64>; 14] = [
            ("ember_warm_hits", "Claims served by a ready VM", |s| s.counters.hits),
            ("ember_warm_misses", "Claims that waited for a VM to boot", |s| s.counters.misses),
            ("ember_claims_queued", "Warm hits that queued for a VM to come back from its reset", |s| {
                s.counters.queued
            }),
            ("ember_pool_exhausted", "Claims refused for lack of capacity", |s| s.counters.exhausted),
            ("ember_vms_created", "VMs created", |s| s.counters.created),
            ("ember_vm_create_failures", "VM creations that failed", |s| s.counters.create_failures),
            ("ember_vms_destroyed", "VMs destroyed", |s| s.counters.destroyed),
            ("ember_vm_resets", "Used VMs made clean and reused", |s| s.counters.resets),
            ("ember_vm_reset_failures", "Resets that failed (the VM was replaced)", |s| {
                s.counters.reset_failures
            }),
            ("ember_vm_scrubs", "Used VMs scrubbed for the same function", |s| s.counters.scrubs),
            (
                "ember_vm_scrub_failures",
                "Scrubs that failed or found a leftover (a full reset followed)",
                |s| s.counters.scrub_failures,
            ),
            ("ember_vm_steals", "VMs taken from another function's warm set", |s| s.counters.steals),
            (
                "ember_refused_by_capacity",
                "Claims refused at once because they would have waited past limits.max_queue_wait",
                |s| s.counters.refused_by_capacity,
            ),
            ("ember_queue_timeouts", "Queued claims that no VM reached within pool.claim_timeout", |s| {
                s.counters.queue_timeouts
            }),
        ];
        for (name, help, get) in counters {
            per_image(&mut enc, name, help, &pools, |s| one(C(get(s))))?;
        }
        per_image(&mut enc, "ember_pool_vms", "VMs by state", &pools, |s| {
            [
                ("ready", s.ready),
                ("booting", s.booting),
                ("claimed", s.claimed),
                ("resetting", s.resetting),
                ("session", s.sessions),
            ]
            .into_iter()
            .map(|(state, n)| (Some(("state", state)), G(n as f64)))
            .collect()
        })?;
        let gauges: [Described<Option<f64>>; 8] = [
            ("ember_pool_warmed_up", "1 once the pool has held its min_size ready VMs (GET /readyz)", |s| {
                Some(if s.warmed_up { 1.0 } else { 0.0 })
            }),
            ("ember_pool_target", "VMs the sizer wants ready", |s| Some(s.target as f64)),
            ("ember_service_rate", "VMs per second coming back to the ready set", |s| Some(s.service_rate)),
            ("ember_queue_wait_seconds", "Expected wait of the next queued claim", |s| {
                Some(s.queue_wait_secs)
            }),
            ("ember_capacity_calls_per_second", "Calls per second the host's CPUs can serve", |s| {
                s.capacity_per_sec
            }),
            ("ember_pool_waiters", "Claims waiting for a VM", |s| Some(s.waiters as f64)),
            ("ember_request_rate_short", "Claims per second (short window)", |s| Some(s.rate_short)),
            ("ember_request_rate_long", "Claims per second (long window)", |s| Some(s.rate_long)),
        ];
        for (name, help, get) in gauges {
            per_image(&mut enc, name, help, &pools, |s| get(s).map(|v| (None, G(v))).into_iter().collect())?;
        }
        per_image(
            &mut enc,
            "ember_cpu_seconds_per_operation",
            "CPU seconds of the VM's host processes per call, full reset, scrub and creation",
            &pools,
            |s| {
                let cpu = s.cpu_seconds;
                [("exec", cpu.exec), ("reset", cpu.reset), ("scrub", cpu.scrub), ("create", cpu.create)]
                    .into_iter()
                    .filter_map(|(kind, v)| v.map(|v| (Some(("kind", kind)), G(v))))
                    .collect()
            },
        )?;
        // The host's CPU is one figure, whichever pool measured it.
        if let Some(b) = pools.iter().find_map(|(_, s)| s.host_cpu_busy) {
            let g = ConstGauge::new(b);
            g.encode(enc.encode_descriptor(
                "ember_host_cpu_busy_ratio",
                "Share of the host's CPUs busy",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}
