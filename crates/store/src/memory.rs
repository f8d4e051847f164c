//! `memory`: blobs held in an LRU index as the list of `Bytes` chunks they arrived in.
//!
//! A put keeps the incoming chunks as they are (no copy, no reallocation as the blob grows)
//! and publishes the list in one map insert, so readers never see half a blob. Reads hand out
//! slices of the same chunks. The eviction policy bounds the total.
//!
//! A memory store is always bounded: without `eviction_policy.max_bytes` it holds at most a
//! quarter of the machine's physical memory ([`default_max_bytes`]). A blob larger than the
//! bound is refused with RESOURCE_EXHAUSTED as it arrives, instead of evicting everything else
//! to make room for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::MemoryStore as MemoryConfig;
use cairn_core::{BlobStream, Digest, Error};
use futures::StreamExt;

use crate::eviction::EvictionMap;
use crate::{check_range, ReadCounter, Store, StoreInfo};

pub struct MemoryStore {
    map: EvictionMap<Arc<Vec<Bytes>>>,
    max_bytes: u64,
    /// Bytes held by puts still in progress (not yet in `map`): bounded by `max_bytes` too, so
    /// that many slow or abandoned uploads cannot hold more memory than the store may.
    pending: AtomicU64,
    reads: ReadCounter,
}

/// One put's share of `MemoryStore::pending`, given back when the put ends, however it ends.
struct Pending<'a> {
    total: &'a AtomicU64,
    bytes: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The bound of a memory store configured without `max_bytes`: a quarter of the physical
/// memory (`MemTotal` of `/proc/meminfo`), or 1 GiB where that cannot be read.
pub fn default_max_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(1 << 30, |kib| kib.saturating_mul(1024) / 4)
}

impl MemoryStore {
    pub fn new(cfg: &MemoryConfig) -> MemoryStore {
        let mut policy = cfg.eviction_policy.clone().unwrap_or_default();
        if policy.max_bytes.0 == 0 {
            policy.max_bytes.0 = default_max_bytes();
        }
        MemoryStore {
            map: EvictionMap::new(Some(&policy)),
            max_bytes: policy.max_bytes.0,
            pending: AtomicU64::new(0),
            reads: ReadCounter::default(),
        }
    }

    /// Entries evicted so far.
    pub fn evictions(&self) -> u64 {
        self.map.evictions()
    }
}

/// The slices of `chunks` that cover `start..start + len`.
fn slices(chunks: &[Bytes], mut start: u64, mut len: u64) -> Vec<Result<Bytes, Error>> {
    let mut out = Vec::new();
    for c in chunks {
        if len == 0 {
            break;
        }
        let n = c.len() as u64;
        if start >= n {
            start -= n;
            continue;
        }
        let take = (n - start).min(len);
        out.push(Ok(c.slice(start as usize..(start + take) as usize)));
        len -= take;
        start = 0;
    }
    out
}

