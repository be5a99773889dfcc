//! Read-only routes: health, pool status, functions, metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::Backend;
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: 200 while serving, 503 while draining.
pub async fn healthz<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let s = state.pool.status();
    if state.is_draining() || s.draining {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response();
    }
    Json(json!({"status": "ok", "ready_vms": s.ready})).into_response()
}

/// `GET /v1/pool`: sizes by state, request rates, the sizer's target.
pub async fn pool<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let s = state.pool.status();
    let c = state.pool.config();
    Json(json!({
        "vms": {
            "ready": s.ready,
            "booting": s.booting,
            "claimed": s.claimed,
            "resetting": s.resetting,
            "sessions": s.sessions,
        },
        "warm_sets": s.warm_sets,
        "capacity": {
            "calls_per_sec": s.capacity_per_sec,
            "service_rate_per_sec": s.service_rate,
            "queue_wait_secs": s.queue_wait_secs,
            "host_cpu_busy": s.host_cpu_busy,
            "cpu_seconds_per": s.cpu_seconds,
        },
        "waiters": s.waiters,
        "target": s.target,
        "draining": s.draining,
        "rates": {"short_per_sec": s.rate_short, "long_per_sec": s.rate_long},
        "limits": {
            "min_size": c.min_size,
            "max_size": c.max_size,
            "max_memory_mb": c.max_memory_mb,
            "max_sessions": c.max_sessions,
            "run_reset": c.run_reset,
        },
        "counters": s.counters,
        "invocations_running": state.limits.max_concurrent_requests - state.permits.available_permits(),
    }))
    .into_response()
}

/// `GET /v1/functions`.
pub async fn functions<B: Backend>(State(state): State<AppState<B>>) -> Response {
    Json(json!({"functions": state.functions.list()})).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics<B: Backend>(State(state): State<AppState<B>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(state.pool.status()),
    )
        .into_response()
}
