//! Read-only routes: health, pool status, images, functions, metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ember_pool::pool::{Backend, Pool};
use serde_json::json;

use crate::pools::Readiness;
use crate::state::AppState;

/// `GET /healthz`: 200 while serving, 503 while draining.
pub async fn healthz<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let draining = state.pools.iter().any(|(_, p)| p.status().draining);
    if state.is_draining() || draining {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response();
    }
    let ready: usize = state.pools.iter().map(|(_, p)| p.status().ready).sum();
    Json(json!({"status": "ok", "ready_vms": ready})).into_response()
}

/// `GET /readyz`: 200 once every image's pool has held its `min_size`
/// ready VMs (a call then finds a warm VM), 503 before (saying what it
/// waits for) and while draining. `/healthz` is liveness; this is readiness.
pub async fn readyz<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    match state.pools.readiness() {
        _ if state.is_draining() => draining(),
        Readiness::Draining => draining(),
        Readiness::Warming(waiting) => {
            let message = waiting.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            (unavailable, Json(json!({"status": "warming", "message": message, "waiting_for": waiting})))
                .into_response()
        }
        Readiness::Ready => {
            let images: serde_json::Map<String, serde_json::Value> = state
                .pools
                .iter()
                .map(|(name, p)| {
                    (name.to_string(), json!({"ready": p.status().ready, "min_size": p.config().min_size}))
                })
                .collect();
            Json(json!({"status": "ready", "images": images})).into_response()
        }
    }
}

fn draining() -> Response {
    let body = json!({"status": "draining", "message": "the server is draining: it takes no new calls"});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// One image's pool, as `/v1/pool` and `/v1/images` show it.
fn pool_json<B: Backend>(pool: &Pool<B>) -> serde_json::Value {
    let s = pool.status();
    let c = pool.config();
    json!({
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
            "wait_bias": s.wait_bias,
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
    })
}

/// `GET /v1/pool`: the default image's pool at the top (sizes by state,
/// request rates, the sizer's target), every image's under `images`, and
/// the memory budget they share.
pub async fn pool<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let mut top = pool_json(state.pools.default_pool());
    let images: serde_json::Map<String, serde_json::Value> =
        state.pools.iter().map(|(name, p)| (name.to_string(), pool_json(p))).collect();
    let budget = state.pools.default_pool().budget();
    if let Some(o) = top.as_object_mut() {
        o.insert("image".into(), json!(state.pools.default_name()));
        o.insert("images".into(), json!(images));
        o.insert("memory".into(), json!({"used_mb": budget.used_mb(), "max_mb": budget.limit_mb()}));
        o.insert(
            "invocations_running".into(),
            json!(state.limits.max_concurrent_requests - state.permits.available_permits()),
        );
    }
    Json(top).into_response()
}

/// `GET /v1/cluster`: this node, and every live member with its load as
/// this node's watch-fed copy has them (no etcd request).
pub async fn cluster(member: Option<std::sync::Arc<ember_cluster::Membership>>) -> Response {
    let Some(m) = member else {
        return Json(json!({"enabled": false, "node": null, "members": []})).into_response();
    };
    let view = m.view();
    Json(json!({
        "enabled": true,
        "node": m.node(),
        "incarnation": m.incarnation(),
        "fenced": m.fenced(),
        "lease_ttl_secs": m.config().lease_ttl.as_secs(),
        "revision": view.revision,
        "members": view.listed(),
    }))
    .into_response()
}

/// `GET /v1/images`: every image served, what it holds, and its pool.
pub async fn images<B: Backend>(State(state): State<AppState<B>>) -> Response {
    let list: Vec<serde_json::Value> = state
        .pools
        .iter()
        .map(|(name, pool)| {
            let info = state.image_info.get(name);
            let s = pool.status();
            let c = pool.config();
            json!({
                "name": name,
                "default": name == state.pools.default_name(),
                "description": info.map(|i| i.description.as_str()),
                "source": info.map(|i| i.source),
                "packages": info.map(|i| &i.packages),
                "pip": info.map(|i| &i.pip),
                "preload": info.map(|i| &i.preload),
                "size_bytes": info.map(|i| i.rootfs_bytes),
                "built_at": info.map(|i| i.built_at),
                "build_secs": info.map(|i| i.build_secs),
                "memory_mb": pool.vm_memory_mb(),
                "disk_mb": info.map(|i| i.disk_mb),
                "writable_root": info.is_some_and(|i| i.writable_root),
                "sudo": info.is_some_and(|i| i.sudo),
                "pool": {
                    "ready": s.ready,
                    "booting": s.booting,
                    "claimed": s.claimed,
                    "resetting": s.resetting,
                    "sessions": s.sessions,
                    "target": s.target,
                    "min_size": c.min_size,
                    "max_size": c.max_size,
                },
            })
        })
        .collect();
    Json(json!({"images": list, "default": state.pools.default_name()})).into_response()
}

/// `GET /v1/functions`.
pub async fn functions<B: Backend>(State(state): State<AppState<B>>) -> Response {
    Json(json!({"functions": state.functions.list()})).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics<B: Backend>(State(state): State<AppState<B>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics_text(),
    )
        .into_response()
}
