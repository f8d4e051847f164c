//! Spans of served gRPC requests, exported over OTLP.
//!
//! Requests are observed in one place, `metrics::RpcTimer`: when traces are exported it hands
//! each finished RPC to a [`SpanSink`], a bounded queue that never waits (a full queue drops
//! the span and counts it in `otlp_spans_dropped_total`). The export task ([`run`]) turns
//! queued RPCs into OTLP spans following the OpenTelemetry RPC conventions (name
//! `{rpc.service}/{rpc.method}`, kind SERVER, `rpc.system=grpc`, `rpc.grpc.status_code`, status
//! ERROR with the gRPC message when the code is not OK) and sends them in batches.
//!
//! An incoming W3C `traceparent` header becomes the span's parent: [`with_incoming_parent`]
//! (installed by the listener only while traces are exported) makes it visible to the handler
//! for the duration of the request. A parent that is not sampled means no span.
//!
//! Cost when traces are off: none. No sink is installed, the listener adds no layer, and
//! `RpcTimer` checks one `OnceLock`.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, SpanFlags, Status,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::transport::Transport;
use super::{kv, scope, OtlpConfig, SignalConfig};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::{bytestream, longrunning};

/// Longest gRPC message kept in a span's status.
const MAX_MESSAGE: usize = 512;

/// The W3C trace context of an incoming request (`traceparent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `version-traceid-parentid-flags`; `None` for anything malformed, as the W3C
    /// recommendation asks (the request is then traced as a new root).
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        // Version 00 has exactly four fields; later versions may append more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex_lower::<1>(version)?;
        let trace_id = hex_lower::<16>(trace)?;
        let span_id = hex_lower::<8>(span)?;
        let [flags] = hex_lower::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// `N` bytes from exactly `2 * N` lowercase hex digits.
fn hex_lower<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

tokio::task_local! {
    static INCOMING: Option<TraceParent>;
}

/// Middleware: runs the request with its `traceparent` (if any, and valid) visible to
/// [`incoming_parent`].
pub async fn with_incoming_parent(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let parent = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    INCOMING.scope(parent, next.run(request)).await
}

/// The `traceparent` of the request being handled by this task, if any.
pub fn incoming_parent() -> Option<TraceParent> {
    INCOMING.try_with(|p| *p).ok().flatten()
}

/// One finished RPC, as recorded on the request path: no formatting, no ids yet.
#[derive(Debug, Clone)]
pub struct RpcSpan {
    /// The metrics' service label (`cas`, `ac`, ...).
    pub service: &'static str,
    pub method: &'static str,
    pub code: tonic::Code,
    /// The status message when the code is not OK.
    pub message: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub parent: Option<TraceParent>,
}

impl RpcSpan {
    /// Whether this RPC is exported at all (a parent that is not sampled says no).
    pub fn sampled(parent: Option<&TraceParent>) -> bool {
        parent.is_none_or(TraceParent::sampled)
    }
}

/// The request side of the span queue: bounded, never waits.
pub struct SpanSink {
    tx: mpsc::Sender<RpcSpan>,
    dropped: Counter,
}

/// The export side of the span queue.
pub struct SpanQueue(mpsc::Receiver<RpcSpan>);

impl SpanSink {
    /// A queue of `capacity` spans; spans that find it full are counted in `dropped`.
    pub fn new(capacity: usize, dropped: Counter) -> (SpanSink, SpanQueue) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (SpanSink { tx, dropped }, SpanQueue(rx))
    }

    /// Queues `span`, or drops and counts it when the queue is full (or export has stopped).
    pub fn record(&self, span: RpcSpan) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// The status message kept in a span: at most [`MAX_MESSAGE`] bytes, cut at a character.
pub fn span_message(message: &str) -> String {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
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

fn int_kv(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
    }
}

/// The OTLP span of one RPC, with fresh ids (and the parent's trace id, when there is one).
/// Whether a server span ends in error, as OpenTelemetry's gRPC conventions say for the server
/// side: only codes that mean the server failed. NOT_FOUND (a cache miss), INVALID_ARGUMENT and
/// the other caller-side codes leave the status unset; `rpc.grpc.status_code` still has them.
fn server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

pub fn to_span(rpc: &RpcSpan) -> Span {
    let service = grpc_service(rpc.service);
    let (trace_id, parent_span_id, trace_flags, remote) = match &rpc.parent {
        Some(p) => (p.trace_id, p.span_id.to_vec(), p.flags, true),
        None => (rand::random::<[u8; 16]>(), Vec::new(), 1, false),
    };
    let mut flags = u32::from(trace_flags) | SpanFlags::ContextHasIsRemoteMask as u32;
    if remote {
        flags |= SpanFlags::ContextIsRemoteMask as u32;
    }
    let status = server_error(rpc.code).then(|| Status {
        message: rpc.message.clone(),
        code: StatusCode::Error as i32,
    });
    Span {
        trace_id: trace_id.to_vec(),
        span_id: rand::random::<[u8; 8]>().to_vec(),
        parent_span_id,
        flags,
        name: format!("{service}/{}", rpc.method),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: rpc.start_unix_nanos,
        end_time_unix_nano: rpc.end_unix_nanos,
        attributes: vec![
            kv("rpc.system", "grpc"),
            kv("rpc.service", service),
            kv("rpc.method", rpc.method),
            int_kv("rpc.grpc.status_code", rpc.code as i64),
        ],
        status,
        ..Default::default()
    }
}

