//! `size_partitioning`: blobs smaller than `size` go to `lower_store`, the rest to
//! `upper_store`. The digest's size decides, so a key always maps to the same side.

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};

use crate::{Health, Store, StoreInfo, StoreRef};

pub struct SizePartitioningStore {
    size: u64,
    lower: StoreRef,
    upper: StoreRef,
}

impl SizePartitioningStore {
    pub fn new(size: u64, lower: StoreRef, upper: StoreRef) -> SizePartitioningStore {
        SizePartitioningStore { size, lower, upper }
    }

    fn side(&self, key: &Digest) -> &StoreRef {
        if key.size() < self.size {
            &self.lower
        } else {
            &self.upper
        }
    }
}

#[async_trait]
impl Store for SizePartitioningStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let (lo, hi): (Vec<(usize, Digest)>, Vec<(usize, Digest)>) = keys
            .iter()
            .copied()
            .enumerate()
            .partition(|(_, k)| k.size() < self.size);
        let lo_keys: Vec<Digest> = lo.iter().map(|x| x.1).collect();
        let hi_keys: Vec<Digest> = hi.iter().map(|x| x.1).collect();
        let (lo_r, hi_r) =
            futures::try_join!(self.lower.has_many(&lo_keys), self.upper.has_many(&hi_keys))?;
        let mut out = vec![None; keys.len()];
        for ((i, _), r) in lo.iter().zip(lo_r).chain(hi.iter().zip(hi_r)) {
            out[*i] = r;
        }
        Ok(out)
    }
    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        self.side(key).get(key, offset, length).await
    }
    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        self.side(key).put(key, body).await
    }
    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper(
            "size_partitioning",
            vec![
                ("lower_store", self.lower.info()),
                ("upper_store", self.upper.info()),
            ],
        )
    }
    async fn health(&self) -> Health {
        match self.lower.health().await {
            Health::Ok => self.upper.health().await,
            bad => bad,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::testutil;
    use crate::StoreExt;
    use std::sync::Arc;

    #[tokio::test]
    async fn routes_by_size_and_meets_contract() {
        let lower: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let upper: StoreRef = Arc::new(MemoryStore::new(&Default::default()));
        let s = SizePartitioningStore::new(2000, lower.clone(), upper.clone());
        testutil::check_store_contract(&s).await;
        let small = cairn_core::DigestFunction::Sha256.compute(&testutil::data(1000, 1));
        assert!(lower.has(&small).await.unwrap().is_some());
        assert!(upper.has(&small).await.unwrap().is_none());
    }
}
