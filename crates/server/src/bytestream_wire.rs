//! The tonic service that routes `google.bytestream.ByteStream`'s three methods to
//! [`ByteStreamService`], over the `Bytes`-payload wire types of
//! [`cairn_core::bytestream_wire`]. Write requests do not go through tonic's decoder at all:
//! [`crate::grpc_body`] copies each one once into its own buffer.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::body::Body;
use tonic::codegen::{http, StdError};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use crate::bytestream::ByteStreamService;
use crate::grpc_body::{frame_split, streaming_response, unary_response, Messages};

pub use cairn_core::bytestream_wire::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};

pub type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;

/// The tonic service for `google.bytestream.ByteStream`.
#[derive(Clone)]
pub struct ByteStreamServer {
    inner: Arc<ByteStreamService>,
    max_message_bytes: usize,
}

impl ByteStreamServer {
    pub fn new(inner: ByteStreamService, max_message_bytes: usize) -> Self {
        ByteStreamServer {
            inner: Arc::new(inner),
            max_message_bytes,
        }
    }
}

impl NamedService for ByteStreamServer {
    const NAME: &'static str = "google.bytestream.ByteStream";
}

struct Query(Arc<ByteStreamService>);

impl UnaryService<QueryWriteStatusRequest> for Query {
    type Response = QueryWriteStatusResponse;
    type Future = BoxFuture<'static, Result<Response<QueryWriteStatusResponse>, Status>>;
    fn call(&mut self, request: Request<QueryWriteStatusRequest>) -> Self::Future {
        let s = self.0.clone();
        Box::pin(async move { s.query_write_status(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for ByteStreamServer
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let max = self.max_message_bytes;
        match req.uri().path() {
            "/google.bytestream.ByteStream/Read" => Box::pin(async move {
                let mut messages = Messages::<B, ReadRequest>::new(req.into_body(), max);
                let request = match messages.next().await {
                    Some(Ok(r)) => r,
                    Some(Err(status)) => return Ok(status.into_http()),
                    None => {
                        return Ok(Status::invalid_argument(
                            "ByteStream.Read: the request carried no ReadRequest message",
                        )
                        .into_http())
                    }
                };
                Ok(match inner.read(Request::new(request)).await {
                    // Each chunk goes out from the store's own buffer (frame_split), not through
                    // an encoder's copy.
                    Ok(stream) => streaming_response(
                        stream
                            .into_inner()
                            .map(|r| r.map(|m| frame_split(&ReadResponse::default(), 10, m.data))),
                    ),
                    Err(status) => status.into_http(),
                })
            }),
            "/google.bytestream.ByteStream/Write" => Box::pin(async move {
                let messages = Messages::<B, WriteRequest>::new(req.into_body(), max);
                Ok(match inner.write(messages).await {
                    Ok(response) => unary_response(&response),
                    Err(status) => status.into_http(),
                })
            }),
            "/google.bytestream.ByteStream/QueryWriteStatus" => Box::pin(async move {
                Ok(Grpc::new(ProstCodec::default())
                    .apply_max_message_size_config(Some(max), Some(max))
                    .unary(Query(inner), req)
                    .await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("unknown ByteStream method").into_http())
            }),
        }
    }
}