#[async_trait]
impl Store for MemoryStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let sizes: Vec<Option<u64>> = keys.iter().map(|k| self.map.size_of(k)).collect();
        self.reads.count_lookup(&sizes);
        Ok(sizes)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let Some((chunks, size)) = self.map.get(key) else {
            self.reads.count(0, 1);
            return Err(Error::not_found(format!(
                "{key} is not in the memory store"
            )));
        };
        self.reads.count(1, 0);
        let (start, len) = check_range(key, size, offset, length)?;
        Ok(futures::stream::iter(slices(&chunks, start, len)).boxed())
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let mut chunks = Vec::new();
        // The bytes of this put held so far, counted in `pending` until it ends either way.
        let mut held = Pending {
            total: &self.pending,
            bytes: 0,
        };
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if !chunk.is_empty() {
                let n = chunk.len() as u64;
                if held.bytes + n > self.max_bytes {
                    return Err(Error::resource_exhausted(format!(
                        "{key}: the blob is larger than this memory store's max_bytes ({} bytes); storing it would evict everything else",
                        self.max_bytes
                    )));
                }
                let before = self.pending.fetch_add(n, Ordering::Relaxed);
                held.bytes += n;
                if before + n > self.max_bytes {
                    return Err(Error::resource_exhausted(format!(
                        "{key}: uploads in progress to this memory store already hold {before} bytes; with this one they would pass its max_bytes ({}); retry later",
                        self.max_bytes
                    )));
                }
                chunks.push(chunk);
            }
        }
        let size = held.bytes;
        drop(held);
        drop(self.map.insert(*key, Arc::new(chunks), size));
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "memory",
            size_bytes: Some(self.map.total_bytes()),
            entries: Some(self.map.len()),
            evictions: Some(self.map.evictions()),
            reads: Some(self.reads.snapshot()),
            detail: None,
            index: None,
            children: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    #[tokio::test]
    async fn reads_are_counted_as_hits_and_misses() {
        use crate::{Reads, StoreExt};
        let store = MemoryStore::new(&MemoryConfig::default());
        let f = cairn_core::DigestFunction::Sha256;
        let (here, absent) = (f.compute(b"here"), f.compute(b"absent"));
        store
            .put_bytes(&here, Bytes::from_static(b"here"))
            .await
            .unwrap();
        store.has_many(&[here, absent, absent]).await.unwrap();
        store.get_all(&here, 100).await.unwrap();
        assert!(store.get(&absent, 0, None).await.is_err());
        let reads = store.info().reads.unwrap();
        assert_eq!(
            reads,
            Reads {
                hits: 2,
                misses: 3,
                errors: 0
            }
        );
        assert_eq!(reads.hit_rate(), Some(0.4));
        assert_eq!(Reads::default().hit_rate(), None);
    }

    #[tokio::test]
    async fn memory_store_contract() {
        testutil::check_store_contract(&MemoryStore::new(&MemoryConfig::default())).await;
    }

    #[tokio::test]
    async fn a_blob_larger_than_max_bytes_is_refused_and_evicts_nothing() {
        use crate::StoreExt;
        let cfg = MemoryConfig {
            eviction_policy: Some(cairn_config::stores::EvictionPolicy {
                max_bytes: cairn_config::ByteSize(1000),
                ..Default::default()
            }),
        };
        let store = MemoryStore::new(&cfg);
        let small = Bytes::from_static(b"kept");
        let small_key = cairn_core::DigestFunction::Sha256.compute(&small);
        store.put_bytes(&small_key, small.clone()).await.unwrap();
        let big = Bytes::from(vec![7u8; 1001]);
        let big_key = cairn_core::DigestFunction::Sha256.compute(&big);
        let err = store.put_bytes(&big_key, big).await.unwrap_err();
        assert_eq!(err.code, cairn_core::Code::ResourceExhausted, "{err}");
        assert!(err.to_string().contains("max_bytes"), "{err}");
        assert_eq!(store.get_all(&small_key, 100).await.unwrap(), small);
        assert!(store.has(&big_key).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn puts_in_progress_together_hold_at_most_max_bytes() {
        let cfg = MemoryConfig {
            eviction_policy: Some(cairn_config::stores::EvictionPolicy {
                max_bytes: cairn_config::ByteSize(1000),
                ..Default::default()
            }),
        };
        let store = Arc::new(MemoryStore::new(&cfg));
        // Three uploads of 400 bytes each, each stuck after its first 400 bytes.
        let mut stuck = Vec::new();
        let mut results = Vec::new();
        for i in 0..3u8 {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Error>>(1);
            let body =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
                )
                .boxed();
            let key = cairn_core::DigestFunction::Sha256.compute(&[i; 800]);
            let s = store.clone();
            results.push(tokio::spawn(async move { s.put(&key, body).await }));
            tx.send(Ok(Bytes::from(vec![i; 400]))).await.unwrap();
            stuck.push(tx);
        }
        // The third pushed the pending total past 1000: it fails at once.
        let third = results.pop().unwrap();
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), third)
            .await
            .expect("the third put did not fail at once")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, cairn_core::Code::ResourceExhausted, "{e}");
        assert!(e.message.contains("in progress"), "{e}");
        // The stuck ones give their bytes back when their clients go away.
        drop(stuck);
        for r in results {
            let _ = r.await;
        }
        assert_eq!(store.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_store_without_max_bytes_is_still_bounded() {
        let store = MemoryStore::new(&MemoryConfig::default());
        assert!(store.max_bytes > 0);
        assert_eq!(store.max_bytes, default_max_bytes());
    }
}
