//! OpenTelemetry export of the metrics in [`Metrics`]: the same registry `/metrics` encodes is
//! read (its Prometheus text) and sent as OTLP gauges, monotonic sums and histograms, so a
//! metric is still declared once. Configured by the standard variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`; unset: no export),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, default, or `http/protobuf`), `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`), `OTEL_EXPORTER_OTLP_COMPRESSION` (`gzip`, `zstd`,
//! `none`), `OTEL_EXPORTER_OTLP_TIMEOUT` and `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds).
//! Export runs in its own task with a timeout: an unreachable collector costs a log line,
//! never a request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Export settings read from the environment.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub endpoint: String,
    pub http: bool,
    pub service_name: String,
    pub attributes: Vec<(String, String)>,
    pub compression: Option<String>,
    pub timeout: Duration,
    pub interval: Duration,
}

impl OtlpConfig {
    /// `None` when no endpoint is set.
    pub fn from_env() -> Option<OtlpConfig> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))?;
        let http = var("OTEL_EXPORTER_OTLP_PROTOCOL").is_some_and(|p| p.starts_with("http"));
        let ms = |k: &str, d: u64| {
            Duration::from_millis(var(k).and_then(|v| v.parse().ok()).unwrap_or(d))
        };
        Some(OtlpConfig {
            endpoint,
            http,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| "cairn".into()),
            attributes: var("OTEL_RESOURCE_ATTRIBUTES")
                .map(|a| {
                    a.split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
            compression: var("OTEL_EXPORTER_OTLP_COMPRESSION").filter(|c| c != "none"),
            timeout: ms("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000),
            interval: ms("OTEL_METRIC_EXPORT_INTERVAL", 60_000).max(Duration::from_millis(50)),
        })
    }
}

/// Starts the export task if the environment asks for one.
pub fn start(
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = OtlpConfig::from_env()?;
    tracing::info!(endpoint = %cfg.endpoint, http = cfg.http, "exporting metrics over OTLP");
    Some(tokio::spawn(async move {
        let start_ns = now_ns();
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let request = build_request(&cfg, &metrics.encode(), start_ns, now_ns());
            match tokio::time::timeout(cfg.timeout, send(&cfg, request)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "OTLP export failed"),
                Err(_) => tracing::debug!("OTLP export timed out"),
            }
        }
    }))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn send(cfg: &OtlpConfig, request: ExportMetricsServiceRequest) -> Result<(), String> {
    if cfg.http {
        let url = if cfg.endpoint.ends_with("/v1/metrics") {
            cfg.endpoint.clone()
        } else {
            format!("{}/v1/metrics", cfg.endpoint.trim_end_matches('/'))
        };
        return post_protobuf(&url, request.encode_to_vec(), cfg.compression.as_deref()).await;
    }
    let channel = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(cfg.timeout)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = MetricsServiceClient::new(channel);
    match cfg.compression.as_deref() {
        Some("gzip") => client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip),
        Some("zstd") => client = client.send_compressed(tonic::codec::CompressionEncoding::Zstd),
        _ => {}
    }
    client
        .export(request)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// OTLP/HTTP: one POST of the protobuf body over a plain HTTP/1.1 connection.
async fn post_protobuf(url: &str, body: Vec<u8>, compression: Option<&str>) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// endpoints are supported for http/protobuf")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let (body, encoding) = match compression {
        Some("zstd") => (
            zstd::bulk::compress(&body, 3).map_err(|e| e.to_string())?,
            Some("zstd"),
        ),
        _ => (body, None),
    };
    let mut s = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| e.to_string())?;
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(e) = encoding {
        head.push_str(&format!("Content-Encoding: {e}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&body).await.map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.map_err(|e| e.to_string())?;
    let status = String::from_utf8_lossy(&reply[..reply.len().min(12)]).to_string();
    if status.starts_with("HTTP/1.1 2") || status.starts_with("HTTP/1.0 2") {
        Ok(())
    } else {
        Err(format!("collector answered {status:?}"))
    }
}

/// Label pairs of one sample.
type Labels = Vec<(String, String)>;
/// One sample line: metric name, labels, value.
type Sample = (String, Labels, f64);
/// A histogram series: (upper bound, cumulative count) buckets, sum, count.
type HistogramSeries = (Vec<(f64, u64)>, f64, u64);

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
    }
}

/// One sample line: name, labels, value.
fn parse_sample(line: &str) -> Option<Sample> {
    let (name_labels, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match name_labels.find('{') {
        None => (name_labels.to_string(), vec![]),
        Some(i) => {
            let inner = name_labels[i + 1..].strip_suffix('}')?;
            let mut labels = Vec::new();
            let mut rest = inner;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"")?;
                let mut v = String::new();
                let mut chars = after.char_indices();
                let mut end = None;
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                v.push(match n {
                                    'n' => '\n',
                                    other => other,
                                });
                            }
                        }
                        '"' => {
                            end = Some(j);
                            break;
                        }
                        c => v.push(c),
                    }
                }
                labels.push((k.trim_start_matches(',').to_string(), v));
                rest = after[end? + 1..].trim_start_matches(',');
            }
            (name_labels[..i].to_string(), labels)
        }
    };
    Some((name, labels, value))
}

