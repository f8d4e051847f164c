//! OTLP export: Cairn started with the guides' OTEL_* variables sends its metrics and one span
//! per gRPC request to a real OTLP receiver on loopback (gRPC, and http/protobuf with and
//! without gzip), with the service name and resource attributes; an unreachable or stuck
//! collector does not stop it serving.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
use cairn_core::proto::google::longrunning::operation;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use tokio::sync::mpsc;

struct Receiver(mpsc::Sender<ExportMetricsServiceRequest>);

struct TraceReceiver(mpsc::Sender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for TraceReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner()).await;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner()).await;
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn start_cairn(
    dir: &std::path::Path,
    otel_endpoint: &str,
    extra_env: &[(&str, &str)],
) -> (Reaped, SocketAddr) {
    let config = common::MEMORY_CONFIG.replace("@ADDR@", "127.0.0.1:0");
    start_cairn_with(
        dir,
        &config,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otel_endpoint)],
        extra_env,
    )
}

/// Cairn with `config` and the guides' OTEL_* settings, plus `endpoint_env` (the endpoint
/// variables, or none) and `extra_env`; returns it with its first listener's address.
fn start_cairn_with(
    dir: &std::path::Path,
    config_text: &str,
    endpoint_env: &[(&str, &str)],
    extra_env: &[(&str, &str)],
) -> (Reaped, SocketAddr) {
    let config = dir.join("c.json5");
    std::fs::write(&config, config_text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("run")
        .arg(&config)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .envs(endpoint_env.iter().copied())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_SERVICE_NAME", "nativelink")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=production,service.version=v0.5.0",
        )
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .env("RUST_LOG", "info")
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.split(" listening on ").nth(1) {
            break rest.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Reaped(child), addr)
}

/// A Cairn child process that is killed when dropped, so that a failing test leaves none.
struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn metrics_arrive_at_a_real_otlp_receiver_with_resource_attributes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                MetricsServiceServer::new(Receiver(tx))
                    .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
            )
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_cairn(dir.path(), &format!("http://{otlp_addr}"), &[]);
    // Some traffic, so that request metrics exist.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
    cas.find_missing_blobs(re::FindMissingBlobsRequest::default())
        .await
        .unwrap();
    let mut found = false;
    for _ in 0..50 {
        let req = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an export")
            .unwrap();
        let rm = &req.resource_metrics[0];
        let attrs: Vec<(String, String)> = rm
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
                _ => None,
            })
            .collect();
        assert!(
            attrs.contains(&("service.name".into(), "nativelink".into())),
            "{attrs:?}"
        );
        assert!(
            attrs.contains(&("deployment.environment".into(), "production".into())),
            "{attrs:?}"
        );
        assert!(
            attrs.contains(&("service.version".into(), "v0.5.0".into())),
            "{attrs:?}"
        );
        let names: Vec<&str> = rm.scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        for want in [
            "nativelink_request_duration_seconds",
            "nativelink_store_size_bytes",
            "nativelink_cas_requests",
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        if names.contains(&"nativelink_requests") {
            found = true;
            break;
        }
    }
    assert!(found, "request counters never arrived");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn an_unreachable_collector_does_not_stop_serving() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_cairn(dir.path(), &format!("http://127.0.0.1:{port}"), &[]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
    for _ in 0..20 {
        let t = std::time::Instant::now();
        cas.find_missing_blobs(re::FindMissingBlobsRequest::default())
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// String attributes as pairs (other kinds are left out).
fn string_attrs(attrs: &[KeyValue]) -> Vec<(String, String)> {
    attrs
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        })
}

