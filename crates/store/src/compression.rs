//! `compression`: stores blobs lz4-compressed in the backend, under the same key.
//!
//! # Frame format (version 1)
//!
//! All integers are little-endian.
//!
//! ```text
//! header   12 bytes  magic "CLZ4" | version u8 = 1 | 3 zero bytes | block_size u32
//! block*             stored_len u32 | uncompressed_len u32
//!                    | payload (stored_len & 0x7fff_ffff bytes)
//! end       8 bytes  eight zero bytes (a block of uncompressed_len 0)
//! index              one u32 per block: its payload length
//! footer   28 bytes  total_size u64 | block_count u64 | block_size u32 | version u8 = 1
//!                    | 3 zero bytes | magic "CLZ4"
//! ```
//!
//! A block's payload is an lz4 block (`lz4_flex::block`), or, when the top bit of `stored_len`
//! is set, the raw bytes (used when compression would not shrink the block). Every block holds
//! exactly `block_size` uncompressed bytes except the last, which holds 1 to `block_size`; the
//! empty blob has no blocks. lz4 blocks carry no checksum: content integrity is the job of a
//! `verify` store; this one rejects structural damage.
//!
//! # Guarantees and costs
//! - `put` streams: it holds one block (`block_size`, default 64 KiB) plus the index (4 bytes
//!   per block) in memory, never the blob. The frame is written as one backend `put`, so the
//!   backend's own all-or-nothing guarantee carries over.
//! - `get` from offset 0 reads the frame front to back, one block in memory at a time. From a
//!   later offset it asks the backend for the frame's size, reads the footer, sums the index
//!   entries of the blocks before the offset (streamed), and starts reading at the block that
//!   holds the offset: earlier blocks are neither read nor decompressed.
//! - `has_many` reports the uncompressed size: one backend `has_many`, then a footer read per
//!   present key. A frame whose footer is damaged is reported absent (and logged), so that
//!   clients upload the blob again.
//! - A damaged frame is a DATA_LOSS error, never a panic; a block larger than
//!   `max_decode_block_size` (default the larger of 4 MiB and `block_size`) is refused.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use cairn_config::stores::{CompressionAlgorithm, CompressionStore as Cfg};
use cairn_core::{stream, BlobStream, Code, Digest, Error};
use futures::{StreamExt, TryStreamExt};

use crate::{check_range, Health, Store, StoreExt, StoreInfo, StoreRef};

const MAGIC: &[u8; 4] = b"CLZ4";
const VERSION: u8 = 1;
const HEADER_LEN: u64 = 12;
const BLOCK_HEADER_LEN: u64 = 8;
const END_LEN: u64 = BLOCK_HEADER_LEN;
const FOOTER_LEN: u64 = 28;
/// Top bit of `stored_len`: the payload is the raw bytes.
const STORED_RAW: u32 = 0x8000_0000;
/// Largest block size the format allows (payload lengths use 31 bits).
const MAX_BLOCK_SIZE: u64 = 1 << 30;
const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;
const DEFAULT_MAX_DECODE_BLOCK_SIZE: u64 = 4 * 1024 * 1024;
/// Blocks larger than this are (de)compressed on the blocking pool, off the reactor.
const BLOCKING_THRESHOLD: usize = 1024 * 1024;
/// Footer reads in flight for one `has_many`.
const FOOTER_READS_IN_FLIGHT: usize = 16;
/// Index bytes read per step when seeking.
const INDEX_READ_STEP: u64 = 64 * 1024;

/// Builds a compression store over `backend`.
pub fn build(cfg: &Cfg, backend: StoreRef) -> Result<StoreRef, Error> {
    Ok(Arc::new(CompressionStore::new(cfg, backend)?))
}

pub struct CompressionStore {
    backend: StoreRef,
    block_size: u32,
    max_decode_block_size: u32,
}

