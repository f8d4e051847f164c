//! OTLP export: Cairn started with the guides' OTEL_* variables sends its metrics to a real
//! OTLP gRPC receiver on loopback, with the service name and resource attributes; an
//! unreachable collector does not stop it serving.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use tokio::sync::mpsc;

struct Receiver(mpsc::Sender<ExportMetricsServiceRequest>);

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

fn start_cairn(dir: &std::path::Path, otel_endpoint: &str) -> (std::process::Child, SocketAddr) {
    let config = dir.join("c.json5");
    std::fs::write(
        &config,
        common::MEMORY_CONFIG.replace("@ADDR@", "127.0.0.1:0"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("run")
        .arg(&config)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otel_endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_SERVICE_NAME", "nativelink")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=production,service.version=v0.5.0",
        )
        .env("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
        .env("RUST_LOG", "info")
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
    (child, addr)
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
    let (mut child, addr) = start_cairn(dir.path(), &format!("http://{otlp_addr}"));
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
    let (mut child, addr) = start_cairn(dir.path(), &format!("http://127.0.0.1:{port}"));
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

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}
