//! A store seen through the metrics: each call a service makes counts as a cache operation
//! (`read` hit/miss/error, `write` success/error) with its latency, labelled with the store's
//! configured name as `cache_type`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};
use cairn_store::{Health, Store, StoreInfo, StoreRef};

use crate::metrics::Metrics;

pub struct MeteredStore {
    name: String,
    inner: StoreRef,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub fn wrap(name: &str, inner: StoreRef, metrics: Arc<Metrics>) -> StoreRef {
        metrics.init_store(name);
        Arc::new(MeteredStore {
            name: name.to_string(),
            inner,
            metrics,
        })
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let start = Instant::now();
        let r = self.inner.has_many(keys).await;
        let secs = start.elapsed().as_secs_f64();
        match &r {
            Ok(sizes) => {
                for s in sizes {
                    let result = if s.is_some() { "hit" } else { "miss" };
                    self.metrics.cache_op(&self.name, "read", result, secs);
                }
            }
            Err(_) => self.metrics.cache_op(&self.name, "read", "error", secs),
        }
        r
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let start = Instant::now();
        let r = self.inner.get(key, offset, length).await;
        let result = match &r {
            Ok(_) => "hit",
            Err(e) if e.is_not_found() => "miss",
            Err(_) => "error",
        };
        self.metrics
            .cache_op(&self.name, "read", result, start.elapsed().as_secs_f64());
        r
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        let start = Instant::now();
        let r = self.inner.put(key, body).await;
        let result = if r.is_ok() { "success" } else { "error" };
        self.metrics
            .cache_op(&self.name, "write", result, start.elapsed().as_secs_f64());
        r
    }

    fn info(&self) -> StoreInfo {
        self.inner.info()
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }
}
