//! A span around every store operation of every node of a store tree, named by the node's key
//! path: `store.has`, `store.get` (opening the read; the bytes stream after it) and
//! `store.put` (the whole upload), with fields `store` (`stores.CAS.fast_slow.slow`), `kind`
//! (`experimental_cloud_object_store`), the digest and sizes. The factory wraps each node it
//! builds, so wrapper stores (`verify`, `dedup`, `fast_slow`...) and leaves alike show where a
//! request's time went. At `debug` level: nothing is recorded unless a subscriber wants it
//! (`RUST_LOG`, or trace export, which takes Cairn's spans whatever `RUST_LOG` says).

use std::sync::Arc;

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};
use tracing::Instrument;

use crate::{Health, Store, StoreInfo, StoreRef};

pub struct TracedStore {
    inner: StoreRef,
    path: Arc<str>,
    kind: &'static str,
}

/// `inner`, with a span around each operation.
pub fn wrap(inner: StoreRef, path: &str, kind: &'static str) -> StoreRef {
    Arc::new(TracedStore {
        inner,
        path: path.into(),
        kind,
    })
}

#[async_trait]
impl Store for TracedStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let span = tracing::debug_span!("store.has", store = %self.path, kind = self.kind, keys = keys.len());
        self.inner.has_many(keys).instrument(span).await
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let span = tracing::debug_span!("store.get", store = %self.path, kind = self.kind, digest = %key, offset, length = ?length);
        self.inner.get(key, offset, length).instrument(span).await
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        let span = tracing::debug_span!("store.put", store = %self.path, kind = self.kind, digest = %key, bytes = key.size());
        self.inner.put(key, body).instrument(span).await
    }

    fn info(&self) -> StoreInfo {
        self.inner.info()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    /// The wrapped store's own: the span is invisible to a user of a kind's API.
    fn as_any(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        self.inner.as_any()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreExt;

    #[tokio::test]
    async fn a_traced_store_is_transparent() {
        let inner: StoreRef = Arc::new(crate::memory::MemoryStore::new(&Default::default()));
        let s = wrap(inner.clone(), "stores.CAS", "memory");
        let d = cairn_core::DigestFunction::Sha256.compute(b"x");
        s.put_bytes(&d, "x".into()).await.unwrap();
        assert_eq!(inner.get_all(&d, 10).await.unwrap(), "x");
        assert_eq!(s.has(&d).await.unwrap(), Some(1));
        assert_eq!(s.info().kind, "memory");
        assert!(s.as_any().is_none());
    }
}
