//! Every metric Cairn exports, declared once. `/metrics` encodes this registry in the
//! Prometheus text format. Names follow the NativeLink guides: the prefix (default
//! `nativelink`, `global.metrics_prefix` in the config) is prepended to each name below, so the
//! guides' queries work unchanged. Labels never carry digests (bounded cardinality: services,
//! methods, codes, configured store and scheduler names, fixed enumerations).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::otlp::traces;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: &'static str,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcErrorLabels {
    pub service: &'static str,
    pub method: &'static str,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchedulerLabels {
    pub scheduler: String,
}

/// One replica of a scheduler whose state is shared in Redis.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub scheduler: String,
    pub replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub scheduler: String,
    pub execution_stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success`, `failure`, `cache_hit` or `timeout`.
    pub execution_result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheTypeLabels {
    pub cache_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheOpLabels {
    pub cache_type: String,
    /// `read`, `write`, `delete` or `evict`.
    pub cache_operation_name: &'static str,
    /// `hit`, `miss`, `success` or `error`.
    pub cache_operation_result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheOpDurationLabels {
    pub cache_type: String,
    pub cache_operation_name: &'static str,
}

/// A request to a remote backend of a leaf store (`cairn_store::backend_metrics`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The store's key path without `stores.` (`CAS`, `CAS.fast_slow.slow`).
    pub store: String,
    /// The store kind (`redis_store`, ...).
    pub backend: &'static str,
    /// A fixed word per backend (`lookup`, `read`, `write`, ...).
    pub operation: &'static str,
}

/// A leaf store's backend requests since start, all operations together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendTotals {
    /// The store kind (`redis_store`, a cloud provider).
    pub backend: &'static str,
    pub requests: u64,
    /// Attempts that failed (each retried attempt counts).
    pub errors: u64,
    pub retries: u64,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0, 30.0, 60.0,
    ])
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every gRPC method, by the service label `Metrics::rpc` gives it: the series created at 0
/// when a listener serves the service ([`Metrics::init_service`]).
pub const SERVICE_METHODS: &[(&str, &[&str])] = &[
    (
        "cas",
        &[
            "FindMissingBlobs",
            "BatchUpdateBlobs",
            "BatchReadBlobs",
            "GetTree",
            "SplitBlob",
            "GetChunkMapping",
            "SpliceBlob",
            "RegisterChunkMapping",
        ],
    ),
    ("ac", &["GetActionResult", "UpdateActionResult"]),
    ("bytestream", &["Read", "Write", "QueryWriteStatus"]),
    ("capabilities", &["GetCapabilities"]),
    ("execution", &["Execute", "WaitExecution"]),
    ("fetch", &["FetchBlob", "FetchDirectory"]),
    ("push", &["PushBlob", "PushDirectory"]),
    (
        "bep",
        &["PublishLifecycleEvent", "PublishBuildToolEventStream"],
    ),
    (
        "operations",
        &[
            "GetOperation",
            "ListOperations",
            "CancelOperation",
            "DeleteOperation",
            "WaitOperation",
        ],
    ),
];

/// The execution results that `execution_completed_count_total` counts.
pub const EXECUTION_RESULTS: [&str; 4] = ["success", "failure", "cache_hit", "timeout"];

/// The process's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RpcLabels, Counter>,
    pub request_errors: Family<RpcErrorLabels, Counter>,
    pub request_duration: HistogramFamily<RpcLabels>,
    pub store_size_bytes: Family<StoreLabels, Gauge>,
    pub store_entries: Family<StoreLabels, Gauge>,
    /// 1 while a store's start-up index load (filesystem) is in progress.
    pub store_index_loading: Family<StoreLabels, Gauge>,
    /// Entries that load has indexed so far.
    pub store_index_loaded_entries: Family<StoreLabels, Gauge>,
    pub scheduler_queue_length: Family<SchedulerLabels, Gauge>,
    pub queue_length: Family<SchedulerLabels, Gauge>,
    pub worker_active_count: Family<SchedulerLabels, Gauge>,
    pub worker_slots_total: Family<SchedulerLabels, Gauge>,
    pub worker_slots_busy: Family<SchedulerLabels, Gauge>,
    pub execution_active_count: Family<StageLabels, Gauge>,
    pub execution_retry_count: Family<SchedulerLabels, Counter>,
    pub execution_completed: Family<ResultLabels, Counter>,
    /// Shared scheduler state (`experimental_backend: redis`): the whole cluster as Redis
    /// holds it, where the families above count this replica's own workers and claims.
    pub cluster_queue_length: Family<SchedulerLabels, Gauge>,
    pub cluster_execution_active_count: Family<StageLabels, Gauge>,
    pub cluster_replicas: Family<SchedulerLabels, Gauge>,
    pub cluster_worker_active_count: Family<ReplicaLabels, Gauge>,
    pub cluster_worker_slots_total: Family<ReplicaLabels, Gauge>,
    pub cluster_worker_slots_busy: Family<ReplicaLabels, Gauge>,
    pub cluster_replica_claims: Family<ReplicaLabels, Gauge>,
    /// 1, labelled with this process's replica id: joins the unlabelled per-process families.
    pub scheduler_replica_info: Family<ReplicaLabels, Gauge>,
    /// Monotonic, but exposed without `_total`, as the deployment guide names it.
    pub worker_execution_failures: Gauge,
    /// Blobs looked up in the CAS (FindMissingBlobs, reads), and those found. Monotonic,
    /// exposed without `_total` so that the guide's `rate(nativelink_cas_hits[5m])` works.
    pub cas_requests: Gauge,
    pub cas_hits: Gauge,
    pub cas_hit_rate: Gauge<f64, AtomicU64>,
    pub cache_operations: Family<CacheOpLabels, Counter>,
    pub cache_size: Family<CacheTypeLabels, Gauge>,
    pub cache_operation_duration: HistogramFamily<CacheOpDurationLabels>,
    pub backend_requests: Family<BackendLabels, Counter>,
    pub backend_request_errors: Family<BackendLabels, Counter>,
    pub backend_retries: Family<BackendLabels, Counter>,
    pub backend_request_duration: HistogramFamily<BackendLabels>,
    /// The backend counters summed per `store` label, for the web UI's cache page (the
    /// families cannot be listed). Bounded like the labels: one entry per leaf store path.
    backend_totals: Mutex<std::collections::BTreeMap<String, BackendTotals>>,
    /// `global.disable_metrics`: no `/metrics` route and no OTLP metric export.
    disabled: std::sync::atomic::AtomicBool,
}

impl Metrics {
    /// Metrics named `nativelink_*`.
    pub fn new() -> Arc<Metrics> {
        Metrics::with_prefix("nativelink")
    }

    /// Metrics named `{prefix}_*`.
    pub fn with_prefix(prefix: &str) -> Arc<Metrics> {
        let mut r = Registry::with_prefix(prefix);
        let hist =
            || HistogramFamily::new_with_constructor(duration_histogram as fn() -> Histogram);
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            requests: Default::default(),
            request_errors: Default::default(),
            request_duration: hist(),
            store_size_bytes: Default::default(),
            store_entries: Default::default(),
            store_index_loading: Default::default(),
            store_index_loaded_entries: Default::default(),
            scheduler_queue_length: Default::default(),
            queue_length: Default::default(),
            worker_active_count: Default::default(),
            worker_slots_total: Default::default(),
            worker_slots_busy: Default::default(),
            execution_active_count: Default::default(),
            execution_retry_count: Default::default(),
            execution_completed: Default::default(),
            cluster_queue_length: Default::default(),
            cluster_execution_active_count: Default::default(),
            cluster_replicas: Default::default(),
            cluster_worker_active_count: Default::default(),
            cluster_worker_slots_total: Default::default(),
            cluster_worker_slots_busy: Default::default(),
            cluster_replica_claims: Default::default(),
            scheduler_replica_info: Default::default(),
            worker_execution_failures: Default::default(),
            cas_requests: Default::default(),
            cas_hits: Default::default(),
            cas_hit_rate: Default::default(),
            cache_operations: Default::default(),
            cache_size: Default::default(),
            cache_operation_duration: HistogramFamily::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            ),
            backend_requests: Default::default(),
            backend_request_errors: Default::default(),
            backend_retries: Default::default(),
            backend_request_duration: HistogramFamily::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            ),
            backend_totals: Default::default(),
            disabled: Default::default(),
        };
        r.register(
            "requests",
            "gRPC requests served, by service and method",
            m.requests.clone(),
        );
        r.register(
            "request_errors",
            "gRPC requests that ended with a non-OK status, by service, method and code",
            m.request_errors.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request to response (to the first message for streams), by service and method",
            m.request_duration.clone(),
        );
        r.register(
            "store_size_bytes",
            "Bytes held by each top-level store (sum of its leaf stores)",
            m.store_size_bytes.clone(),
        );
        r.register(
            "store_entries",
            "Entries held by each top-level store (sum of its leaf stores)",
            m.store_entries.clone(),
        );
        r.register(
            "store_index_loading",
            "1 while the index of a store (filesystem) loads at start-up; lookups of blobs not yet indexed check the disk meanwhile",
            m.store_index_loading.clone(),
        );
        r.register(
            "store_index_loaded_entries",
            "Entries the start-up index load of a store (filesystem) has indexed so far",
            m.store_index_loaded_entries.clone(),
        );
        r.register(
            "scheduler_queue_length",
            "Actions queued and waiting for a worker",
            m.scheduler_queue_length.clone(),
        );
        r.register(
            "queue_length",
            "Actions queued and waiting for a worker (the autoscaling metric)",
            m.queue_length.clone(),
        );
        r.register(
            "worker_active_count",
            "Workers connected to the scheduler",
            m.worker_active_count.clone(),
        );
        r.register(
            "worker_slots_total",
            "Action slots of all connected workers",
            m.worker_slots_total.clone(),
        );
        r.register(
            "worker_slots_busy",
            "Action slots running an action",
            m.worker_slots_busy.clone(),
        );
        r.register(
            "execution_active_count",
            "Actions by stage (queued, executing)",
            m.execution_active_count.clone(),
        );
        r.register(
            "execution_retry_count",
            "Attempts re-queued after a worker failure, disconnect or timeout",
            m.execution_retry_count.clone(),
        );
        r.register(
            "execution_completed_count",
            "Executions answered, by result: success, failure, cache_hit, timeout",
            m.execution_completed.clone(),
        );
        r.register(
            "cluster_queue_length",
            "Shared scheduler state: actions queued by every replica's clients, waiting for a worker of any replica",
            m.cluster_queue_length.clone(),
        );
        r.register(
            "cluster_execution_active_count",
            "Shared scheduler state: actions by stage (queued, executing) across every replica",
            m.cluster_execution_active_count.clone(),
        );
        r.register(
            "cluster_replicas",
            "Shared scheduler state: replicas that recorded themselves within the last three leases",
            m.cluster_replicas.clone(),
        );
        r.register(
            "cluster_worker_active_count",
            "Shared scheduler state: workers connected to each replica",
            m.cluster_worker_active_count.clone(),
        );
        r.register(
            "cluster_worker_slots_total",
            "Shared scheduler state: action slots of each replica's workers",
            m.cluster_worker_slots_total.clone(),
        );
        r.register(
            "cluster_worker_slots_busy",
            "Shared scheduler state: busy action slots of each replica's workers",
            m.cluster_worker_slots_busy.clone(),
        );
        r.register(
            "cluster_replica_claims",
            "Shared scheduler state: operations each replica holds a lease on",
            m.cluster_replica_claims.clone(),
        );
        r.register(
            "scheduler_replica_info",
            "Shared scheduler state: 1, labelled with this process's replica id",
            m.scheduler_replica_info.clone(),
        );
        r.register(
            "worker_execution_failures",
            "Executions that failed (non-zero exit, error status or infrastructure failure); monotonic",
            m.worker_execution_failures.clone(),
        );
        r.register(
            "cas_requests",
            "Blobs looked up in the CAS; monotonic",
            m.cas_requests.clone(),
        );
        r.register(
            "cas_hits",
            "Blobs looked up in the CAS and found; monotonic",
            m.cas_hits.clone(),
        );
        r.register(
            "cas_hit_rate",
            "cas_hits / cas_requests since start",
            m.cas_hit_rate.clone(),
        );
        r.register(
            "cache_operations",
            "Store operations by cache_type (store name), operation and result",
            m.cache_operations.clone(),
        );
        r.register(
            "cache_size",
            "Bytes held by each store (cache_type = store name)",
            m.cache_size.clone(),
        );
        r.register(
            "cache_operation_duration_seconds",
            "Store operation latency by cache_type and operation",
            m.cache_operation_duration.clone(),
        );
        r.register(
            "store_backend_requests",
            "Request attempts from leaf stores to their backends (Redis, object storage), by store, backend and operation",
            m.backend_requests.clone(),
        );
        r.register(
            "store_backend_request_errors",
            "Backend request attempts that failed (each retried attempt counts), by store, backend and operation",
            m.backend_request_errors.clone(),
        );
        r.register(
            "store_backend_retries",
            "Backend requests tried again after a failure, by store, backend and operation",
            m.backend_retries.clone(),
        );
        r.register(
            "store_backend_request_duration_seconds",
            "Backend request attempt latency, by store, backend and operation",
            m.backend_request_duration.clone(),
        );
        *m.registry.lock() = r;
        Arc::new(m)
    }

    /// Turns metrics off (`global.disable_metrics`), before any listener starts.
    pub fn disable(&self) {
        self.disabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether metrics are served and exported.
    pub fn enabled(&self) -> bool {
        !self.disabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts timing one RPC. This is the one place that observes requests: the timer feeds
    /// the request metrics and, when traces are exported, records the outcome on the
    /// request's span (the current one: call it inside the handler).
    pub fn rpc(self: &Arc<Self>, service: &'static str, method: &'static str) -> RpcTimer {
        RpcTimer {
            metrics: self.clone(),
            labels: RpcLabels { service, method },
            start: Instant::now(),
            span: traces::exporting().then(tracing::Span::current),
        }
    }

    /// Creates the series of every method of `service` at 0 (requests, the duration
    /// histogram, and errors with `code="Internal"`), so that the guides' queries return 0,
    /// not nothing, from the first scrape.
    pub fn init_service(&self, service: &str) {
        let Some((service, methods)) = SERVICE_METHODS.iter().find(|(s, _)| *s == service) else {
            return;
        };
        for method in methods.iter() {
            let labels = RpcLabels { service, method };
            let _ = self.requests.get_or_create(&labels);
            let _ = self.request_duration.get_or_create(&labels);
            let _ = self.request_errors.get_or_create(&RpcErrorLabels {
                service,
                method,
                code: "Internal".to_string(),
            });
        }
    }

    /// Creates every `execution_result` series at 0.
    pub fn init_execution(&self) {
        for result in EXECUTION_RESULTS {
            let _ = self.execution_completed.get_or_create(&ResultLabels {
                execution_result: result,
            });
        }
    }

    /// Creates the operation series of the store named `cache_type` at 0: reads (hit, miss,
    /// error), writes (success, error) and evictions.
    pub fn init_store(&self, cache_type: &str) {
        for (name, result) in [
            ("read", "hit"),
            ("read", "miss"),
            ("read", "error"),
            ("write", "success"),
            ("write", "error"),
            ("evict", "success"),
        ] {
            let _ = self.cache_operations.get_or_create(&CacheOpLabels {
                cache_type: cache_type.to_string(),
                cache_operation_name: name,
                cache_operation_result: result,
            });
        }
        for name in ["read", "write"] {
            let _ = self
                .cache_operation_duration
                .get_or_create(&CacheOpDurationLabels {
                    cache_type: cache_type.to_string(),
                    cache_operation_name: name,
                });
        }
    }

    /// Counts CAS lookups: `asked` blobs, `found` of them present.
    pub fn cas_lookups(&self, asked: u64, found: u64) {
        let total = self.cas_requests.inc_by(asked as i64) + asked as i64;
        let hits = self.cas_hits.inc_by(found as i64) + found as i64;
        if total > 0 {
            self.cas_hit_rate.set(hits as f64 / total as f64);
        }
    }

    /// Counts one store operation.
    pub fn cache_op(
        &self,
        cache_type: &str,
        name: &'static str,
        result: &'static str,
        seconds: f64,
    ) {
        self.cache_operations
            .get_or_create(&CacheOpLabels {
                cache_type: cache_type.to_string(),
                cache_operation_name: name,
                cache_operation_result: result,
            })
            .inc();
        self.cache_operation_duration
            .get_or_create(&CacheOpDurationLabels {
                cache_type: cache_type.to_string(),
                cache_operation_name: name,
            })
            .observe(seconds);
    }

    /// Counts one event of a store's backend client.
    pub fn backend_event(&self, event: &cairn_store::backend_metrics::BackendEvent<'_>) {
        use cairn_store::backend_metrics::BackendEvent;
        match *event {
            BackendEvent::Request {
                store,
                backend,
                operation,
                ok,
                seconds,
            } => {
                let labels = BackendLabels {
                    store: store.to_string(),
                    backend,
                    operation,
                };
                self.backend_requests.get_or_create(&labels).inc();
                if !ok {
                    self.backend_request_errors.get_or_create(&labels).inc();
                }
                self.backend_request_duration
                    .get_or_create(&labels)
                    .observe(seconds);
                self.add_backend_totals(store, backend, |t| {
                    t.requests += 1;
                    t.errors += u64::from(!ok);
                });
            }
            BackendEvent::Retry {
                store,
                backend,
                operation,
            } => {
                self.backend_retries
                    .get_or_create(&BackendLabels {
                        store: store.to_string(),
                        backend,
                        operation,
                    })
                    .inc();
                self.add_backend_totals(store, backend, |t| t.retries += 1);
            }
        }
    }

    fn add_backend_totals(
        &self,
        store: &str,
        backend: &'static str,
        f: impl FnOnce(&mut BackendTotals),
    ) {
        let mut totals = self.backend_totals.lock();
        match totals.get_mut(store) {
            Some(t) => f(t),
            None => {
                let mut t = BackendTotals {
                    backend,
                    ..Default::default()
                };
                f(&mut t);
                totals.insert(store.to_string(), t);
            }
        }
    }

    /// The backend requests of the leaf store whose `store` label is `store`
    /// (`CAS.fast_slow.slow`) since start, if it sent any.
    pub fn backend_totals(&self, store: &str) -> Option<BackendTotals> {
        self.backend_totals.lock().get(store).copied()
    }

    /// The reads counted under `cache_type` (a store's configured name, or a `cache_metrics`
    /// wrapper's `cache_type`), if any series of it exists.
    pub fn cache_reads(&self, cache_type: &str) -> Option<cairn_store::Reads> {
        let get = |result: &'static str| {
            self.cache_operations
                .get(&CacheOpLabels {
                    cache_type: cache_type.to_string(),
                    cache_operation_name: "read",
                    cache_operation_result: result,
                })
                .map(|c| c.get())
        };
        let (hits, misses, errors) = (get("hit"), get("miss"), get("error"));
        if hits.is_none() && misses.is_none() && errors.is_none() {
            return None;
        }
        Some(cairn_store::Reads {
            hits: hits.unwrap_or(0),
            misses: misses.unwrap_or(0),
            errors: errors.unwrap_or(0),
        })
    }

    /// Counts one answered execution.
    pub fn execution_completed(&self, result: &'static str) {
        self.execution_completed
            .get_or_create(&ResultLabels {
                execution_result: result,
            })
            .inc();
        if result == "failure" {
            self.worker_execution_failures.inc();
        }
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Records one RPC's count, duration and outcome (and its status on its span, when traces
/// are exported; holding the span keeps it open until a streamed answer ends).
pub struct RpcTimer {
    metrics: Arc<Metrics>,
    labels: RpcLabels,
    start: Instant,
    span: Option<tracing::Span>,
}

impl RpcTimer {
    /// Ends the RPC with `result`: an error status counts in `request_errors`.
    pub fn finish<T>(self, result: &Result<T, tonic::Status>) {
        let status = result.as_ref().err();
        self.end(status, status.is_some());
    }

    /// Ends an RPC whose `status` is a cache miss (GetActionResult's NOT_FOUND): counted as
    /// a request, not as an error, so that error-rate alerts stay quiet on cold builds. Its
    /// span still carries the status.
    pub fn finish_cache_miss(self, status: &tonic::Status) {
        self.end(Some(status), false);
    }

    fn end(self, status: Option<&tonic::Status>, is_error: bool) {
        let m = &self.metrics;
        let elapsed = self.start.elapsed();
        m.requests.get_or_create(&self.labels).inc();
        m.request_duration
            .get_or_create(&self.labels)
            .observe(elapsed.as_secs_f64());
        if let (Some(status), true) = (status, is_error) {
            m.request_errors
                .get_or_create(&RpcErrorLabels {
                    service: self.labels.service,
                    method: self.labels.method,
                    code: format!("{:?}", status.code()),
                })
                .inc();
        }
        if let Some(span) = &self.span {
            traces::record_status(span, status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_store::backend_metrics::BackendEvent;

    #[test]
    fn the_cache_page_views_read_the_same_counters() {
        let m = Metrics::new();
        assert_eq!(m.cache_reads("CAS"), None, "no series yet");
        m.init_store("CAS");
        assert_eq!(m.cache_reads("CAS"), Some(cairn_store::Reads::default()));
        m.cache_op("CAS", "read", "hit", 0.001);
        m.cache_op("CAS", "read", "hit", 0.001);
        m.cache_op("CAS", "read", "miss", 0.001);
        m.cache_op("CAS", "write", "success", 0.001);
        assert_eq!(
            m.cache_reads("CAS"),
            Some(cairn_store::Reads {
                hits: 2,
                misses: 1,
                errors: 0
            })
        );

        let request = |ok| BackendEvent::Request {
            store: "CAS.fast_slow.slow",
            backend: "redis_store",
            operation: "read",
            ok,
            seconds: 0.01,
        };
        m.backend_event(&request(true));
        m.backend_event(&request(false));
        m.backend_event(&BackendEvent::Retry {
            store: "CAS.fast_slow.slow",
            backend: "redis_store",
            operation: "read",
        });
        assert_eq!(
            m.backend_totals("CAS.fast_slow.slow"),
            Some(BackendTotals {
                backend: "redis_store",
                requests: 2,
                errors: 1,
                retries: 1
            })
        );
        assert_eq!(m.backend_totals("CAS"), None);
        assert!(m
            .encode()
            .contains("store_backend_requests_total{store=\"CAS.fast_slow.slow\""));
    }
}
