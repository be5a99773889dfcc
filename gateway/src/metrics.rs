//! Prometheus metrics (text format at `GET /metrics`). Request counts and
//! latency histograms are recorded as things happen; pool sizes and
//! counters are a snapshot of the pool's status taken at scrape time (the
//! metrics never hold the pool: the pool holds them, as its observer).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_pool::pool::{PoolEvent, PoolStatus, ResetKind};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub invocations: Family<OutcomeLabels, Counter>,
    pub claim_seconds: Histogram,
    pub exec_seconds: Histogram,
    pub reset_seconds: Histogram,
    pub scrub_seconds: Histogram,
    pub create_seconds: Histogram,
    pool_status: Arc<Mutex<Option<PoolStatus>>>,
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
        let mut seconds = |name: &str, help: &str| {
            let h = Histogram::new(seconds_buckets());
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
        let pool_status = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(PoolCollector { status: Arc::clone(&pool_status) }));
        Arc::new(Self {
            registry,
            requests,
            invocations,
            claim_seconds,
            exec_seconds,
            reset_seconds,
            scrub_seconds,
            create_seconds,
            pool_status,
        })
    }

    /// For [`ember_pool::pool::Pool::observe`].
    pub fn observe_pool(self: &Arc<Self>) -> ember_pool::pool::Observer {
        let m = Arc::clone(self);
        Arc::new(move |event| match event {
            PoolEvent::Reset { took, ok: true, kind: ResetKind::Full } => {
                m.reset_seconds.observe(took.as_secs_f64())
            }
            PoolEvent::Reset { took, ok: true, kind: ResetKind::Scrub } => {
                m.scrub_seconds.observe(took.as_secs_f64())
            }
            PoolEvent::Created { took, ok: true } => m.create_seconds.observe(took.as_secs_f64()),
            // Failures show in the pool's counters.
            PoolEvent::Reset { .. } | PoolEvent::Created { .. } => {}
        })
    }

    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route: route.into(), method: method.into(), status })
            .inc();
    }

    pub fn invocation(&self, outcome: &'static str, exec: Option<Duration>) {
        self.invocations.get_or_create(&OutcomeLabels { outcome }).inc();
        if let Some(d) = exec {
            self.exec_seconds.observe(d.as_secs_f64());
        }
    }

    /// The text exposition, with `pool` as the pool's state.
    pub fn encode(&self, pool: PoolStatus) -> String {
        // One scrape at a time sees its own snapshot.
        let mut slot = self.pool_status.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(pool);
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
    status: Arc<Mutex<Option<PoolStatus>>>,
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for PoolCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
        let c = s.counters;
        counter(&mut enc, "ember_warm_hits", "Claims served by a ready VM", c.hits)?;
        counter(&mut enc, "ember_warm_misses", "Claims that waited for a VM to boot", c.misses)?;
        counter(
            &mut enc,
            "ember_claims_queued",
            "Warm hits that queued for a VM to come back from its reset",
            c.queued,
        )?;
        counter(&mut enc, "ember_pool_exhausted", "Claims refused for lack of capacity", c.exhausted)?;
        counter(&mut enc, "ember_vms_created", "VMs created", c.created)?;
        counter(&mut enc, "ember_vm_create_failures", "VM creations that failed", c.create_failures)?;
        counter(&mut enc, "ember_vms_destroyed", "VMs destroyed", c.destroyed)?;
        counter(&mut enc, "ember_vm_resets", "Used VMs made clean and reused", c.resets)?;
        counter(
            &mut enc,
            "ember_vm_reset_failures",
            "Resets that failed (the VM was replaced)",
            c.reset_failures,
        )?;
        counter(&mut enc, "ember_vm_scrubs", "Used VMs scrubbed for the same function", c.scrubs)?;
        counter(
            &mut enc,
            "ember_vm_scrub_failures",
            "Scrubs that failed or found a leftover (a full reset followed)",
            c.scrub_failures,
        )?;
        counter(&mut enc, "ember_vm_steals", "VMs taken from another function's warm set", c.steals)?;
        let g = ConstGauge::new(0i64);
        let mut family = enc.encode_descriptor("ember_pool_vms", "VMs by state", None, g.metric_type())?;
        for (state, n) in [
            ("ready", s.ready),
            ("booting", s.booting),
            ("claimed", s.claimed),
            ("resetting", s.resetting),
            ("session", s.sessions),
        ] {
            let labels = [("state", state)];
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?;
        }
        gauge(&mut enc, "ember_pool_target", "VMs the sizer wants ready", s.target as f64)?;
        counter(
            &mut enc,
            "ember_refused_by_capacity",
            "Claims refused at once because they would have waited past limits.max_queue_wait",
            c.refused_by_capacity,
        )?;
        gauge(&mut enc, "ember_service_rate", "VMs per second coming back to the ready set", s.service_rate)?;
        gauge(
            &mut enc,
            "ember_queue_wait_seconds",
            "Expected wait of the next queued claim",
            s.queue_wait_secs,
        )?;
        if let Some(cap) = s.capacity_per_sec {
            gauge(
                &mut enc,
                "ember_capacity_calls_per_second",
                "Calls per second the host's CPUs can serve",
                cap,
            )?;
        }
        if let Some(b) = s.host_cpu_busy {
            gauge(&mut enc, "ember_host_cpu_busy_ratio", "Share of the host's CPUs busy", b)?;
        }
        let g = ConstGauge::new(0.0f64);
        let mut family = enc.encode_descriptor(
            "ember_cpu_seconds_per_operation",
            "CPU seconds of the VM's host processes per call, full reset, scrub and creation",
            None,
            g.metric_type(),
        )?;
        let cpu = s.cpu_seconds;
        for (kind, v) in
            [("exec", cpu.exec), ("reset", cpu.reset), ("scrub", cpu.scrub), ("create", cpu.create)]
        {
            if let Some(v) = v {
                ConstGauge::new(v).encode(family.encode_family(&[("kind", kind)])?)?;
            }
        }
        gauge(&mut enc, "ember_pool_waiters", "Claims waiting for a VM", s.waiters as f64)?;
        gauge(&mut enc, "ember_request_rate_short", "Claims per second (short window)", s.rate_short)?;
        gauge(&mut enc, "ember_request_rate_long", "Claims per second (long window)", s.rate_long)?;
        Ok(())
    }
}
