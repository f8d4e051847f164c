//! What a cloud store tells about its backend: every HTTP request (method, outcome, latency)
//! and every retry, labelled with the store's key path. Counts are kept here (tests and
//! `/status` read them); the process's metric registry receives the same events through one
//! observer the server installs at start-up ([`set_observer`]), which declares the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// One backend event.
#[derive(Debug, Clone, Copy)]
pub enum BackendEvent<'a> {
    /// An HTTP request to the backend ended: `outcome` is `ok` (a 2xx, or a 404 that answers
    /// "missing") or `error` (no answer, or any other status).
    Request {
        store: &'a str,
        provider: &'static str,
        method: &'a str,
        outcome: &'static str,
        seconds: f64,
    },
    /// An operation (`head`, `get`, `put`, `put_part`, ...) is tried again after an error.
    Retry {
        store: &'a str,
        provider: &'static str,
        operation: &'static str,
    },
}

/// Receives every backend event of every cloud store.
pub type BackendObserver = Arc<dyn Fn(BackendEvent<'_>) + Send + Sync>;

static OBSERVER: OnceLock<BackendObserver> = OnceLock::new();

/// Installs the process's observer (once, at start-up; later calls are ignored).
pub fn set_observer(observer: BackendObserver) {
    let _ = OBSERVER.set(observer);
}

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
        if let Some(o) = OBSERVER.get() {
            o(BackendEvent::Request {
                store: &self.store,
                provider: self.provider,
                method,
                outcome,
                seconds,
            });
        }
    }

    pub fn retry(&self, operation: &'static str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = OBSERVER.get() {
            o(BackendEvent::Retry {
                store: &self.store,
                provider: self.provider,
                operation,
            });
        }
    }

    pub fn counts(&self) -> BackendCounts {
        BackendCounts {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}