#[tokio::test]
async fn request_spans_arrive_at_a_real_otlp_receiver_with_status_and_parent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    let (mtx, _mrx) = mpsc::channel(64);
    let (ttx, mut trx) = mpsc::channel(64);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                MetricsServiceServer::new(Receiver(mtx))
                    .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
            )
            .add_service(
                TraceServiceServer::new(TraceReceiver(ttx))
                    .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
            )
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (mut child, addr) = start_cairn(dir.path(), &format!("http://{otlp_addr}"), &[]);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // A FindMissingBlobs that is part of a client's trace...
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut cas =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone());
    let mut request = tonic::Request::new(re::FindMissingBlobsRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    cas.find_missing_blobs(request).await.unwrap();
    // ... and a GetActionResult miss whose `traceparent` is garbage: served as usual, traced
    // as a new root.
    let mut ac = re::action_cache_client::ActionCacheClient::new(ch.clone());
    let missing = re::Digest {
        hash: "ab".repeat(32),
        size_bytes: 12,
    };
    let mut request = tonic::Request::new(re::GetActionResultRequest {
        action_digest: Some(missing),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{}-{parent_id}-01", "zz".repeat(16))
            .parse()
            .unwrap(),
    );
    request
        .metadata_mut()
        .insert("tracestate", "x".repeat(8000).parse().unwrap());
    let miss = ac.get_action_result(request).await.unwrap_err();
    assert_eq!(miss.code(), tonic::Code::NotFound);
    // Streams pass through the layer that reads `traceparent` untouched: a ByteStream write
    // in three messages and the read of it.
    let blob = common::data(300_000, 7);
    let digest = cairn_core::DigestFunction::Sha256.compute(&blob);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        digest.hash_hex(),
        blob.len()
    );
    let mut bs = ByteStreamClient::new(ch);
    let chunks: Vec<WriteRequest> = blob
        .chunks(100_000)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: name.clone(),
            write_offset: (i * 100_000) as i64,
            finish_write: (i + 1) * 100_000 >= blob.len(),
            data: c.to_vec(),
        })
        .collect();
    let written = bs.write(futures::stream::iter(chunks)).await.unwrap();
    assert_eq!(written.into_inner().committed_size, blob.len() as i64);
    let mut read = bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", digest.hash_hex(), blob.len()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(m) = futures::StreamExt::next(&mut read).await {
        back.extend_from_slice(&m.unwrap().data);
    }
    assert!(back == blob, "the blob read back differs");

    let cas_service = "build.bazel.remote.execution.v2.ContentAddressableStorage";
    let ac_service = "build.bazel.remote.execution.v2.ActionCache";
    let mut spans: Vec<Span> = Vec::new();
    let want = |spans: &[Span], name: &str| spans.iter().find(|s| s.name == name).cloned();
    while want(&spans, &format!("{ac_service}/GetActionResult")).is_none()
        || want(&spans, &format!("{cas_service}/FindMissingBlobs")).is_none()
        || want(&spans, "google.bytestream.ByteStream/Write").is_none()
        || want(&spans, "google.bytestream.ByteStream/Read").is_none()
    {
        let req = tokio::time::timeout(Duration::from_secs(10), trx.recv())
            .await
            .expect("spans of both requests within 10 s")
            .unwrap();
        for rs in &req.resource_spans {
            let attrs = string_attrs(&rs.resource.as_ref().unwrap().attributes);
            for want in [
                ("service.name", "nativelink"),
                ("deployment.environment", "production"),
                ("service.version", "v0.5.0"),
            ] {
                assert!(
                    attrs.contains(&(want.0.into(), want.1.into())),
                    "{want:?} not in {attrs:?}"
                );
            }
            for ss in &rs.scope_spans {
                spans.extend(ss.spans.iter().cloned());
            }
        }
    }
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;

    // What was served is on the span: ByteStream names its blob.
    for method in ["Write", "Read"] {
        let s = want(&spans, &format!("google.bytestream.ByteStream/{method}")).unwrap();
        assert!(
            string_attr(&s, "digest").is_some_and(|d| d.contains(&digest.hash_hex())),
            "{method}: {:?}",
            s.attributes
        );
    }

    let fmb = want(&spans, &format!("{cas_service}/FindMissingBlobs")).unwrap();
    assert_eq!(fmb.kind, SpanKind::Server as i32);
    let attrs = string_attrs(&fmb.attributes);
    for want in [
        ("rpc.system", "grpc"),
        ("rpc.service", cas_service),
        ("rpc.method", "FindMissingBlobs"),
    ] {
        assert!(
            attrs.contains(&(want.0.into(), want.1.into())),
            "{want:?} not in {attrs:?}"
        );
    }
    assert_eq!(int_attr(&fmb, "rpc.grpc.status_code"), Some(0));
    assert!(fmb
        .status
        .as_ref()
        .is_none_or(|s| s.code == StatusCode::Unset as i32));
    assert_eq!(hex(&fmb.trace_id), trace_id, "the client's trace");
    assert_eq!(hex(&fmb.parent_span_id), parent_id, "the client's span");
    assert_eq!(fmb.span_id.len(), 8);
    assert!(before <= fmb.start_time_unix_nano);
    assert!(fmb.start_time_unix_nano <= fmb.end_time_unix_nano);
    assert!(fmb.end_time_unix_nano <= after);

    let gar = want(&spans, &format!("{ac_service}/GetActionResult")).unwrap();
    assert_eq!(gar.kind, SpanKind::Server as i32);
    assert_eq!(int_attr(&gar, "rpc.grpc.status_code"), Some(5));
    // A cache miss is not a server error: OpenTelemetry's gRPC server convention leaves the
    // status unset for NOT_FOUND (the code is in rpc.grpc.status_code).
    assert!(gar
        .status
        .as_ref()
        .is_none_or(|s| s.code == StatusCode::Unset as i32));
    assert_eq!(gar.trace_id.len(), 16, "a new trace");
    assert_ne!(hex(&gar.trace_id), trace_id);
    assert!(gar.parent_span_id.is_empty());
    assert!(before <= gar.start_time_unix_nano && gar.end_time_unix_nano <= after);
    // One span per request, not one per export.
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.name.ends_with("/GetActionResult"))
            .count(),
        1
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_spans_not_requests() {
    // Accepts connections and never says a word: every export waits for its timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_cairn(
        dir.path(),
        &format!("http://{otlp_addr}"),
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "2"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ],
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cas = re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch);
    for _ in 0..50 {
        let t = std::time::Instant::now();
        cas.find_missing_blobs(re::FindMissingBlobsRequest::default())
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // The exporter is stuck on its batch (1 s timeout); the SDK's queue holds two spans and
    // drops the rest. Serving goes on, and stopping is not held up past the flush deadline.
    drop(cas);
    let stop = std::time::Instant::now();
    sigterm(&child);
    // Waited for off the test's runtime, which must keep driving the client's connection
    // (it answers the server's GOAWAY).
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stop.elapsed() < Duration::from_secs(10),
        "{:?}",
        stop.elapsed()
    );
}