impl CompressionStore {
    /// Fails with INVALID_ARGUMENT on a block size of 0, past 1 GiB, or past
    /// `max_decode_block_size`.
    pub fn new(cfg: &Cfg, backend: StoreRef) -> Result<CompressionStore, Error> {
        let CompressionAlgorithm::Lz4(lz4) = &cfg.compression_algorithm;
        let block_size = lz4.block_size.map_or(DEFAULT_BLOCK_SIZE, |b| b.get());
        let max_decode = lz4
            .max_decode_block_size
            .map_or(DEFAULT_MAX_DECODE_BLOCK_SIZE.max(block_size), |b| b.get());
        if block_size == 0 || block_size > MAX_BLOCK_SIZE {
            return Err(Error::invalid_argument(format!(
                "compression store: lz4.block_size is {block_size}; expected 1 byte to 1 GiB"
            )));
        }
        if max_decode > MAX_BLOCK_SIZE || max_decode < block_size {
            return Err(Error::invalid_argument(format!(
                "compression store: lz4.max_decode_block_size is {max_decode}; expected at least \
                 block_size ({block_size}) and at most 1 GiB"
            )));
        }
        Ok(CompressionStore {
            backend,
            // Both fit: checked against MAX_BLOCK_SIZE above.
            block_size: block_size as u32,
            max_decode_block_size: max_decode as u32,
        })
    }

    /// Reads and checks the footer of the frame stored under `key`, `frame_len` bytes long.
    async fn read_footer(&self, key: &Digest, frame_len: u64) -> Result<Footer, Error> {
        if frame_len < HEADER_LEN + END_LEN + FOOTER_LEN {
            return Err(corrupt(
                key,
                format!("frame of {frame_len} bytes is too short"),
            ));
        }
        let raw = stream::collect(
            self.backend
                .get(key, frame_len - FOOTER_LEN, Some(FOOTER_LEN))
                .await?,
            FOOTER_LEN as usize,
        )
        .await?;
        Footer::parse(key, &raw, frame_len, self.max_decode_block_size)
    }

