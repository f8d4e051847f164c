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

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::MemoryStore as MemoryConfig;
use cairn_core::{BlobStream, Digest, Error};
use futures::StreamExt;

use crate::eviction::EvictionMap;
use crate::{check_range, Store, StoreInfo};

pub struct MemoryStore {
    map: EvictionMap<Arc<Vec<Bytes>>>,
    max_bytes: u64,
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
        Ok(keys.iter().map(|k| self.map.size_of(k)).collect())
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let Some((chunks, size)) = self.map.get(key) else {
            return Err(Error::not_found(format!(
                "{key} is not in the memory store"
            )));
        };
        let (start, len) = check_range(key, size, offset, length)?;
        Ok(futures::stream::iter(slices(&chunks, start, len)).boxed())
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let mut chunks = Vec::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if !chunk.is_empty() {
                size += chunk.len() as u64;
                if size > self.max_bytes {
                    return Err(Error::resource_exhausted(format!(
                        "{key}: the blob is larger than this memory store's max_bytes ({} bytes); storing it would evict everything else",
                        self.max_bytes
                    )));
                }
                chunks.push(chunk);
            }
        }
        drop(self.map.insert(*key, Arc::new(chunks), size));
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "memory",
            size_bytes: Some(self.map.total_bytes()),
            entries: Some(self.map.len()),
            evictions: Some(self.map.evictions()),
            children: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

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

    #[test]
    fn a_store_without_max_bytes_is_still_bounded() {
        let store = MemoryStore::new(&MemoryConfig::default());
        assert!(store.max_bytes > 0);
        assert_eq!(store.max_bytes, default_max_bytes());
    }
}
