//! gRPC message framing straight on the HTTP/2 body, for the one hot client-streaming method
//! (ByteStream.Write).
//!
//! tonic's decoder copies every DATA frame into its own buffer and then hands out slices of it;
//! a store that keeps those slices pins that buffer, and one that copies them out makes a second
//! copy. Here each message is copied once, from the HTTP/2 frames into a buffer of exactly the
//! message's length, and decoded from that buffer, so the `bytes` fields of the message are
//! zero-copy slices of memory that holds nothing else.
//!
//! Framing (gRPC over HTTP/2): each message is a 1-byte compressed flag, a 4-byte big-endian
//! length and the protobuf bytes. Compressed messages are refused: Cairn never advertises a
//! request encoding, so a client only sends them against the protocol.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::{Body, Frame};
use tonic::codegen::{http, StdError};
use tonic::Status;

/// Length of the gRPC message prefix: compressed flag and length.
const PREFIX: usize = 5;

/// The messages of a gRPC request body, each decoded from its own exactly-sized buffer.
pub struct Messages<B: Body, M> {
    body: Pin<Box<B>>,
    /// The DATA frame being consumed.
    chunk: Option<B::Data>,
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// The message being filled and its declared length.
    message: Option<(BytesMut, usize)>,
    max_message_bytes: usize,
    done: bool,
    _message: PhantomData<fn() -> M>,
}

impl<B: Body, M> Messages<B, M> {
    pub fn new(body: B, max_message_bytes: usize) -> Self {
        Messages {
            body: Box::pin(body),
            chunk: None,
            prefix: [0; PREFIX],
            prefix_len: 0,
            message: None,
            max_message_bytes,
            done: false,
            _message: PhantomData,
        }
    }
}

impl<B, M> Messages<B, M>
where
    B: Body,
    M: prost::Message + Default,
{
    /// Takes bytes from the current chunk until a message is complete.
    fn consume(&mut self) -> Option<Result<M, Status>> {
        let chunk = self.chunk.as_mut()?;
        while chunk.has_remaining() {
            if self.prefix_len < PREFIX {
                let n = (PREFIX - self.prefix_len).min(chunk.chunk().len());
                self.prefix[self.prefix_len..self.prefix_len + n]
                    .copy_from_slice(&chunk.chunk()[..n]);
                chunk.advance(n);
                self.prefix_len += n;
                if self.prefix_len < PREFIX {
                    continue;
                }
                if self.prefix[0] != 0 {
                    return Some(Err(Status::unimplemented(
                        "compressed gRPC messages are not accepted on this method: send them \
                         uncompressed (no grpc-encoding), or use compressed-blobs/zstd resource \
                         names for compressed blob bytes",
                    )));
                }
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if len > self.max_message_bytes {
                    return Some(Err(Status::resource_exhausted(format!(
                        "gRPC message of {len} bytes is larger than this server's limit of {} \
                         bytes: send smaller ByteStream.Write chunks",
                        self.max_message_bytes
                    ))));
                }
                self.message = Some((BytesMut::with_capacity(len), len));
            }
            let Some((buf, len)) = self.message.as_mut() else {
                break;
            };
            // From the contiguous part of the chunk; the loop comes back for the rest.
            let n = (*len - buf.len()).min(chunk.chunk().len());
            buf.extend_from_slice(&chunk.chunk()[..n]);
            chunk.advance(n);
            if buf.len() == *len {
                let (buf, _) = self.message.take()?;
                self.prefix_len = 0;
                return Some(M::decode(buf.freeze()).map_err(|e| {
                    Status::invalid_argument(format!("malformed gRPC request message: {e}"))
                }));
            }
        }
        self.chunk = None;
        None
    }
}

impl<B, M> Stream for Messages<B, M>
where
    B: Body,
    B::Error: Into<StdError>,
    M: prost::Message + Default,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin (the body is boxed), so the stream is too.
        let this = Pin::into_inner(self);
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(item) = this.consume() {
                this.done = item.is_err();
                return Poll::Ready(Some(item));
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a request carry nothing we use.
                    if let Ok(data) = frame.into_data() {
                        this.chunk = Some(data);
                    }
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                None => {
                    this.done = true;
                    if this.prefix_len == 0 && this.message.is_none() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Status::cancelled(
                        "the request stream ended in the middle of a gRPC message",
                    ))));
                }
            }
        }
    }
}

impl<B: Body, M> Unpin for Messages<B, M> {}