/// One export request holding `rpcs`.
pub fn build_request(resource: &Resource, rpcs: &[RpcSpan]) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans: rpcs.iter().map(to_span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Exports queued spans: a batch leaves when it is full or `span_delay` after its first span.
/// On `stop`, what is queued is sent once more (bounded by the export timeout) and the task
/// ends. Export runs here, never on the request path: while it waits on a slow collector the
/// queue fills and then drops.
pub(super) async fn run(
    cfg: OtlpConfig,
    signal: SignalConfig,
    queue: SpanQueue,
    stop: CancellationToken,
) {
    let transport = match Transport::new(signal) {
        Ok(t) => t,
        Err(e) => return tracing::warn!(error = %e, "OTLP trace export is off"),
    };
    let resource = cfg.resource();
    let export = |batch: Vec<RpcSpan>| {
        let request = build_request(&resource, &batch);
        let transport = &transport;
        async move {
            if let Err(e) = transport.export_traces(request).await {
                tracing::debug!(error = %e, spans = batch.len(), "OTLP trace export failed");
            }
        }
    };
    let mut rx = queue.0;
    loop {
        let mut batch = Vec::with_capacity(cfg.span_batch);
        let mut stopping = tokio::select! {
            n = rx.recv_many(&mut batch, cfg.span_batch) => n == 0,
            _ = stop.cancelled() => true,
        };
        if !stopping {
            let deadline = tokio::time::sleep(cfg.span_delay);
            tokio::pin!(deadline);
            while batch.len() < cfg.span_batch && !stopping {
                let room = cfg.span_batch - batch.len();
                tokio::select! {
                    n = rx.recv_many(&mut batch, room) => stopping = n == 0,
                    _ = &mut deadline => break,
                    _ = stop.cancelled() => stopping = true,
                }
            }
        }
        if !batch.is_empty() {
            export(batch).await;
        }
        if stopping {
            // Flush what is queued; the caller bounds how long this may take.
            loop {
                let mut batch = Vec::with_capacity(cfg.span_batch);
                while batch.len() < cfg.span_batch {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    return;
                }
                export(batch).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_the_w3c_form_and_rejects_the_rest() {
        let p =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.span_id[7], 0xb7);
        assert!(p.sampled());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn an_rpc_becomes_a_server_span_named_as_the_conventions_say() {
        let parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let rpc = RpcSpan {
            service: "ac",
            method: "GetActionResult",
            code: tonic::Code::NotFound,
            message: "no action result".into(),
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            parent,
        };
        let s = to_span(&rpc);
        assert_eq!(
            s.name,
            "build.bazel.remote.execution.v2.ActionCache/GetActionResult"
        );
        assert_eq!(s.kind, SpanKind::Server as i32);
        assert_eq!(s.trace_id, parent.unwrap().trace_id.to_vec());
        assert_eq!(s.parent_span_id, parent.unwrap().span_id.to_vec());
        assert_eq!(s.span_id.len(), 8);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        assert!(s.attributes.contains(&int_kv("rpc.grpc.status_code", 5)));
        assert!(s.attributes.contains(&kv("rpc.system", "grpc")));
        assert_eq!(s.status, None, "a cache miss is not a server error");
        let failed = to_span(&RpcSpan {
            code: tonic::Code::Internal,
            message: "disk full".into(),
            ..rpc.clone()
        });
        let status = failed.status.unwrap();
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "disk full");
        let ok = to_span(&RpcSpan {
            code: tonic::Code::Ok,
            parent: None,
            ..rpc
        });
        assert_eq!(ok.status, None);
        assert_eq!(ok.trace_id.len(), 16);
        assert!(ok.parent_span_id.is_empty());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let dropped = Counter::default();
        let (sink, _queue) = SpanSink::new(2, dropped.clone());
        let rpc = RpcSpan {
            service: "cas",
            method: "FindMissingBlobs",
            code: tonic::Code::Ok,
            message: String::new(),
            start_unix_nanos: 0,
            end_unix_nanos: 1,
            parent: None,
        };
        for _ in 0..5 {
            sink.record(rpc.clone());
        }
        assert_eq!(dropped.get(), 3);
    }

    #[test]
    fn messages_are_cut_at_a_character() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = span_message(&long);
        assert!(cut.len() <= MAX_MESSAGE && cut.chars().all(|c| c == 'é'));
    }
}
