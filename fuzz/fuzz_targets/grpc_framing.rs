//! The server's own gRPC framing (ByteStream.Write bodies): arbitrary bytes, cut into HTTP/2
//! DATA frames at arbitrary points, give messages or one error, never a panic, and never a
//! message larger than the limit.
#![no_main]
use arbitrary::Arbitrary;
use bytes::Bytes;
use cairn_core::proto::google::bytestream::WriteRequest;
use futures::StreamExt;
use http_body::Frame;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    body: Vec<u8>,
    cuts: Vec<u16>,
    limit: u16,
}

fuzz_target!(|input: Input| {
    let mut frames = Vec::new();
    let mut rest = Bytes::from(input.body);
    for c in input.cuts {
        if rest.is_empty() {
            break;
        }
        let n = (c as usize % rest.len()).max(1);
        frames.push(Ok::<_, std::convert::Infallible>(Frame::data(rest.split_to(n))));
    }
    if !rest.is_empty() {
        frames.push(Ok(Frame::data(rest)));
    }
    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
    let limit = input.limit as usize;
    let mut messages =
        cairn_server::grpc_body::Messages::<_, WriteRequest>::new(body, limit);
    futures::executor::block_on(async {
        let mut errors = 0;
        while let Some(m) = messages.next().await {
            match m {
                Ok(m) => {
                    assert_eq!(errors, 0, "a message after an error");
                    assert!(m.data.len() <= limit);
                }
                Err(_) => errors += 1,
            }
        }
        assert!(errors <= 1);
    });
});
