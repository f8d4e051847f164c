//! `cache_metrics`: counts the operations of the store it wraps under a `cache_type` label
//! (NativeLink's wrapper), so that an inner tier (the fast memory of a `fast_slow`, say) can be
//! watched on its own. Each operation goes to an [`OpObserver`]: the one given at
//! construction, or for configured `cache_metrics` stores the process's, which the server
//! installs at start-up ([`set_observer`]); without one, the wrapper only passes through. The
//! server also counts every top-level store a service uses through the same wrapper.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use cairn_core::{BlobStream, Digest, Error};

use crate::{Health, Store, StoreInfo, StoreRef};

/// Receives one operation: cache type, operation (`read`, `write`), result (`hit`, `miss`,
/// `success`, `error`) and its duration in seconds.
pub type OpObserver = Arc<dyn Fn(&str, &'static str, &'static str, f64) + Send + Sync>;

static OBSERVER: OnceLock<OpObserver> = OnceLock::new();

/// Installs where configured `cache_metrics` stores count (once, at start-up).
pub fn set_observer(observer: OpObserver) {
    let _ = OBSERVER.set(observer);
}

pub struct CacheMetricsStore {
    cache_type: String,
    inner: StoreRef,
    observer: Option<OpObserver>,
    /// Describe itself as the store it wraps (no node of its own in `/status`).
    transparent: bool,
    /// Reads counted here too, for the node's description (configured wrappers only).
    reads: crate::ReadCounter,
}

impl CacheMetricsStore {
    /// A configured `cache_metrics` store: counts go to the process's observer.
    pub fn new(cache_type: String, inner: StoreRef) -> CacheMetricsStore {
        CacheMetricsStore {
            cache_type,
            inner,
            observer: None,
            transparent: false,
            reads: Default::default(),
        }
    }

    /// Counts `inner`'s operations into `observer`, and describes itself as `inner`.
    pub fn counting(cache_type: &str, inner: StoreRef, observer: OpObserver) -> StoreRef {
        Arc::new(CacheMetricsStore {
            cache_type: cache_type.to_string(),
            inner,
            observer: Some(observer),
            transparent: true,
            reads: Default::default(),
        })
    }

    fn observe(&self, op: &'static str, result: &'static str, start: Instant) {
        if let Some(o) = self.observer.as_ref().or_else(|| OBSERVER.get()) {
            o(&self.cache_type, op, result, start.elapsed().as_secs_f64());
        }
    }
}

#[async_trait]
impl Store for CacheMetricsStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let start = Instant::now();
        let r = self.inner.has_many(keys).await;
        match &r {
            Ok(sizes) => {
                if !self.transparent {
                    self.reads.count_lookup(sizes);
                }
                for s in sizes {
                    self.observe("read", if s.is_some() { "hit" } else { "miss" }, start);
                }
            }
            Err(_) => {
                if !self.transparent {
                    self.reads.error();
                }
                self.observe("read", "error", start)
            }
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
        if !self.transparent {
            self.reads.count_get(&r);
        }
        let result = match &r {
            Ok(_) => "hit",
            Err(e) if e.is_not_found() => "miss",
            Err(_) => "error",
        };
        self.observe("read", result, start);
        r
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        let start = Instant::now();
        let r = self.inner.put(key, body).await;
        self.observe("write", if r.is_ok() { "success" } else { "error" }, start);
        r
    }

    fn info(&self) -> StoreInfo {
        if self.transparent {
            return self.inner.info();
        }
        StoreInfo {
            reads: Some(self.reads.snapshot()),
            detail: Some(format!("cache_type {}", self.cache_type)),
            ..StoreInfo::wrapper("cache_metrics", vec![("backend", self.inner.info())])
        }
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }
}
