//! OpenTelemetry export over OTLP: the metrics of [`Metrics`] ([`metrics`]) and one span per gRPC
//! request served ([`traces`]), configured by the standard variables:
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector; `/v1/metrics` and `/v1/traces` are appended
//!   for `http/protobuf`. `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` and `..._TRACES_ENDPOINT`
//!   override it for one signal and are used as given. No endpoint for a signal: no export,
//!   and for traces no span is recorded at all.
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, default, or `http/protobuf`),
//!   `OTEL_EXPORTER_OTLP_COMPRESSION` (`gzip`, `zstd` over gRPC only, `none`) and
//!   `OTEL_EXPORTER_OTLP_TIMEOUT` (ms), each also per signal (`..._METRICS_PROTOCOL`, ...).
//! - `OTEL_SERVICE_NAME` (default `cairn`) and `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`): the
//!   resource of both signals.
//! - `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000); `OTEL_BSP_SCHEDULE_DELAY` (ms, default
//!   5000), `OTEL_BSP_MAX_QUEUE_SIZE` (2048) and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512) for spans.
//! - `OTEL_METRICS_EXPORTER=none`, `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`
//!   turn a signal (or both) off.
//!
//! Each signal is exported by its own task with a timeout: an unreachable collector costs a
//! log line, never a request. Spans wait in a bounded queue; when it is full new spans are
//! dropped and counted (`otlp_spans_dropped_total`).

pub mod metrics;
pub mod traces;
mod transport;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio_util::sync::CancellationToken;

/// Where and how one signal (metrics or traces) is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalConfig {
    /// The gRPC endpoint, or for `http/protobuf` the full URL the request is POSTed to.
    pub endpoint: String,
    /// `http/protobuf` rather than `grpc`.
    pub http: bool,
    /// `gzip` or `zstd`; `None` sends uncompressed.
    pub compression: Option<String>,
    /// Deadline of one export, connection included.
    pub timeout: Duration,
}

/// Export settings read from the environment.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub metrics: Option<SignalConfig>,
    pub traces: Option<SignalConfig>,
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
    /// Time between two metric exports.
    pub metric_interval: Duration,
    /// Longest a finished span waits before it is exported.
    pub span_delay: Duration,
    /// Spans waiting for export at most; more are dropped and counted.
    pub span_queue: usize,
    /// Spans in one export request at most.
    pub span_batch: usize,
}

impl OtlpConfig {
    /// `None` when neither signal has an endpoint.
    pub fn from_env() -> Option<OtlpConfig> {
        OtlpConfig::from_vars(|k| std::env::var(k).ok())
    }

