//! `experimental_origin_events` (NativeLink's key): an event for every gRPC request the
//! listeners serve, published in batches to a store for an outside service to process.
//!
//! A request first takes a place in the bounded queue (`max_event_queue_size`; when it is
//! full the request waits for room, which slows every client, as NativeLink warns) and fills
//! it with its event when its response ends. One task takes up to 1024 queued events at a
//! time and writes them as one value: JSON lines, one event per line, under the SHA-256 of
//! `OriginEvents:{uuid}` (the stores are keyed by digests, so NativeLink's key name is hashed,
//! as Build Event Protocol keys are). A failed write is tried 5 times, then the batch is
//! dropped and logged. On shutdown what is queued is written before the process exits.
//!
//! An event: `{"version":1, "event_id", "time_unix_ms", "service", "method", "identity",
//! "request_metadata": {Bazel's RequestMetadata: "tool_name", "tool_version", "action_id",
//! "tool_invocation_id", "correlated_invocations_id", "action_mnemonic", "target_id",
//! "configuration_id"}, "grpc_status", "duration_ms"}`. `identity` is the value of the
//! listener's `experimental_identity_header` (empty without one); `request_metadata` is
//! absent when the client sent none.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{DigestFunction, Error};
use cairn_store::{StoreExt, StoreRef};
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events per stored batch.
const MAX_EVENTS_PER_BATCH: usize = 1024;
/// Writes of one batch before it is dropped.
const MAX_UPLOAD_ATTEMPTS: u32 = 5;
/// The header Bazel sends its `RequestMetadata` in.
const REQUEST_METADATA: &str = "build.bazel.remote.execution.v2.requestmetadata-bin";

static QUEUE: OnceLock<mpsc::Sender<serde_json::Value>> = OnceLock::new();

/// The running publisher; [`Publisher::stop`] writes what is queued and ends it.
pub struct Publisher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Starts publishing to `store` with a queue of `queue` events. Listeners started after
/// this record their requests. Only one publisher runs per process; a second call is an
/// error.
pub fn start(store: StoreRef, queue: u64) -> Result<Publisher, Error> {
    let (tx, rx) = mpsc::channel(queue.clamp(1, 1 << 24) as usize);
    QUEUE
        .set(tx)
        .map_err(|_| Error::internal("experimental_origin_events: already started"))?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(publish(rx, store, stop.clone()));
    Ok(Publisher { stop, task })
}

impl Publisher {
    /// Writes the queued events (within `deadline`) and ends the task.
    pub async fn stop(self, deadline: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            tracing::warn!("experimental_origin_events: queued events not all written at exit");
        }
    }
}

/// Whether requests are recorded (a publisher runs).
pub fn enabled() -> bool {
    QUEUE.get().is_some()
}

async fn publish(
    mut rx: mpsc::Receiver<serde_json::Value>,
    store: StoreRef,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_EVENTS_PER_BATCH);
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, MAX_EVENTS_PER_BATCH) => {
                if n == 0 {
                    return;
                }
                write(&store, &mut batch).await;
            }
            () = stop.cancelled() => {
                while let Ok(e) = rx.try_recv() {
                    batch.push(e);
                    if batch.len() == MAX_EVENTS_PER_BATCH {
                        write(&store, &mut batch).await;
                    }
                }
                write(&store, &mut batch).await;
                return;
            }
        }
    }
}

/// Stores one batch (emptying `batch`).
async fn write(store: &StoreRef, batch: &mut Vec<serde_json::Value>) {
    if batch.is_empty() {
        return;
    }
    let mut text = Vec::new();
    for e in batch.drain(..) {
        // Serializing a `Value` cannot fail.
        let _ = serde_json::to_writer(&mut text, &e);
        text.push(b'\n');
    }
    let name = format!("OriginEvents:{}", uuid::Uuid::new_v4().hyphenated());
    let key = DigestFunction::Sha256.compute(name.as_bytes());
    let data = Bytes::from(text);
    for attempt in 1..=MAX_UPLOAD_ATTEMPTS {
        match store.put_bytes(&key, data.clone()).await {
            Ok(()) => return,
            Err(e) if attempt < MAX_UPLOAD_ATTEMPTS => {
                tracing::warn!(attempt, error = %e, "experimental_origin_events: write failed, retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, events_key = %name, "experimental_origin_events: batch dropped");
            }
        }
    }
}

/// The listener layer: waits for room in the queue, serves the request, and queues its event
/// when the response ends (at its trailers, or when it is dropped).
pub async fn record(
    identity_header: Option<http::HeaderName>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(queue) = QUEUE.get() else {
        return next.run(req).await;
    };
    let Ok(permit) = queue.clone().reserve_owned().await else {
        return next.run(req).await;
    };
    let started = Instant::now();
    let (service, method) = match req.uri().path().trim_start_matches('/').split_once('/') {
        Some((s, m)) => (s.to_string(), m.to_string()),
        None => (req.uri().path().to_string(), String::new()),
    };
    let identity = identity_header
        .and_then(|h| req.headers().get(h))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let metadata = request_metadata(req.headers());
    let time_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let event = serde_json::json!({
        "version": 1,
        "event_id": uuid::Uuid::new_v4().hyphenated().to_string(),
        "time_unix_ms": time_unix_ms,
        "service": service,
        "method": method,
        "identity": identity,
    });
    let response = next.run(req).await;
    let (parts, body) = response.into_parts();
    let status = grpc_status(&parts.headers);
    let body = Recorded {
        inner: body,
        pending: Some(Pending {
            permit,
            event,
            metadata,
            started,
            status,
        }),
    };
    axum::response::Response::from_parts(parts, Body::new(body))
}

/// Bazel's `RequestMetadata` header, as JSON.
fn request_metadata(headers: &http::HeaderMap) -> Option<serde_json::Value> {
    use base64::Engine;
    let raw = headers.get(REQUEST_METADATA)?.to_str().ok()?;
    // Binary headers are base64, padded or not.
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(raw.trim_end_matches('='))
        .ok()?;
    let m = re::RequestMetadata::decode(bytes.as_slice()).ok()?;
    let tool = m.tool_details.unwrap_or_default();
    Some(serde_json::json!({
        "tool_name": tool.tool_name,
        "tool_version": tool.tool_version,
        "action_id": m.action_id,
        "tool_invocation_id": m.tool_invocation_id,
        "correlated_invocations_id": m.correlated_invocations_id,
        "action_mnemonic": m.action_mnemonic,
        "target_id": m.target_id,
        "configuration_id": m.configuration_id,
    }))
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// An event waiting for the end of its response.
struct Pending {
    permit: mpsc::OwnedPermit<serde_json::Value>,
    event: serde_json::Value,
    metadata: Option<serde_json::Value>,
    started: Instant,
    status: Option<i64>,
}

impl Pending {
    fn send(mut self) {
        let e = &mut self.event;
        if let Some(m) = self.metadata.take() {
            e["request_metadata"] = m;
        }
        // A response that ended without a status (the client went away) is CANCELLED.
        e["grpc_status"] = self.status.unwrap_or(1).into();
        e["duration_ms"] = (self.started.elapsed().as_millis() as u64).into();
        self.permit.send(self.event);
    }
}

/// A response body that queues its request's event when it ends.
struct Recorded {
    inner: Body,
    pending: Option<Pending>,
}

impl http_body::Body for Recorded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(status) = f.trailers_ref().and_then(grpc_status) {
                    if let Some(mut p) = this.pending.take() {
                        p.status = Some(status);
                        p.send();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.send();
                }
            }
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.send();
        }
    }
}
