//! OpenTelemetry export over OTLP.
//!
//! - Traces ([`traces`]): `tracing` spans of every layer, exported by the OpenTelemetry SDK
//!   (`tracing-opentelemetry`, the SDK's batch span processor, `opentelemetry-otlp`), which
//!   reads the standard `OTEL_*` variables itself.
//! - Metrics ([`metrics`]): the registry of [`crate::Metrics`], exported by our own code. The
//!   SDK's OTLP metric exporter only accepts the SDK's own `ResourceMetrics` (its fields are
//!   private to the SDK), so it could only export metrics declared a second time as SDK
//!   instruments; ARCHITECTURE.md has the reasoning. Variables honoured for metrics:
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector; `/v1/metrics` is appended for
//!   `http/protobuf`. `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` overrides it and is used as given.
//!   No endpoint: no export.
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, default, or `http/protobuf`),
//!   `OTEL_EXPORTER_OTLP_COMPRESSION` (`gzip`, `zstd`, `none`) and
//!   `OTEL_EXPORTER_OTLP_TIMEOUT` (ms), each also as `..._METRICS_...`.
//! - `OTEL_SERVICE_NAME` (default `cairn`) and `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`).
//! - `OTEL_METRIC_EXPORT_INTERVAL` (ms, default 60000).
//! - `OTEL_METRICS_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn it off.
//!
//! Export runs in its own task with a timeout: an unreachable collector costs a log line,
//! never a request.

pub mod metrics;
pub mod traces;
mod transport;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio_util::sync::CancellationToken;

/// Where and how metrics are sent.
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
    pub metrics: SignalConfig,
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
    /// Time between two metric exports.
    pub metric_interval: Duration,
}

impl OtlpConfig {
    /// `None` when metrics have no endpoint or are turned off.
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
        let metrics = signal("METRICS", "v1/metrics")?;
        Some(OtlpConfig {
            metrics,
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
        })
    }

    /// The resource metrics carry: `service.name` and `OTEL_RESOURCE_ATTRIBUTES`.
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

/// The metrics export task; [`OtlpExport::stop`] sends the last export and ends it.
pub struct OtlpExport {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpExport {
    /// Sends one last metric export and waits at most `deadline` for it.
    pub async fn stop(self, deadline: Duration) {
        self.stop.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Starts exporting metrics if the environment asks for it (traces: [`traces::layer`]).
pub fn start(metrics: Arc<crate::Metrics>) -> Option<OtlpExport> {
    let cfg = OtlpConfig::from_env()?;
    if !metrics.enabled() {
        return None;
    }
    let stop = CancellationToken::new();
    let signal = cfg.metrics.clone();
    tracing::info!(endpoint = %signal.endpoint, http = signal.http, "exporting metrics over OTLP");
    let task = tokio::spawn(metrics::run(cfg, signal, metrics, stop.clone()));
    Some(OtlpExport { stop, task })
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
        ..Default::default()
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
            ("OTEL_METRICS_EXPORTER", "none")
        ])
        .is_none());
        assert!(cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true")
        ])
        .is_none());
    }

    #[test]
    fn the_general_endpoint_gets_the_metrics_path_over_http() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap();
        let m = c.metrics;
        assert_eq!(m.endpoint, "http://c:4318/v1/metrics");
        assert!(m.http);
        assert_eq!(m.compression.as_deref(), Some("gzip"));
    }

    #[test]
    fn signal_variables_override_the_general_ones() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4318/x"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ])
        .unwrap();
        let m = c.metrics;
        assert_eq!(m.endpoint, "http://m:4318/x");
        assert!(m.http);
        assert_eq!(m.compression, None);
        let grpc = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).unwrap();
        assert_eq!(grpc.metrics.endpoint, "http://c:4317");
    }
}
