//! The headers of the client request being served, for `grpc` stores with
//! `forward_headers`: the server runs each request inside [`scope`], and a store call made
//! while serving it (or in a task started with [`spawn`] from it) reads them with
//! [`current`]. Nothing is recorded unless some store forwards headers ([`wanted`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A client request's headers.
pub type Headers = Arc<tonic::metadata::MetadataMap>;

tokio::task_local! {
    static CLIENT_HEADERS: Headers;
}

static WANTED: AtomicBool = AtomicBool::new(false);

/// Whether a store of this process forwards client headers (set when one is built).
pub fn wanted() -> bool {
    WANTED.load(Ordering::Relaxed)
}

pub(crate) fn set_wanted() {
    WANTED.store(true, Ordering::Relaxed);
}

/// Runs `fut` with `headers` as the client request's headers.
pub async fn scope<F: Future>(headers: Headers, fut: F) -> F::Output {
    CLIENT_HEADERS.scope(headers, fut).await
}

/// The headers of the client request being served, if any.
pub fn current() -> Option<Headers> {
    CLIENT_HEADERS.try_with(Clone::clone).ok()
}

/// `tokio::spawn`, carrying the current client request's headers into the task.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match current() {
        Some(h) => tokio::spawn(CLIENT_HEADERS.scope(h, fut)),
        None => tokio::spawn(fut),
    }
}