/// What an OTLP/HTTP receiver got in one POST.
#[derive(Debug)]
enum HttpExport {
    Metrics(ExportMetricsServiceRequest),
    Traces(ExportTraceServiceRequest),
}

/// One POST as the receiver saw it: its headers, and the decoded request (or why not).
#[derive(Debug)]
struct HttpPost {
    path: String,
    content_type: Option<String>,
    content_encoding: Option<String>,
    export: Result<HttpExport, String>,
}

/// A real OTLP/HTTP receiver (hyper, HTTP/1.1) on loopback: POST /v1/metrics and /v1/traces,
/// protobuf bodies, gzip or identity. Everything it gets goes to the channel; checks are made
/// by the test, not here, so that a bad request fails the test rather than a server task.
async fn http_receiver() -> (SocketAddr, mpsc::Receiver<HttpPost>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string)
                        };
                        let path = req.uri().path().to_string();
                        let content_type = header("content-type");
                        let content_encoding = header("content-encoding");
                        let method = req.method().clone();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let export = (|| {
                            if method != hyper::Method::POST {
                                return Err(format!("method {method}"));
                            }
                            let body = body.map_err(|e| e.to_string())?;
                            let body = match content_encoding.as_deref() {
                                None => body.to_vec(),
                                Some("gzip") => {
                                    let mut out = Vec::new();
                                    std::io::Read::read_to_end(
                                        &mut flate2::read::GzDecoder::new(&body[..]),
                                        &mut out,
                                    )
                                    .map_err(|e| format!("gunzip: {e}"))?;
                                    out
                                }
                                Some(other) => return Err(format!("encoding {other}")),
                            };
                            match path.as_str() {
                                "/v1/metrics" => ExportMetricsServiceRequest::decode(&body[..])
                                    .map(HttpExport::Metrics)
                                    .map_err(|e| e.to_string()),
                                "/v1/traces" => ExportTraceServiceRequest::decode(&body[..])
                                    .map(HttpExport::Traces)
                                    .map_err(|e| e.to_string()),
                                other => Err(format!("path {other}")),
                            }
                        })();
                        let status = if export.is_ok() { 200 } else { 400 };
                        let _ = tx
                            .send(HttpPost {
                                path,
                                content_type,
                                content_encoding,
                                export,
                            })
                            .await;
                        // An empty Export*ServiceResponse is zero bytes of protobuf.
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/x-protobuf")
                            .body(http_body_util::Full::new(bytes::Bytes::new()))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

