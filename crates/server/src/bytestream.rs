//! ByteStream: Read (with `read_offset` and `read_limit`), Write (resumable, verified) and
//! QueryWriteStatus, for `blobs/` and `compressed-blobs/zstd/` resource names.
//!
//! A write feeds a store `put` through a bounded channel while it streams: memory is bounded by
//! the channel depth, never by the blob. The put's body is checked against the digest (size as
//! it passes, hash at the end) before the store commits, so a mismatching upload stores
//! nothing. If the client goes away mid-write, the upload waits `resume_timeout` for a new
//! stream with the same upload id to continue from the committed offset
//! (`QueryWriteStatus` tells it where), then is abandoned, leaving nothing behind.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cairn_core::{stream as blob_stream, BlobStream, Digest, DigestFunction, Error};
use cairn_store::{StoreExt, StoreRef};
use futures::stream::{BoxStream, Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::bytestream_wire::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use crate::instances::Instances;
use crate::metrics::Metrics;
use crate::resource::{self, Compressor};
use crate::zstd_codec::{StreamDecoder, StreamEncoder};
use crate::Limits;

/// Chunks buffered between a write stream and its store put.
const WRITE_DEPTH: usize = 16;

/// A chunk on its way to a store put, holding its share of the listener's upload buffer
/// ([`Limits::upload_buffer_bytes`], counted in KiB) until the put takes it: past the buffer,
/// writers wait for their stores to take what they sent (HTTP/2 flow control then holds the
/// clients back), so many uploads into a slow store cannot fill memory.
type Buffered = (Bytes, Option<tokio::sync::OwnedSemaphorePermit>);

pub struct ByteStreamService {
    instances: Instances,
    limits: Limits,
    metrics: Arc<Metrics>,
    uploads: Arc<Mutex<HashMap<String, Arc<Upload>>>>,
    /// [`Limits::upload_buffer_bytes`], in KiB.
    buffered: Arc<tokio::sync::Semaphore>,
    /// Instances that take and send `compressed-blobs/zstd` (`capabilities.remote_cache_compression`).
    zstd: Arc<std::collections::BTreeSet<String>>,
}

/// An upload in progress; `state` is held by the one stream feeding it.
struct Upload {
    digest: Digest,
    compressor: Compressor,
    /// `state.committed`, readable while a stream holds the state (QueryWriteStatus).
    progress: std::sync::atomic::AtomicU64,
    state: tokio::sync::Mutex<UploadState>,
}

struct UploadState {
    /// Bytes received, as sent on the wire (compressed bytes for zstd).
    committed: u64,
    /// Uncompressed bytes passed to the store.
    decoded: u64,
    sender: Option<mpsc::Sender<Result<Buffered, Error>>>,
    done: Option<oneshot::Receiver<Result<(), Error>>>,
    decoder: Option<StreamDecoder>,
    /// Bumped by every stream that attaches; the abandon timer only fires for its own.
    generation: u64,
}

impl ByteStreamService {
    pub fn new(instances: Instances, limits: Limits, metrics: Arc<Metrics>) -> ByteStreamService {
        ByteStreamService {
            instances,
            limits,
            metrics,
            uploads: Arc::default(),
            buffered: Arc::new(tokio::sync::Semaphore::new(
                (limits.upload_buffer_bytes >> 10).min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            zstd: Arc::default(),
        }
    }

    /// Serves `compressed-blobs/zstd` names for these instances only.
    pub fn with_zstd(
        mut self,
        instances: Arc<std::collections::BTreeSet<String>>,
    ) -> ByteStreamService {
        self.zstd = instances;
        self
    }

    /// Refuses a `compressed-blobs/zstd` name on an instance without zstd.
    fn check_compressor(&self, res: &resource::Resource) -> Result<(), Error> {
        if res.compressor == Compressor::Zstd && !self.zstd.contains(&res.instance) {
            return Err(Error::invalid_argument(format!(
                "{}: zstd (compressed-blobs/zstd) is not enabled for instance {:?} (capabilities remote_cache_compression); use blobs/",
                res.digest, res.instance
            )));
        }
        Ok(())
    }

    fn default_function() -> DigestFunction {
        DigestFunction::default_for_64_hex()
    }

    /// Starts the store put for a new upload.
    fn start_upload(
        &self,
        store: StoreRef,
        digest: Digest,
        compressor: Compressor,
    ) -> Result<Upload, Error> {
        let (tx, rx) = mpsc::channel::<Result<Buffered, Error>>(WRITE_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        // The permit is dropped as the put takes the chunk.
        let body: BlobStream = futures::stream::poll_fn({
            let mut rx = rx;
            move |cx| rx.poll_recv(cx)
        })
        .map(|r| r.map(|(chunk, _permit)| chunk))
        .boxed();
        let body = blob_stream::verified(body, digest, true);
        // The put carries the client's headers (a `grpc` store's `forward_headers`).
        cairn_store::client_headers::spawn(async move {
            let _ = done_tx.send(store.put(&digest, body).await);
        });
        Ok(Upload {
            digest,
            compressor,
            progress: Default::default(),
            state: tokio::sync::Mutex::new(UploadState {
                committed: 0,
                decoded: 0,
                sender: Some(tx),
                done: Some(done_rx),
                decoder: match compressor {
                    Compressor::Zstd => Some(StreamDecoder::new()?),
                    Compressor::Identity => None,
                },
                generation: 0,
            }),
        })
    }

    async fn write_inner(
        &self,
        mut stream: impl Stream<Item = Result<WriteRequest, Status>> + Unpin,
    ) -> Result<WriteResponse, Error> {
        let first = match stream.next().await.transpose() {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Error::invalid_argument(
                    "Write: the stream carried no request",
                ))
            }
            Err(s) => return Err(Error::from(s).context("Write")),
        };
        let res = resource::parse(&first.resource_name, true, Self::default_function())?;
        let store = self.instances.get(&res.instance)?.clone();
        self.check_compressor(&res)?;
        let digest = res.digest;
        crate::otlp::traces::record_request(&res.instance, Some(&digest));
        let key = format!(
            "{}\u{0}{}\u{0}{}",
            res.instance,
            res.upload_id.as_deref().unwrap_or_default(),
            first.resource_name
        );

        let existing = self.uploads.lock().get(&key).cloned();
        if existing.is_none() && first.write_offset == 0 && store.has(&digest).await?.is_some() {
            // Already stored: done without reading the rest (the REAPI allows this).
            return Ok(WriteResponse {
                committed_size: match res.compressor {
                    Compressor::Identity => digest.size() as i64,
                    Compressor::Zstd => -1,
                },
            });
        }
        let upload = match existing {
            Some(u) => u,
            None => {
                if self.uploads.lock().len() >= self.limits.max_uploads {
                    return Err(Error::resource_exhausted(format!(
                        "Write {}: this listener already has {} uploads in progress (its limit, advanced_http.max_uploads); retry later",
                        first.resource_name, self.limits.max_uploads
                    )));
                }
                let u = Arc::new(self.start_upload(store, digest, res.compressor)?);
                self.uploads.lock().entry(key.clone()).or_insert(u).clone()
            }
        };
        let Ok(mut state) = upload.state.try_lock() else {
            return Err(Error::new(
                cairn_core::Code::Aborted,
                format!(
                    "Write {}: this upload is being written by another stream",
                    first.resource_name
                ),
            ));
        };
        state.generation += 1;
        let generation = state.generation;

        let mut msg = Some(first);
        loop {
            let m = match msg.take() {
                Some(m) => m,
                None => match stream.next().await.transpose() {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        drop(state);
                        self.abandon_later(key, upload.clone(), generation);
                        return Err(Error::invalid_argument(
                            "Write: the stream ended without finish_write; resume it with the same upload id",
                        ));
                    }
                    Err(s) => {
                        drop(state);
                        self.abandon_later(key, upload.clone(), generation);
                        return Err(Error::from(s)
                            .context("Write interrupted; resume it with the same upload id"));
                    }
                },
            };
            if let Err(e) = self.feed(&upload, &mut state, m.write_offset, m.data).await {
                self.abort(&key, &mut state, e.clone()).await;
                return Err(e);
            }
            if m.finish_write {
                return self.finish(&key, &upload, &mut state).await;
            }
        }
    }

    /// Passes one message's data to the store put.
    async fn feed(
        &self,
        upload: &Upload,
        st: &mut UploadState,
        offset: i64,
        data: Bytes,
    ) -> Result<(), Error> {
        let d = upload.digest;
        if offset < 0 {
            return Err(Error::invalid_argument(format!(
                "Write {d}: write_offset {offset} is negative"
            )));
        }
        let offset = offset as u64;
        if offset > st.committed {
            return Err(Error::invalid_argument(format!(
                "Write {d}: write_offset {offset} is past the {} bytes committed so far",
                st.committed
            )));
        }
        // A resumed client may resend bytes we already have; skip them.
        let skip = (st.committed - offset) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        // A slice of the message's own buffer (grpc_body copied it there once, from the HTTP/2
        // frames), so the store keeps no memory that is not blob bytes.
        let data = data.slice(skip..);
        st.committed += data.len() as u64;
        upload
            .progress
            .store(st.committed, std::sync::atomic::Ordering::Relaxed);
        let chunks = match st.decoder.as_mut() {
            Some(dec) => dec
                .feed(&data)
                .map_err(|e| e.context(format!("Write {d}")))?,
            None => vec![data],
        };
        for chunk in chunks {
            st.decoded += chunk.len() as u64;
            if st.decoded > d.size() {
                return Err(Error::invalid_argument(format!(
                    "Write {d}: {} bytes written, past the declared size of {}",
                    st.decoded,
                    d.size()
                )));
            }
            let Some(tx) = st.sender.as_ref() else {
                return Err(Error::internal(format!("Write {d}: upload already closed")));
            };
            let kib = (chunk.len().div_ceil(1024))
                .min(self.limits.upload_buffer_bytes >> 10)
                .min(u32::MAX as usize) as u32;
            // Never closed: the semaphore lives as long as the service.
            let permit = self.buffered.clone().acquire_many_owned(kib).await.ok();
            if tx.send(Ok((chunk, permit))).await.is_err() {
                // The put ended early: its result says why.
                return Err(self.put_result(st).await.err().unwrap_or_else(|| {
                    Error::internal(format!("Write {d}: the store stopped reading"))
                }));
            }
        }
        Ok(())
    }

    async fn put_result(&self, st: &mut UploadState) -> Result<(), Error> {
        st.sender = None;
        match st.done.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(Error::internal("store put task ended"))),
            None => Err(Error::internal("upload already finished")),
        }
    }

    async fn finish(
        &self,
        key: &str,
        upload: &Upload,
        st: &mut UploadState,
    ) -> Result<WriteResponse, Error> {
        let d = upload.digest;
        if st.decoded != d.size() {
            let e = Error::invalid_argument(format!(
                "Write {d}: finish_write after {} bytes, but the digest says {}",
                st.decoded,
                d.size()
            ));
            self.abort(key, st, e.clone()).await;
            return Err(e);
        }
        let result = self.put_result(st).await;
        self.uploads.lock().remove(key);
        result?;
        Ok(WriteResponse {
            committed_size: match upload.compressor {
                Compressor::Identity => st.committed as i64,
                Compressor::Zstd => st.committed as i64,
            },
        })
    }

    /// Fails the put (so that the store discards it) and forgets the upload.
    async fn abort(&self, key: &str, st: &mut UploadState, why: Error) {
        if let Some(tx) = st.sender.take() {
            let _ = tx.send(Err(why)).await;
        }
        if let Some(rx) = st.done.take() {
            let _ = rx.await;
        }
        self.uploads.lock().remove(key);
    }

    /// After the resume timeout, abandons an upload that no new stream took over.
    fn abandon_later(&self, key: String, upload: Arc<Upload>, generation: u64) {
        let uploads = self.uploads.clone();
        let timeout = self.limits.resume_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Ok(mut st) = upload.state.try_lock() else {
                return;
            };
            if st.generation != generation {
                return;
            }
            if let Some(tx) = st.sender.take() {
                let _ = tx
                    .send(Err(Error::cancelled(
                        "upload abandoned: not resumed in time",
                    )))
                    .await;
            }
            if let Some(rx) = st.done.take() {
                let _ = rx.await;
            }
            let mut map = uploads.lock();
            if map.get(&key).is_some_and(|u| Arc::ptr_eq(u, &upload)) {
                map.remove(&key);
            }
        });
    }

    async fn read_inner(
        &self,
        req: ReadRequest,
    ) -> Result<BoxStream<'static, Result<ReadResponse, Status>>, Error> {
        let res = resource::parse(&req.resource_name, false, Self::default_function())?;
        let store = self.instances.get(&res.instance)?.clone();
        self.check_compressor(&res)?;
        let d = res.digest;
        crate::otlp::traces::record_request(&res.instance, Some(&d));
        if req.read_offset < 0 {
            return Err(Error::invalid_argument(format!(
                "Read {d}: read_offset {} is negative",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Error::invalid_argument(format!(
                "Read {d}: read_limit {} is negative",
                req.read_limit
            )));
        }
        let offset = req.read_offset as u64;
        if offset > d.size() {
            return Err(Error::out_of_range(format!(
                "Read {d}: read_offset {offset} is past the end of the blob ({} bytes)",
                d.size()
            )));
        }
        let limit = (req.read_limit > 0).then_some(req.read_limit as u64);
        if d.is_empty_blob() {
            return Ok(match res.compressor {
                Compressor::Identity => futures::stream::empty().boxed(),
                Compressor::Zstd => {
                    let mut enc = StreamEncoder::new()?;
                    let data = enc.finish()?;
                    futures::stream::once(async move { Ok(ReadResponse { data }) }).boxed()
                }
            });
        }
        if res.compressor == Compressor::Zstd && (offset != 0 || limit.is_some()) {
            return Err(Error::invalid_argument(format!(
                "Read {d}: read_offset and read_limit are not supported for compressed-blobs reads"
            )));
        }
        let body = store.get(&d, offset, limit).await?;
        let expected = limit.map_or(d.size() - offset, |l| l.min(d.size() - offset));
        let body = exact_length(body, expected, d);
        let body = rechunk(body, self.limits.read_chunk_bytes.max(1));
        Ok(match res.compressor {
            Compressor::Identity => body
                .map(|r| r.map(|b| ReadResponse { data: b }).map_err(Status::from))
                .boxed(),
            Compressor::Zstd => zstd_read(body)?,
        })
    }
}

