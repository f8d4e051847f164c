//! HTTP routes served beside gRPC on the same listener: `/status` (200 with each component's
//! health as JSON, 503 when one is unhealthy) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use cairn_store::{Health, StoreRef};

use crate::metrics::{Metrics, StoreLabels};

/// What the HTTP routes report on.
#[derive(Clone)]
pub struct HttpState {
    /// Top-level stores this process runs, by name.
    pub stores: Vec<(String, StoreRef)>,
    pub metrics: Arc<Metrics>,
    /// Per-store health check deadline.
    pub health_timeout: Duration,
    /// Schedulers this process runs, for `/metrics`.
    pub schedulers: Vec<crate::execution::ExecutionPipeline>,
    /// Size of the blob `/status` writes to each store and reads back (0: none).
    pub probe_bytes: u64,
}

/// The probe blob of `size` bytes: the same bytes for the same size (a probe never stores
/// more than one blob per size), shaped as an encoded `ActionResult` whose only field is
/// `stdout_raw`, so that an action-cache store that checks what it serves (completeness
/// checking) reads it back like any other entry.
fn probe_blob(size: u64) -> bytes::Bytes {
    // Tag 5 (stdout_raw), wire type 2: one key byte, the length as a varint, the payload.
    let size = size.clamp(2, 64 << 20) as usize;
    let mut payload = size - 2;
    while 1 + prost::encoding::encoded_len_varint(payload as u64) + payload > size {
        payload -= 1;
    }
    let mut out = Vec::with_capacity(size);
    out.push((5 << 3) | 2);
    prost::encoding::encode_varint(payload as u64, &mut out);
    out.extend((0..payload).map(|i| (i as u64).wrapping_mul(31) as u8 ^ b'c'));
    out.into()
}

/// Writes a blob of `size` bytes (the same bytes for the same size, so it is stored once) and
/// reads it back.
async fn probe(store: &StoreRef, size: u64) -> Health {
    use cairn_store::StoreExt;
    let data = probe_blob(size);
    let digest = cairn_core::DigestFunction::Sha256.compute(&data);
    if let Err(e) = store.put_bytes(&digest, data.clone()).await {
        return Health::Failed(format!("health probe: writing {digest}: {e}"));
    }
    match store.get_all(&digest, data.len()).await {
        Ok(back) if back == data => Health::Ok,
        Ok(_) => Health::Failed(format!("health probe: {digest} read back different bytes")),
        Err(e) => Health::Failed(format!("health probe: reading {digest} back: {e}")),
    }
}

/// The admin API under `path`: `POST {path}/scheduler/{scheduler}/set_drain_worker/{worker}/{0|1}`.
pub fn admin_router(
    path: &str,
    schedulers: std::collections::BTreeMap<String, crate::execution::ExecutionPipeline>,
) -> Router {
    let route = format!(
        "{}/scheduler/{{scheduler}}/set_drain_worker/{{worker}}/{{draining}}",
        path.trim_end_matches('/')
    );
    Router::new()
        .route(&route, axum::routing::post(set_drain_worker))
        .with_state(Arc::new(schedulers))
}

