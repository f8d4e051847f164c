//! `memory`: blobs held in an LRU index as the list of `Bytes` chunks they arrived in.
//!
//! A put keeps the incoming chunks as they are (no copy, no reallocation as the blob grows)
//! and publishes the list in one map insert, so readers never see half a blob. Reads hand out
//! slices of the same chunks. The eviction policy bounds the total.

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
}

impl MemoryStore {
    pub fn new(cfg: &MemoryConfig) -> MemoryStore {
        MemoryStore {
            map: EvictionMap::new(cfg.eviction_policy.as_ref()),
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
}
