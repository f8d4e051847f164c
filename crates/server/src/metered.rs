//! A store seen through the metrics: each call a service makes counts as a cache operation
//! (`read` hit/miss/error, `write` success/error) with its latency, labelled with the store's
//! configured name as `cache_type` (the `cache_metrics` wrapper of the store crate, counting
//! into this process's metrics).

use std::sync::Arc;

use cairn_store::cache_metrics::CacheMetricsStore;
use cairn_store::StoreRef;

use crate::metrics::Metrics;

pub struct MeteredStore;

impl MeteredStore {
    /// `inner`, counted under `name`; its series exist at 0 from now on.
    pub fn wrap(name: &str, inner: StoreRef, metrics: Arc<Metrics>) -> StoreRef {
        metrics.init_store(name);
        CacheMetricsStore::counting(
            name,
            inner,
            Arc::new(move |cache_type, op, result, seconds| {
                metrics.cache_op(cache_type, op, result, seconds)
            }),
        )
    }
}