async fn set_drain_worker(
    State(schedulers): State<
        Arc<std::collections::BTreeMap<String, crate::execution::ExecutionPipeline>>,
    >,
    axum::extract::Path((scheduler, worker, draining)): axum::extract::Path<(
        String,
        String,
        String,
    )>,
) -> (StatusCode, String) {
    let draining = match draining.as_str() {
        "1" => true,
        "0" => false,
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("{other:?} is neither 1 (drain) nor 0 (undrain)\n"),
            )
        }
    };
    let Some(p) = schedulers.get(&scheduler) else {
        let known: Vec<&str> = schedulers.keys().map(String::as_str).collect();
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no scheduler named {scheduler:?} (schedulers: {})\n",
                known.join(", ")
            ),
        );
    };
    let Some(handle) = p.local() else {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "scheduler {scheduler:?} forwards to another scheduler and has no workers; drain the worker there\n"
            ),
        );
    };
    match handle.set_worker_draining(worker.clone(), draining).await {
        Ok(()) if draining => (StatusCode::OK, format!("Draining worker {worker}\n")),
        Ok(()) => (
            StatusCode::OK,
            format!("Worker {worker} is back in service\n"),
        ),
        Err(e) if e.is_not_found() => (StatusCode::NOT_FOUND, format!("{e}\n")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// The router for `/status` (at `status_path`) and, when enabled, `/metrics`.
pub fn router(state: HttpState, status_path: Option<&str>, metrics_path: Option<&str>) -> Router {
    let mut r = Router::new();
    if let Some(p) = status_path {
        r = r.route(p, get(status));
    }
    if let Some(p) = metrics_path {
        r = r.route(p, get(metrics));
    }
    r.with_state(state)
}

async fn status(State(s): State<HttpState>) -> impl IntoResponse {
    let checks = s.stores.iter().map(|(name, store)| {
        let store = store.clone();
        let timeout = s.health_timeout;
        let probe_bytes = s.probe_bytes;
        async move {
            let check = async {
                match store.health().await {
                    Health::Ok if probe_bytes > 0 => probe(&store, probe_bytes).await,
                    other => other,
                }
            };
            let health = match tokio::time::timeout(timeout, check).await {
                Ok(h) => h,
                Err(_) => Health::Failed(format!("health check took longer than {timeout:?}")),
            };
            (name.clone(), store.info(), health)
        }
    });
    let results = futures::future::join_all(checks).await;
    let healthy = results.iter().all(|(_, _, h)| *h == Health::Ok);
    let mut components = serde_json::Map::new();
    for (name, info, health) in results {
        let mut c = serde_json::Map::new();
        c.insert("kind".into(), info.kind.into());
        // A store that serves while its index loads says how far the load is.
        if let Some(index) = info.index_state() {
            let mut i = serde_json::Map::new();
            i.insert(
                "state".into(),
                if index.loading { "loading" } else { "loaded" }.into(),
            );
            i.insert("phase".into(), index.phase.into());
            i.insert("entries".into(), index.entries.into());
            if let Some(n) = index.expected.filter(|_| index.loading) {
                i.insert("expected_entries".into(), n.into());
            }
            c.insert("index".into(), i.into());
        }
        match health {
            Health::Ok => {
                c.insert("status".into(), "ok".into());
            }
            Health::Failed(why) => {
                c.insert("status".into(), "failed".into());
                c.insert("message".into(), why.into());
            }
        }
        components.insert(format!("stores/{name}"), c.into());
    }
    for p in &s.schedulers {
        if let Some(shared) = p.shared() {
            let view = tokio::time::timeout(s.health_timeout, shared_status(shared))
                .await
                .unwrap_or_else(|_| {
                    serde_json::json!({
                        "status": "failed",
                        "replica": shared.replica_id(),
                        "message": format!("reading the cluster view took longer than {:?}", s.health_timeout),
                    })
                });
            components.insert(format!("schedulers/{}", p.name), view);
        }
    }
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "failed" },
        "version": env!("CARGO_PKG_VERSION"),
        "components": components,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    for (name, store) in &s.stores {
        let info = store.info();
        let labels = StoreLabels {
            store: name.clone(),
        };
        s.metrics
            .store_size_bytes
            .get_or_create(&labels)
            .set(info.total_size_bytes() as i64);
        s.metrics
            .store_entries
            .get_or_create(&labels)
            .set(total_entries(&info) as i64);
        if let Some(index) = info.index_state() {
            s.metrics
                .store_index_loading
                .get_or_create(&labels)
                .set(index.loading as i64);
            s.metrics
                .store_index_loaded_entries
                .get_or_create(&labels)
                .set(index.entries as i64);
        }
        s.metrics
            .cache_size
            .get_or_create(&crate::metrics::CacheTypeLabels {
                cache_type: name.clone(),
            })
            .set(info.total_size_bytes() as i64);
        let evicted = s
            .metrics
            .cache_operations
            .get_or_create(&crate::metrics::CacheOpLabels {
                cache_type: name.clone(),
                cache_operation_name: "evict",
                cache_operation_result: "success",
            });
        let (now, seen) = (info.total_evictions(), evicted.get());
        if now > seen {
            evicted.inc_by(now - seen);
        }
    }
    for p in &s.schedulers {
        let Some(handle) = p.local() else {
            continue; // a `grpc` scheduler: the scheduler it forwards to exports these
        };
        let Ok(st) = handle.stats().await else {
            continue;
        };
        let l = crate::metrics::SchedulerLabels {
            scheduler: p.name.clone(),
        };
        let m = &s.metrics;
        scheduler_figures(
            m,
            &l,
            SchedulerFigures {
                queued: st.queued as u64,
                executing: st.executing as u64,
                workers: st.workers as u64,
                slots: st.total_slots,
                busy: st.busy_slots,
            },
        );
        {
            // A read guard on the family: not held across the await below.
            let retries = m.execution_retry_count.get_or_create(&l);
            let seen = retries.get();
            if st.retries_total > seen {
                retries.inc_by(st.retries_total - seen);
            }
        }
        if let Some(shared) = p.shared() {
            cluster_metrics(m, &p.name, shared).await;
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// What one scheduler exports under the guides' metric names.
struct SchedulerFigures {
    queued: u64,
    executing: u64,
    workers: u64,
    slots: u64,
    busy: u64,
}

/// Sets the guides' scheduler families for the scheduler of `l`.
fn scheduler_figures(m: &Metrics, l: &crate::metrics::SchedulerLabels, f: SchedulerFigures) {
    m.scheduler_queue_length
        .get_or_create(l)
        .set(f.queued as i64);
    m.queue_length.get_or_create(l).set(f.queued as i64);
    m.worker_active_count.get_or_create(l).set(f.workers as i64);
    m.worker_slots_total.get_or_create(l).set(f.slots as i64);
    m.worker_slots_busy.get_or_create(l).set(f.busy as i64);
    for (stage, n) in [("queued", f.queued), ("executing", f.executing)] {
        m.execution_active_count
            .get_or_create(&crate::metrics::StageLabels {
                scheduler: l.scheduler.clone(),
                execution_stage: stage,
            })
            .set(n as i64);
    }
}

/// The shared scheduler's cluster-wide figures, from Redis. The per-replica families are
/// rebuilt on each scrape, so that a replica gone from Redis leaves them; without Redis they
/// are left empty (the queue and replica counts keep their last values).
async fn cluster_metrics(
    m: &Metrics,
    scheduler: &str,
    shared: &crate::execution::shared::SharedScheduler,
) {
    use crate::metrics::{ReplicaLabels, SchedulerLabels, StageLabels};
    m.scheduler_replica_info
        .get_or_create(&ReplicaLabels {
            scheduler: scheduler.to_string(),
            replica: shared.replica_id().to_string(),
        })
        .set(1);
    for family in [
        &m.cluster_worker_active_count,
        &m.cluster_worker_slots_total,
        &m.cluster_worker_slots_busy,
        &m.cluster_replica_claims,
    ] {
        family.clear();
    }
    let Ok(view) = shared.cluster().await else {
        return;
    };
    let l = SchedulerLabels {
        scheduler: scheduler.to_string(),
    };
    // The guides' own expressions (`sum(nativelink_scheduler_queue_length)`,
    // `nativelink_scheduler_queue_length > 100`, `nativelink_worker_active_count < 2`,
    // `sum(nativelink_execution_active_count{execution_stage="queued"})`) read one scheduler's
    // families. With shared state one replica, the live one with the lowest id, exports the
    // cluster's figures under those names and the others none, so that a sum, a max or one
    // series each gives the cluster. When it dies, the next takes over once its record
    // expires (three leases).
    if view.replicas.first().map(|(id, _)| id.as_str()) == Some(shared.replica_id()) {
        let total = |f: fn(&crate::execution::shared::ReplicaSummary) -> u64| {
            view.replicas.iter().map(|(_, r)| f(r)).sum::<u64>()
        };
        scheduler_figures(
            m,
            &l,
            SchedulerFigures {
                queued: view.queued,
                executing: view.executing,
                workers: total(|r| r.workers),
                slots: total(|r| r.slots),
                busy: total(|r| r.busy),
            },
        );
    } else {
        for family in [
            &m.scheduler_queue_length,
            &m.queue_length,
            &m.worker_active_count,
            &m.worker_slots_total,
            &m.worker_slots_busy,
        ] {
            family.remove(&l);
        }
        for execution_stage in ["queued", "executing"] {
            m.execution_active_count.remove(&StageLabels {
                scheduler: scheduler.to_string(),
                execution_stage,
            });
        }
    }
    m.cluster_queue_length
        .get_or_create(&l)
        .set(view.queued as i64);
    m.cluster_replicas
        .get_or_create(&l)
        .set(view.replicas.len() as i64);
    for (stage, n) in [("queued", view.queued), ("executing", view.executing)] {
        m.cluster_execution_active_count
            .get_or_create(&StageLabels {
                scheduler: scheduler.to_string(),
                execution_stage: stage,
            })
            .set(n as i64);
    }
    for (replica, r) in &view.replicas {
        let rl = ReplicaLabels {
            scheduler: scheduler.to_string(),
            replica: replica.clone(),
        };
        m.cluster_worker_active_count
            .get_or_create(&rl)
            .set(r.workers as i64);
        m.cluster_worker_slots_total
            .get_or_create(&rl)
            .set(r.slots as i64);
        m.cluster_worker_slots_busy
            .get_or_create(&rl)
            .set(r.busy as i64);
        m.cluster_replica_claims
            .get_or_create(&rl)
            .set(r.claims as i64);
    }
}

/// `/status`'s entry for a scheduler whose state is shared: this replica's id and whether it
/// claims work, and the cluster as Redis holds it (or why it could not be read). It does not
/// change the status code: the state's `redis_store` has its own entry under `stores/`.
async fn shared_status(shared: &crate::execution::shared::SharedScheduler) -> serde_json::Value {
    let mut c = serde_json::Map::new();
    c.insert("kind".into(), "simple (shared state in Redis)".into());
    c.insert("replica".into(), shared.replica_id().into());
    c.insert("claiming".into(), shared.claiming().into());
    match shared.cluster().await {
        Ok(view) => {
            c.insert("status".into(), "ok".into());
            let replicas: Vec<serde_json::Value> = view
                .replicas
                .iter()
                .map(|(id, r)| {
                    serde_json::json!({
                        "replica": id,
                        "this_replica": id == shared.replica_id(),
                        "workers": r.workers,
                        "slots": r.slots,
                        "busy_slots": r.busy,
                        "claims": r.claims,
                    })
                })
                .collect();
            c.insert(
                "cluster".into(),
                serde_json::json!({
                    "queued": view.queued,
                    "executing": view.executing,
                    "workers": view.replicas.iter().map(|(_, r)| r.workers).sum::<u64>(),
                    "replicas": replicas,
                }),
            );
        }
        Err(e) => {
            c.insert("status".into(), "failed".into());
            c.insert("message".into(), e.message.into());
        }
    }
    c.into()
}

fn total_entries(info: &cairn_store::StoreInfo) -> u64 {
    info.entries.unwrap_or(0)
        + info
            .children
            .iter()
            .map(|(_, c)| total_entries(c))
            .sum::<u64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn probe_blobs_are_action_results_of_the_asked_size() {
        for size in [
            2u64,
            3,
            100,
            127,
            128,
            129,
            130,
            1 << 14,
            (1 << 14) + 2,
            1 << 20,
        ] {
            let blob = probe_blob(size);
            assert!(
                blob.len() as u64 == size || blob.len() as u64 == size - 1,
                "{size}: {}",
                blob.len()
            );
            let r = cairn_core::proto::build::bazel::remote::execution::v2::ActionResult::decode(
                blob.clone(),
            )
            .unwrap();
            assert!(r.output_files.is_empty() && r.stdout_digest.is_none());
            assert_eq!(probe_blob(size), blob, "the same bytes every time");
        }
    }
}
