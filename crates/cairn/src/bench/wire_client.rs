//! A ByteStream client over `cairn_server::bytestream_wire`'s messages: the payload is a
//! `Bytes` slice of the receive buffer, not a copy into a `Vec<u8>` as with the generated
//! client, so that the bench measures the server rather than client-side copies.

use cairn_server::bytestream_wire::{ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;

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

pub async fn write<S>(
    channel: Channel,
    max_message: usize,
    request: Request<S>,
) -> Result<WriteResponse, Status>
where
    S: futures::Stream<Item = WriteRequest> + Send + 'static,
{
    let mut g = grpc(channel, max_message);
    g.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let codec: ProstCodec<WriteRequest, WriteResponse> = ProstCodec::default();
    let path = PathAndQuery::from_static("/google.bytestream.ByteStream/Write");
    Ok(g.client_streaming(request, path, codec).await?.into_inner())
}
