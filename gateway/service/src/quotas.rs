//! Per-tenant quotas: concurrent calls, sessions, paused sessions, memory
//! held by sessions, and calls per second (a token bucket). A key's own
//! quotas override the config's defaults field by field; unset everywhere
//! means unlimited. Past one, the caller gets a `429` whose code names it
//! (`quota_calls`, ...) and a `Retry-After`, distinct from the pool's own
//! `pool_exhausted`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::Error;

/// Quotas of one key, or the defaults (`[quotas]`). `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Calls running at once (one-shot and session calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrent_calls: Option<u32>,
    /// Sessions, running or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,
    /// Paused sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_sessions: Option<u32>,
    /// Guest memory (MiB) held by running sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_memory_mb: Option<u64>,
    /// Calls started per second, on average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calls_per_second: Option<f64>,
    /// Calls that may start at once before the rate applies (default: the
    /// rate rounded up, at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

impl Quotas {
    /// Each field of `self`, else of `defaults`.
    pub fn or(self, defaults: &Quotas) -> Quotas {
        Quotas {
            concurrent_calls: self.concurrent_calls.or(defaults.concurrent_calls),
            sessions: self.sessions.or(defaults.sessions),
            paused_sessions: self.paused_sessions.or(defaults.paused_sessions),
            session_memory_mb: self.session_memory_mb.or(defaults.session_memory_mb),
            calls_per_second: self.calls_per_second.or(defaults.calls_per_second),
            burst: self.burst.or(defaults.burst),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if let Some(r) = self.calls_per_second {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("calls_per_second {r} must be a positive number"));
            }
        }
        if self.burst == Some(0) {
            return Err("burst must be at least 1".into());
        }
        Ok(())
    }
}

/// What a quota refusal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Calls,
    Rate,
    Sessions,
    PausedSessions,
    SessionMemory,
}

impl Quota {
    pub fn code(self) -> &'static str {
        match self {
            Quota::Calls => "quota_calls",
            Quota::Rate => "quota_rate",
            Quota::Sessions => "quota_sessions",
            Quota::PausedSessions => "quota_paused_sessions",
            Quota::SessionMemory => "quota_session_memory",
        }
    }

    /// The refusal: 429, its code, when to try again.
    pub fn refuse(self, tenant: &str, detail: String, retry_after: Duration) -> Error {
        let secs = u32::try_from(retry_after.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1);
        Error::busy(self.code(), format!("tenant {tenant:?}: {detail}"), secs)
    }
}

