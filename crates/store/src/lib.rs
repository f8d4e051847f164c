//! The [`Store`] trait and one module per store kind, named as its config key.
//!
//! A leaf store (memory, filesystem, noop, grpc, redis_store) does I/O; a wrapper store (fast_slow, verify,
//! compression, dedup, size_partitioning, shard, existence_cache, completeness_checking,
//! ref_store) holds other stores and adds one behaviour. [`factory::build_stores`] turns the
//! config's `stores` into a name -> store map; it and the config enum are the only places that
//! list every kind.
//!
//! Contract of every store: a `put` becomes visible only when complete (readers never see half
//! a blob); `get` of a missing key is NOT_FOUND; bodies are streamed in bounded chunks.

pub mod backend_metrics;
pub mod cache_metrics;
pub mod channel;
pub mod client_headers;
pub mod cloud_object_store;
pub mod completeness_checking;
pub mod compression;
pub mod dedup;
pub mod eviction;
pub mod existence_cache;
pub mod factory;
pub mod fast_slow;
pub mod filesystem;
pub mod grpc;
pub mod memory;
pub mod noop;
pub mod ontap_existence_cache;
pub mod redis_store;
pub mod ref_store;
pub mod shard;
pub mod size_partitioning;
pub mod traced;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_core::{BlobStream, Digest, Error};

pub use factory::{
    build_spec, build_store_tree, build_stores, check_spec, places_of, spec_warnings, StoreMap,
    StoreTree,
};

/// A store's health as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ok,
    Failed(String),
}

/// Where a store's start-up index load is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexState {
    /// Until the index holds everything on disk (lookups of blobs not yet indexed then check
    /// the disk itself).
    pub loading: bool,
    /// `snapshot` (reading the index snapshot), `walk` (listing and stat-ing every blob),
    /// `reconcile` (listing the directory against the loaded snapshot) or `ready`.
    pub phase: &'static str,
    /// Entries indexed so far.
    pub entries: u64,
    /// Entries the snapshot announced, when loading from one.
    pub expected: Option<u64>,
}

/// One node of a store tree, for `/status`, `check-config` and metrics.
#[derive(Debug, Clone)]
pub struct StoreInfo {
    /// Config key of the kind (`memory`, `fast_slow`, ...).
    pub kind: &'static str,
    /// Bytes held, for leaf stores that know it.
    pub size_bytes: Option<u64>,
    /// Entries held, for leaf stores that know it.
    pub entries: Option<u64>,
    /// Entries evicted since start, for stores with an eviction index.
    pub evictions: Option<u64>,
    /// Reads answered since start (lookups and gets), for stores that count them: leaf
    /// stores with an index (memory, filesystem) and configured `cache_metrics` wrappers.
    pub reads: Option<Reads>,
    /// What the node says of itself beyond its kind: a `ref_store`'s target, a
    /// `cache_metrics` wrapper's `cache_type`.
    pub detail: Option<String>,
    /// For stores whose index is loaded at start-up (filesystem): how far that load is.
    pub index: Option<IndexState>,
    pub children: Vec<(&'static str, StoreInfo)>,
}

impl StoreInfo {
    pub fn leaf(kind: &'static str) -> StoreInfo {
        StoreInfo {
            kind,
            size_bytes: None,
            entries: None,
            evictions: None,
            reads: None,
            detail: None,
            index: None,
            children: vec![],
        }
    }
    pub fn wrapper(kind: &'static str, children: Vec<(&'static str, StoreInfo)>) -> StoreInfo {
        StoreInfo {
            kind,
            size_bytes: None,
            entries: None,
            evictions: None,
            reads: None,
            detail: None,
            index: None,
            children,
        }
    }

    /// The index load of the leaves below, added up: loading while any one is; `None` when
    /// no leaf loads an index.
    pub fn index_state(&self) -> Option<IndexState> {
        let mut total: Option<IndexState> = self.index;
        for (_, c) in &self.children {
            if let Some(s) = c.index_state() {
                total = Some(match total {
                    None => s,
                    Some(t) => IndexState {
                        loading: t.loading || s.loading,
                        phase: if t.loading { t.phase } else { s.phase },
                        entries: t.entries + s.entries,
                        expected: t.expected.zip(s.expected).map(|(a, b)| a + b),
                    },
                });
            }
        }
        total
    }
    /// Total evictions of the stores below.
    pub fn total_evictions(&self) -> u64 {
        self.evictions.unwrap_or(0)
            + self
                .children
                .iter()
                .map(|(_, c)| c.total_evictions())
                .sum::<u64>()
    }

