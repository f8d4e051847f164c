//! `experimental_read_batching`: whole reads of small CAS blobs wait in a bounded queue and
//! go upstream together in `BatchReadBlobs` calls.
//!
//! One task (started with the first batched read) takes a free dispatch slot, then everything
//! queued up to `max_batch_bytes`, and sends it as one call; while every slot is busy, reads
//! gather in the queue, so the busier the store, the larger its batches. A read that would
//! push the queue past `max_queued_bytes` is not queued: the caller reads it with ByteStream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use cairn_config::stores::GrpcReadBatching;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, Error};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;

/// Checks the keys without building anything.
pub fn check(b: &GrpcReadBatching) -> Result<(), Error> {
    let at = "grpc.experimental_read_batching";
    if b.dispatch_slots == 0 {
        return Err(Error::invalid_argument(format!(
            "{at}.dispatch_slots: expected at least 1"
        )));
    }
    if b.max_batch_bytes.0 < b.max_blob_size_bytes.0 {
        return Err(Error::invalid_argument(format!(
            "{at}.max_batch_bytes: {} is less than max_blob_size_bytes ({}): no blob would fit a batch",
            b.max_batch_bytes.0, b.max_blob_size_bytes.0
        )));
    }
    Ok(())
}

/// What a batch call needs of its store.
#[derive(Clone)]
pub(super) struct Upstream {
    pub channels: crate::channel::Pool,
    pub instance: String,
    pub headers: tonic::metadata::MetadataMap,
    pub addresses: String,
    pub max_message: usize,
}

struct Pending {
    key: Digest,
    reply: oneshot::Sender<Result<Bytes, Error>>,
}

pub(super) struct ReadBatcher {
    cfg: GrpcReadBatching,
    upstream: Upstream,
    queued: Arc<AtomicU64>,
    /// Started by the first read (a runtime is then certain).
    tx: OnceLock<mpsc::Sender<Pending>>,
}

/// Most reads waiting at once, whatever their sizes.
const QUEUE_DEPTH: usize = 1 << 16;

impl ReadBatcher {
    pub(super) fn new(cfg: GrpcReadBatching, upstream: Upstream) -> ReadBatcher {
        ReadBatcher {
            cfg,
            upstream,
            queued: Arc::default(),
            tx: OnceLock::new(),
        }
    }

    /// Whether a whole read of `key` goes through a batch.
    pub(super) fn takes(&self, key: &Digest) -> bool {
        key.size() > 0 && key.size() <= self.cfg.max_blob_size_bytes.0
    }

    /// The blob, read in a batch; `None` when the queue is full (read it another way).
    pub(super) async fn read(&self, key: &Digest) -> Option<Result<Bytes, Error>> {
        let size = key.size();
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before + size > self.cfg.max_queued_bytes.0 {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return None;
        }
        let tx = self.tx.get_or_init(|| self.start());
        let (reply, answer) = oneshot::channel();
        if tx.try_send(Pending { key: *key, reply }).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return None;
        }
        Some(answer.await.unwrap_or_else(|_| {
            Err(Error::internal(format!(
                "{key}: the read batch was dropped"
            )))
        }))
    }

    fn start(&self) -> mpsc::Sender<Pending> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(dispatch(
            rx,
            self.cfg,
            self.upstream.clone(),
            self.queued.clone(),
        ));
        tx
    }
}

/// Takes batches off the queue while slots are free; ends when the store is dropped.
async fn dispatch(
    mut rx: mpsc::Receiver<Pending>,
    cfg: GrpcReadBatching,
    upstream: Upstream,
    queued: Arc<AtomicU64>,
) {
    let slots = Arc::new(Semaphore::new(cfg.dispatch_slots.min(1024) as usize));
    let mut carry: Option<Pending> = None;
    let mut next = 0usize;
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let function = first.key.function();
        let mut bytes = first.key.size();
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            if p.key.function() != function || bytes + p.key.size() > cfg.max_batch_bytes.0 {
                carry = Some(p);
                break;
            }
            bytes += p.key.size();
            batch.push(p);
        }
        queued.fetch_sub(bytes, Ordering::AcqRel);
        let channels = upstream.channels.current();
        let channel = channels[next % channels.len()].clone();
        next = next.wrapping_add(1);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            send(channel, &upstream, batch).await;
            drop(slot);
        });
    }
}

/// One `BatchReadBlobs` call; every waiting read gets its blob or an error.
async fn send(channel: Channel, up: &Upstream, batch: Vec<Pending>) {
    let function = batch[0].key.function();
    let mut request = tonic::Request::new(re::BatchReadBlobsRequest {
        instance_name: up.instance.clone(),
        digests: batch.iter().map(|p| p.key.to_proto()).collect(),
        acceptable_compressors: vec![],
        digest_function: function.to_proto(),
    });
    *request.metadata_mut() = up.headers.clone();
    let mut client =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(channel)
            .max_decoding_message_size(up.max_message)
            .max_encoding_message_size(up.max_message);
    let responses = match client.batch_read_blobs(request).await {
        Ok(r) => r.into_inner().responses,
        Err(e) => {
            let e = Error::from(e).context(format!("upstream {} BatchReadBlobs", up.addresses));
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let mut by_digest: std::collections::HashMap<
        (String, i64),
        re::batch_read_blobs_response::Response,
    > = responses
        .into_iter()
        .filter_map(|r| {
            let d = r.digest.clone()?;
            Some(((d.hash, d.size_bytes), r))
        })
        .collect();
    for p in batch {
        let d = p.key.to_proto();
        let result = match by_digest.remove(&(d.hash, d.size_bytes)) {
            None => Err(Error::internal(format!(
                "upstream {}: BatchReadBlobs left out {}",
                up.addresses, p.key
            ))),
            Some(r) => answer(&p.key, r, &up.addresses),
        };
        let _ = p.reply.send(result);
    }
}

/// One entry of a response, checked against what was asked.
fn answer(
    key: &Digest,
    r: re::batch_read_blobs_response::Response,
    upstream: &str,
) -> Result<Bytes, Error> {
    if let Some(s) = r.status.filter(|s| s.code != 0) {
        let code = tonic::Code::from_i32(s.code);
        return Err(Error::from(tonic::Status::new(code, s.message))
            .context(format!("upstream {upstream} {key}")));
    }
    if r.compressor != re::compressor::Value::Identity as i32 {
        return Err(Error::internal(format!(
            "upstream {upstream} {key}: answered with compressor {} that was not asked for",
            r.compressor
        )));
    }
    if r.data.len() as u64 != key.size() {
        return Err(Error::new(
            cairn_core::Code::DataLoss,
            format!(
                "upstream {upstream} {key}: sent {} bytes for a blob of {}",
                r.data.len(),
                key.size()
            ),
        ));
    }
    Ok(Bytes::from(r.data))
}