/// The gRPC framing of a message as two chunks, so that a large `bytes` field is sent from the
/// caller's buffer instead of being copied into an encoding buffer: the prefix and every field
/// of `head`, then the key and length of field `tag`, then `data` itself. `tag` must be higher
/// than every field set in `head` (protobuf writes fields in tag order), and `head` must leave
/// that field empty.
pub fn frame_split<M: prost::Message>(head: &M, tag: u32, data: Bytes) -> [Bytes; 2] {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    let data_len = if data.is_empty() {
        0
    } else {
        key_len(tag) + encoded_len_varint(data.len() as u64) + data.len()
    };
    let len = head.encoded_len() + data_len;
    let mut buf = BytesMut::with_capacity(PREFIX + len - data.len());
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // A BytesMut grows as needed, so encoding cannot fail.
    let _ = head.encode(&mut buf);
    if !data.is_empty() {
        encode_key(tag, WireType::LengthDelimited, &mut buf);
        encode_varint(data.len() as u64, &mut buf);
    }
    [buf.freeze(), data]
}

/// The HTTP response of a server-streaming call whose messages come already framed (see
/// [`frame_split`]): their chunks, then trailers with the status that ended the stream (OK at
/// its end, or the first error, after which nothing more is sent).
pub fn streaming_response<S>(messages: S) -> http::Response<tonic::body::Body>
where
    S: Stream<Item = Result<[Bytes; 2], Status>> + Send + 'static,
{
    let frames = messages
        .map(Some)
        .chain(futures::stream::iter([None]))
        .scan(false, |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let mut trailers = http::HeaderMap::new();
            let frames = match item {
                Some(Ok([head, data])) => {
                    return futures::future::ready(Some(vec![Frame::data(head), Frame::data(data)]))
                }
                Some(Err(status)) => {
                    let _ = status.add_header(&mut trailers);
                    vec![Frame::trailers(trailers)]
                }
                None => {
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    vec![Frame::trailers(trailers)]
                }
            };
            *ended = true;
            futures::future::ready(Some(frames))
        })
        .flat_map(futures::stream::iter)
        .filter(|f| futures::future::ready(f.data_ref().is_none_or(|d| !d.is_empty())))
        .map(Ok::<_, std::convert::Infallible>);
    grpc_response(tonic::body::Body::new(http_body_util::StreamBody::new(
        frames,
    )))
}

