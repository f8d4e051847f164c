//! `dedup`: splits blobs into content-defined chunks, stores each chunk once in
//! `content_store`, and keeps the list of a blob's chunks in `index_store`.
//!
//! Chunk boundaries come from FastCDC (`fastcdc::v2020`, normalization level 1), so they follow
//! the content: two blobs that share a run of bytes share the chunks inside it, wherever the run
//! sits, and the same body always splits the same way however its stream is cut. Chunk sizes:
//! `min_size` (default 64 KiB), `normal_size` (average, default 256 KiB), `max_size` (default
//! 512 KiB); FastCDC accepts 64 B..1 MiB, 256 B..4 MiB and 1 KiB..16 MiB respectively, and
//! `min_size <= normal_size <= max_size`. A chunk's key is its digest under the blob key's
//! digest function.
//!
//! # Index entry format (version 1)
//!
//! Stored in `index_store` under the blob's key. Integers are little-endian.
//!
//! ```text
//! header  20 bytes  magic "CDX1" | total_size u64 | chunk_count u32 | hash_len u32
//! entry*            chunk hash (hash_len bytes) | chunk size u32
//! ```
//!
//! # Guarantees and costs
//! - `put` holds at most `max_size` bytes of unchunked body plus the chunks being uploaded
//!   (at most 4 at a time), never the whole blob. Chunking and hashing run on the blocking pool.
//!   Chunks already in `content_store` are not sent again. The index entry is written only
//!   after every chunk is stored, so readers never see half a blob; a failed put may leave
//!   chunks behind, which are harmless.
//! - `get` reads the index (held in memory: `hash_len + 4` bytes per chunk, refused past
//!   64 MiB) and fetches only the chunks that overlap the range, in order, up to
//!   `max_concurrent_fetch_per_get` (default 10) at a time; each fetched chunk is held whole
//!   until it is sent.
//! - `has_many` reads only each index entry's 20-byte header and reports the blob's size. It
//!   does not check that the chunks are still in `content_store`: give `content_store` an
//!   eviction policy at least as lenient as `index_store`'s. A missing chunk surfaces as
//!   NOT_FOUND from `get`; a damaged index entry as DATA_LOSS (and as absent from `has_many`).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use cairn_config::stores::DedupStore as Cfg;
use cairn_core::{stream, BlobStream, Code, Digest, DigestFunction, Error};
use fastcdc::v2020 as cdc;
use futures::{StreamExt, TryStreamExt};
use tokio::task::JoinSet;

use crate::{check_range, Health, Store, StoreExt, StoreInfo, StoreRef};

const DEFAULT_MIN_SIZE: u64 = 64 * 1024;
const DEFAULT_NORMAL_SIZE: u64 = 256 * 1024;
const DEFAULT_MAX_SIZE: u64 = 512 * 1024;
const DEFAULT_MAX_CONCURRENT_FETCH: u64 = 10;
/// Chunk uploads in flight for one `put`.
const UPLOADS_IN_FLIGHT: usize = 4;
/// Index header reads in flight for one `has_many`.
const HEADER_READS_IN_FLIGHT: usize = 16;
const INDEX_MAGIC: &[u8; 4] = b"CDX1";
const INDEX_HEADER_LEN: usize = 20;
/// Largest index entry written or read.
const MAX_INDEX_BYTES: usize = 64 * 1024 * 1024;

/// Builds a dedup store over an index store and a content store.
pub fn build(cfg: &Cfg, index: StoreRef, content: StoreRef) -> Result<StoreRef, Error> {
    Ok(Arc::new(DedupStore::new(cfg, index, content)?))
}

pub struct DedupStore {
    index: StoreRef,
    content: StoreRef,
    chunker: Chunker,
    max_fetch: usize,
}