    /// Total bytes of the leaves below.
    pub fn total_size_bytes(&self) -> u64 {
        self.size_bytes.unwrap_or(0)
            + self
                .children
                .iter()
                .map(|(_, c)| c.total_size_bytes())
                .sum::<u64>()
    }
}

/// Reads a store answered: each key looked up (`has_many`) or read (`get`) is a hit when
/// present, a miss when absent, an error when the store could not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads {
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
}

impl Reads {
    /// Hits over hits and misses, or `None` before the first answered read.
    pub fn hit_rate(&self) -> Option<f64> {
        let answered = self.hits + self.misses;
        (answered > 0).then(|| self.hits as f64 / answered as f64)
    }
}

/// The counters behind [`Reads`]: relaxed atomics, one increment per key.
#[derive(Debug, Default)]
pub struct ReadCounter {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl ReadCounter {
    /// Counts `hits` keys found and `misses` keys absent.
    pub fn count(&self, hits: u64, misses: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        if hits > 0 {
            self.hits.fetch_add(hits, Relaxed);
        }
        if misses > 0 {
            self.misses.fetch_add(misses, Relaxed);
        }
    }

    /// Counts one read that ended in an error other than NOT_FOUND.
    pub fn error(&self) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the answer of `has_many`.
    pub fn count_lookup(&self, sizes: &[Option<u64>]) {
        let hits = sizes.iter().filter(|s| s.is_some()).count() as u64;
        self.count(hits, sizes.len() as u64 - hits);
    }

    /// Counts the answer of `get`.
    pub fn count_get<T>(&self, r: &Result<T, Error>) {
        match r {
            Ok(_) => self.count(1, 0),
            Err(e) if e.is_not_found() => self.count(0, 1),
            Err(_) => self.error(),
        }
    }

    pub fn snapshot(&self) -> Reads {
        use std::sync::atomic::Ordering::Relaxed;
        Reads {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// A content store: keys are digests; for the CAS the value hashes to the key, for the AC the
/// key is only a name.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// For each key, the stored size, or `None` when absent.
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error>;

    /// Reads `length` bytes (all when `None`) from `offset`. A missing key is NOT_FOUND; an
    /// offset past the end is OUT_OF_RANGE.
    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error>;

    /// Stores a body. It becomes visible to readers only once complete; an error from the
    /// body stream aborts the write and leaves nothing behind.
    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error>;

    /// Describes the subtree.
    fn info(&self) -> StoreInfo;

    /// Health of this store and what it holds.
    async fn health(&self) -> Health {
        Health::Ok
    }

    /// The store as `Any`, for a user that needs one kind's own API (the shared scheduler
    /// state reaches a `redis_store`'s connection this way). `None` unless a kind opts in.
    fn as_any(&self) -> Option<&(dyn std::any::Any + Send + Sync)> {
        None
    }
}

/// A shared store.
pub type StoreRef = Arc<dyn Store>;

/// Convenience calls on any store.
#[async_trait]
pub trait StoreExt {
    async fn has(&self, key: &Digest) -> Result<Option<u64>, Error>;
    async fn get_all(&self, key: &Digest, limit: usize) -> Result<Bytes, Error>;
    async fn put_bytes(&self, key: &Digest, data: Bytes) -> Result<(), Error>;
}

#[async_trait]
impl<S: Store + ?Sized> StoreExt for S {
    async fn has(&self, key: &Digest) -> Result<Option<u64>, Error> {
        Ok(self
            .has_many(std::slice::from_ref(key))
            .await?
            .pop()
            .flatten())
    }
    async fn get_all(&self, key: &Digest, limit: usize) -> Result<Bytes, Error> {
        let stream = self.get(key, 0, None).await?;
        cairn_core::stream::collect(stream, limit).await
    }
    async fn put_bytes(&self, key: &Digest, data: Bytes) -> Result<(), Error> {
        self.put(key, cairn_core::stream::once(data)).await
    }
}

/// Checks a read range against a blob's size: OUT_OF_RANGE past the end.
pub fn check_range(
    key: &Digest,
    size: u64,
    offset: u64,
    length: Option<u64>,
) -> Result<(u64, u64), Error> {
    if offset > size {
        return Err(Error::out_of_range(format!(
            "read offset {offset} is past the end of {key} ({size} bytes)"
        )));
    }
    let len = length.map_or(size - offset, |l| l.min(size - offset));
    Ok((offset, len))
}

#[cfg(test)]
pub(crate) mod testutil;