/// Cairn exporting over http/protobuf with `compression` (`gzip` or `none`): both signals
/// arrive at the right paths, as protobuf, compressed as asked, with the service name.
async fn http_protobuf_export(compression: &str) {
    let (otlp_addr, mut rx) = http_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_cairn(
        dir.path(),
        &format!("http://{otlp_addr}"),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", compression),
        ],
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cas =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone());
    cas.find_missing_blobs(re::FindMissingBlobsRequest::default())
        .await
        .unwrap();
    let mut ac = re::action_cache_client::ActionCacheClient::new(ch);
    let miss = ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(re::Digest {
                hash: "cd".repeat(32),
                size_bytes: 3,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(miss.code(), tonic::Code::NotFound);

    let want_encoding = (compression == "gzip").then(|| "gzip".to_string());
    let service_name = ("service.name".to_string(), "nativelink".to_string());
    let mut metric_names: Vec<String> = Vec::new();
    let mut spans: Vec<Span> = Vec::new();
    let wanted_metrics = [
        "nativelink_requests",
        "nativelink_request_duration_seconds",
        "nativelink_cas_requests",
        "nativelink_store_size_bytes",
    ];
    let wanted_spans = [
        "build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        "build.bazel.remote.execution.v2.ActionCache/GetActionResult",
    ];
    while !wanted_metrics
        .iter()
        .all(|m| metric_names.iter().any(|n| n == m))
        || !wanted_spans
            .iter()
            .all(|w| spans.iter().any(|s| s.name == *w))
    {
        let post = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("metrics and spans within 10 s; have {metric_names:?} and {spans:?}")
            })
            .unwrap();
        assert_eq!(
            post.content_type.as_deref(),
            Some("application/x-protobuf"),
            "{post:?}"
        );
        assert_eq!(post.content_encoding, want_encoding, "{post:?}");
        match post.export {
            Ok(HttpExport::Metrics(m)) => {
                assert_eq!(post.path, "/v1/metrics");
                for rm in m.resource_metrics {
                    let attrs = string_attrs(&rm.resource.unwrap().attributes);
                    assert!(attrs.contains(&service_name), "{attrs:?}");
                    for sm in rm.scope_metrics {
                        metric_names.extend(sm.metrics.into_iter().map(|m| m.name));
                    }
                }
            }
            Ok(HttpExport::Traces(t)) => {
                assert_eq!(post.path, "/v1/traces");
                for rs in t.resource_spans {
                    let attrs = string_attrs(&rs.resource.unwrap().attributes);
                    assert!(attrs.contains(&service_name), "{attrs:?}");
                    for ss in rs.scope_spans {
                        spans.extend(ss.spans);
                    }
                }
            }
            Err(e) => panic!("{} rejected: {e}", post.path),
        }
    }
    let gar = spans
        .iter()
        .find(|s| s.name.ends_with("/GetActionResult"))
        .unwrap();
    assert_eq!(int_attr(gar, "rpc.grpc.status_code"), Some(5));
    assert!(gar
        .status
        .as_ref()
        .is_none_or(|s| s.code == StatusCode::Unset as i32));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn http_protobuf_export_with_gzip_reaches_a_real_http_receiver() {
    http_protobuf_export("gzip").await;
}

#[tokio::test]
async fn http_protobuf_export_uncompressed_reaches_a_real_http_receiver() {
    http_protobuf_export("none").await;
}

/// Asks `child` to stop as an operator would (SIGTERM).
fn sigterm(child: &std::process::Child) {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A real OTLP/gRPC receiver on loopback (tonic, zstd accepted): what it gets goes to the
/// two channels.
async fn grpc_receiver() -> (
    SocketAddr,
    mpsc::Receiver<ExportMetricsServiceRequest>,
    mpsc::Receiver<ExportTraceServiceRequest>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (mtx, mrx) = mpsc::channel(1024);
    let (ttx, trx) = mpsc::channel(1024);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                MetricsServiceServer::new(Receiver(mtx))
                    .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
            )
            .add_service(
                TraceServiceServer::new(TraceReceiver(ttx))
                    .accept_compressed(tonic::codec::CompressionEncoding::Zstd),
            )
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    (addr, mrx, trx)
}

