//! `grpc`: a store on another REAPI server. `store_type: "cas"` speaks ContentAddressableStorage
//! and ByteStream; `store_type: "ac"` speaks ActionCache (values are serialized
//! `ActionResult`s). It is what a worker uses to reach the CAS and AC of a split deployment.
//!
//! Uploads stream through ByteStream.Write; the remote server verifies them. Reads stream
//! through ByteStream.Read with offset and limit. Connections are made lazily and reused:
//! `connections_per_endpoint` of them per endpoint, each with at most `concurrency_limit`
//! requests in flight; `max_concurrent_requests` bounds the store's requests in all. `retry`
//! retries what can be sent again whole (FindMissingBlobs, GetActionResult,
//! UpdateActionResult, and opening a read) on the codes of `retry_on_errors`, with exponential
//! backoff and jitter; an upload is never retried, since its body streams once.
//!
//! Each endpoint's connections follow its `connect_timeout_s`, `tcp_keepalive_s` and
//! `http2_keepalive_*` keys; `rpc_timeout_s` bounds each call, a read's stream included.
//! Every call carries the static `headers` and the `forward_headers` of the client request
//! being served (`client_headers`). Blob names carry the digest function unless
//! `use_legacy_resource_names`. With `experimental_read_batching` whole reads of small blobs
//! go in `BatchReadBlobs` calls (`grpc/read_batching.rs`). With `experimental_remote_cache_compression` uploads and whole
//! reads of CAS blobs of 64 KiB or more travel as `compressed-blobs/zstd`.

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::GrpcStore as GrpcConfig;
use cairn_core::bytestream_wire::{ReadRequest, ReadResponse, WriteRequest, WriteResponse};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{stream, BlobStream, Digest, DigestFunction, Error};
use futures::StreamExt;
use prost::Message;
use tonic::transport::Channel;

use crate::{Health, Store, StoreInfo};

mod call_headers;
mod read_batching;
mod retry;
mod zstd_wire;

use call_headers::CallHeaders;
pub use retry::RetryPolicy;

/// Smallest blob sent or fetched as zstd with `experimental_remote_cache_compression`.
const ZSTD_MIN: u64 = 64 << 10;

/// Largest message sent or accepted.
const MAX_MESSAGE: usize = 64 << 20;
/// Bytes per ByteStream.Write message.
const WRITE_CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cas,
    Ac,
}

pub struct GrpcStore {
    instance: String,
    kind: Kind,
    channels: crate::channel::Pool,
    addresses: Vec<String>,
    retry: RetryPolicy,
    /// `max_concurrent_requests`.
    permits: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// `use_legacy_resource_names`.
    legacy_names: bool,
    /// `rpc_timeout_s`, when set.
    rpc_timeout: Option<std::time::Duration>,
    /// `headers` and `forward_headers`.
    headers: CallHeaders,
    /// `experimental_remote_cache_compression` (a CAS store only).
    zstd: bool,
    /// `experimental_read_batching` (a CAS store only).
    batcher: Option<read_batching::ReadBatcher>,
}

/// Checks the config without connecting: the store type, and that every endpoint is an
/// address whose TLS files load. Returns the kind and the endpoints.
pub fn check(cfg: &GrpcConfig) -> Result<(Kind, Vec<tonic::transport::Endpoint>), Error> {
    let kind = match cfg.store_type.as_deref().unwrap_or("cas") {
        "cas" => Kind::Cas,
        "ac" => Kind::Ac,
        other => {
            return Err(Error::invalid_argument(format!(
                "grpc.store_type: expected \"cas\" or \"ac\", found {other:?}"
            )))
        }
    };
    if cfg.endpoints.is_empty() {
        return Err(Error::invalid_argument(
            "grpc.endpoints: at least one endpoint is needed",
        ));
    }
    let endpoints = cfg
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            crate::channel::endpoint(
                &e.address,
                e.tls_config.as_ref(),
                &format!("grpc.endpoints[{i}]"),
            )
        })
        .collect::<Result<_, _>>()?;
    RetryPolicy::from_config(cfg.retry.as_ref())?;
    if cfg.connections_per_endpoint == Some(0) {
        return Err(Error::invalid_argument(
            "grpc.connections_per_endpoint: expected at least 1",
        ));
    }
    if cfg.max_concurrent_requests == Some(0) {
        return Err(Error::invalid_argument(
            "grpc.max_concurrent_requests: expected at least 1 (leave it out for no limit)",
        ));
    }
    for (i, e) in cfg.endpoints.iter().enumerate() {
        if e.concurrency_limit == Some(0) {
            return Err(Error::invalid_argument(format!(
                "grpc.endpoints[{i}].concurrency_limit: expected at least 1 (leave it out for no limit)"
            )));
        }
    }
    CallHeaders::from_config(cfg)?;
    if let Some(b) = &cfg.experimental_read_batching {
        if !cfg.forward_headers.is_empty() {
            return Err(Error::invalid_argument(
                "grpc.experimental_read_batching: cannot be used with forward_headers (one batch serves many clients, whose headers differ)",
            ));
        }
        read_batching::check(b)?;
    }
    Ok((kind, endpoints))
}

