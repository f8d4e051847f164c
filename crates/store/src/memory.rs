//! `memory`: blobs held as `Bytes` in an LRU index.
//!
//! A put collects the body into one buffer (bounded by the eviction policy, which is what a
//! memory store is for) and publishes it in one step, so readers never see half a blob. Reads
//! hand out slices of the same buffer: no copies.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use cairn_config::stores::MemoryStore as MemoryConfig;
use cairn_core::{stream, BlobStream, Digest, Error};
use futures::StreamExt;

use crate::eviction::EvictionMap;
use crate::{check_range, Store, StoreInfo};

pub struct MemoryStore {
    map: EvictionMap<Bytes>,
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
        let Some((data, size)) = self.map.get(key) else {
            return Err(Error::not_found(format!(
                "{key} is not in the memory store"
            )));
        };
        let (start, len) = check_range(key, size, offset, length)?;
        Ok(stream::once(
            data.slice(start as usize..(start + len) as usize),
        ))
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let mut first: Option<Bytes> = None;
        let mut buf: Option<BytesMut> = None;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            match (&mut first, &mut buf) {
                (None, _) => first = Some(chunk),
                (Some(f), None) => {
                    let mut b = BytesMut::with_capacity(f.len() + chunk.len());
                    b.extend_from_slice(f);
                    b.extend_from_slice(&chunk);
                    buf = Some(b);
                }
                (Some(_), Some(b)) => b.extend_from_slice(&chunk),
            }
        }
        let data = match (first, buf) {
            (_, Some(b)) => b.freeze(),
            (Some(f), None) => f,
            (None, None) => Bytes::new(),
        };
        let size = data.len() as u64;
        drop(self.map.insert(*key, data, size));
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "memory",
            size_bytes: Some(self.map.total_bytes()),
            entries: Some(self.map.len()),
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