/// Remote execution with a local worker whose CAS reaches the server over gRPC (a `grpc`
/// store as the slow tier), so that the worker's fetches are outbound gRPC calls.
const EXECUTION_CONFIG: &str = r#"{
  stores: {
    CAS: { memory: {} },
    AC: { memory: {} },
    WORKER_CAS: { fast_slow: {
      fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/worker-tmp" } },
      slow: { grpc: { instance_name: "", endpoints: [{ address: "grpc://@ADDR@" }], store_type: "cas" } } } },
  },
  schedulers: {
    MAIN: { simple: { supported_platform_properties: { OSFamily: "exact" } } },
  },
  servers: [
    { listener: { http: { socket_address: "@ADDR@" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS" }],
        execution: [{ instance_name: "", cas_store: "CAS", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
      } },
    { listener: { http: { socket_address: "@WADDR@" } }, services: { worker_api: { scheduler: "MAIN" } } },
  ],
  workers: [{ local: {
    worker_api_endpoint: { uri: "grpc://@WADDR@" },
    cas_fast_slow_store: "WORKER_CAS",
    upload_action_result: { ac_store: "AC" },
    work_directory: "@DIR@/work",
    platform_properties: { OSFamily: { values: ["linux"] } },
  } }],
}"#;

fn execution_config(dir: &std::path::Path) -> String {
    EXECUTION_CONFIG
        .replace("@ADDR@", &common::free_addr().to_string())
        .replace("@WADDR@", &common::free_addr().to_string())
        .replace("@DIR@", &dir.display().to_string())
}

/// Uploads a shell action and runs it with Execute carrying `traceparent` (when given), to
/// the end of its stream; returns the final ExecuteResponse.
async fn run_action(
    ch: tonic::transport::Channel,
    traceparent: Option<&str>,
) -> re::ExecuteResponse {
    let (digest, blobs) = common::actions::ShellAction {
        script: "cat in.txt > out.txt",
        outputs: &["out.txt"],
        inputs: &[("in.txt", b"traced input\n")],
        do_not_cache: false,
    }
    .build();
    let mut cas =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone());
    let requests = blobs
        .into_iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(cairn_core::DigestFunction::Sha256.compute(&b).to_proto()),
            data: b,
            compressor: 0,
        })
        .collect();
    cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        requests,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut exec = re::execution_client::ExecutionClient::new(ch);
    let mut request = tonic::Request::new(re::ExecuteRequest {
        action_digest: Some(digest.to_proto()),
        ..Default::default()
    });
    if let Some(tp) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", tp.parse().unwrap());
    }
    let mut ops = tokio::time::timeout(Duration::from_secs(30), exec.execute(request))
        .await
        .expect("Execute answers")
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = tokio::time::timeout(Duration::from_secs(30), ops.message())
        .await
        .expect("the operation progresses")
        .unwrap()
    {
        last = Some(op);
    }
    let op = last.expect("at least one operation");
    assert!(op.done, "{op:?}");
    match op.result {
        Some(operation::Result::Response(any)) => {
            re::ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        other => panic!("no response: {other:?}"),
    }
}