/// Fails the read (DATA_LOSS) when the store gives more or fewer bytes than the digest's
/// size says the range has: a truncated or overlong blob is never served as the blob.
fn exact_length(body: BlobStream, expected: u64, d: Digest) -> BlobStream {
    futures::stream::unfold((body, 0u64, false), move |(mut body, seen, done)| async move {
        if done {
            return None;
        }
        let wrong = |seen: u64| {
            Error::data_loss(format!(
                "Read {d}: the stored blob gives {seen} bytes where {expected} were expected; it is not served"
            ))
        };
        match body.next().await {
            Some(Ok(chunk)) => {
                let seen = seen + chunk.len() as u64;
                if seen > expected {
                    Some((Err(wrong(seen)), (body, seen, true)))
                } else {
                    Some((Ok(chunk), (body, seen, false)))
                }
            }
            Some(Err(e)) => Some((Err(e), (body, seen, true))),
            None if seen != expected => Some((Err(wrong(seen)), (body, seen, true))),
            None => None,
        }
    })
    .boxed()
}

/// Splits chunks larger than one ReadResponse should carry.
fn rechunk(body: BlobStream, chunk: usize) -> BlobStream {
    body.flat_map(move |r| match r {
        Ok(b) if b.len() > chunk => blob_stream::once_chunked(b, chunk),
        other => futures::stream::iter(vec![other]).boxed(),
    })
    .boxed()
}

