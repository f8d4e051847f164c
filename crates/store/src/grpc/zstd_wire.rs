//! `experimental_remote_cache_compression`: blob bodies as zstd frames on the wire
//! (`compressed-blobs/zstd/...` ByteStream names). Level 1, as the server side uses; each
//! chunk is compressed or decompressed as it passes (at most one 1 MiB chunk at a time).

use bytes::Bytes;
use cairn_core::{BlobStream, Error};
use futures::StreamExt;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Bytes of output buffer per step.
const OUT: usize = 256 << 10;

/// `body` compressed into one zstd frame.
pub(super) fn compress(body: BlobStream) -> BlobStream {
    let encoder = match Encoder::new(1) {
        Ok(e) => e,
        Err(e) => {
            return futures::stream::once(async move { Err(Error::internal(format!("zstd: {e}"))) })
                .boxed()
        }
    };
    futures::stream::unfold(Some((body, encoder)), |state| async move {
        let (mut body, mut enc) = state?;
        loop {
            match body.next().await {
                Some(Ok(chunk)) => match feed(&mut enc, &chunk) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Some((Ok(out), Some((body, enc)))),
                    Err(e) => return Some((Err(e), None)),
                },
                Some(Err(e)) => return Some((Err(e), None)),
                None => return Some((finish(&mut enc), None)),
            }
        }
    })
    .boxed()
}

fn feed(enc: &mut Encoder<'static>, mut input: &[u8]) -> Result<Bytes, Error> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; OUT];
    while !input.is_empty() {
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(&mut buf[..]);
        enc.run(&mut inb, &mut outb)
            .map_err(|e| Error::internal(format!("zstd: {e}")))?;
        let (c, p) = (inb.pos(), outb.pos());
        out.extend_from_slice(&buf[..p]);
        input = &input[c..];
    }
    Ok(out.into())
}

fn finish(enc: &mut Encoder<'static>) -> Result<Bytes, Error> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; OUT];
    loop {
        let mut outb = OutBuffer::around(&mut buf[..]);
        let remaining = enc
            .finish(&mut outb, true)
            .map_err(|e| Error::internal(format!("zstd: {e}")))?;
        let p = outb.pos();
        out.extend_from_slice(&buf[..p]);
        if remaining == 0 {
            return Ok(out.into());
        }
    }
}

/// `body` (zstd frames) decompressed; an error unless it comes to exactly `expected` bytes.
pub(super) fn decompress(body: BlobStream, expected: u64, what: String) -> BlobStream {
    let decoder = match Decoder::new() {
        Ok(d) => d,
        Err(e) => {
            return futures::stream::once(async move { Err(Error::internal(format!("zstd: {e}"))) })
                .boxed()
        }
    };
    let state = (body, decoder, 0u64, what);
    futures::stream::unfold(Some(state), move |state| async move {
        let (mut body, mut dec, mut total, what) = state?;
        loop {
            match body.next().await {
                Some(Ok(chunk)) => {
                    let out = match unpack(&mut dec, &chunk, &what) {
                        Ok(out) => out,
                        Err(e) => return Some((Err(e), None)),
                    };
                    total += out.len() as u64;
                    if total > expected {
                        let e = Error::new(cairn_core::Code::DataLoss, format!(
                            "{what}: zstd data decompresses to more than the {expected} bytes of its digest"
                        ));
                        return Some((Err(e), None));
                    }
                    if !out.is_empty() {
                        return Some((Ok(out), Some((body, dec, total, what))));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None if total == expected => return None,
                None => {
                    let e = Error::new(cairn_core::Code::DataLoss, format!(
                        "{what}: zstd data decompresses to {total} bytes, the digest says {expected}"
                    ));
                    return Some((Err(e), None));
                }
            }
        }
    })
    .boxed()
}

fn unpack(dec: &mut Decoder<'static>, mut input: &[u8], what: &str) -> Result<Bytes, Error> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; OUT];
    loop {
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(&mut buf[..]);
        dec.run(&mut inb, &mut outb).map_err(|e| {
            Error::new(
                cairn_core::Code::DataLoss,
                format!("{what}: invalid zstd data: {e}"),
            )
        })?;
        let (c, p) = (inb.pos(), outb.pos());
        out.extend_from_slice(&buf[..p]);
        input = &input[c..];
        // Done when the input is used up and the output buffer was not filled (nothing is
        // left inside the decoder for this input).
        if (input.is_empty() && p < buf.len()) || (c == 0 && p == 0) {
            return Ok(out.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], n: usize) -> BlobStream {
        let v: Vec<Result<Bytes, Error>> = data
            .chunks(n)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(v).boxed()
    }

    async fn all(mut s: BlobStream) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_body_survives_compression_and_a_wrong_size_is_an_error() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let packed = all(compress(chunks(&data, 1 << 20))).await.unwrap();
        assert!(packed.len() < data.len() / 10);
        assert_eq!(zstd::decode_all(&packed[..]).unwrap(), data);
        let back = all(decompress(
            chunks(&packed, 7777),
            data.len() as u64,
            "x".into(),
        ))
        .await
        .unwrap();
        assert_eq!(back, data);
        let short = decompress(chunks(&packed, 7777), data.len() as u64 + 1, "x".into());
        assert!(all(short)
            .await
            .unwrap_err()
            .message
            .contains("the digest says"));
        let long = decompress(chunks(&packed, 7777), data.len() as u64 - 1, "x".into());
        assert!(all(long).await.unwrap_err().message.contains("more than"));
        let junk = decompress(chunks(b"not zstd at all", 4), 10, "x".into());
        assert!(all(junk).await.is_err());
    }
}
