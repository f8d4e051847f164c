//! `existence_cache`: remembers which keys the backend has, so that repeated `has_many` calls
//! (FindMissingBlobs) skip the backend.
//!
//! Positive answers only: a key the backend reported present, or that was put through this
//! store, is cached with its size in an [`EvictionMap`] bounded by `eviction_policy`; absent
//! keys are always asked again. An entry's size for the policy is the blob's size, so
//! `max_bytes` bounds the total size of the blobs vouched for; `max_count` bounds memory and
//! `max_seconds` how stale an answer may be.
//!
//! What it costs: a key the backend loses (evicted, deleted) behind this store's back is still
//! reported present until its entry is evicted or expires, or until a `get` of it returns
//! NOT_FOUND, which drops the entry. Put this in front of stores that do not lose blobs by
//! themselves, or bound the staleness with `max_seconds`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use cairn_config::stores::ExistenceCacheStore as Cfg;
use cairn_core::{BlobStream, Digest, Error};
use futures::StreamExt;

use crate::eviction::EvictionMap;
use crate::{Health, Store, StoreInfo, StoreRef};

/// Builds an existence cache in front of `backend`.
pub fn build(cfg: &Cfg, backend: StoreRef) -> Result<StoreRef, Error> {
    Ok(Arc::new(ExistenceCacheStore::new(cfg, backend)))
}

pub struct ExistenceCacheStore {
    backend: StoreRef,
    /// Digest -> size of the blobs known to be in the backend.
    known: Arc<EvictionMap<u64>>,
}

impl ExistenceCacheStore {
    pub fn new(cfg: &Cfg, backend: StoreRef) -> ExistenceCacheStore {
        ExistenceCacheStore {
            backend,
            known: Arc::new(EvictionMap::new(cfg.eviction_policy.as_ref())),
        }
    }

    /// Keys currently cached.
    pub fn cached(&self) -> u64 {
        self.known.len()
    }
}

