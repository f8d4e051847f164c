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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Runs `f` under a subscriber with the OpenTelemetry layer (spans get ids, nothing is
    /// exported).
    fn traced<T>(f: impl FnOnce() -> T) -> T {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f)
    }

    fn traceparent(pairs: &[(String, String)]) -> Option<&str> {
        pairs
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_parent_passes_through_a_span_to_the_next_hop() {
        let out = traced(|| {
            let span = tracing::info_span!("hop");
            set_parent(&span, [("traceparent", PARENT), ("tracestate", "vendor=1")]);
            inject(&span)
        });
        let tp = traceparent(&out).expect("a traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
        assert_ne!(parts[2], "00f067aa0ba902b7", "our own span, not the parent");
        assert!(out.contains(&("tracestate".into(), "vendor=1".into())));
    }

    #[test]
    fn garbage_leaves_a_new_root_and_never_panics() {
        for bad in [
            "",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "\u{1F600}-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            &"a".repeat(100_000),
        ] {
            let out = traced(|| {
                let span = tracing::info_span!("hop");
                set_parent(&span, [("traceparent", bad)]);
                inject(&span)
            });
            let tp = traceparent(&out).expect("a fresh trace");
            assert!(!tp.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{bad:?}");
        }
    }

    #[test]
    fn without_the_layer_nothing_is_injected() {
        let span = tracing::info_span!("untraced");
        set_parent(&span, [("traceparent", PARENT)]);
        assert!(inject(&span).is_empty());
        let mut headers = http::HeaderMap::new();
        inject_headers(&mut headers);
        assert!(headers.is_empty());
    }
}
