//! What a cloud store tells about its backend: every HTTP request (method, outcome, latency)
//! and every retry, labelled with the store's key path. Counts are kept here (tests and
//! `/status` read them); the same events go to the process's per-backend metrics through
//! [`crate::backend_metrics`] (`backend` is the provider, `operation` the HTTP method or the
//! store operation retried).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend_metrics::{self, BackendEvent};

/// The counters of one store's backend.
#[derive(Debug)]
pub struct BackendEvents {
    store: String,
    provider: &'static str,
    requests: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
}

/// A reading of [`BackendEvents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendCounts {
    pub requests: u64,
    pub errors: u64,
    pub retries: u64,
}

impl BackendEvents {
    pub fn new(store: &str, provider: &'static str) -> BackendEvents {
        BackendEvents {
            store: store.to_string(),
            provider,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn request(&self, method: &str, outcome: &'static str, seconds: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if outcome != "ok" {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        backend_metrics::record(BackendEvent::Request {
            store: backend_metrics::store_label(&self.store),
            backend: self.provider,
            operation: method_label(method),
            ok: outcome == "ok",
            seconds,
        });
    }

    pub fn retry(&self, operation: &'static str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        backend_metrics::record(BackendEvent::Retry {
            store: backend_metrics::store_label(&self.store),
            backend: self.provider,
            operation,
        });
    }

    pub fn counts(&self) -> BackendCounts {
        BackendCounts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

/// A bounded label for an HTTP method.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "get",
        "HEAD" => "head",
        "PUT" => "put",
        "POST" => "post",
        "DELETE" => "delete",
        "PATCH" => "patch",
        _ => "other",
    }
}