impl DedupStore {
    /// Fails with INVALID_ARGUMENT on chunk sizes FastCDC does not accept or a fetch limit of 0.
    pub fn new(cfg: &Cfg, index: StoreRef, content: StoreRef) -> Result<DedupStore, Error> {
        let chunker = Chunker::new(
            cfg.min_size.map_or(DEFAULT_MIN_SIZE, |s| s.get()),
            cfg.normal_size.map_or(DEFAULT_NORMAL_SIZE, |s| s.get()),
            cfg.max_size.map_or(DEFAULT_MAX_SIZE, |s| s.get()),
        )?;
        let max_fetch = cfg
            .max_concurrent_fetch_per_get
            .unwrap_or(DEFAULT_MAX_CONCURRENT_FETCH);
        if max_fetch == 0 {
            return Err(Error::invalid_argument(
                "dedup store: max_concurrent_fetch_per_get is 0; expected at least 1",
            ));
        }
        Ok(DedupStore {
            index,
            content,
            chunker,
            max_fetch: usize::try_from(max_fetch).unwrap_or(usize::MAX),
        })
    }

    async fn read_index(&self, key: &Digest) -> Result<Index, Error> {
        let raw = self.index.get(key, 0, None).await?;
        let raw = stream::collect(raw, MAX_INDEX_BYTES).await.map_err(|e| {
            if e.code == Code::ResourceExhausted {
                corrupt(
                    key,
                    format!("index entry is larger than {MAX_INDEX_BYTES} bytes"),
                )
            } else {
                e
            }
        })?;
        Index::decode(key, &raw)
    }