/// Adds the caller's W3C trace context to each outgoing request.
type Inject = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;
type Traced = tonic::service::interceptor::InterceptedService<Channel, Inject>;

fn traced(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    cairn_core::trace_context::inject_metadata(request.metadata_mut());
    Ok(request)
}

impl GrpcStore {
    pub fn new(cfg: &GrpcConfig) -> Result<GrpcStore, Error> {
        let (kind, _) = check(cfg)?;
        let rpc_timeout =
            (cfg.rpc_timeout_s > 0).then(|| std::time::Duration::from_secs(cfg.rpc_timeout_s));
        let addresses: Vec<String> = cfg.endpoints.iter().map(|e| e.address.clone()).collect();
        let files = crate::channel::tls_files(cfg.endpoints.iter().map(|e| e.tls_config.as_ref()));
        let build_cfg = cfg.clone();
        let channels = crate::channel::Pool::new("grpc.endpoints", files, move || {
            GrpcStore::channels(&build_cfg, rpc_timeout)
        })?;
        let headers = CallHeaders::from_config(cfg)?;

        let batcher = match (&cfg.experimental_read_batching, kind) {
            (Some(b), Kind::Cas) => Some(read_batching::ReadBatcher::new(
                *b,
                read_batching::Upstream {
                    channels: channels.clone(),
                    instance: cfg.instance_name.clone(),
                    headers: headers.fixed.clone(),
                    addresses: addresses.join(","),
                    max_message: MAX_MESSAGE,
                },
            )),
            _ => None,
        };
        Ok(GrpcStore {
            batcher,
            instance: cfg.instance_name.clone(),
            kind,
            channels,
            addresses,
            retry: RetryPolicy::from_config(cfg.retry.as_ref())?,
            permits: cfg.max_concurrent_requests.map(|n| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(
                    n.min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
                ))
            }),
            legacy_names: cfg.use_legacy_resource_names,
            zstd: kind == Kind::Cas && cfg.experimental_remote_cache_compression == Some(true),
            rpc_timeout,
            headers: {
                if !headers.forward.is_empty() {
                    crate::client_headers::set_wanted();
                }
                headers
            },
        })
    }

    /// One lazy channel per connection of each endpoint (TLS files read now).
    fn channels(
        cfg: &GrpcConfig,
        rpc_timeout: Option<std::time::Duration>,
    ) -> Result<Vec<Channel>, Error> {
        let (_, endpoints) = check(cfg)?;
        let mut channels = Vec::new();
        for (ep, e) in endpoints.into_iter().zip(&cfg.endpoints) {
            let ep = ep
                .tcp_nodelay(true)
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(16 << 20))
                // Blobs arrive in 256 KiB frames rather than 16 KiB ones (BENCHMARKS.md).
                .max_frame_size(Some(256 << 10));
            let ep = crate::channel::with_endpoint_settings(ep, e);
            let ep = match rpc_timeout {
                Some(t) => ep.timeout(t),
                None => ep,
            };
            // Each lazy channel is a connection of its own.
            for _ in 0..cfg.connections_per_endpoint.unwrap_or(1).min(64) {
                channels.push(ep.connect_lazy());
            }
        }
        Ok(channels)
    }

    /// A request carrying this store's headers.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        self.headers.apply(r.metadata_mut());
        r
    }

    fn channel(&self) -> Channel {
        self.channels.pick()
    }

    fn cas(
        &self,
    ) -> re::content_addressable_storage_client::ContentAddressableStorageClient<Traced> {
        re::content_addressable_storage_client::ContentAddressableStorageClient::with_interceptor(
            self.channel(),
            traced as Inject,
        )
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
    }

    fn ac(&self) -> re::action_cache_client::ActionCacheClient<Traced> {
        re::action_cache_client::ActionCacheClient::with_interceptor(
            self.channel(),
            traced as Inject,
        )
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamWire {
        ByteStreamWire(
            tonic::client::Grpc::new(tonic::service::interceptor::InterceptedService::new(
                self.channel(),
                traced as Inject,
            ))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// `blobs/FUNCTION/HASH/SIZE`, or `blobs/HASH/SIZE` with `use_legacy_resource_names`;
    /// `compressed-blobs/zstd/...` when `zstd`.
    fn path(&self, key: &Digest, zstd: bool) -> String {
        let blobs = if zstd {
            "compressed-blobs/zstd"
        } else {
            "blobs"
        };
        if self.legacy_names {
            format!("{blobs}/{}/{}", key.hash_hex(), key.size())
        } else {
            format!(
                "{blobs}/{}/{}/{}",
                key.function().name(),
                key.hash_hex(),
                key.size()
            )
        }
    }

    fn upstream(&self, e: tonic::Status) -> Error {
        Error::from(crate::channel::connection_status(e))
            .context(format!("upstream {}", self.addresses.join(",")))
    }

    /// A slot of `max_concurrent_requests`, held for the call (and a read's stream).
    async fn permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match &self.permits {
            Some(p) => p.clone().acquire_owned().await.ok(),
            None => None,
        }
    }

    /// Runs `call` (a request that can be sent again whole), retrying per `retry`.
    async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            match call().await.map_err(crate::channel::connection_status) {
                Err(e) if self.retry.retries(attempt, e.code()) => {
                    tracing::debug!(upstream = %self.addresses.join(","), code = ?e.code(), attempt, "retrying");
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Store for GrpcStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        match self.kind {
            Kind::Cas => {
                let mut out = vec![None; keys.len()];
                // One request per digest function.
                for f in DigestFunction::ALL {
                    let idx: Vec<usize> = (0..keys.len())
                        .filter(|&i| keys[i].function() == f)
                        .collect();
                    if idx.is_empty() {
                        continue;
                    }
                    let request = re::FindMissingBlobsRequest {
                        instance_name: self.instance.clone(),
                        blob_digests: idx.iter().map(|&i| keys[i].to_proto()).collect(),
                        digest_function: f.to_proto(),
                    };
                    let _permit = self.permit().await;
                    let resp = self
                        .retried(|| {
                            let mut client = self.cas();
                            let request = self.request(request.clone());
                            async move { client.find_missing_blobs(request).await }
                        })
                        .await
                        .map_err(|e| self.upstream(e))?
                        .into_inner();
                    let missing: std::collections::HashSet<(String, i64)> = resp
                        .missing_blob_digests
                        .into_iter()
                        .map(|d| (d.hash, d.size_bytes))
                        .collect();
                    for i in idx {
                        let d = keys[i].to_proto();
                        if !missing.contains(&(d.hash, d.size_bytes)) {
                            out[i] = Some(keys[i].size());
                        }
                    }
                }
                Ok(out)
            }
            Kind::Ac => {
                let mut out = Vec::with_capacity(keys.len());
                for k in keys {
                    out.push(match self.get_action_result(k).await {
                        Ok(b) => Some(b.len() as u64),
                        Err(e) if e.is_not_found() => None,
                        Err(e) => return Err(e),
                    });
                }
                Ok(out)
            }
        }
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        if self.kind == Kind::Ac {
            let data = self.get_action_result(key).await?;
            let (start, len) = crate::check_range(key, data.len() as u64, offset, length)?;
            return Ok(stream::once(
                data.slice(start as usize..(start + len) as usize),
            ));
        }
        if key.is_empty_blob() {
            return Ok(stream::empty());
        }
        let whole = offset == 0 && length.is_none_or(|l| l >= key.size());
        if let Some(b) = self.batcher.as_ref().filter(|b| whole && b.takes(key)) {
            // Queued for a batch, unless the queue is full.
            if let Some(r) = b.read(key).await {
                return r.map(stream::once);
            }
        }
        let zstd = self.zstd && whole && key.size() >= ZSTD_MIN;
        let request = ReadRequest {
            resource_name: format!("{}{}", self.prefix(), self.path(key, zstd)),
            read_offset: if zstd { 0 } else { offset as i64 },
            read_limit: if zstd { 0 } else { length.unwrap_or(0) as i64 },
        };
        let permit = self.permit().await;
        let resp = self
            .retried(|| {
                let mut client = self.bytestream();
                let request = self.request(request.clone());
                async move { client.read(request).await }
            })
            .await
            .map_err(|e| self.upstream(e))?
            .into_inner();
        let addresses = self.addresses.join(",");
        let addresses2 = addresses.clone();
        let body = resp
            .map(move |r| {
                // The permit lives as long as the stream.
                let _ = &permit;
                r.map(|m| m.data)
                    .map_err(|e| Error::from(e).context(format!("upstream {addresses}")))
            })
            .boxed();
        let body = if zstd {
            zstd_wire::decompress(body, key.size(), format!("upstream {addresses2} {key}"))
        } else {
            body
        };
        Ok(match self.rpc_timeout {
            Some(t) => within(body, t, self.addresses.join(",")),
            None => body,
        })
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        if self.kind == Kind::Ac {
            let data = stream::collect(body, MAX_MESSAGE).await?;
            let result = re::ActionResult::decode(data.as_ref()).map_err(|e| {
                Error::invalid_argument(format!("{key}: value is not an ActionResult: {e}"))
            })?;
            let request = re::UpdateActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(key.to_proto()),
                action_result: Some(result),
                results_cache_policy: None,
                digest_function: key.function().to_proto(),
            };
            let _permit = self.permit().await;
            self.retried(|| {
                let mut client = self.ac();
                let request = self.request(request.clone());
                async move { client.update_action_result(request).await }
            })
            .await
            .map_err(|e| self.upstream(e))?;
            return Ok(());
        }
        let zstd = self.zstd && key.size() >= ZSTD_MIN;
        let body = if zstd {
            zstd_wire::compress(body)
        } else {
            body
        };
        let name = format!(
            "{}uploads/{}/{}",
            self.prefix(),
            uuid::Uuid::new_v4(),
            self.path(key, zstd)
        );
        let size = key.size();
        // Re-chunk the body into Write messages; the last one carries finish_write. An error
        // in the body ends the request stream without finish_write, which the server treats
        // as an interrupted upload (nothing stored).
        let failure = std::sync::Arc::new(std::sync::OnceLock::<Error>::new());
        let feed = Feed {
            body,
            name,
            offset: 0,
            first: true,
            done: false,
            pending: Default::default(),
            failure: failure.clone(),
        };
        let _permit = self.permit().await;
        let mut md = tonic::metadata::MetadataMap::new();
        self.headers.apply(&mut md);
        let result = upload(self.bytestream(), feed, md).await;
        if let Some(e) = failure.get().cloned() {
            return Err(e);
        }
        let committed = result
            .map_err(|e| self.upstream(e))?
            .into_inner()
            .committed_size;
        // A compressed upload's committed size counts wire bytes (or is -1); the upstream
        // checked the blob's size and hash itself.
        if !zstd && committed != size as i64 && committed != -1 {
            return Err(Error::internal(format!(
                "upstream {} committed {committed} bytes of {key}",
                self.addresses.join(",")
            )));
        }
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::leaf("grpc")
    }

    async fn health(&self) -> Health {
        Health::Ok
    }
}

impl GrpcStore {
    async fn get_action_result(&self, key: &Digest) -> Result<Bytes, Error> {
        let request = re::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(key.to_proto()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: vec![],
            digest_function: key.function().to_proto(),
        };
        let _permit = self.permit().await;
        let r = self
            .retried(|| {
                let mut client = self.ac();
                let request = self.request(request.clone());
                async move { client.get_action_result(request).await }
            })
            .await
            .map_err(|e| self.upstream(e))?
            .into_inner();
        Ok(r.encode_to_vec().into())
    }
}

/// The state of one upload's request stream.
struct Feed {
    body: BlobStream,
    name: String,
    offset: u64,
    first: bool,
    done: bool,
    pending: std::collections::VecDeque<Bytes>,
    failure: std::sync::Arc<std::sync::OnceLock<Error>>,
}

/// Next Write message of an upload.
async fn write_step(mut f: Feed) -> Option<(WriteRequest, Feed)> {
    if f.done {
        return None;
    }
    loop {
        let (data, finish) = if let Some(d) = f.pending.pop_front() {
            (d, false)
        } else {
            match f.body.next().await {
                Some(Ok(mut b)) => {
                    while b.len() > WRITE_CHUNK {
                        f.pending.push_back(b.split_to(WRITE_CHUNK));
                    }
                    if !b.is_empty() {
                        f.pending.push_back(b);
                    }
                    continue;
                }
                Some(Err(e)) => {
                    let _ = f.failure.set(e);
                    return None;
                }
                None => {
                    f.done = true;
                    (Bytes::new(), true)
                }
            }
        };
        let len = data.len() as u64;
        let msg = WriteRequest {
            resource_name: if f.first {
                f.name.clone()
            } else {
                String::new()
            },
            write_offset: f.offset as i64,
            finish_write: finish,
            data,
        };
        f.first = false;
        f.offset += len;
        return Some((msg, f));
    }
}

/// Sends one upload's messages. The body is pumped into a bounded channel by a task of its
/// own: tonic needs a request stream it can share between threads, which a body stream is not.
async fn upload(
    mut client: ByteStreamWire,
    feed: Feed,
    metadata: tonic::metadata::MetadataMap,
) -> Result<tonic::Response<WriteResponse>, tonic::Status> {
    // One message waits here while the pump holds the next: with tonic's encoding buffer and
    // h2's send queue, an upload holds about four messages below the store.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteRequest>(1);
    let pump = tokio::spawn(async move {
        let mut feed = Some(feed);
        while let Some(f) = feed.take() {
            let Some((msg, next)) = write_step(f).await else {
                break;
            };
            if tx.send(msg).await.is_err() {
                break;
            }
            feed = Some(next);
        }
    });
    let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut request = tonic::Request::new(requests);
    *request.metadata_mut() = metadata;
    let result = client.write(request).await;
    pump.abort();
    result
}

/// A ByteStream client over the `Bytes`-payload wire types, so that an upload's chunks reach
/// tonic's encoder without being copied into a `Vec` first.
struct ByteStreamWire(tonic::client::Grpc<Traced>);

impl ByteStreamWire {
    async fn ready(&mut self) -> Result<(), tonic::Status> {
        self.0
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))
    }

    async fn read(
        &mut self,
        request: tonic::Request<ReadRequest>,
    ) -> Result<tonic::Response<tonic::codec::Streaming<ReadResponse>>, tonic::Status> {
        self.ready().await?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/google.bytestream.ByteStream/Read",
        );
        self.0
            .server_streaming(request, path, tonic_prost::ProstCodec::default())
            .await
    }

    async fn write<S>(
        &mut self,
        request: tonic::Request<S>,
    ) -> Result<tonic::Response<WriteResponse>, tonic::Status>
    where
        S: futures::Stream<Item = WriteRequest> + Send + 'static,
    {
        self.ready().await?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/google.bytestream.ByteStream/Write",
        );
        self.0
            .client_streaming(request, path, tonic_prost::ProstCodec::default())
            .await
    }
}

/// `body`, ending with DEADLINE_EXCEEDED if it has not ended `limit` after the call began.
fn within(body: BlobStream, limit: std::time::Duration, upstream: String) -> BlobStream {
    let deadline = tokio::time::Instant::now() + limit;
    futures::stream::unfold(Some(body), move |body| {
        let upstream = upstream.clone();
        async move {
            let mut body = body?;
            match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(Some(item)) => Some((item, Some(body))),
                Ok(None) => None,
                Err(_) => Some((
                    Err(Error::new(
                        cairn_core::Code::DeadlineExceeded,
                        format!(
                            "upstream {upstream}: read still running after rpc_timeout_s ({limit:?})"
                        ),
                    )),
                    None,
                )),
            }
        }
    })
    .boxed()
}