fn string_attr(span: &Span, key: &str) -> Option<String> {
    string_attrs(&span.attributes)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[tokio::test]
async fn execute_spans_of_server_scheduler_and_worker_join_the_clients_trace() {
    let (otlp_addr, _mrx, mut trx) = grpc_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_cairn_with(
        dir.path(),
        &execution_config(dir.path()),
        &[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{otlp_addr}"),
        )],
        // No protocol named: gRPC, Cairn's default.
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "")],
    );
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let resp = run_action(ch, Some(&format!("00-{trace_id}-{client_span}-01"))).await;
    assert_eq!(resp.status.as_ref().map_or(0, |s| s.code), 0, "{resp:?}");
    assert_eq!(resp.result.as_ref().unwrap().exit_code, 0);

    // Every span of the client's trace, until the worker's last step has arrived.
    let execute = "build.bazel.remote.execution.v2.Execution/Execute";
    let wanted = [
        execute,
        "scheduler.queue",
        "scheduler.start_action",
        "scheduler.complete",
        "worker.action",
        "worker.fetch_inputs",
        "worker.run",
        "worker.upload_outputs",
        "worker.report",
    ];
    let mut spans: Vec<Span> = Vec::new();
    while !wanted.iter().all(|w| spans.iter().any(|s| s.name == *w)) {
        let req = tokio::time::timeout(Duration::from_secs(10), trx.recv())
            .await
            .unwrap_or_else(|_| {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!("the trace's spans within 10 s; have {names:?}")
            })
            .unwrap();
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                spans.extend(
                    ss.spans
                        .into_iter()
                        .filter(|s| hex(&s.trace_id) == trace_id),
                );
            }
        }
    }
    let one = |name: &str| -> Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0].clone()
    };
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    // Whether `ancestor` is on the chain of parents of `span`.
    let descends = |span: &Span, ancestor: &Span| {
        let mut at = span.parent_span_id.clone();
        while let Some(p) = by_id(&at) {
            if p.span_id == ancestor.span_id {
                return true;
            }
            at = p.parent_span_id.clone();
        }
        false
    };

    let server = one(execute);
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(
        hex(&server.parent_span_id),
        client_span,
        "the client's span"
    );
    assert_eq!(int_attr(&server, "rpc.grpc.status_code"), Some(0));
    assert!(string_attr(&server, "digest").is_some_and(|d| d.contains('/')));
    assert_eq!(string_attr(&server, "instance").as_deref(), Some(""));

    let queue = one("scheduler.queue");
    assert_eq!(queue.parent_span_id, server.span_id, "queued under Execute");
    let start = one("scheduler.start_action");
    assert_eq!(
        start.parent_span_id, server.span_id,
        "dispatched under Execute"
    );
    let complete = one("scheduler.complete");
    assert_eq!(
        complete.parent_span_id, server.span_id,
        "completed under Execute"
    );
    assert_eq!(string_attr(&complete, "result").as_deref(), Some("success"));
    let worker = one("worker.action");
    assert_eq!(
        worker.parent_span_id, start.span_id,
        "the worker's span is a child of the dispatch, across the worker API"
    );
    assert_eq!(
        string_attr(&worker, "attempt"),
        string_attr(&start, "attempt")
    );
    for step in [
        "worker.fetch_inputs",
        "worker.run",
        "worker.upload_outputs",
        "worker.report",
    ] {
        let s = one(step);
        assert!(descends(&s, &worker), "{step} is not under worker.action");
    }
    let fetch = one("worker.fetch_inputs");
    let run = one("worker.run");
    let upload = one("worker.upload_outputs");
    assert!(fetch.end_time_unix_nano <= run.start_time_unix_nano);
    assert!(run.end_time_unix_nano <= upload.start_time_unix_nano);
    assert_eq!(string_attr(&run, "program").as_deref(), Some("/bin/sh"));

    // The worker's CAS is a grpc store: its reads are store spans under the fetch step, and
    // the server spans of those calls are their children (traceparent sent outbound).
    let store_gets: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "store.get" && string_attr(s, "kind").as_deref() == Some("grpc"))
        .filter(|s| descends(s, &fetch))
        .collect();
    assert!(
        !store_gets.is_empty(),
        "no grpc store.get under the fetch step"
    );
    // Named by the node's key path; the wrapper around the grpc store has its span too.
    for g in &store_gets {
        let path = string_attr(g, "store").unwrap_or_default();
        assert!(path.starts_with("stores."), "store span named {path:?}");
        let parent = spans.iter().find(|p| p.span_id == g.parent_span_id);
        assert!(
            parent
                .is_some_and(|p| p.name == "store.get"
                    && string_attr(p, "kind").as_deref() == Some("fast_slow")),
            "the grpc store.get is not under its fast_slow's"
        );
    }
    let inbound: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32 && s.span_id != server.span_id)
        .filter(|s| store_gets.iter().any(|g| descends(s, g)))
        .collect();
    assert!(
        !inbound.is_empty(),
        "no server span under the worker's outbound store calls: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn traces_turned_off_or_without_an_endpoint_are_not_exported() {
    // Metrics still go to the receiver, so its silence on traces is not a dead link.
    let (otlp_addr, mut mrx, mut trx) = grpc_receiver().await;
    let endpoint = format!("http://{otlp_addr}");
    type Vars<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Vars, Vars); 3] = [
        (&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &endpoint)], &[]),
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
            &[("OTEL_TRACES_EXPORTER", "none")],
        ),
        (
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", &endpoint)],
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")],
        ),
    ];
    for (endpoints, extra) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, addr) =
            start_cairn_with(dir.path(), &execution_config(dir.path()), endpoints, extra);
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let resp = run_action(
            ch,
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        )
        .await;
        assert_eq!(resp.status.as_ref().map_or(0, |s| s.code), 0, "{resp:?}");
        // Three metric exports after the action (200 ms apart): spans would have been sent
        // by now (200 ms batching delay).
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(10), mrx.recv())
                .await
                .expect("metrics keep arriving")
                .unwrap();
        }
        assert!(
            trx.try_recv().is_err(),
            "spans exported with {endpoints:?} {extra:?}"
        );
        let _ = child.kill();
        let _ = child.wait();
        while mrx.try_recv().is_ok() {}
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