    /// `has_many` for one key: the size from its index header, or `None` for an absent or
    /// damaged entry.
    async fn blob_size(&self, key: Digest, index_len: Option<u64>) -> Result<Option<u64>, Error> {
        let Some(index_len) = index_len else {
            return Ok(None);
        };
        match self.read_size(&key, index_len).await {
            Ok(size) => Ok(Some(size)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) if e.code == Code::DataLoss => {
                tracing::warn!(digest = %key, error = %e, "dedup store: reporting a damaged index entry as absent");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The blob's size from its index header; `index_len` is the entry's length.
    async fn read_size(&self, key: &Digest, index_len: u64) -> Result<u64, Error> {
        let raw = self
            .index
            .get(key, 0, Some(INDEX_HEADER_LEN as u64))
            .await?;
        let raw = stream::collect(raw, INDEX_HEADER_LEN).await?;
        let header = Header::parse(key, &raw)?;
        if header.entries_len() + INDEX_HEADER_LEN as u64 != index_len {
            return Err(corrupt(
                key,
                format!(
                    "{} chunks do not fit an index of {index_len} bytes",
                    header.count
                ),
            ));
        }
        Ok(header.total)
    }
}

/// A DATA_LOSS error naming the blob.
fn corrupt(key: &Digest, why: impl std::fmt::Display) -> Error {
    Error::data_loss(format!(
        "dedup store: index entry of {key} is damaged: {why}"
    ))
}

/// FastCDC with sizes checked once.
#[derive(Clone, Copy)]
struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Chunker {
    fn new(min: u64, avg: u64, max: u64) -> Result<Chunker, Error> {
        let within = |v: u64, lo: u32, hi: u32| (u64::from(lo)..=u64::from(hi)).contains(&v);
        if !within(min, cdc::MINIMUM_MIN, cdc::MINIMUM_MAX)
            || !within(avg, cdc::AVERAGE_MIN, cdc::AVERAGE_MAX)
            || !within(max, cdc::MAXIMUM_MIN, cdc::MAXIMUM_MAX)
            || min > avg
            || avg > max
        {
            return Err(Error::invalid_argument(format!(
                "dedup store: chunk sizes min_size {min}, normal_size {avg}, max_size {max} are not \
                 accepted; expected min_size in 64 B..1 MiB, normal_size in 256 B..4 MiB, max_size \
                 in 1 KiB..16 MiB, and min_size <= normal_size <= max_size"
            )));
        }
        // The same masks `fastcdc::v2020::FastCDC::new` derives (normalization level 1). All
        // three sizes fit in u32 (checked above), and log2 of 256..4 MiB is 8..22, so both mask
        // indexes are within the 26-entry table.
        let bits = cdc::logarithm2(avg as u32);
        let level = cdc::Normalization::Level1.bits();
        Ok(Chunker {
            min: min as usize,
            avg: avg as usize,
            max: max as usize,
            mask_s: cdc::MASKS[(bits + level) as usize],
            mask_l: cdc::MASKS[(bits - level) as usize],
        })
    }

    /// Length of the first chunk of `data`, which is either at least `max` bytes long or the
    /// rest of the body: FastCDC looks at no more than `max` bytes, so the cut does not depend
    /// on how the body was streamed.
    fn first_len(&self, data: &[u8]) -> usize {
        let (_, n) = cdc::cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n.clamp(1, data.len())
    }

    /// Cuts every chunk whose end is decided, hashing each; returns them and the undecided rest
    /// (shorter than `max`, or empty when `last`).
    fn split(
        &self,
        function: DigestFunction,
        mut window: Bytes,
        last: bool,
    ) -> (Vec<(Digest, Bytes)>, Bytes) {
        let mut out = vec![];
        while !window.is_empty() && (last || window.len() >= self.max) {
            let chunk = window.split_to(self.first_len(&window));
            out.push((function.compute(&chunk), chunk));
        }
        (out, window)
    }
}

struct Header {
    total: u64,
    count: u32,
    hash_len: u32,
}

impl Header {
    fn parse(key: &Digest, raw: &[u8]) -> Result<Header, Error> {
        if raw.len() < INDEX_HEADER_LEN || &raw[0..4] != INDEX_MAGIC {
            return Err(corrupt(key, "no CDX1 header"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let mut total = [0u8; 8];
        total.copy_from_slice(&raw[4..12]);
        let header = Header {
            total: u64::from_le_bytes(total),
            count: u32_at(12),
            hash_len: u32_at(16),
        };
        let want = key.function().hash_len();
        if header.hash_len as usize != want {
            return Err(corrupt(
                key,
                format!(
                    "chunk hashes of {} bytes, {} hashes have {want}",
                    header.hash_len,
                    key.function()
                ),
            ));
        }
        Ok(header)
    }

    fn entries_len(&self) -> u64 {
        u64::from(self.count) * (u64::from(self.hash_len) + 4)
    }
}

/// A blob's chunks, in order.
struct Index {
    total: u64,
    chunks: Vec<Digest>,
}

impl Index {
    fn encode(key: &Digest, chunks: &[Digest]) -> Result<Bytes, Error> {
        let hash_len = key.function().hash_len();
        let len = INDEX_HEADER_LEN + chunks.len() * (hash_len + 4);
        let count = u32::try_from(chunks.len())
            .ok()
            .filter(|_| len <= MAX_INDEX_BYTES);
        let Some(count) = count else {
            return Err(Error::resource_exhausted(format!(
                "dedup store: {key} splits into {} chunks, more than an index entry holds; raise the chunk sizes",
                chunks.len()
            )));
        };
        let mut out = BytesMut::with_capacity(len);
        out.extend_from_slice(INDEX_MAGIC);
        out.put_u64_le(chunks.iter().map(|c| c.size()).sum());
        out.put_u32_le(count);
        out.put_u32_le(hash_len as u32);
        for c in chunks {
            out.extend_from_slice(c.hash());
            // Chunks are at most 16 MiB (FastCDC's largest max_size).
            out.put_u32_le(c.size() as u32);
        }
        Ok(out.freeze())
    }

    fn decode(key: &Digest, raw: &[u8]) -> Result<Index, Error> {
        let header = Header::parse(key, raw)?;
        let entries = &raw[INDEX_HEADER_LEN..];
        if entries.len() as u64 != header.entries_len() {
            return Err(corrupt(
                key,
                format!(
                    "{} chunks do not fit an index of {} bytes",
                    header.count,
                    raw.len()
                ),
            ));
        }
        let hash_len = header.hash_len as usize;
        let mut chunks = Vec::with_capacity(header.count as usize);
        let mut total: u64 = 0;
        for entry in entries.chunks_exact(hash_len + 4) {
            let s = &entry[hash_len..];
            let size = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            if size == 0 || size > cdc::MAXIMUM_MAX {
                return Err(corrupt(key, format!("chunk of {size} bytes")));
            }
            total += u64::from(size);
            chunks.push(Digest::new(
                key.function(),
                &entry[..hash_len],
                u64::from(size),
            ));
        }
        if total != header.total {
            return Err(corrupt(
                key,
                format!(
                    "chunks add up to {total} bytes, the header says {}",
                    header.total
                ),
            ));
        }
        Ok(Index { total, chunks })
    }
}

/// Stores a chunk unless the content store already has it.
async fn store_chunk(content: StoreRef, chunk: Digest, data: Bytes) -> Result<(), Error> {
    if content.has(&chunk).await?.is_some() {
        return Ok(());
    }
    content.put(&chunk, stream::once(data)).await
}

/// Waits for one upload and passes on its error.
async fn join_one(uploads: &mut JoinSet<Result<(), Error>>, key: &Digest) -> Result<(), Error> {
    match uploads.join_next().await {
        None | Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(e.context(format!("dedup store: storing a chunk of {key}"))),
        Some(Err(e)) => Err(Error::internal(format!(
            "dedup store: a chunk upload of {key} failed: {e}"
        ))),
    }
}

/// Reads `len` bytes of a chunk from `offset`.
async fn fetch(
    content: StoreRef,
    blob: Digest,
    chunk: Digest,
    offset: u64,
    len: u64,
) -> Result<Bytes, Error> {
    let what = || format!("dedup store: reading chunk {chunk} of {blob}");
    // The whole chunk, so that its hash is checked before any of it is served: a chunk that is
    // not what its key says (damaged in the backend, or overwritten by another store that
    // shares its place) is DATA_LOSS, never wrong bytes.
    let body = content
        .get(&chunk, 0, None)
        .await
        .map_err(|e| e.context(what()))?;
    // Chunks are at most 16 MiB (checked when the index is decoded).
    let data = stream::collect(body, chunk.size() as usize)
        .await
        .map_err(|e| e.context(what()))?;
    if data.len() as u64 != chunk.size() {
        return Err(Error::data_loss(format!(
            "{}: got {} bytes, expected {}",
            what(),
            data.len(),
            chunk.size()
        )));
    }
    if chunk.function().compute(&data) != chunk {
        return Err(Error::data_loss(format!(
            "{}: its bytes do not hash to its key (damaged in the content store, or \
             overwritten by a store that shares its place)",
            what()
        )));
    }
    let end = offset.saturating_add(len).min(chunk.size());
    Ok(data.slice(offset.min(end) as usize..end as usize))
}

#[async_trait]
impl Store for DedupStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let index_lens = self.index.has_many(keys).await?;
        let lookups: Vec<(Digest, Option<u64>)> = keys.iter().copied().zip(index_lens).collect();
        futures::stream::iter(lookups)
            .map(|(key, index_len)| self.blob_size(key, index_len))
            .buffered(HEADER_READS_IN_FLIGHT)
            .try_collect()
            .await
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let index = self.read_index(key).await?;
        let (start, len) = check_range(key, index.total, offset, length)?;
        let end = start + len;
        let mut parts = vec![];
        let mut pos = 0;
        for chunk in index.chunks {
            let (from, to) = (pos, pos + chunk.size());
            pos = to;
            if to <= start {
                continue;
            }
            if from >= end {
                break;
            }
            let lo = start.max(from) - from;
            let hi = end.min(to) - from;
            parts.push((chunk, lo, hi - lo));
        }
        let content = self.content.clone();
        let blob = *key;
        Ok(futures::stream::iter(parts)
            .map(move |(chunk, lo, n)| fetch(content.clone(), blob, chunk, lo, n))
            .buffered(self.max_fetch)
            .boxed())
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let function = key.function();
        let mut pending = BytesMut::new();
        let mut chunks: Vec<Digest> = vec![];
        // Dropping the set (on an error or a cancelled put) aborts the uploads in flight.
        let mut uploads = JoinSet::new();
        let mut ended = false;
        while !ended {
            match body.next().await {
                Some(data) => {
                    pending.extend_from_slice(&data?);
                    if pending.len() < self.chunker.max {
                        continue;
                    }
                }
                None => ended = true,
            }
            if pending.is_empty() {
                continue;
            }
            let window = pending.split().freeze();
            let chunker = self.chunker;
            let (ready, rest) =
                tokio::task::spawn_blocking(move || chunker.split(function, window, ended))
                    .await
                    .map_err(|e| {
                        Error::internal(format!("dedup store: chunking {key} failed: {e}"))
                    })?;
            pending.extend_from_slice(&rest);
            for (chunk, data) in ready {
                chunks.push(chunk);
                while uploads.len() >= UPLOADS_IN_FLIGHT {
                    join_one(&mut uploads, key).await?;
                }
                uploads.spawn(store_chunk(self.content.clone(), chunk, data));
            }
        }
        while !uploads.is_empty() {
            join_one(&mut uploads, key).await?;
        }
        let index = Index::encode(key, &chunks)?;
        self.index.put(key, stream::once(index)).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper(
            "dedup",
            vec![
                ("index_store", self.index.info()),
                ("content_store", self.content.info()),
            ],
        )
    }

    async fn health(&self) -> Health {
        match self.index.health().await {
            Health::Ok => self.content.health().await,
            bad => bad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::testutil;
    use cairn_config::stores::StoreSpec;
    use cairn_config::ByteSize;

    struct Fixture {
        store: DedupStore,
        index: StoreRef,
        content: Arc<MemoryStore>,
    }

    /// Small chunks (2 / 8 / 32 KiB), so that test blobs split into many.
    fn fixture() -> Fixture {
        let index: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let content = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = Cfg {
            index_store: StoreSpec::Noop(Default::default()),
            content_store: StoreSpec::Noop(Default::default()),
            min_size: Some(ByteSize(2 * 1024)),
            normal_size: Some(ByteSize(8 * 1024)),
            max_size: Some(ByteSize(32 * 1024)),
            max_concurrent_fetch_per_get: Some(3),
        };
        let store = DedupStore::new(&cfg, index.clone(), content.clone()).unwrap();
        Fixture {
            store,
            index,
            content,
        }
    }

    /// Index and content in one store (a shared bucket prefix): a blob of one chunk and its
    /// index entry have one key. A clobbered chunk is DATA_LOSS, never wrong bytes; a chunk
    /// damaged in the content store too.
    #[tokio::test]
    async fn a_chunk_that_is_not_what_its_key_says_is_data_loss_never_served() {
        let shared = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = Cfg {
            index_store: StoreSpec::Noop(Default::default()),
            content_store: StoreSpec::Noop(Default::default()),
            min_size: Some(ByteSize(2 * 1024)),
            normal_size: Some(ByteSize(8 * 1024)),
            max_size: Some(ByteSize(32 * 1024)),
            max_concurrent_fetch_per_get: Some(3),
        };
        let store = DedupStore::new(&cfg, shared.clone(), shared.clone()).unwrap();
        let blob = Bytes::from(vec![7u8; 1000]);
        let key = DigestFunction::Sha256.compute(&blob);
        store.put_bytes(&key, blob.clone()).await.unwrap();
        // The index entry (written last) replaced the chunk under the same key; or the chunk
        // replaced the index: either way no wrong bytes come out.
        match store.get_all(&key, 1 << 20).await {
            Ok(got) => assert_eq!(got, blob),
            Err(e) => assert!(
                matches!(
                    e.code,
                    cairn_core::Code::DataLoss | cairn_core::Code::NotFound
                ),
                "{e}"
            ),
        }

        let f = fixture();
        let data = testutil::data(100_000, 5);
        let key = DigestFunction::Sha256.compute(&data);
        f.store.put_bytes(&key, data.clone()).await.unwrap();
        // Damage one chunk in place: same key, same length, other bytes.
        let index = f.index.get_all(&key, 1 << 20).await.unwrap();
        let chunks = Index::decode(&key, &index).unwrap().chunks;
        let victim = chunks[1];
        let mut bad = f.content.get_all(&victim, 1 << 20).await.unwrap().to_vec();
        bad[0] ^= 1;
        f.content.put_bytes(&victim, bad.into()).await.unwrap();
        let e = f.store.get_all(&key, 1 << 20).await.unwrap_err();
        assert_eq!(e.code, cairn_core::Code::DataLoss, "{e}");
        assert!(e.message.contains("do not hash to its key"), "{e}");
        // A range inside an intact chunk still reads.
        let first = chunks[0].size();
        let part = f.store.get(&key, 0, Some(first.min(100))).await.unwrap();
        let part = cairn_core::stream::collect(part, 1 << 20).await.unwrap();
        assert_eq!(part, data.slice(0..first.min(100) as usize));
    }

    fn uneven(data: &Bytes, step: usize) -> BlobStream {
        let mut chunks = vec![];
        let mut rest = data.clone();
        let mut n = step;
        while !rest.is_empty() {
            let take = rest.len().min(n);
            chunks.push(Ok(rest.split_to(take)));
            n = n * 2 + 1;
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
    async fn dedup_store_contract() {
        testutil::check_store_contract(&fixture().store).await;
        let index: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let content: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let cfg = Cfg {
            index_store: StoreSpec::Noop(Default::default()),
            content_store: StoreSpec::Noop(Default::default()),
            min_size: None,
            normal_size: None,
            max_size: None,
            max_concurrent_fetch_per_get: None,
        };
        testutil::check_store_contract(&DedupStore::new(&cfg, index, content).unwrap()).await;
    }

    #[tokio::test]
    async fn blobs_sharing_content_share_chunks() {
        let f = fixture();
        let a = testutil::data(400_000, 7);
        let mut b = testutil::data(1000, 8).to_vec();
        b.extend_from_slice(&a[..300_000]);
        b.extend_from_slice(&testutil::data(5000, 9));
        b.extend_from_slice(&a[300_000..]);
        let b = Bytes::from(b);
        let (da, db) = (
            DigestFunction::Sha256.compute(&a),
            DigestFunction::Sha256.compute(&b),
        );
        f.store.put(&da, stream::once(a.clone())).await.unwrap();
        let after_a = f.content.info().size_bytes.unwrap();
        assert_eq!(after_a, 400_000);
        f.store.put(&db, stream::once(b.clone())).await.unwrap();
        let added = f.content.info().size_bytes.unwrap() - after_a;
        // Only the chunks around the two edits are new.
        assert!(
            added < 100_000,
            "the second blob added {added} bytes of chunks"
        );
        assert_eq!(
            f.store.has_many(&[da, db]).await.unwrap(),
            vec![Some(400_000), Some(406_000)]
        );
        assert_eq!(f.store.get_all(&da, usize::MAX).await.unwrap(), a);
        assert_eq!(f.store.get_all(&db, usize::MAX).await.unwrap(), b);
    }

    #[tokio::test]
    async fn chunking_does_not_depend_on_how_the_body_is_streamed() {
        let f = fixture();
        let data = testutil::data(200_000, 3);
        let k1 = DigestFunction::Sha256.compute(&data);
        let k2 = DigestFunction::Blake3.compute(&data);
        let k3 = DigestFunction::Sha256.compute(b"same body, another name");
        f.store.put(&k1, stream::once(data.clone())).await.unwrap();
        f.store.put(&k3, uneven(&data, 1)).await.unwrap();
        let i1 = f.index.get_all(&k1, usize::MAX).await.unwrap();
        let i3 = f.index.get_all(&k3, usize::MAX).await.unwrap();
        assert_eq!(i1, i3);
        // Another digest function names chunks by its own hashes.
        f.store.put(&k2, uneven(&data, 100)).await.unwrap();
        let i2 = Index::decode(&k2, &f.index.get_all(&k2, usize::MAX).await.unwrap()).unwrap();
        assert!(i2
            .chunks
            .iter()
            .all(|c| c.function() == DigestFunction::Blake3));
        assert_eq!(f.store.get_all(&k2, usize::MAX).await.unwrap(), data);
    }

    #[tokio::test]
    async fn ranged_reads_fetch_only_what_they_need() {
        let f = fixture();
        let data = testutil::data(150_000, 5);
        let d = DigestFunction::Sha256.compute(&data);
        f.store.put(&d, uneven(&data, 777)).await.unwrap();
        let index = Index::decode(&d, &f.index.get_all(&d, usize::MAX).await.unwrap()).unwrap();
        assert!(index.chunks.len() > 5, "{} chunks", index.chunks.len());
        let first = index.chunks[0].size();
        for (offset, len) in [
            (0, Some(1)),
            (first - 1, Some(2)),
            (first, Some(first)),
            (1234, Some(100_000)),
            (149_999, None),
            (150_000, None),
            (5000, Some(0)),
        ] {
            let got = read(&f.store, &d, offset, len).await.unwrap();
            let end = len.map_or(data.len(), |l| (offset + l).min(150_000) as usize);
            assert_eq!(
                got,
                data.slice(offset as usize..end),
                "offset {offset} length {len:?}"
            );
        }
        assert_eq!(
            read(&f.store, &d, 150_001, None).await.unwrap_err().code,
            Code::OutOfRange
        );

        // A read of the first chunk works even when the others are gone.
        let lone = Arc::new(MemoryStore::new(&Default::default()));
        let head = data.slice(..first as usize);
        lone.put_bytes(&index.chunks[0], head.clone())
            .await
            .unwrap();
        let partial = DedupStore {
            index: f.index.clone(),
            content: lone,
            chunker: f.store.chunker,
            max_fetch: 1,
        };
        assert_eq!(
            read(&partial, &d, 10, Some(first - 10)).await.unwrap(),
            head.slice(10..)
        );
        let err = read(&partial, &d, 0, None).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[tokio::test]
    async fn damaged_index_is_data_loss() {
        let f = fixture();
        let data = testutil::data(100_000, 6);
        let d = DigestFunction::Sha256.compute(&data);
        f.store.put_bytes(&d, data).await.unwrap();
        let good = f.index.get_all(&d, usize::MAX).await.unwrap();

        f.index
            .put_bytes(&d, Bytes::from_static(b"not an index"))
            .await
            .unwrap();
        assert_eq!(
            read(&f.store, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );
        assert_eq!(f.store.has(&d).await.unwrap(), None);

        f.index
            .put_bytes(&d, good.slice(..good.len() - 1))
            .await
            .unwrap();
        assert_eq!(
            read(&f.store, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );
        assert_eq!(f.store.has(&d).await.unwrap(), None);

        let mut bad = good.to_vec();
        bad[4] ^= 1; // total size
        f.index.put_bytes(&d, bad.into()).await.unwrap();
        assert_eq!(
            read(&f.store, &d, 0, None).await.unwrap_err().code,
            Code::DataLoss
        );
    }

    #[test]
    fn bad_chunk_sizes_are_rejected() {
        assert!(Chunker::new(64, 256, 1024).is_ok());
        assert!(Chunker::new(DEFAULT_MIN_SIZE, DEFAULT_NORMAL_SIZE, DEFAULT_MAX_SIZE).is_ok());
        assert!(Chunker::new(10, 256, 1024).is_err());
        assert!(Chunker::new(4096, 1024, 8192).is_err());
        assert!(Chunker::new(64, 256, 32 << 20).is_err());
    }
}
