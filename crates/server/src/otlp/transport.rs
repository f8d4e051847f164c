//! Sending one OTLP metrics export request to the collector, over gRPC (a channel kept between exports,
//! reconnected when needed) or `http/protobuf` (one POST per export, HTTP/1.1 over plain TCP).
//! Nothing here waits without a deadline: every call is bounded by the signal's timeout.

use std::io::Write;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
};
use prost::Message;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

use super::SignalConfig;

/// The connection of one signal to its collector.
pub(super) struct Transport {
    signal: SignalConfig,
    /// Connected on the first gRPC export and reconnected when broken; `None` for
    /// `http/protobuf`.
    channel: Option<Channel>,
}

impl Transport {
    /// Must run inside the runtime (the gRPC channel's worker is a task).
    pub(super) fn new(signal: SignalConfig) -> Result<Transport, String> {
        let channel = if signal.http {
            None
        } else {
            Some(
                tonic::transport::Endpoint::from_shared(signal.endpoint.clone())
                    .map_err(|e| format!("OTLP endpoint {:?}: {e}", signal.endpoint))?
                    .connect_timeout(signal.timeout)
                    .connect_lazy(),
            )
        };
        Ok(Transport { signal, channel })
    }

    pub(super) async fn export_metrics(
        &self,
        request: ExportMetricsServiceRequest,
    ) -> Result<(), String> {
        self.bounded(async {
            match &self.channel {
                None => self.post(request.encode_to_vec()).await,
                Some(channel) => {
                    let mut client = MetricsServiceClient::new(channel.clone());
                    if let Some(c) = self.grpc_compression() {
                        client = client.send_compressed(c);
                    }
                    client.export(request).await.map_err(|e| e.to_string())?;
                    Ok(())
                }
            }
        })
        .await
    }

    async fn bounded(
        &self,
        f: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<(), String> {
        match tokio::time::timeout(self.signal.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{}: no answer within {:?}",
                self.signal.endpoint, self.signal.timeout
            )),
        }
    }

    fn grpc_compression(&self) -> Option<CompressionEncoding> {
        match self.signal.compression.as_deref() {
            Some("gzip") => Some(CompressionEncoding::Gzip),
            Some("zstd") => Some(CompressionEncoding::Zstd),
            _ => None,
        }
    }

    /// OTLP/HTTP: one POST of the protobuf body; any 2xx answer is success.
    async fn post(&self, body: Vec<u8>) -> Result<(), String> {
        let url = &self.signal.endpoint;
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url}: only http:// endpoints are supported for http/protobuf")
        })?;
        let (host, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
        let (body, encoding) = encode(body, self.signal.compression.as_deref())?;
        let stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("connecting to {host}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        // The connection task ends when the exchange does; it is aborted below in any case.
        let conn = tokio::spawn(conn);
        let mut request = http::Request::post(path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/x-protobuf");
        if let Some(e) = encoding {
            request = request.header(http::header::CONTENT_ENCODING, e);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            let status = response.status();
            // The body is small (a partial-success message at most); read it so that the
            // exchange completes cleanly.
            let _ = response.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("POST {url}: collector answered {status}"))
            }
        }
        .await;
        conn.abort();
        result
    }
}

/// The body as sent and its `Content-Encoding`.
fn encode(
    body: Vec<u8>,
    compression: Option<&str>,
) -> Result<(Vec<u8>, Option<&'static str>), String> {
    match compression {
        Some("gzip") => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&body).map_err(|e| e.to_string())?;
            Ok((e.finish().map_err(|e| e.to_string())?, Some("gzip")))
        }
        Some("zstd") => Ok((
            zstd::bulk::compress(&body, 3).map_err(|e| e.to_string())?,
            Some("zstd"),
        )),
        _ => Ok((body, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn gzip_bodies_decode_to_the_original() {
        let (gz, enc) = encode(b"otlp".repeat(100), Some("gzip")).unwrap();
        assert_eq!(enc, Some("gzip"));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"otlp".repeat(100));
        assert_eq!(encode(b"x".to_vec(), None).unwrap(), (b"x".to_vec(), None));
    }
}
