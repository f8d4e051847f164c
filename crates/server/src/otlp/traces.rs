//! Traces: `tracing` spans exported over OTLP by the OpenTelemetry SDK.
//!
//! Every layer opens spans with `tracing` (the gRPC request here, store operations, scheduler
//! decisions, worker steps), at DEBUG level and under a `cairn*` target. When traces are
//! exported, [`layer`] adds a `tracing-opentelemetry` layer that takes exactly those spans
//! (whatever `RUST_LOG` says) and hands them to the SDK's batch span processor, which sends
//! them with `opentelemetry-otlp`'s exporter. The SDK reads the standard variables itself:
//! endpoint, protocol, compression, timeout and headers (`OTEL_EXPORTER_OTLP_*`), batching
//! (`OTEL_BSP_*`), sampling (`OTEL_TRACES_SAMPLER`), resource (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`). Cairn decides only whether to export at all ([`wanted`]).
//!
//! Cost when traces are off: no layer is installed, so a DEBUG span under the default INFO
//! filter is disabled at its callsite (one cached interest check), and the request layer of
//! the listener is not installed.
//!
//! Incoming W3C `traceparent`/`tracestate` headers become the parent of the request span
//! ([`request_span`]); from there `cairn_core::trace_context` carries the context on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{span_processor_with_async_runtime::BatchSpanProcessor, SdkTracer};
use opentelemetry_sdk::trace::{BatchConfig, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::Layer;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::{bytestream, longrunning};

/// Longest gRPC message kept in a span's status.
const MAX_MESSAGE: usize = 512;

/// Set once traces are exported; read by the request path to skip span work otherwise.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a [`layer`] was built).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether the environment `var` describes asks for trace export: an endpoint for traces
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), and neither
/// `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`.
pub fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let var = |k: &str| {
        var(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    if var("OTEL_TRACES_EXPORTER").is_some_and(|e| e.eq_ignore_ascii_case("none")) {
        return false;
    }
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
}

/// The SDK's tracer provider; [`TraceExport::stop`] sends the spans still queued.
pub struct TraceExport {
    provider: SdkTracerProvider,
}

impl TraceExport {
    /// Flushes queued spans and stops the exporter, waiting at most `deadline`.
    pub async fn stop(self, deadline: Duration) {
        let provider = self.provider;
        // The SDK's shutdown blocks until the export task (on this runtime) answers.
        let done = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(deadline));
        let _ = tokio::time::timeout(deadline + Duration::from_millis(500), done).await;
    }
}

/// The spans the OpenTelemetry layer takes: Cairn's own spans at DEBUG and above, and events
/// at WARN and above (recorded on their span). Decided per callsite, once.
fn cairn_spans(m: &tracing::Metadata<'_>) -> bool {
    let ours = m.target().starts_with("cairn");
    if m.is_span() {
        ours && *m.level() <= tracing::Level::DEBUG
    } else {
        *m.level() <= tracing::Level::WARN
    }
}

/// The layer exporting spans, when the environment asks for it (see [`wanted`]). Must be
/// called inside the Tokio runtime: the batch processor and the exporter run on it. A
/// malformed endpoint is logged (to stderr: the subscriber is not installed yet) and
/// leaves traces off.
#[allow(clippy::type_complexity)]
pub fn layer<S>() -> Option<(
    TraceExport,
    Filtered<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>, FilterFn, S>,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    if !wanted(|k| std::env::var(k).ok()) {
        return None;
    }
    // Cairn's default protocol is gRPC, as the guides' collectors expect (port 4317); the
    // SDK's own default would be http/protobuf. A protocol that is set is the SDK's to read.
    let protocol_set = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = if protocol_set {
        builder.build()
    } else {
        builder.with_tonic().build()
    };
    let exporter = match built {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cairn: OTLP trace export is off: {e}");
            return None;
        }
    };
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(BatchConfig::default())
        .build();
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let mut resource = Resource::builder();
    if !named {
        resource = resource.with_service_name("cairn");
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("cairn");
    EXPORTING.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_filter(FilterFn::new(
            cairn_spans as fn(&tracing::Metadata<'_>) -> bool,
        ));
    Some((TraceExport { provider }, layer))
}

/// Middleware (installed by the listener only while traces are exported): runs each gRPC
/// request inside its server span, named `{rpc.service}/{rpc.method}` as OpenTelemetry's RPC
/// conventions say, whose parent is the request's `traceparent` when it has a valid one.
/// The service records the status ([`record_status`]) and what it served (`instance`,
/// `digest`).
pub async fn request_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = request.uri().path().trim_start_matches('/');
    let (service, method) = path.split_once('/').unwrap_or((path, ""));
    let span = tracing::debug_span!(
        target: "cairn_server::request",
        "grpc request",
        otel.name = %path,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        instance = tracing::field::Empty,
        digest = tracing::field::Empty,
    );
    cairn_core::trace_context::set_parent_from_headers(&span, request.headers());
    tracing::Instrument::instrument(next.run(request), span).await
}

