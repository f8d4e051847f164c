//! Metrics over OTLP: the registry `/metrics` encodes is read (its Prometheus text) and sent as
//! OTLP gauges, monotonic sums and histograms, so a metric is still declared once, in
//! `crate::metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio_util::sync::CancellationToken;

use super::transport::Transport;
use super::{kv, now_ns, scope, OtlpConfig, SignalConfig};
use crate::metrics::Metrics;

/// Exports the registry every `metric_interval` until `stop`, then once more.
pub(super) async fn run(
    cfg: OtlpConfig,
    signal: SignalConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let transport = match Transport::new(signal) {
        Ok(t) => t,
        Err(e) => return tracing::warn!(error = %e, "OTLP metrics export is off"),
    };
    let resource = cfg.resource();
    let start_ns = now_ns();
    let mut tick = tokio::time::interval(cfg.metric_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let request = build_request(&resource, &metrics.encode(), start_ns, now_ns());
        if let Err(e) = transport.export_metrics(request).await {
            tracing::debug!(error = %e, "OTLP metrics export failed");
        }
        if last {
            return;
        }
    }
}

/// Label pairs of one sample.
type Labels = Vec<(String, String)>;
/// One sample line: metric name, labels, value.
type Sample = (String, Labels, f64);
/// A histogram series: (upper bound, cumulative count) buckets, sum, count.
type HistogramSeries = (Vec<(f64, u64)>, f64, u64);

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
    resource: &Resource,
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
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
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
        let resource = Resource {
            attributes: vec![
                kv("service.name", "svc"),
                kv("deployment.environment", "ci"),
            ],
            ..Default::default()
        };
        let req = build_request(&resource, &m.encode(), 1, 2);
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
