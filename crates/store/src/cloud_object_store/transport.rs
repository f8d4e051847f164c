//! The HTTP layer under every provider's client: `object_store`'s own reqwest client, wrapped
//! so that each backend request is reported to the store's [`BackendEvents`] (method,
//! outcome, latency) and so that a transient answer (408, 429, 5xx, and 416 for ranges) comes
//! back as a typed [`BackendStatus`] error the store can classify. `object_store` keeps its
//! own retries off (`max_retries: 0`): the store retries whole operations itself, counted.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use cairn_core::Code;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::ClientOptions;

use super::metrics::BackendEvents;

/// A backend's answer that is worth classifying by its status (the body is dropped).
#[derive(Debug)]
pub struct BackendStatus(pub http::StatusCode);

impl fmt::Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend answered {}", self.0)
    }
}

impl std::error::Error for BackendStatus {}

/// Builds `object_store`'s default client and wraps it.
#[derive(Debug)]
pub struct CountingConnector {
    pub events: Arc<BackendEvents>,
}

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService {
            inner,
            events: self.events.clone(),
        }))
    }
}

#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    events: Arc<BackendEvents>,
}

#[async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let method = req.method().clone();
        let start = Instant::now();
        let result = self.inner.execute(req).await;
        let seconds = start.elapsed().as_secs_f64();
        match result {
            Ok(resp) if surfaced(resp.status()) => {
                self.events.request(method.as_str(), "error", seconds);
                Err(HttpError::new(
                    HttpErrorKind::Request,
                    BackendStatus(resp.status()),
                ))
            }
            Ok(resp) => {
                let outcome = if resp.status().is_success() || resp.status().as_u16() == 404 {
                    "ok"
                } else {
                    "error"
                };
                self.events.request(method.as_str(), outcome, seconds);
                Ok(resp)
            }
            Err(e) => {
                self.events.request(method.as_str(), "error", seconds);
                Err(e)
            }
        }
    }
}

/// Statuses turned into a [`BackendStatus`] error: transient ones, and 416 (a range past the
/// end). Every other status goes to `object_store` as it came (404, 412, 403, redirects...).
fn surfaced(s: http::StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 416 | 429) || s.is_server_error()
}

/// The gRPC code of a backend error: NOT_FOUND for a missing object, UNAVAILABLE for a
/// connection that failed or a 5xx, RESOURCE_EXHAUSTED for throttling, DEADLINE_EXCEEDED for
/// a timeout, OUT_OF_RANGE for 416, PERMISSION_DENIED for 401 and 403.
pub fn classify(e: &object_store::Error) -> Code {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => return Code::NotFound,
        E::AlreadyExists { .. } => return Code::AlreadyExists,
        E::Precondition { .. } | E::NotModified { .. } => return Code::FailedPrecondition,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => return Code::PermissionDenied,
        E::NotSupported { .. } | E::NotImplemented { .. } => return Code::Unimplemented,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => return Code::InvalidArgument,
        _ => {}
    }
    let chain = || {
        std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |s| {
            s.source()
        })
    };
    // The status this layer surfaced sits below `object_store`'s `HttpError` that carries it.
    if let Some(BackendStatus(status)) = chain().find_map(|s| s.downcast_ref::<BackendStatus>()) {
        return match status.as_u16() {
            408 => Code::DeadlineExceeded,
            416 => Code::OutOfRange,
            429 => Code::ResourceExhausted,
            _ => Code::Unavailable,
        };
    }
    if let Some(h) = chain().find_map(|s| s.downcast_ref::<HttpError>()) {
        return match h.kind() {
            HttpErrorKind::Timeout => Code::DeadlineExceeded,
            _ => Code::Unavailable,
        };
    }
    // Another 4xx, or an answer cut short or garbled on the way: worth another attempt (a
    // permanent refusal only costs the retry budget).
    Code::Unavailable
}
