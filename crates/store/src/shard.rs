//! `shard`: spreads keys over several stores by weight.
//!
//! Each key goes to exactly one store, chosen by weighted rendezvous (highest-random-weight)
//! hashing of the digest's hash bytes: every store `i` draws a pseudo-random score from the
//! first 8 bytes of the hash and `i`, scaled by its weight (`weight / -ln(u)`, `u` uniform in
//! (0, 1)), and the highest score wins. So:
//! - the choice is stable: the same key always maps to the same store, across restarts and
//!   versions (the hash function below is part of the on-disk layout: do not change it);
//! - a store receives keys in proportion to its weight; a store of weight 0 receives none (a
//!   way to drain it), as long as another store has a positive weight;
//! - adding or removing a store moves only the keys that land on it, not the others. Stores are
//!   identified by their position in the list, so reordering the list moves keys.
//!
//! The size is not part of the hash: a key's shard depends only on its hash bytes.

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};

use crate::{Health, Store, StoreInfo, StoreRef};

/// Builds a shard store over `stores`, each with its weight.
pub fn build(stores: Vec<(StoreRef, u64)>) -> Result<StoreRef, Error> {
    Ok(std::sync::Arc::new(ShardStore::new(stores)?))
}

pub struct ShardStore {
    stores: Vec<(StoreRef, u64)>,
}

impl ShardStore {
    /// Fails with INVALID_ARGUMENT when the list is empty or every weight is 0.
    pub fn new(stores: Vec<(StoreRef, u64)>) -> Result<ShardStore, Error> {
        if stores.is_empty() {
            return Err(Error::invalid_argument(
                "shard store: `stores` is empty; list at least one store",
            ));
        }
        if stores.iter().all(|(_, w)| *w == 0) {
            return Err(Error::invalid_argument(
                "shard store: every weight is 0; give at least one store a weight of 1 or more",
            ));
        }
        Ok(ShardStore { stores })
    }

    /// Index of the store that holds `key`.
    fn shard_of(&self, key: &Digest) -> usize {
        let mut prefix = [0u8; 8];
        let hash = key.hash();
        let n = hash.len().min(8);
        prefix[..n].copy_from_slice(&hash[..n]);
        let x = u64::from_le_bytes(prefix);
        let mut best = 0;
        let mut best_score = f64::NEG_INFINITY;
        for (i, (_, weight)) in self.stores.iter().enumerate() {
            if *weight == 0 {
                continue;
            }
            let h = splitmix64(x ^ splitmix64(i as u64 + 1));
            // 53 random bits into (0, 1): never 0, so the logarithm is finite and negative.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = *weight as f64 / -u.ln();
            if score > best_score {
                best = i;
                best_score = score;
            }
        }
        best
    }

    fn store_for(&self, key: &Digest) -> &StoreRef {
        &self.stores[self.shard_of(key)].0
    }
}

/// The splitmix64 finalizer: a fixed, well-mixed 64-bit permutation.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[async_trait]
impl Store for ShardStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let mut groups: Vec<(Vec<usize>, Vec<Digest>)> = vec![(vec![], vec![]); self.stores.len()];
        for (i, key) in keys.iter().enumerate() {
            let g = &mut groups[self.shard_of(key)];
            g.0.push(i);
            g.1.push(*key);
        }
        let lookups = groups
            .iter()
            .enumerate()
            .filter(|(_, (_, ks))| !ks.is_empty())
            .map(|(s, (idx, ks))| async move {
                let sizes = self.stores[s].0.has_many(ks).await?;
                Ok::<_, Error>((idx, sizes))
            });
        let mut out = vec![None; keys.len()];
        for (idx, sizes) in futures::future::try_join_all(lookups).await? {
            for (i, size) in idx.iter().zip(sizes) {
                out[*i] = size;
            }
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        self.store_for(key).get(key, offset, length).await
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        self.store_for(key).put(key, body).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper(
            "shard",
            self.stores
                .iter()
                .map(|(s, _)| ("stores", s.info()))
                .collect(),
        )
    }

    async fn health(&self) -> Health {
        for (store, _) in &self.stores {
            if let Health::Failed(why) = store.health().await {
                return Health::Failed(why);
            }
        }
        Health::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;
    use crate::testutil;
    use crate::StoreExt;
    use cairn_core::DigestFunction;
    use std::sync::Arc;

    fn memory() -> StoreRef {
        Arc::new(MemoryStore::new(&Default::default()))
    }

    #[tokio::test]
    async fn shard_store_contract() {
        let s = ShardStore::new(vec![(memory(), 1), (memory(), 2), (memory(), 1)]).unwrap();
        testutil::check_store_contract(&s).await;
    }

    #[tokio::test]
    async fn spreads_keys_by_weight_and_finds_each() {
        let shards = [memory(), memory(), memory()];
        let weights = [1u64, 1, 2];
        let s = ShardStore::new(shards.iter().cloned().zip(weights).collect()).unwrap();
        let n = 4000;
        let keys: Vec<Digest> = (0..n as u32)
            .map(|i| DigestFunction::Sha256.compute(&i.to_le_bytes()))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            s.put_bytes(k, bytes::Bytes::from((i as u32).to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
        let total: u64 = weights.iter().sum();
        for (shard, w) in shards.iter().zip(weights) {
            let held = shard.info().entries.unwrap() as f64;
            let want = n as f64 * w as f64 / total as f64;
            assert!(
                (held - want).abs() < want * 0.15,
                "shard of weight {w} holds {held} keys, expected about {want}"
            );
        }
        let sizes = s.has_many(&keys).await.unwrap();
        assert!(sizes.iter().all(|s| *s == Some(4)));
        for (i, k) in keys.iter().enumerate().take(100) {
            let got = s.get_all(k, 16).await.unwrap();
            assert_eq!(&got[..], &(i as u32).to_le_bytes());
        }
    }

    #[tokio::test]
    async fn routing_is_stable_and_moves_few_keys_when_a_shard_is_added() {
        let three = ShardStore::new(vec![(memory(), 1), (memory(), 1), (memory(), 1)]).unwrap();
        let again = ShardStore::new(vec![(memory(), 1), (memory(), 1), (memory(), 1)]).unwrap();
        let four = ShardStore::new(vec![
            (memory(), 1),
            (memory(), 1),
            (memory(), 1),
            (memory(), 1),
        ])
        .unwrap();
        let keys: Vec<Digest> = (0..2000u32)
            .map(|i| DigestFunction::Blake3.compute(&i.to_le_bytes()))
            .collect();
        let mut moved = 0;
        for k in &keys {
            assert_eq!(three.shard_of(k), again.shard_of(k));
            let to = four.shard_of(k);
            if to != three.shard_of(k) {
                assert_eq!(to, 3, "a key moved between two old shards");
                moved += 1;
            }
        }
        // About a quarter of the keys move to the new shard.
        assert!((350..650).contains(&moved), "{moved} of 2000 keys moved");
    }

    #[tokio::test]
    async fn zero_weight_gets_nothing_and_bad_lists_are_rejected() {
        let drained = memory();
        let s = ShardStore::new(vec![(memory(), 1), (drained.clone(), 0)]).unwrap();
        for i in 0..200u32 {
            let k = DigestFunction::Sha256.compute(&i.to_le_bytes());
            s.put_bytes(&k, bytes::Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        assert_eq!(drained.info().entries, Some(0));
        assert!(build(vec![]).is_err());
        assert!(build(vec![(memory(), 0)]).is_err());
    }
}
