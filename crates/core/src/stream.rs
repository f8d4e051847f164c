//! Blob bodies as streams of `Bytes` chunks.
//!
//! Every store reads and writes a [`BlobStream`]: memory use is bounded by chunk size times the
//! number of streams in flight, never by blob size.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use crate::Error;

/// The chunk size Cairn reads files and splits large buffers into (256 KiB).
pub const CHUNK_SIZE: usize = 256 * 1024;

/// A blob body: chunks of bytes, or an error that ends the stream.
pub type BlobStream = BoxStream<'static, Result<Bytes, Error>>;

/// A stream of one buffer, split into chunks of at most [`CHUNK_SIZE`] (the split is free: each
/// chunk is a slice of the same `Bytes`).
pub fn once(data: Bytes) -> BlobStream {
    once_chunked(data, CHUNK_SIZE)
}

/// A stream of one buffer split into chunks of at most `chunk` bytes (slices, no copies).
pub fn once_chunked(data: Bytes, chunk: usize) -> BlobStream {
    let chunk = chunk.max(1);
    let mut chunks = Vec::with_capacity(data.len() / chunk + 1);
    let mut rest = data;
    while rest.len() > chunk {
        chunks.push(Ok(rest.split_to(chunk)));
    }
    if !rest.is_empty() {
        chunks.push(Ok(rest));
    }
    futures::stream::iter(chunks).boxed()
}

/// An empty stream.
pub fn empty() -> BlobStream {
    futures::stream::empty().boxed()
}

/// Collects a stream into one buffer, failing with RESOURCE_EXHAUSTED past `limit` bytes. Only
/// for bodies known to be small (action results, directories).
pub async fn collect(mut stream: BlobStream, limit: usize) -> Result<Bytes, Error> {
    let first = match stream.next().await {
        None => return Ok(Bytes::new()),
        Some(chunk) => chunk?,
    };
    let Some(second) = stream.next().await else {
        if first.len() > limit {
            return Err(too_big(limit));
        }
        return Ok(first);
    };
    let mut buf = bytes::BytesMut::with_capacity(first.len() * 2);
    buf.extend_from_slice(&first);
    buf.extend_from_slice(&second?);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > limit {
            return Err(too_big(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.len() > limit {
        return Err(too_big(limit));
    }
    Ok(buf.freeze())
}

fn too_big(limit: usize) -> Error {
    Error::resource_exhausted(format!(
        "blob is larger than the {limit} bytes this operation buffers in memory"
    ))
}

/// Wraps a body so that it fails, before it ends, unless its bytes match `digest`: the size
/// always (a body longer than declared fails as soon as it passes the size), the hash when
/// `check_hash`. A store that commits only after its body ends cleanly therefore never commits
/// a mismatching blob. The bytes are hashed once, as they pass.
pub fn verified(body: BlobStream, digest: crate::Digest, check_hash: bool) -> BlobStream {
    struct State {
        body: BlobStream,
        hasher: Option<crate::Hasher>,
        seen: u64,
        digest: crate::Digest,
        done: bool,
    }
    let state = State {
        body,
        hasher: check_hash.then(|| digest.function().hasher()),
        seen: 0,
        digest,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        match st.body.next().await {
            Some(Ok(chunk)) => {
                st.seen += chunk.len() as u64;
                if st.seen > st.digest.size() {
                    st.done = true;
                    let e = Error::invalid_argument(format!(
                        "upload of {} is longer than its declared size of {} bytes",
                        st.digest,
                        st.digest.size()
                    ));
                    return Some((Err(e), st));
                }
                if let Some(h) = st.hasher.as_mut() {
                    h.update(&chunk);
                }
                Some((Ok(chunk), st))
            }
            Some(Err(e)) => {
                st.done = true;
                Some((Err(e), st))
            }
            None => {
                st.done = true;
                if st.seen != st.digest.size() {
                    let e = Error::invalid_argument(format!(
                        "upload of {} has {} bytes, but its digest says {}",
                        st.digest,
                        st.seen,
                        st.digest.size()
                    ));
                    return Some((Err(e), st));
                }
                if let Some(h) = st.hasher.take() {
                    let got = h.finish_with_size(st.seen);
                    if got != st.digest {
                        let e = Error::invalid_argument(format!(
                            "upload of {} does not match its digest: the bytes hash to {}",
                            st.digest,
                            got.hash_hex()
                        ));
                        return Some((Err(e), st));
                    }
                }
                None
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DigestFunction;

    #[tokio::test]
    async fn verified_passes_good_bodies_and_fails_bad_ones_before_the_end() {
        let data = Bytes::from(vec![7u8; 200_000]);
        let d = DigestFunction::Sha256.compute(&data);
        let ok = collect(verified(once(data.clone()), d, true), usize::MAX).await;
        assert_eq!(ok.unwrap(), data);

        let wrong_hash = DigestFunction::Sha256.compute(b"other").with_size(200_000);
        let e = collect(verified(once(data.clone()), wrong_hash, true), usize::MAX)
            .await
            .unwrap_err();
        assert!(e.message.contains("does not match"), "{e}");
        // Without hash checking the same body passes (size matches).
        assert!(
            collect(verified(once(data.clone()), wrong_hash, false), usize::MAX)
                .await
                .is_ok()
        );

        let e = collect(
            verified(once(data.clone()), d.with_size(10), true),
            usize::MAX,
        )
        .await
        .unwrap_err();
        assert!(e.message.contains("longer than"), "{e}");
        let e = collect(verified(once(data), d.with_size(300_000), true), usize::MAX)
            .await
            .unwrap_err();
        assert!(e.message.contains("digest says 300000"), "{e}");
    }
}