/// A token bucket on the tokio clock.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Take a token at `rate`/s with room for `burst`, or say when one is due.
    fn take(&mut self, now: Instant, rate: f64, burst: u32) -> Result<(), Duration> {
        let cap = f64::from(burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// What one tenant is using now.
#[derive(Debug)]
struct Usage {
    calls: AtomicU32,
    bucket: Mutex<Option<Bucket>>,
}

/// Every tenant's live usage, for the quotas that count calls.
#[derive(Debug, Default)]
pub struct Tenants {
    usage: DashMap<Arc<str>, Arc<Usage>>,
    /// Held from a session quota's check to the change it allows (open,
    /// fork, resume, pause), so two requests at once cannot both pass it.
    sessions: DashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>,
}

/// A running call counted against its tenant; dropping it frees the place.
#[derive(Debug)]
pub struct CallSlot {
    usage: Arc<Usage>,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.usage.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tenants {
    fn usage(&self, tenant: &Arc<str>) -> Arc<Usage> {
        Arc::clone(
            &self
                .usage
                .entry(Arc::clone(tenant))
                .or_insert_with(|| Arc::new(Usage { calls: AtomicU32::new(0), bucket: Mutex::new(None) })),
        )
    }

    /// Admit one call of `tenant` under `quotas` (rate first, then
    /// concurrency), or refuse it.
    pub fn start_call(&self, tenant: &Arc<str>, quotas: &Quotas) -> Result<CallSlot, Error> {
        let usage = self.usage(tenant);
        if let Some(rate) = quotas.calls_per_second {
            let burst = quotas.burst.unwrap_or_else(|| (rate.ceil() as u32).max(1));
            let now = Instant::now();
            let mut b = usage.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let bucket = b.get_or_insert(Bucket { tokens: f64::from(burst), at: now });
            if let Err(wait) = bucket.take(now, rate, burst) {
                return Err(Quota::Rate.refuse(tenant, format!("more than {rate} calls a second"), wait));
            }
        }
        let limit = quotas.concurrent_calls.unwrap_or(u32::MAX);
        let taken =
            usage.calls.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        if taken.is_err() {
            return Err(Quota::Calls.refuse(
                tenant,
                format!("{limit} calls are running, the most this key may run at once"),
                Duration::from_secs(1),
            ));
        }
        Ok(CallSlot { usage })
    }

    /// Serialise `tenant`'s session changes that a quota counts (`None`
    /// without keys: nothing to count).
    pub async fn hold_sessions(&self, tenant: Option<&str>) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let tenant = tenant?;
        let lock = Arc::clone(&self.sessions.entry(Arc::from(tenant)).or_default());
        Some(lock.lock_owned().await)
    }

    /// Calls of `tenant` running now.
    pub fn running_calls(&self, tenant: &str) -> u32 {
        self.usage.get(tenant).map_or(0, |u| u.calls.load(Ordering::Acquire))
    }

    /// Every tenant seen, with its running calls (for metrics).
    pub fn snapshot(&self) -> Vec<(Arc<str>, u32)> {
        self.usage.iter().map(|e| (Arc::clone(e.key()), e.value().calls.load(Ordering::Acquire))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn a_key_overrides_the_defaults_field_by_field() {
        let defaults = Quotas { sessions: Some(5), concurrent_calls: Some(8), ..Quotas::default() };
        let own = Quotas { sessions: Some(1), ..Quotas::default() };
        let q = own.or(&defaults);
        assert_eq!((q.sessions, q.concurrent_calls, q.paused_sessions), (Some(1), Some(8), None));
        assert!(Quotas { calls_per_second: Some(0.0), ..Quotas::default() }.check().is_err());
        assert!(Quotas { burst: Some(0), ..Quotas::default() }.check().is_err());
    }

    #[test]
    fn concurrent_calls_are_counted_per_tenant_and_freed_on_drop() {
        let tenants = Tenants::default();
        let q = Quotas { concurrent_calls: Some(2), ..Quotas::default() };
        let a1 = tenants.start_call(&t("a"), &q).unwrap();
        let _a2 = tenants.start_call(&t("a"), &q).unwrap();
        let err = tenants.start_call(&t("a"), &q).unwrap_err();
        assert_eq!((err.code, err.retry_after), ("quota_calls", Some(1)));
        let _b = tenants.start_call(&t("b"), &q).expect("another tenant has its own count");
        drop(a1);
        assert_eq!(tenants.running_calls("a"), 1);
        tenants.start_call(&t("a"), &q).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_a_token_bucket_with_a_burst() {
        let tenants = Tenants::default();
        let q = Quotas { calls_per_second: Some(2.0), burst: Some(3), ..Quotas::default() };
        for _ in 0..3 {
            drop(tenants.start_call(&t("a"), &q).unwrap());
        }
        let err = tenants.start_call(&t("a"), &q).unwrap_err();
        assert_eq!((err.code, err.retry_after), ("quota_rate", Some(1)));
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(tenants.start_call(&t("a"), &q).expect("a token every half second"));
        assert!(tenants.start_call(&t("a"), &q).is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            drop(tenants.start_call(&t("a"), &q).unwrap());
        }
        assert!(tenants.start_call(&t("a"), &q).is_err(), "the bucket holds at most the burst");
    }
}
