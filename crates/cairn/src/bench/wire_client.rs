//! A ByteStream client over `cairn_server::bytestream_wire`'s messages: the payload is a
//! `Bytes` slice of the receive buffer (reads) or of the caller's buffer (writes), not a copy
//! into a `Vec<u8>` as with the generated client, so that the bench measures the server rather
//! than client-side copies.

use bytes::Bytes;
use cairn_server::bytestream_wire::{ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use futures::StreamExt;
use http_body_util::BodyExt;
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;
use tower::{Service, ServiceExt};

fn grpc(channel: Channel, max_message: usize) -> tonic::client::Grpc<Channel> {
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message)
}

pub async fn read(
    channel: Channel,
    max_message: usize,
    request: Request<ReadRequest>,
) -> Result<Streaming<ReadResponse>, Status> {
    let mut g = grpc(channel, max_message);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec: ProstCodec<ReadRequest, ReadResponse> = ProstCodec::default();
    let path = PathAndQuery::from_static("/google.bytestream.ByteStream/Read");
    Ok(g.server_streaming(request, path, codec).await?.into_inner())
}

/// ByteStream.Write without tonic's encoder, which copies every message into its buffer: each
/// request goes out as two HTTP/2 body chunks, a small one with the gRPC prefix and every field
/// but `data`, then `data` itself, a slice the caller already holds.
pub async fn write<S>(channel: Channel, request: Request<S>) -> Result<WriteResponse, Status>
where
    S: futures::Stream<Item = WriteRequest> + Send + 'static,
{
    let (metadata, _, messages) = request.into_parts();
    let frames = messages.flat_map(|m| futures::stream::iter(frame(m)));
    let body = http_body_util::StreamBody::new(
        frames.map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b))),
    );
    let mut http_request = http::Request::new(tonic::body::Body::new(body));
    *http_request.method_mut() = http::Method::POST;
    *http_request.uri_mut() = http::Uri::from_static("/google.bytestream.ByteStream/Write");
    *http_request.headers_mut() = metadata.into_headers();
    let headers = http_request.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("te", http::HeaderValue::from_static("trailers"));

    let mut channel = channel;
    let response = channel
        .ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?
        .call(http_request)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (parts, body) = response.into_parts();
    if let Some(status) = Status::from_header_map(&parts.headers) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    let collected = body
        .collect()
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    if let Some(status) = collected.trailers().and_then(Status::from_header_map) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    let bytes = collected.to_bytes();
    let Some(message) = bytes.get(5..) else {
        return Err(Status::internal(
            "ByteStream.Write: the response carried no message",
        ));
    };
    WriteResponse::decode(message)
        .map_err(|e| Status::internal(format!("ByteStream.Write: malformed response: {e}")))
}

/// The gRPC framing of `m` as two chunks: prefix and the other fields, then the data.
fn frame(m: WriteRequest) -> [Bytes; 2] {
    let data = m.data;
    let head = WriteRequest {
        data: Bytes::new(),
        ..m
    };
    // Field 10 is `data`.
    cairn_server::grpc_body::frame_split(&head, 10, data)
}