fn zstd_read(body: BlobStream) -> Result<BoxStream<'static, Result<ReadResponse, Status>>, Error> {
    let enc = StreamEncoder::new()?;
    let s = futures::stream::unfold((body, Some(enc)), |(mut body, mut enc)| async move {
        let e = enc.as_mut()?;
        match body.next().await {
            Some(Ok(chunk)) => {
                let out = e.feed(&chunk);
                Some((
                    out.map(|data| ReadResponse { data }).map_err(Status::from),
                    (body, enc),
                ))
            }
            Some(Err(err)) => Some((Err(Status::from(err)), (body, None))),
            None => {
                let out = e.finish();
                Some((
                    out.map(|data| ReadResponse { data }).map_err(Status::from),
                    (body, None),
                ))
            }
        }
    })
    .filter(|r| futures::future::ready(!matches!(r, Ok(ReadResponse { data }) if data.is_empty())));
    Ok(s.boxed())
}

/// The three RPCs, called by [`crate::bytestream_wire::ByteStreamServer`].
impl ByteStreamService {
    pub async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<crate::bytestream_wire::ReadStream>, Status> {
        let timer = self.metrics.rpc("bytestream", "Read");
        let r = self
            .read_inner(request.into_inner())
            .await
            .map_err(Status::from);
        timer.finish(&r);
        r.map(Response::new)
    }

