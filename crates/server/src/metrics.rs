//! Every metric Cairn exports, declared once. `/metrics` encodes this registry in the
//! Prometheus text format. Names follow the NativeLink guides (`nativelink_*`), so that their
//! queries work unchanged; labels never carry digests (bounded cardinality).

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub scheduler: String,
    pub execution_stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

/// The process's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RpcLabels, Counter>,
    pub request_errors: Family<RpcErrorLabels, Counter>,
    pub request_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    pub store_size_bytes: Family<StoreLabels, Gauge>,
    pub store_entries: Family<StoreLabels, Gauge>,
    pub scheduler_queue_length: Family<SchedulerLabels, Gauge>,
    pub queue_length: Family<SchedulerLabels, Gauge>,
    pub worker_active_count: Family<SchedulerLabels, Gauge>,
    pub worker_slots_total: Family<SchedulerLabels, Gauge>,
    pub worker_slots_busy: Family<SchedulerLabels, Gauge>,
    pub execution_active_count: Family<StageLabels, Gauge>,
    pub execution_retry_count: Family<SchedulerLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let requests = Family::<RpcLabels, Counter>::default();
        let request_errors = Family::<RpcErrorLabels, Counter>::default();
        let request_duration =
            Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            );
        let store_size_bytes = Family::<StoreLabels, Gauge>::default();
        let store_entries = Family::<StoreLabels, Gauge>::default();
        registry.register(
            "nativelink_requests",
            "gRPC requests served, by service and method",
            requests.clone(),
        );
        registry.register(
            "nativelink_request_errors",
            "gRPC requests that ended with a non-OK status, by service, method and code",
            request_errors.clone(),
        );
        registry.register(
            "nativelink_request_duration_seconds",
            "Time from request to response (to the first message for streams), by service and method",
            request_duration.clone(),
        );
        registry.register(
            "nativelink_store_size_bytes",
            "Bytes held by each top-level store (sum of its leaf stores)",
            store_size_bytes.clone(),
        );
        registry.register(
            "nativelink_store_entries",
            "Entries held by each top-level store (sum of its leaf stores)",
            store_entries.clone(),
        );
        let scheduler_queue_length = Family::<SchedulerLabels, Gauge>::default();
        let queue_length = Family::<SchedulerLabels, Gauge>::default();
        let worker_active_count = Family::<SchedulerLabels, Gauge>::default();
        let worker_slots_total = Family::<SchedulerLabels, Gauge>::default();
        let worker_slots_busy = Family::<SchedulerLabels, Gauge>::default();
        let execution_active_count = Family::<StageLabels, Gauge>::default();
        let execution_retry_count = Family::<SchedulerLabels, Counter>::default();
        registry.register(
            "nativelink_scheduler_queue_length",
            "Actions queued and waiting for a worker",
            scheduler_queue_length.clone(),
        );
        registry.register(
            "nativelink_queue_length",
            "Actions queued and waiting for a worker (the autoscaling metric)",
            queue_length.clone(),
        );
        registry.register(
            "nativelink_worker_active_count",
            "Workers connected to the scheduler",
            worker_active_count.clone(),
        );
        registry.register(
            "nativelink_worker_slots_total",
            "Action slots of all connected workers",
            worker_slots_total.clone(),
        );
        registry.register(
            "nativelink_worker_slots_busy",
            "Action slots running an action",
            worker_slots_busy.clone(),
        );
        registry.register(
            "nativelink_execution_active_count",
            "Actions by stage (queued, executing)",
            execution_active_count.clone(),
        );
        registry.register(
            "nativelink_execution_retry_count",
            "Attempts re-queued after a worker failure, disconnect or timeout",
            execution_retry_count.clone(),
        );
        Arc::new(Metrics {
            scheduler_queue_length,
            queue_length,
            worker_active_count,
            worker_slots_total,
            worker_slots_busy,
            execution_active_count,
            execution_retry_count,
            registry: Mutex::new(registry),
            requests,
            request_errors,
            request_duration,
            store_size_bytes,
            store_entries,
        })
    }

    /// Starts timing one RPC.
    pub fn rpc(self: &Arc<Self>, service: &'static str, method: &'static str) -> RpcTimer {
        RpcTimer {
            metrics: self.clone(),
            labels: RpcLabels { service, method },
            start: Instant::now(),
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

/// Records one RPC's count, duration and outcome.
pub struct RpcTimer {
    metrics: Arc<Metrics>,
    labels: RpcLabels,
    start: Instant,
}

impl RpcTimer {
    pub fn finish<T>(self, result: &Result<T, tonic::Status>) {
        let m = &self.metrics;
        m.requests.get_or_create(&self.labels).inc();
        m.request_duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
        if let Err(status) = result {
            m.request_errors
                .get_or_create(&RpcErrorLabels {
                    service: self.labels.service,
                    method: self.labels.method,
                    code: format!("{:?}", status.code()),
                })
                .inc();
        }
    }
}