/// The OTLP request for one scrape of the registry's text.
pub fn build_request(
    cfg: &OtlpConfig,
    text: &str,
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps: BTreeMap<String, String> = BTreeMap::new();
    let mut samples: Vec<Sample> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((n, t)) = rest.split_once(' ') {
                types.insert(n.to_string(), t.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((n, h)) = rest.split_once(' ') {
                helps.insert(n.to_string(), h.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            if let Some(s) = parse_sample(line) {
                samples.push(s);
            }
        }
    }
    let point = |labels: &[(String, String)], v: f64| NumberDataPoint {
        attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let mut metrics = Vec::new();
    for (family, kind) in &types {
        let description = helps.get(family).cloned().unwrap_or_default();
        let data = match kind.as_str() {
            "counter" => {
                let name = format!("{family}_total");
                let points = samples
                    .iter()
                    .filter(|s| s.0 == name)
                    .map(|s| point(&s.1, s.2))
                    .collect();
                metric::Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })
            }
            "histogram" => {
                let mut groups: BTreeMap<Labels, HistogramSeries> = BTreeMap::new();
                for (n, labels, v) in &samples {
                    let base: Vec<(String, String)> =
                        labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                    if *n == format!("{family}_bucket") {
                        let le = labels
                            .iter()
                            .find(|(k, _)| k == "le")
                            .map(|(_, v)| v.as_str())
                            .unwrap_or("+Inf");
                        let bound = if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().unwrap_or(f64::INFINITY)
                        };
                        groups.entry(base).or_default().0.push((bound, *v as u64));
                    } else if *n == format!("{family}_sum") {
                        groups.entry(base).or_default().1 = *v;
                    } else if *n == format!("{family}_count") {
                        groups.entry(base).or_default().2 = *v as u64;
                    }
                }
                let data_points = groups
                    .into_iter()
                    .map(|(labels, (mut buckets, sum, count))| {
                        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let mut prev = 0u64;
                        let mut bucket_counts = Vec::new();
                        let mut explicit_bounds = Vec::new();
                        for (bound, cumulative) in &buckets {
                            bucket_counts.push(cumulative.saturating_sub(prev));
                            prev = *cumulative;
                            if bound.is_finite() {
                                explicit_bounds.push(*bound);
                            }
                        }
                        HistogramDataPoint {
                            attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
                            start_time_unix_nano: start_ns,
                            time_unix_nano: now_ns,
                            count,
                            sum: Some(sum),
                            bucket_counts,
                            explicit_bounds,
                            ..Default::default()
                        }
                    })
                    .collect();
                metric::Data::Histogram(Histogram {
                    data_points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })
            }
            _ => {
                let points = samples
                    .iter()
                    .filter(|s| &s.0 == family)
                    .map(|s| point(&s.1, s.2))
                    .collect();
                metric::Data::Gauge(Gauge {
                    data_points: points,
                })
            }
        };
        metrics.push(Metric {
            name: family.clone(),
            description,
            data: Some(data),
            ..Default::default()
        });
    }
    let mut attributes = vec![kv("service.name", &cfg.service_name)];
    attributes.extend(cfg.attributes.iter().map(|(k, v)| kv(k, v)));
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "cairn".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_text_becomes_gauges_sums_and_histograms() {
        let m = Metrics::new();
        m.cas_lookups(4, 3);
        m.execution_completed("success");
        m.cache_op("CAS", "read", "hit", 0.002);
        let cfg = OtlpConfig {
            endpoint: String::new(),
            http: false,
            service_name: "svc".into(),
            attributes: vec![("deployment.environment".into(), "ci".into())],
            compression: None,
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
        };
        let req = build_request(&cfg, &m.encode(), 1, 2);
        let rm = &req.resource_metrics[0];
        let attrs = &rm.resource.as_ref().unwrap().attributes;
        assert!(attrs.contains(&kv("service.name", "svc")));
        assert!(attrs.contains(&kv("deployment.environment", "ci")));
        let metrics = &rm.scope_metrics[0].metrics;
        let find = |n: &str| {
            metrics
                .iter()
                .find(|x| x.name == n)
                .unwrap_or_else(|| panic!("{n}"))
        };
        match find("nativelink_cas_hits").data.as_ref().unwrap() {
            metric::Data::Gauge(g) => assert_eq!(
                g.data_points[0].value,
                Some(number_data_point::Value::AsDouble(3.0))
            ),
            other => panic!("{other:?}"),
        }
        match find("nativelink_execution_completed_count")
            .data
            .as_ref()
            .unwrap()
        {
            metric::Data::Sum(s) => {
                assert!(s.is_monotonic);
                assert!(s.data_points[0]
                    .attributes
                    .contains(&kv("execution_result", "success")));
            }
            other => panic!("{other:?}"),
        }
        match find("nativelink_cache_operation_duration_seconds")
            .data
            .as_ref()
            .unwrap()
        {
            metric::Data::Histogram(h) => {
                let p = &h.data_points[0];
                assert_eq!(p.count, 1);
                assert_eq!(p.bucket_counts.iter().sum::<u64>(), 1);
                assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
            }
            other => panic!("{other:?}"),
        }
    }
}