    /// `has_many` for one key: the footer's size, or `None` for an absent or damaged frame.
    async fn uncompressed_size(
        &self,
        key: Digest,
        frame_len: Option<u64>,
    ) -> Result<Option<u64>, Error> {
        let Some(frame_len) = frame_len else {
            return Ok(None);
        };
        match self.read_footer(&key, frame_len).await {
            Ok(footer) => Ok(Some(footer.total_size)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) if e.code == Code::DataLoss => {
                tracing::warn!(digest = %key, error = %e, "compression store: reporting a damaged frame as absent");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Offset in the frame of block `block`: the header plus the blocks before it, summed
    /// from the index as it streams in.
    async fn block_position(
        &self,
        key: &Digest,
        footer: &Footer,
        block: u64,
    ) -> Result<u64, Error> {
        let mut pos = HEADER_LEN;
        if block == 0 {
            return Ok(pos);
        }
        let want = block * 4;
        let mut index = ByteReader::new(
            self.backend
                .get(key, footer.index_start, Some(want))
                .await?,
        );
        let mut read = 0;
        while read < want {
            let step = (want - read).min(INDEX_READ_STEP);
            let Some(entries) = index.read_exact(step as usize).await? else {
                return Err(corrupt(key, "block index is truncated"));
            };
            for entry in entries.chunks_exact(4) {
                pos += BLOCK_HEADER_LEN + u64::from(le_u32(entry));
            }
            read += step;
        }
        if pos > footer.index_start - END_LEN {
            return Err(corrupt(key, "block index points past the blocks"));
        }
        Ok(pos)
    }
}

/// A DATA_LOSS error naming the blob.
fn corrupt(key: &Digest, why: impl std::fmt::Display) -> Error {
    Error::data_loss(format!(
        "compression store: frame of {key} is damaged: {why}"
    ))
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// What the footer says, checked against the frame's length.
#[derive(Debug)]
struct Footer {
    total_size: u64,
    block_size: u32,
    /// Frame offset of the block index.
    index_start: u64,
}

impl Footer {
    fn encode(total_size: u64, block_count: u64, block_size: u32) -> [u8; FOOTER_LEN as usize] {
        let mut f = [0u8; FOOTER_LEN as usize];
        f[0..8].copy_from_slice(&total_size.to_le_bytes());
        f[8..16].copy_from_slice(&block_count.to_le_bytes());
        f[16..20].copy_from_slice(&block_size.to_le_bytes());
        f[20] = VERSION;
        f[24..28].copy_from_slice(MAGIC);
        f
    }

    fn parse(key: &Digest, raw: &[u8], frame_len: u64, max_block: u32) -> Result<Footer, Error> {
        if raw.len() != FOOTER_LEN as usize {
            return Err(corrupt(key, "footer is truncated"));
        }
        if &raw[24..28] != MAGIC || raw[20] != VERSION {
            return Err(corrupt(key, "footer has no CLZ4 version 1 magic"));
        }
        let total_size = le_u64(&raw[0..8]);
        let block_count = le_u64(&raw[8..16]);
        let block_size = le_u32(&raw[16..20]);
        if block_size == 0 || block_size > max_block {
            return Err(corrupt(
                key,
                format!(
                    "block size {block_size} is outside 1..={max_block} (max_decode_block_size)"
                ),
            ));
        }
        if block_count != total_size.div_ceil(u64::from(block_size)) {
            return Err(corrupt(
                key,
                format!(
                    "{block_count} blocks cannot hold {total_size} bytes in blocks of {block_size}"
                ),
            ));
        }
        // Each block takes at least its header and its index entry.
        let least = block_count
            .checked_mul(BLOCK_HEADER_LEN + 4)
            .and_then(|b| b.checked_add(HEADER_LEN + END_LEN + FOOTER_LEN));
        if least.is_none_or(|least| least > frame_len) {
            return Err(corrupt(
                key,
                format!("{block_count} blocks do not fit in {frame_len} bytes"),
            ));
        }
        Ok(Footer {
            total_size,
            block_size,
            index_start: frame_len - FOOTER_LEN - block_count * 4,
        })
    }
}

/// Compresses one block into its header and payload.
fn encode_block(block: &[u8]) -> Bytes {
    let compressed = lz4_flex::block::compress(block);
    // Blocks are at most MAX_BLOCK_SIZE (1 GiB), so every length fits in 31 bits.
    let ulen = block.len() as u32;
    let mut out =
        BytesMut::with_capacity(BLOCK_HEADER_LEN as usize + block.len().min(compressed.len()));
    if compressed.len() < block.len() {
        out.put_u32_le(compressed.len() as u32);
        out.put_u32_le(ulen);
        out.extend_from_slice(&compressed);
    } else {
        out.put_u32_le(ulen | STORED_RAW);
        out.put_u32_le(ulen);
        out.extend_from_slice(block);
    }
    out.freeze()
}

/// Turns a body into a frame as it streams.
struct Encoder {
    body: BlobStream,
    block_size: usize,
    pending: BytesMut,
    /// Payload length of each block written.
    index: Vec<u32>,
    total: u64,
    started: bool,
    finished: bool,
}

impl Encoder {
    fn new(body: BlobStream, block_size: u32) -> Encoder {
        Encoder {
            body,
            block_size: block_size as usize,
            pending: BytesMut::new(),
            index: Vec::new(),
            total: 0,
            started: false,
            finished: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if !self.started {
            self.started = true;
            let mut h = BytesMut::with_capacity(HEADER_LEN as usize);
            h.extend_from_slice(MAGIC);
            h.put_u8(VERSION);
            h.put_bytes(0, 3);
            h.put_u32_le(self.block_size as u32);
            return Ok(Some(h.freeze()));
        }
        if self.finished {
            return Ok(None);
        }
        loop {
            if self.pending.len() >= self.block_size {
                let block = self.pending.split_to(self.block_size).freeze();
                return self.emit(block).await.map(Some);
            }
            match self.body.next().await {
                Some(chunk) => self.pending.extend_from_slice(&chunk?),
                None => break,
            }
        }
        self.finished = true;
        let mut tail = BytesMut::new();
        if !self.pending.is_empty() {
            let block = std::mem::take(&mut self.pending).freeze();
            tail.extend_from_slice(&self.emit(block).await?);
        }
        tail.put_bytes(0, END_LEN as usize);
        for len in &self.index {
            tail.put_u32_le(*len);
        }
        tail.extend_from_slice(&Footer::encode(
            self.total,
            self.index.len() as u64,
            self.block_size as u32,
        ));
        Ok(Some(tail.freeze()))
    }

    async fn emit(&mut self, block: Bytes) -> Result<Bytes, Error> {
        self.total += block.len() as u64;
        let encoded = if block.len() > BLOCKING_THRESHOLD {
            tokio::task::spawn_blocking(move || encode_block(&block))
                .await
                .map_err(|e| Error::internal(format!("compression store: lz4 task failed: {e}")))?
        } else {
            encode_block(&block)
        };
        self.index
            .push((encoded.len() as u64 - BLOCK_HEADER_LEN) as u32);
        Ok(encoded)
    }
}

/// Reads exact byte counts from a stream, slicing without copies where a chunk allows.
struct ByteReader {
    stream: BlobStream,
    head: Bytes,
}

impl ByteReader {
    fn new(stream: BlobStream) -> ByteReader {
        ByteReader {
            stream,
            head: Bytes::new(),
        }
    }

    /// Exactly `n` bytes, or `None` when the stream ends first.
    async fn read_exact(&mut self, n: usize) -> Result<Option<Bytes>, Error> {
        while self.head.is_empty() {
            match self.stream.next().await {
                Some(chunk) => self.head = chunk?,
                None => return Ok(if n == 0 { Some(Bytes::new()) } else { None }),
            }
        }
        if self.head.len() >= n {
            return Ok(Some(self.head.split_to(n)));
        }
        let mut buf = BytesMut::with_capacity(n);
        buf.extend_from_slice(&std::mem::take(&mut self.head));
        while buf.len() < n {
            let Some(chunk) = self.stream.next().await else {
                return Ok(None);
            };
            let mut chunk = chunk?;
            let take = (n - buf.len()).min(chunk.len());
            buf.extend_from_slice(&chunk.split_to(take));
            self.head = chunk;
        }
        Ok(Some(buf.freeze()))
    }
}

/// Turns a frame (from the header, or from a block boundary) back into the body.
struct Decoder {
    key: Digest,
    src: ByteReader,
    /// `None` until the header is read.
    block_size: Option<u32>,
    max_block: u32,
    /// Decoded bytes still to drop before the first one served.
    skip: u64,
    /// Bytes still to serve; `None` for all.
    remaining: Option<u64>,
    /// Whether the footer promised `remaining` bytes (so running out early is damage).
    exact: bool,
    /// A block shorter than `block_size` was seen: it must be the last.
    short_seen: bool,
    done: bool,
}

impl Decoder {
    fn into_stream(self) -> BlobStream {
        futures::stream::try_unfold(self, |mut d| async move {
            Ok(d.next().await?.map(|chunk| (chunk, d)))
        })
        .boxed()
    }

    async fn next(&mut self) -> Result<Option<Bytes>, Error> {
        if self.done || self.remaining == Some(0) {
            return Ok(None);
        }
        let key = self.key;
        let block_size = match self.block_size {
            Some(b) => b,
            None => {
                let Some(h) = self.src.read_exact(HEADER_LEN as usize).await? else {
                    return Err(corrupt(&key, "header is truncated"));
                };
                if &h[0..4] != MAGIC || h[4] != VERSION {
                    return Err(corrupt(&key, "header has no CLZ4 version 1 magic"));
                }
                let b = le_u32(&h[8..12]);
                if b == 0 || b > self.max_block {
                    return Err(corrupt(
                        &key,
                        format!(
                            "block size {b} is outside 1..={} (max_decode_block_size)",
                            self.max_block
                        ),
                    ));
                }
                self.block_size = Some(b);
                b
            }
        };
        loop {
            let Some(h) = self.src.read_exact(BLOCK_HEADER_LEN as usize).await? else {
                return Err(corrupt(&key, "frame ends without its end marker"));
            };
            let stored = le_u32(&h[0..4]);
            let ulen = le_u32(&h[4..8]);
            if ulen == 0 {
                if stored != 0 {
                    return Err(corrupt(&key, "block of 0 bytes with a payload"));
                }
                self.done = true;
                if self.exact && (self.skip > 0 || self.remaining.is_some_and(|r| r > 0)) {
                    return Err(corrupt(
                        &key,
                        "frame holds fewer bytes than its footer says",
                    ));
                }
                return Ok(None);
            }
            if ulen > block_size || self.short_seen {
                return Err(corrupt(
                    &key,
                    format!(
                        "block of {ulen} bytes does not fit the frame's {block_size}-byte blocks"
                    ),
                ));
            }
            self.short_seen = ulen < block_size;
            let raw = stored & STORED_RAW != 0;
            let plen = stored & !STORED_RAW;
            let plen_ok = if raw {
                plen == ulen
            } else {
                plen as usize <= lz4_flex::block::get_maximum_output_size(ulen as usize)
            };
            if !plen_ok {
                return Err(corrupt(
                    &key,
                    format!("payload of {plen} bytes for a {ulen}-byte block"),
                ));
            }
            let Some(payload) = self.src.read_exact(plen as usize).await? else {
                return Err(corrupt(&key, "block payload is truncated"));
            };
            if self.skip >= u64::from(ulen) {
                // Wholly before the range: not decompressed.
                self.skip -= u64::from(ulen);
                continue;
            }
            let mut data = if raw {
                payload
            } else if ulen as usize > BLOCKING_THRESHOLD {
                tokio::task::spawn_blocking(move || decode_block(&key, &payload, ulen))
                    .await
                    .map_err(|e| {
                        Error::internal(format!("compression store: lz4 task failed: {e}"))
                    })??
            } else {
                decode_block(&key, &payload, ulen)?
            };
            // `skip` < `ulen` here, so it fits in usize.
            data = data.slice(self.skip as usize..);
            self.skip = 0;
            if let Some(r) = &mut self.remaining {
                data.truncate(data.len().min(usize::try_from(*r).unwrap_or(usize::MAX)));
                *r -= data.len() as u64;
            }
            return Ok(Some(data));
        }
    }
}

fn decode_block(key: &Digest, payload: &[u8], ulen: u32) -> Result<Bytes, Error> {
    let mut out = vec![0u8; ulen as usize];
    match lz4_flex::block::decompress_into(payload, &mut out) {
        Ok(n) if n == out.len() => Ok(out.into()),
        Ok(n) => Err(corrupt(
            key,
            format!("block decodes to {n} bytes, its header says {ulen}"),
        )),
        Err(e) => Err(corrupt(key, format!("lz4 block does not decode: {e}"))),
    }
}

#[async_trait]
impl Store for CompressionStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let frame_sizes = self.backend.has_many(keys).await?;
        let lookups: Vec<(Digest, Option<u64>)> = keys.iter().copied().zip(frame_sizes).collect();
        futures::stream::iter(lookups)
            .map(|(key, frame_len)| self.uncompressed_size(key, frame_len))
            .buffered(FOOTER_READS_IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        if offset == 0 {
            let src = self.backend.get(key, 0, None).await?;
            return Ok(Decoder {
                key: *key,
                src: ByteReader::new(src),
                block_size: None,
                max_block: self.max_decode_block_size,
                skip: 0,
                remaining: length,
                exact: false,
                short_seen: false,
                done: false,
            }
            .into_stream());
        }
        let Some(frame_len) = self.backend.has(key).await? else {
            return Err(Error::not_found(format!(
                "{key} is not in the compression store's backend"
            )));
        };
        let footer = self.read_footer(key, frame_len).await?;
        let (start, len) = check_range(key, footer.total_size, offset, length)?;
        if len == 0 {
            return Ok(stream::empty());
        }
        let block = start / u64::from(footer.block_size);
        let pos = self.block_position(key, &footer, block).await?;
        let src = self
            .backend
            .get(key, pos, Some(footer.index_start - pos))
            .await?;
        Ok(Decoder {
            key: *key,
            src: ByteReader::new(src),
            block_size: Some(footer.block_size),
            max_block: self.max_decode_block_size,
            skip: start - block * u64::from(footer.block_size),
            remaining: Some(len),
            exact: true,
            short_seen: false,
            done: false,
        }
        .into_stream())
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        let encoder = Encoder::new(body, self.block_size);
        let frame = futures::stream::try_unfold(encoder, |mut e| async move {
            Ok(e.next().await?.map(|chunk| (chunk, e)))
        })
        .boxed();
        self.backend.put(key, frame).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper("compression", vec![("backend", self.backend.info())])
    }

    async fn health(&self) -> Health {
        self.backend.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::testutil;
    use cairn_config::stores::{Lz4Config, StoreSpec};
    use cairn_config::ByteSize;
    use cairn_core::DigestFunction;

    fn store(block_size: Option<u64>) -> (CompressionStore, StoreRef) {
        let backend: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = Cfg {
            compression_algorithm: CompressionAlgorithm::Lz4(Lz4Config {
                block_size: block_size.map(ByteSize),
                max_decode_block_size: None,
            }),
            backend: StoreSpec::Noop(Default::default()),
        };
        (
            CompressionStore::new(&cfg, backend.clone()).unwrap(),
            backend,
        )
    }

    /// Text-like bytes that lz4 shrinks well.
    fn compressible(len: usize) -> Bytes {
        let words = [
            "cairn ",
            "build ",
            "cache ",
            "remote ",
            "execution ",
            "blob ",
        ];
        let mut out = Vec::with_capacity(len + 16);
        let mut i = 0usize;
        while out.len() < len {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out.into()
    }

    /// The body split into uneven chunks, so blocks straddle chunk boundaries.
    fn uneven(data: &Bytes) -> BlobStream {
        let mut chunks = vec![];
        let mut rest = data.clone();
        let mut n = 1;
        while !rest.is_empty() {
            let take = rest.len().min(n);
            chunks.push(Ok(rest.split_to(take)));
            n = n * 3 + 7;
        }
        futures::stream::iter(chunks).boxed()
    }

    async fn read(
        s: &dyn Store,
        key: &Digest,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Bytes, Error> {
        stream::collect(s.get(key, offset, len).await?, usize::MAX).await
    }

    #[tokio::test]
    async fn compression_store_contract() {
        testutil::check_store_contract(&store(None).0).await;
        // Small blocks: the contract's ranged reads then start many blocks in.
        testutil::check_store_contract(&store(Some(1000)).0).await;
    }

    #[tokio::test]
    async fn compressible_data_is_smaller_in_the_backend() {
        let (s, backend) = store(None);
        let data = compressible(1_000_000);
        let d = DigestFunction::Sha256.compute(&data);
        s.put(&d, uneven(&data)).await.unwrap();
        let stored = backend.has(&d).await.unwrap().unwrap();
        assert!(stored < 200_000, "1 MB of text took {stored} bytes");
        assert_eq!(s.has(&d).await.unwrap(), Some(1_000_000));
        assert_eq!(s.get_all(&d, usize::MAX).await.unwrap(), data);

        // Incompressible data is stored raw, at a small cost.
        let noise = testutil::data(200_000, 9);
        let dn = DigestFunction::Sha256.compute(&noise);
        s.put_bytes(&dn, noise.clone()).await.unwrap();
        let stored = backend.has(&dn).await.unwrap().unwrap();
        assert!(
            stored < 200_000 + 200,
            "200 kB of noise took {stored} bytes"
        );
        assert_eq!(s.get_all(&dn, usize::MAX).await.unwrap(), noise);
    }

    #[tokio::test]
    async fn ranged_reads_across_block_boundaries() {
        let (s, _) = store(Some(1000));
        let mut data = compressible(10_500).to_vec();
        data[3000..6000].copy_from_slice(&testutil::data(3000, 4));
        let data = Bytes::from(data);
        let d = DigestFunction::Sha256.compute(&data);
        s.put(&d, uneven(&data)).await.unwrap();
        for (offset, len) in [
            (0, Some(1)),
            (0, Some(1000)),
            (0, Some(1001)),
            (999, Some(2)),
            (1000, Some(1000)),
            (1500, Some(4000)),
            (2999, None),
            (5999, Some(10)),
            (10_000, None),
            (10_499, Some(5)),
            (10_500, None),
            (7000, Some(0)),
        ] {
            let got = read(&s, &d, offset, len).await.unwrap();
            let end = len.map_or(data.len(), |l| (offset + l).min(10_500) as usize);
            assert_eq!(
                got,
                data.slice(offset as usize..end),
                "offset {offset} length {len:?}"
            );
        }
        let err = read(&s, &d, 10_501, None).await.unwrap_err();
        assert_eq!(err.code, Code::OutOfRange);
    }

    #[tokio::test]
    async fn damaged_frames_are_data_loss() {
        let (s, backend) = store(Some(1000));
        let data = compressible(5000);
        let d = DigestFunction::Sha256.compute(&data);
        s.put_bytes(&d, data.clone()).await.unwrap();
        let frame = backend.get_all(&d, usize::MAX).await.unwrap();

        // Not a frame at all.
        backend.put_bytes(&d, testutil::data(300, 5)).await.unwrap();
        let err = read(&s, &d, 0, None).await.unwrap_err();
        assert_eq!(err.code, Code::DataLoss, "{err}");
        assert_eq!(
            read(&s, &d, 10, None).await.unwrap_err().code,
            Code::DataLoss
        );
        assert_eq!(s.has(&d).await.unwrap(), None);

        // Cut short.
        backend
            .put_bytes(&d, frame.slice(..frame.len() / 2))
            .await
            .unwrap();
        assert_eq!(
            read(&s, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );
        assert_eq!(s.has(&d).await.unwrap(), None);

        // A block header claiming more than the block size.
        let mut bad = frame.to_vec();
        bad[HEADER_LEN as usize + 4..HEADER_LEN as usize + 8]
            .copy_from_slice(&5000u32.to_le_bytes());
        backend.put_bytes(&d, bad.into()).await.unwrap();
        assert_eq!(
            read(&s, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );

        // A payload that is not lz4.
        let mut bad = frame.to_vec();
        let payload_len = le_u32(&bad[HEADER_LEN as usize..]) as usize;
        let p = HEADER_LEN as usize + BLOCK_HEADER_LEN as usize;
        bad[p..p + payload_len].fill(0xff);
        backend.put_bytes(&d, bad.into()).await.unwrap();
        assert_eq!(
            read(&s, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );
        // A read from a later block neither reads nor decodes the first one.
        assert_eq!(read(&s, &d, 2500, None).await.unwrap(), data.slice(2500..));

        // A footer promising more than the blocks hold.
        let mut bad = frame.to_vec();
        let f = bad.len() - FOOTER_LEN as usize;
        bad[f..f + 8].copy_from_slice(&5001u64.to_le_bytes());
        backend.put_bytes(&d, bad.into()).await.unwrap();
        assert_eq!(s.has(&d).await.unwrap(), None);

        // The intact frame still reads.
        backend.put_bytes(&d, frame).await.unwrap();
        assert_eq!(read(&s, &d, 4321, None).await.unwrap(), data.slice(4321..));
    }

    #[test]
    fn bad_config_is_rejected() {
        let cfg = |b: u64, m: Option<u64>| Cfg {
            compression_algorithm: CompressionAlgorithm::Lz4(Lz4Config {
                block_size: Some(ByteSize(b)),
                max_decode_block_size: m.map(ByteSize),
            }),
            backend: StoreSpec::Noop(Default::default()),
        };
        let backend: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        assert!(build(&cfg(0, None), backend.clone()).is_err());
        assert!(build(&cfg(2 << 30, None), backend.clone()).is_err());
        assert!(build(&cfg(1 << 20, Some(1 << 10)), backend.clone()).is_err());
        assert!(build(&cfg(8 << 20, None), backend).is_ok());
    }
}