    /// The configuration `var` (a lookup of environment variables) describes.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<OtlpConfig> {
        let var = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let millis = |v: Option<String>, default: u64| {
            Duration::from_millis(v.and_then(|v| v.parse().ok()).unwrap_or(default))
        };
        let signal = |name: &str, path: &str| -> Option<SignalConfig> {
            if var(&format!("OTEL_{name}_EXPORTER")).is_some_and(|e| e == "none") {
                return None;
            }
            let own = |suffix: &str| {
                var(&format!("OTEL_EXPORTER_OTLP_{name}_{suffix}"))
                    .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{suffix}")))
            };
            let protocol = own("PROTOCOL").unwrap_or_else(|| "grpc".into());
            let http = protocol.starts_with("http");
            if protocol == "http/json" {
                tracing::warn!("OTEL_EXPORTER_OTLP_PROTOCOL=http/json: Cairn sends http/protobuf");
            }
            let endpoint = match var(&format!("OTEL_EXPORTER_OTLP_{name}_ENDPOINT")) {
                Some(e) => e,
                None => {
                    let base = var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
                    if http {
                        format!("{}/{path}", base.trim_end_matches('/'))
                    } else {
                        base
                    }
                }
            };
            Some(SignalConfig {
                endpoint,
                http,
                compression: own("COMPRESSION").filter(|c| c != "none"),
                timeout: millis(own("TIMEOUT"), 10_000),
            })
        };
        let metrics = signal("METRICS", "v1/metrics");
        let traces = signal("TRACES", "v1/traces");
        if metrics.is_none() && traces.is_none() {
            return None;
        }
        let count = |k: &str, default: usize| {
            var(k)
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let span_queue = count("OTEL_BSP_MAX_QUEUE_SIZE", 2048);
        Some(OtlpConfig {
            metrics,
            traces,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| "cairn".into()),
            attributes: var("OTEL_RESOURCE_ATTRIBUTES")
                .map(|a| {
                    a.split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            metric_interval: millis(var("OTEL_METRIC_EXPORT_INTERVAL"), 60_000)
                .max(Duration::from_millis(50)),
            span_delay: millis(var("OTEL_BSP_SCHEDULE_DELAY"), 5_000)
                .max(Duration::from_millis(10)),
            span_queue,
            span_batch: count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(span_queue),
        })
    }

    /// The resource both signals carry: `service.name` and `OTEL_RESOURCE_ATTRIBUTES`.
    pub fn resource(&self) -> Resource {
        let mut attributes = vec![kv("service.name", &self.service_name)];
        attributes.extend(
            self.attributes
                .iter()
                .filter(|(k, _)| k != "service.name")
                .map(|(k, v)| kv(k, v)),
        );
        Resource {
            attributes,
            ..Default::default()
        }
    }
}

/// The export tasks; [`OtlpExport::stop`] flushes what is pending and ends them.
pub struct OtlpExport {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl OtlpExport {
    /// Sends what is pending (one last metric export, the queued spans) and waits at most
    /// `deadline` for it.
    pub async fn stop(mut self, deadline: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

/// Starts the export tasks the environment asks for. Spans of requests are recorded from now
/// on (through `metrics`) only if traces are exported. Call it before the listeners start, so
/// that they honour incoming `traceparent` headers.
pub fn start(metrics: Arc<crate::Metrics>) -> Option<OtlpExport> {
    let cfg = OtlpConfig::from_env()?;
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(signal) = cfg.metrics.clone().filter(|_| metrics.enabled()) {
        tracing::info!(endpoint = %signal.endpoint, http = signal.http, "exporting metrics over OTLP");
        tasks.spawn(metrics::run(
            cfg.clone(),
            signal,
            metrics.clone(),
            stop.clone(),
        ));
    }
    if let Some(signal) = cfg.traces.clone() {
        tracing::info!(endpoint = %signal.endpoint, http = signal.http, "exporting request spans over OTLP");
        let (sink, queue) =
            traces::SpanSink::new(cfg.span_queue, metrics.otlp_spans_dropped.clone());
        metrics.record_spans(sink);
        tasks.spawn(traces::run(cfg, signal, queue, stop.clone()));
    }
    Some(OtlpExport { stop, tasks })
}

/// The instrumentation scope of everything Cairn exports.
fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "cairn".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Option<OtlpConfig> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        OtlpConfig::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn no_endpoint_no_export() {
        assert!(cfg(&[("OTEL_SERVICE_NAME", "x")]).is_none());
        assert!(cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true")
        ])
        .is_none());
    }

    #[test]
    fn one_endpoint_serves_both_signals_with_their_paths_over_http() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap();
        let m = c.metrics.unwrap();
        let t = c.traces.unwrap();
        assert_eq!(m.endpoint, "http://c:4318/v1/metrics");
        assert_eq!(t.endpoint, "http://c:4318/v1/traces");
        assert!(m.http && t.http);
        assert_eq!(t.compression.as_deref(), Some("gzip"));
    }

    #[test]
    fn signal_variables_override_the_general_ones() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/x"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "10"),
        ])
        .unwrap();
        assert!(c.metrics.is_none());
        let t = c.traces.unwrap();
        assert_eq!(t.endpoint, "http://t:4318/x");
        assert!(t.http);
        assert_eq!(t.compression, None);
        assert_eq!((c.span_queue, c.span_batch), (10, 10));
        let grpc = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).unwrap();
        assert_eq!(grpc.traces.unwrap().endpoint, "http://c:4317");
    }
}
