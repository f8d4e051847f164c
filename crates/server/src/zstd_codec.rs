//! zstd for `compressed-blobs` and batch compressors: whole-buffer helpers bounded by the
//! digest's size, and a streaming decoder / encoder for ByteStream.

use bytes::Bytes;
use cairn_core::Error;

/// Decompresses a buffer whose uncompressed size must be exactly `expected`.
pub fn decompress_exact(
    data: &[u8],
    expected: u64,
    what: &dyn std::fmt::Display,
) -> Result<Bytes, Error> {
    // The declared size is the client's word: reserve at most 1 MiB up front and let the
    // buffer grow with what the data really holds (the `take` below bounds it).
    let mut out = Vec::with_capacity(expected.min(1 << 20) as usize);
    let mut decoder = zstd::stream::read::Decoder::new(data)
        .map_err(|e| Error::invalid_argument(format!("{what}: zstd: {e}")))?;
    // Read at most one byte more than expected, so that an oversize frame is caught without
    // inflating it whole.
    let mut limited = std::io::Read::take(&mut decoder, expected + 1);
    std::io::Read::read_to_end(&mut limited, &mut out)
        .map_err(|e| Error::invalid_argument(format!("{what}: invalid zstd data: {e}")))?;
    if out.len() as u64 != expected {
        return Err(Error::invalid_argument(format!(
            "{what}: zstd data decompresses to {}{} bytes, but the digest says {expected}",
            if out.len() as u64 > expected {
                "more than "
            } else {
                ""
            },
            out.len().min(expected as usize)
        )));
    }
    Ok(out.into())
}

pub fn compress(data: &[u8]) -> Result<Vec<u8>, Error> {
    zstd::bulk::compress(data, 1).map_err(|e| Error::internal(format!("zstd: {e}")))
}

/// Incremental decoder: feed compressed chunks, get uncompressed bytes.
pub struct StreamDecoder {
    inner: zstd::stream::raw::Decoder<'static>,
    buf: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Result<StreamDecoder, Error> {
        Ok(StreamDecoder {
            inner: zstd::stream::raw::Decoder::new()
                .map_err(|e| Error::internal(format!("zstd: {e}")))?,
            buf: vec![0u8; 256 * 1024],
        })
    }

    /// Decodes one chunk of compressed input into zero or more output buffers.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Bytes>, Error> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Vec::new();
        loop {
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut self.buf[..]);
            self.inner
                .run(&mut inb, &mut outb)
                .map_err(|e| Error::invalid_argument(format!("invalid zstd data: {e}")))?;
            let consumed = inb.pos();
            let produced = outb.pos();
            if produced > 0 {
                out.push(Bytes::copy_from_slice(&self.buf[..produced]));
            }
            input = &input[consumed..];
            if input.is_empty() && produced < self.buf.len() {
                return Ok(out);
            }
            if consumed == 0 && produced == 0 {
                return Ok(out);
            }
        }
    }
}

/// Incremental encoder for ByteStream reads of `compressed-blobs/zstd`.
pub struct StreamEncoder {
    inner: zstd::stream::raw::Encoder<'static>,
    buf: Vec<u8>,
}

impl StreamEncoder {
    pub fn new() -> Result<StreamEncoder, Error> {
        Ok(StreamEncoder {
            inner: zstd::stream::raw::Encoder::new(1)
                .map_err(|e| Error::internal(format!("zstd: {e}")))?,
            buf: vec![0u8; 256 * 1024],
        })
    }

    pub fn feed(&mut self, mut input: &[u8]) -> Result<Bytes, Error> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = Vec::new();
        while !input.is_empty() {
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(&mut self.buf[..]);
            self.inner
                .run(&mut inb, &mut outb)
                .map_err(|e| Error::internal(format!("zstd: {e}")))?;
            let (c, p) = (inb.pos(), outb.pos());
            out.extend_from_slice(&self.buf[..p]);
            input = &input[c..];
        }
        Ok(out.into())
    }

    pub fn finish(&mut self) -> Result<Bytes, Error> {
        use zstd::stream::raw::{Operation, OutBuffer};
        let mut out = Vec::new();
        loop {
            let mut outb = OutBuffer::around(&mut self.buf[..]);
            let remaining = self
                .inner
                .finish(&mut outb, true)
                .map_err(|e| Error::internal(format!("zstd: {e}")))?;
            let p = outb.pos();
            out.extend_from_slice(&self.buf[..p]);
            if remaining == 0 {
                return Ok(out.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_codec_round_trips_and_exact_checks_size() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut enc = StreamEncoder::new().unwrap();
        let mut z = Vec::new();
        for c in data.chunks(100_000) {
            z.extend_from_slice(&enc.feed(c).unwrap());
        }
        z.extend_from_slice(&enc.finish().unwrap());
        let mut dec = StreamDecoder::new().unwrap();
        let mut back = Vec::new();
        for c in z.chunks(7_000) {
            for b in dec.feed(c).unwrap() {
                back.extend_from_slice(&b);
            }
        }
        assert_eq!(back, data);
        assert_eq!(decompress_exact(&z, 1_000_000, &"x").unwrap(), data);
        assert!(decompress_exact(&z, 999_999, &"x").is_err());
        assert!(decompress_exact(b"not zstd", 10, &"x").is_err());
    }
}
