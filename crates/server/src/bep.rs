//! The Build Event Service (`google.devtools.build.v1.PublishBuildEvent`), so that
//! `bazel --bes_backend=grpc://HOST:PORT` streams its build events to Cairn, which keeps them
//! in the `experimental_bep` store, where the web UI (`web_ui/`) reads them.
//!
//! Each event is stored under a key derived from its stream (build id, invocation id,
//! component) and sequence number, its value the encoded `OrderedBuildEvent`; each stream also
//! has a record of the highest sequence number stored, so that a reader can list an
//! invocation's events without scanning. An event is acknowledged only once stored; one sent
//! again (Bazel resends after a reconnect) overwrites itself.

use std::sync::Arc;

use bytes::Bytes;
use cairn_core::{Digest, DigestFunction, Error};
use cairn_proto::bes::v1 as bes;
use cairn_store::{StoreExt, StoreRef};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;

/// Acknowledgements buffered towards a slow client.
const ACK_DEPTH: usize = 64;

pub struct BepService {
    store: StoreRef,
    metrics: Arc<Metrics>,
    /// The web UI's summary of invocations, told of every stored event.
    index: Arc<crate::web_ui::InvocationIndex>,
}

impl BepService {
    /// `index` is the store's [`crate::web_ui::index_for`].
    pub fn new(
        store: StoreRef,
        metrics: Arc<Metrics>,
        index: Arc<crate::web_ui::InvocationIndex>,
    ) -> BepService {
        BepService {
            store,
            metrics,
            index,
        }
    }
}

/// The key of one event of a stream (`Some(seq)`), or of the stream's last-sequence record.
pub fn event_key(stream: &bes::StreamId, sequence: Option<i64>) -> Digest {
    let which = sequence.map_or_else(|| "last".to_string(), |s| s.to_string());
    let text = format!(
        "cairn-bep-v1\0{}\0{}\0{}\0{which}",
        stream.build_id, stream.invocation_id, stream.component
    );
    DigestFunction::Sha256.compute(text.as_bytes())
}

/// Stores one event; its stream and sequence number.
async fn store_event(
    store: &StoreRef,
    index: &crate::web_ui::InvocationIndex,
    event: Option<bes::OrderedBuildEvent>,
) -> Result<(bes::StreamId, i64), Error> {
    let event = event.ok_or_else(|| Error::invalid_argument("the request has no build event"))?;
    let stream = event
        .stream_id
        .clone()
        .ok_or_else(|| Error::invalid_argument("the build event has no stream_id"))?;
    if stream.build_id.is_empty() && stream.invocation_id.is_empty() {
        return Err(Error::invalid_argument(
            "the build event's stream_id names neither a build nor an invocation",
        ));
    }
    let seq = event.sequence_number;
    if seq < 1 {
        return Err(Error::invalid_argument(format!(
            "sequence_number {seq}: sequence numbers start at 1"
        )));
    }
    store
        .put_bytes(&event_key(&stream, Some(seq)), event.encode_to_vec().into())
        .await
        .map_err(|e| e.context("storing a build event"))?;
    // The last sequence number, raised only: a resent older event does not lower it.
    let last_key = event_key(&stream, None);
    let last = match store.get_all(&last_key, 16).await {
        Ok(b) if b.len() == 8 => i64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
        _ => 0,
    };
    if seq > last {
        store
            .put_bytes(&last_key, Bytes::copy_from_slice(&seq.to_le_bytes()))
            .await
            .map_err(|e| e.context("storing a build event stream's length"))?;
    }
    if index.record(
        &stream,
        seq,
        &event.event,
        crate::execution::driver::unix_ms_now(),
    ) {
        // The summaries outlive a restart; failing to keep them loses no build event.
        if let Err(e) = crate::web_ui::index::persist(index, store).await {
            tracing::warn!(error = %e, "web UI: keeping the invocation index failed");
        }
    }
    Ok((stream, seq))
}

#[tonic::async_trait]
impl bes::publish_build_event_server::PublishBuildEvent for BepService {
    async fn publish_lifecycle_event(
        &self,
        request: Request<bes::PublishLifecycleEventRequest>,
    ) -> Result<Response<()>, Status> {
        let timer = self.metrics.rpc("bep", "PublishLifecycleEvent");
        let r = store_event(&self.store, &self.index, request.into_inner().build_event)
            .await
            .map(|_| Response::new(()))
            .map_err(Status::from);
        timer.finish(&r);
        r
    }

    type PublishBuildToolEventStreamStream =
        BoxStream<'static, Result<bes::PublishBuildToolEventStreamResponse, Status>>;

    async fn publish_build_tool_event_stream(
        &self,
        request: Request<Streaming<bes::PublishBuildToolEventStreamRequest>>,
    ) -> Result<Response<Self::PublishBuildToolEventStreamStream>, Status> {
        let timer = self.metrics.rpc("bep", "PublishBuildToolEventStream");
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(ACK_DEPTH);
        let store = self.store.clone();
        let index = self.index.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let ack = match msg {
                    Ok(m) => store_event(&store, &index, m.ordered_build_event)
                        .await
                        .map(|(stream, seq)| bes::PublishBuildToolEventStreamResponse {
                            stream_id: Some(stream),
                            sequence_number: seq,
                        })
                        .map_err(Status::from),
                    // The client went away or sent garbage: nothing more to acknowledge.
                    Err(_) => return,
                };
                let failed = ack.is_err();
                if tx.send(ack).await.is_err() || failed {
                    return;
                }
            }
        });
        let r = Ok(Response::new(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
                .boxed(),
        ));
        timer.finish(&r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_streams_events_and_the_last_record() {
        let s = |b: &str, i: &str, c: i32| bes::StreamId {
            build_id: b.into(),
            invocation_id: i.into(),
            component: c,
        };
        let a = s("b", "i", 3);
        assert_ne!(event_key(&a, Some(1)), event_key(&a, Some(2)));
        assert_ne!(event_key(&a, Some(1)), event_key(&a, None));
        assert_ne!(event_key(&a, Some(1)), event_key(&s("b", "j", 3), Some(1)));
        assert_ne!(event_key(&a, Some(1)), event_key(&s("b", "i", 1), Some(1)));
        assert_eq!(event_key(&a, Some(7)), event_key(&s("b", "i", 3), Some(7)));
    }
}