/// Records a finished RPC's status on its span: `rpc.grpc.status_code` always, and status
/// ERROR with the message only for codes that mean the server failed (OpenTelemetry's gRPC
/// server convention: NOT_FOUND, a cache miss, or INVALID_ARGUMENT are the caller's).
pub fn record_status(span: &tracing::Span, status: Option<&tonic::Status>) {
    let code = status.map_or(tonic::Code::Ok, |s| s.code());
    span.record("rpc.grpc.status_code", code as i64);
    if let Some(s) = status.filter(|s| server_error(s.code())) {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", span_message(s.message()));
    }
}

/// Records the instance name and (when the request names one) the digest on the request span.
pub fn record_request(instance: &str, digest: Option<&cairn_core::Digest>) {
    if !exporting() {
        return;
    }
    let span = tracing::Span::current();
    span.record("instance", instance);
    if let Some(d) = digest {
        span.record("digest", tracing::field::display(d));
    }
}

fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// The status message kept in a span: at most [`MAX_MESSAGE`] bytes, cut at a character.
pub fn span_message(message: &str) -> &str {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// The fully qualified gRPC service behind a metrics service label.
pub fn grpc_service(label: &'static str) -> &'static str {
    match label {
        "cas" => re::content_addressable_storage_server::SERVICE_NAME,
        "ac" => re::action_cache_server::SERVICE_NAME,
        "capabilities" => re::capabilities_server::SERVICE_NAME,
        "execution" => re::execution_server::SERVICE_NAME,
        "bytestream" => bytestream::byte_stream_server::SERVICE_NAME,
        "operations" => longrunning::operations_server::SERVICE_NAME,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn wanted_with(vars: &[(&str, &str)]) -> bool {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wanted(|k| vars.get(k).cloned())
    }

    #[test]
    fn traces_are_exported_only_with_an_endpoint_and_not_turned_off() {
        assert!(!wanted_with(&[("OTEL_SERVICE_NAME", "x")]));
        assert!(wanted_with(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://c:4317"
        )]));
        assert!(wanted_with(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )]));
        assert!(!wanted_with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_SDK_DISABLED", "true")
        ]));
        assert!(!wanted_with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_TRACES_EXPORTER", "none")
        ]));
        assert!(!wanted_with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]));
    }

    #[test]
    fn only_cairn_spans_and_warnings_are_taken() {
        use tracing::Level;
        // Metadata of real callsites, to ask the filter about.
        struct Probe(std::sync::Mutex<Vec<bool>>);
        impl tracing::Subscriber for Probe {
            fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
                self.0.lock().unwrap().push(cairn_spans(m));
                false
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, _: &tracing::Event<'_>) {}
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let probe = std::sync::Arc::new(Probe(Default::default()));
        tracing::subscriber::with_default(probe.clone(), || {
            let _ = tracing::span!(target: "cairn_store::x", Level::DEBUG, "a");
            let _ = tracing::span!(target: "cairn_store::x", Level::TRACE, "b");
            let _ = tracing::span!(target: "h2::proto", Level::DEBUG, "c");
            tracing::event!(target: "h2", Level::WARN, "d");
            tracing::event!(target: "cairn", Level::INFO, "e");
        });
        assert_eq!(
            *probe.0.lock().unwrap(),
            vec![true, false, false, true, false]
        );
    }

    #[test]
    fn messages_are_cut_at_a_character() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = span_message(&long);
        assert!(cut.len() <= MAX_MESSAGE && cut.chars().all(|c| c == 'é'));
    }
}