fn grpc_response(body: tonic::body::Body) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The HTTP response of a successful unary-response call: headers, one message, `grpc-status: 0`.
pub fn unary_response<M: prost::Message>(message: &M) -> http::Response<tonic::body::Body> {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    // Encoding into a buffer of the exact length cannot fail.
    let _ = message.encode(&mut buf);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = [
        Ok::<_, std::convert::Infallible>(Frame::data(buf.freeze())),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    grpc_response(tonic::body::Body::new(body))
}

/// Just the bytes, for tests: the framed form of `message`.
#[cfg(test)]
fn framed<M: prost::Message>(message: &M) -> bytes::Bytes {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message.encode(&mut buf).unwrap();
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytestream_wire::{ReadResponse, WriteRequest};
    use http_body_util::BodyExt;

    fn body(chunks: Vec<Bytes>) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        http_body_util::StreamBody::new(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Frame::data(c))),
        ))
    }

    fn request(i: u8, len: usize) -> WriteRequest {
        WriteRequest {
            resource_name: format!("r{i}"),
            write_offset: i as i64,
            finish_write: i.is_multiple_of(2),
            data: Bytes::from(vec![i; len]),
        }
    }

    async fn decode(chunks: Vec<Bytes>, max: usize) -> Vec<Result<WriteRequest, Status>> {
        Messages::<_, WriteRequest>::new(body(chunks), max)
            .collect()
            .await
    }

    #[tokio::test]
    async fn messages_split_at_any_byte_decode_the_same() {
        let sent = vec![request(1, 1000), WriteRequest::default(), request(2, 3)];
        let wire: Vec<u8> = sent.iter().flat_map(|m| framed(m).to_vec()).collect();
        for step in [1, 2, 4, 5, 7, 64, 999, wire.len()] {
            let chunks = wire.chunks(step).map(Bytes::copy_from_slice).collect();
            let got: Vec<_> = decode(chunks, 1 << 20)
                .await
                .into_iter()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(got, sent, "frames of {step} bytes");
        }
    }

    #[tokio::test]
    async fn data_is_a_slice_of_a_buffer_of_exactly_the_message() {
        let m = request(3, 4096);
        let wire = framed(&m);
        let got = decode(vec![wire.clone()], 1 << 20).await;
        let got = got[0].as_ref().unwrap();
        assert_eq!(got.data, m.data);
        // Not a slice of the frame: a copy (the frame's memory is h2's, to be reused).
        assert!(!wire.as_ptr_range().contains(&got.data.as_ptr()));
    }

    #[tokio::test]
    async fn oversize_compressed_truncated_and_malformed_messages_fail_clearly() {
        let big = framed(&request(1, 100));
        let got = decode(vec![big], 50).await;
        assert_eq!(got.len(), 1);
        let e = got[0].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("limit of 50"), "{}", e.message());

        let mut compressed = framed(&request(1, 10)).to_vec();
        compressed[0] = 1;
        let got = decode(vec![compressed.into()], 1 << 20).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::Unimplemented
        );

        let whole = framed(&request(1, 10));
        let got = decode(vec![whole.slice(..whole.len() - 1)], 1 << 20).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].as_ref().unwrap_err().code(), tonic::Code::Cancelled);

        let garbage = Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]);
        let got = decode(vec![garbage], 1 << 20).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn split_frames_are_the_framed_message() {
        for len in [0, 1, 127, 128, 1 << 20] {
            let m = WriteRequest {
                resource_name: "uploads/u/blobs/abc/1".into(),
                write_offset: 7,
                finish_write: true,
                data: Bytes::from(vec![9u8; len]),
            };
            let head = WriteRequest {
                data: Bytes::new(),
                ..m.clone()
            };
            let [a, b] = frame_split(&head, 10, m.data.clone());
            assert_eq!([a, b.clone()].concat(), framed(&m));
            assert_eq!(
                b.as_ptr(),
                m.data.as_ptr(),
                "data is sent from the caller's buffer"
            );
        }
    }

    #[tokio::test]
    async fn streaming_response_sends_messages_then_the_status_that_ended_them() {
        let m = |n: u8| ReadResponse {
            data: Bytes::from(vec![n; 3]),
        };
        let split = |r: ReadResponse| frame_split(&ReadResponse::default(), 10, r.data);
        let ok = streaming_response(futures::stream::iter([Ok(split(m(1))), Ok(split(m(2)))]));
        let collected = ok.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(
            collected.to_bytes(),
            [framed(&m(1)), framed(&m(2))].concat()
        );

        let failed = streaming_response(futures::stream::iter([
            Ok(split(m(1))),
            Err(Status::data_loss("blob went bad")),
            Ok(split(m(2))),
        ]));
        let collected = failed.into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(trailers["grpc-status"], "15");
        assert_eq!(trailers["grpc-message"], "blob%20went%20bad");
        assert_eq!(
            collected.to_bytes(),
            framed(&m(1)),
            "nothing after the error"
        );
    }

    #[tokio::test]
    async fn unary_response_is_one_framed_message_then_status_ok() {
        let m = crate::bytestream_wire::WriteResponse { committed_size: 42 };
        let response = unary_response(&m);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), framed(&m));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn run<T>(f: impl std::future::Future<Output = T>) -> T {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(f)
        }

        proptest! {
            #[test]
            fn any_bytes_end_in_messages_then_at_most_one_error(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 0..8),
                max in 0usize..64,
            ) {
                let got = run(decode(chunks.into_iter().map(Bytes::from).collect(), max));
                let errors = got.iter().filter(|r| r.is_err()).count();
                prop_assert!(errors <= 1);
                if errors == 1 {
                    prop_assert!(got.last().unwrap().is_err(), "an error ends the stream");
                }
            }

            #[test]
            fn messages_cut_anywhere_decode_the_same(
                sizes in prop::collection::vec(0usize..600, 1..5),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let sent: Vec<WriteRequest> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, len)| request(i as u8, *len))
                    .collect();
                let wire: Vec<u8> = sent.iter().flat_map(|m| framed(m).to_vec()).collect();
                let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
                at.extend([0, wire.len()]);
                at.sort_unstable();
                let chunks = at
                    .windows(2)
                    .map(|w| Bytes::copy_from_slice(&wire[w[0]..w[1]]))
                    .collect();
                let got = run(decode(chunks, 1 << 20));
                let got: Result<Vec<_>, _> = got.into_iter().collect();
                prop_assert_eq!(got.map_err(|e| e.message().to_string()), Ok(sent));
            }
        }
    }
}