    /// ByteStream.Write of the request messages `stream` (see [`crate::grpc_body`]).
    pub async fn write(
        &self,
        stream: impl Stream<Item = Result<WriteRequest, Status>> + Unpin,
    ) -> Result<WriteResponse, Status> {
        let timer = self.metrics.rpc("bytestream", "Write");
        let r = self.write_inner(stream).await.map_err(Status::from);
        timer.finish(&r);
        r
    }

    pub async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let timer = self.metrics.rpc("bytestream", "QueryWriteStatus");
        let r = async {
            let name = request.into_inner().resource_name;
            let res = resource::parse(&name, true, Self::default_function())?;
            let store = self.instances.get(&res.instance)?.clone();
            let key = format!(
                "{}\u{0}{}\u{0}{}",
                res.instance,
                res.upload_id.as_deref().unwrap_or_default(),
                name
            );
            let upload = self.uploads.lock().get(&key).cloned();
            if let Some(u) = upload {
                let committed = u.progress.load(std::sync::atomic::Ordering::Relaxed);
                return Ok(QueryWriteStatusResponse {
                    committed_size: committed as i64,
                    complete: false,
                });
            }
            if res.digest.is_empty_blob() || store.has(&res.digest).await?.is_some() {
                return Ok(QueryWriteStatusResponse {
                    committed_size: res.digest.size() as i64,
                    complete: true,
                });
            }
            Err(Error::not_found(format!(
                "QueryWriteStatus: no upload {name:?} is in progress and the blob is not stored"
            )))
        }
        .await
        .map_err(Status::from);
        timer.finish(&r);
        r.map(Response::new)
    }
}
