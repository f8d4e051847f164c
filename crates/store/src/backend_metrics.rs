//! Requests that leaf stores send to remote backends (Redis, object storage), for the
//! per-backend metrics: each request attempt and each retry goes to the process's observer,
//! which the server installs at start-up ([`set_observer`]) and turns into
//! `store_backend_requests_total`, `store_backend_request_errors_total`,
//! `store_backend_retries_total` and `store_backend_request_duration_seconds` (declared in
//! the server's `metrics.rs`). Without an observer (tests, tools) nothing is recorded.
//!
//! Labels are bounded: `store` is the store's key path without `stores.` (`CAS`,
//! `CAS.fast_slow.slow`), `backend` the store kind (`redis_store`), `operation` one of a
//! fixed set per backend (`lookup`, `read`, `write`, `publish`, `delete`, `ping`).

use std::sync::{Arc, OnceLock};

/// One event of a backend client.
#[derive(Debug, Clone, Copy)]
pub enum BackendEvent<'a> {
    /// One request attempt and how long it took; `ok` false for any failure.
    Request {
        store: &'a str,
        backend: &'static str,
        operation: &'static str,
        ok: bool,
        seconds: f64,
    },
    /// A failed attempt is about to be tried again.
    Retry {
        store: &'a str,
        backend: &'static str,
        operation: &'static str,
    },
}

pub type BackendObserver = Arc<dyn Fn(&BackendEvent<'_>) + Send + Sync>;

static OBSERVER: OnceLock<BackendObserver> = OnceLock::new();

/// Installs where backend events go (once, at start-up).
pub fn set_observer(observer: BackendObserver) {
    let _ = OBSERVER.set(observer);
}

/// Hands one event to the observer, if any.
pub fn record(event: BackendEvent<'_>) {
    if let Some(o) = OBSERVER.get() {
        o(&event);
    }
}

/// The `store` label for a store's key path: `stores.CAS.fast_slow.slow` -> `CAS.fast_slow.slow`.
pub fn store_label(path: &str) -> &str {
    path.strip_prefix("stores.").unwrap_or(path)
}
