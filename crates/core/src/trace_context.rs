//! W3C trace context (`traceparent`, `tracestate`) carried across Cairn's process boundaries:
//! from a client's gRPC metadata into the server's request span, from the Execute call through
//! the scheduler to the worker (as plain key/value pairs in the worker protocol), and out on
//! the gRPC calls Cairn makes itself.
//!
//! Spans are `tracing` spans; the OpenTelemetry layer (installed by the binary only when traces
//! are exported) gives them trace ids. Without that layer every function here is a cheap
//! no-op: there is no context to inject, and a parent cannot be set.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context of `span` as header pairs (`traceparent`, and `tracestate` when it is
/// not empty); empty when the span is not traced.
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Pairs(Vec::new());
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// Makes the context in `pairs` (header name, value) the parent of `span`. Call it before the
/// span is first entered. Malformed or missing headers leave `span` a root, as the W3C
/// recommendation asks.
pub fn set_parent<'a>(span: &tracing::Span, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) {
    let carrier = Found(pairs.into_iter().collect());
    if carrier.0.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// [`set_parent`] from HTTP/2 headers (a gRPC request's metadata).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let pairs = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|k| Some((k, headers.get(k)?.to_str().ok()?)));
    set_parent(span, pairs);
}

/// Adds the current span's trace context to an outgoing request's headers.
pub fn inject_headers(headers: &mut http::HeaderMap) {
    for (k, v) in inject(&tracing::Span::current()) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(&v),
        ) {
            headers.insert(k, v);
        }
    }
}

/// Adds the current span's trace context to an outgoing gRPC request's metadata.
pub fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    for (k, v) in inject(&tracing::Span::current()) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            tonic::metadata::MetadataValue::try_from(v.as_str()),
        ) {
            metadata.insert(k, v);
        }
    }
}

struct Pairs(Vec<(String, String)>);

impl Injector for Pairs {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

struct Found<'a>(Vec<(&'a str, &'a str)>);

impl Extractor for Found<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| *k).collect()
    }
}