#[async_trait]
impl Store for ExistenceCacheStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let mut out: Vec<Option<u64>> = keys.iter().map(|k| self.known.size_of(k)).collect();
        let (ask_idx, ask_keys): (Vec<usize>, Vec<Digest>) = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| out[*i].is_none())
            .map(|(i, k)| (i, *k))
            .unzip();
        if ask_keys.is_empty() {
            return Ok(out);
        }
        let sizes = self.backend.has_many(&ask_keys).await?;
        for ((i, key), size) in ask_idx.into_iter().zip(ask_keys).zip(sizes) {
            if let Some(size) = size {
                drop(self.known.insert(key, size, size));
            }
            out[i] = size;
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        match self.backend.get(key, offset, length).await {
            Ok(stream) => {
                // A blob that vanishes mid-read is forgotten too.
                let known = self.known.clone();
                let key = *key;
                Ok(stream
                    .inspect(move |chunk| {
                        if matches!(chunk, Err(e) if e.is_not_found()) {
                            known.remove(&key);
                        }
                    })
                    .boxed())
            }
            Err(e) => {
                if e.is_not_found() {
                    self.known.remove(key);
                }
                Err(e)
            }
        }
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        // A put replaces the blob: until it completes, the old size is no longer vouched for.
        self.known.remove(key);
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let body = body
            .inspect(move |chunk| {
                if let Ok(bytes) = chunk {
                    counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
            })
            .boxed();
        self.backend.put(key, body).await?;
        let size = seen.load(Ordering::Relaxed);
        drop(self.known.insert(*key, size, size));
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::wrapper("existence_cache", vec![("backend", self.backend.info())])
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
    use crate::StoreExt;
    use bytes::Bytes;
    use cairn_config::stores::EvictionPolicy;
    use cairn_core::DigestFunction;

    /// Passes calls through to a memory store, counting the keys asked of `has_many`.
    struct Counting {
        inner: MemoryStore,
        has_keys: AtomicU64,
    }

    impl Counting {
        fn new() -> Arc<Counting> {
            Arc::new(Counting {
                inner: MemoryStore::new(&Default::default()),
                has_keys: AtomicU64::new(0),
            })
        }
        fn asked(&self) -> u64 {
            self.has_keys.load(Ordering::Relaxed)
        }
    }

    #[async_trait]
    impl Store for Counting {
        async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
            self.has_keys
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            self.inner.has_many(keys).await
        }
        async fn get(
            &self,
            key: &Digest,
            offset: u64,
            length: Option<u64>,
        ) -> Result<BlobStream, Error> {
            self.inner.get(key, offset, length).await
        }
        async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
            self.inner.put(key, body).await
        }
        fn info(&self) -> StoreInfo {
            self.inner.info()
        }
    }

    fn cfg(policy: Option<EvictionPolicy>) -> Cfg {
        Cfg {
            backend: cairn_config::stores::StoreSpec::Noop(Default::default()),
            eviction_policy: policy,
        }
    }

    #[tokio::test]
    async fn existence_cache_contract() {
        let s =
            ExistenceCacheStore::new(&cfg(None), Arc::new(MemoryStore::new(&Default::default())));
        testutil::check_store_contract(&s).await;
    }

    #[tokio::test]
    async fn second_has_many_is_answered_from_the_cache() {
        let backend = Counting::new();
        let f = DigestFunction::Sha256;
        let (a, b, missing) = (f.compute(b"aaa"), f.compute(b"bb"), f.compute(b"nope"));
        // Written straight to the backend, so the cache learns of them only through has_many.
        backend
            .put_bytes(&a, Bytes::from_static(b"aaa"))
            .await
            .unwrap();
        backend
            .put_bytes(&b, Bytes::from_static(b"bb"))
            .await
            .unwrap();
        let s = ExistenceCacheStore::new(&cfg(None), backend.clone());

        let want = vec![Some(3), Some(2), None];
        assert_eq!(s.has_many(&[a, b, missing]).await.unwrap(), want);
        assert_eq!(backend.asked(), 3);
        assert_eq!(s.has_many(&[a, b, missing]).await.unwrap(), want);
        // Only the absent key was asked again.
        assert_eq!(backend.asked(), 4);
        assert_eq!(s.has_many(&[a, b]).await.unwrap(), vec![Some(3), Some(2)]);
        assert_eq!(backend.asked(), 4);
    }

    #[tokio::test]
    async fn put_records_and_not_found_get_forgets() {
        let backend = Counting::new();
        let s = ExistenceCacheStore::new(&cfg(None), backend.clone());
        let data = testutil::data(5000, 3);
        let d = DigestFunction::Sha256.compute(&data);
        s.put_bytes(&d, data).await.unwrap();
        assert_eq!(s.has(&d).await.unwrap(), Some(5000));
        assert_eq!(backend.asked(), 0);

        // The backend loses the blob behind the cache's back (a fresh backend stands in).
        let empty_backend = Counting::new();
        let stale = ExistenceCacheStore::new(&cfg(None), empty_backend.clone());
        stale.known.insert(d, 5000, 5000);
        assert_eq!(stale.has(&d).await.unwrap(), Some(5000));
        let err = stale.get(&d, 0, None).await.err().unwrap();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(stale.cached(), 0);
        assert_eq!(stale.has(&d).await.unwrap(), None);
        assert_eq!(empty_backend.asked(), 1);
    }

    #[tokio::test]
    async fn cache_is_bounded_by_the_policy() {
        let backend = Counting::new();
        let policy = EvictionPolicy {
            max_count: 2,
            ..Default::default()
        };
        let s = ExistenceCacheStore::new(&cfg(Some(policy)), backend.clone());
        for i in 0..5u8 {
            let d = DigestFunction::Sha256.compute(&[i]);
            s.put_bytes(&d, Bytes::from(vec![i])).await.unwrap();
        }
        assert_eq!(s.cached(), 2);
    }
}
