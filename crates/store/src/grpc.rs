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

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::GrpcStore as GrpcConfig;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::{
    byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest,
};
use cairn_core::{stream, BlobStream, Digest, DigestFunction, Error};
use futures::StreamExt;
use prost::Message;
use tonic::transport::Channel;

use crate::{Health, Store, StoreInfo};

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
    channels: Vec<Channel>,
    next: AtomicUsize,
    addresses: Vec<String>,
    retry: RetryPolicy,
    /// `max_concurrent_requests`.
    permits: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

/// `retry` of the config, checked.
#[derive(Debug, Clone, Default)]
pub struct RetryPolicy {
    max_retries: u32,
    delay: std::time::Duration,
    jitter: f64,
    codes: Vec<tonic::Code>,
}

impl RetryPolicy {
    pub fn from_config(r: Option<&cairn_config::stores::Retry>) -> Result<RetryPolicy, Error> {
        let Some(r) = r else {
            return Ok(RetryPolicy::default());
        };
        let codes = match &r.retry_on_errors {
            None => vec![
                tonic::Code::Unavailable,
                tonic::Code::ResourceExhausted,
                tonic::Code::Aborted,
                tonic::Code::DeadlineExceeded,
                tonic::Code::Unknown,
            ],
            Some(names) => names
                .iter()
                .map(|n| {
                    code_named(n).ok_or_else(|| {
                        Error::invalid_argument(format!(
                            "grpc.retry.retry_on_errors: {n:?} is not a gRPC status code name (such as Unavailable, ResourceExhausted, Internal)"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let delay = r.delay.unwrap_or(0.0);
        if !(0.0..=3600.0).contains(&delay) {
            return Err(Error::invalid_argument(format!(
                "grpc.retry.delay: expected seconds from 0 to 3600, found {delay}"
            )));
        }
        let jitter = r.jitter.unwrap_or(0.0);
        if !(0.0..=10.0).contains(&jitter) {
            return Err(Error::invalid_argument(format!(
                "grpc.retry.jitter: expected a fraction from 0 to 10, found {jitter}"
            )));
        }
        Ok(RetryPolicy {
            max_retries: r.max_retries.unwrap_or(0).min(100) as u32,
            delay: std::time::Duration::from_secs_f64(delay),
            jitter,
            codes,
        })
    }

    /// Whether a call that failed with `code` on try number `attempt` (from 0) is tried again.
    pub fn retries(&self, attempt: u32, code: tonic::Code) -> bool {
        attempt < self.max_retries && self.codes.contains(&code)
    }

    /// The wait before retry number `attempt` (from 0): `delay * 2^attempt`, plus up to
    /// `jitter` times that, capped at 60 s.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let base = self.delay.as_secs_f64() * f64::from(1u32 << attempt.min(16));
        // A fraction from the clock's nanoseconds: enough to spread retries apart.
        let noise = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()) as f64
            / 1e9;
        std::time::Duration::from_secs_f64((base * (1.0 + self.jitter * noise)).min(60.0))
    }
}

/// A gRPC status code by name, in NativeLink's spelling (`Unavailable`) or the protocol's
/// (`UNAVAILABLE`, `resource_exhausted`).
fn code_named(name: &str) -> Option<tonic::Code> {
    let n: String = name
        .chars()
        .filter(|c| *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| format!("{c:?}").to_ascii_lowercase() == n)
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
        let (kind, endpoints) = check(cfg)?;
        let mut channels = Vec::new();
        let mut addresses = Vec::new();
        for (ep, e) in endpoints.into_iter().zip(&cfg.endpoints) {
            let ep = ep
                .tcp_nodelay(true)
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(16 << 20))
                // Blobs arrive in 256 KiB frames rather than 16 KiB ones (BENCHMARKS.md).
                .max_frame_size(Some(256 << 10))
                .http2_keep_alive_interval(std::time::Duration::from_secs(30))
                .connect_timeout(std::time::Duration::from_secs(10));
            let ep = match e.concurrency_limit {
                Some(n) => ep.concurrency_limit(n as usize),
                None => ep,
            };
            // Each lazy channel is a connection of its own.
            for _ in 0..cfg.connections_per_endpoint.unwrap_or(1).min(64) {
                channels.push(ep.connect_lazy());
            }
            addresses.push(e.address.clone());
        }
        Ok(GrpcStore {
            instance: cfg.instance_name.clone(),
            kind,
            channels,
            next: AtomicUsize::new(0),
            addresses,
            retry: RetryPolicy::from_config(cfg.retry.as_ref())?,
            permits: cfg.max_concurrent_requests.map(|n| {
                std::sync::Arc::new(tokio::sync::Semaphore::new(
                    n.min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
                ))
            }),
        })
    }

    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
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

    fn bytestream(&self) -> ByteStreamClient<Traced> {
        ByteStreamClient::with_interceptor(self.channel(), traced as Inject)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    fn path(key: &Digest) -> String {
        match key.function() {
            DigestFunction::Sha256 => format!("blobs/{}/{}", key.hash_hex(), key.size()),
            f => format!("blobs/{}/{}/{}", f.name(), key.hash_hex(), key.size()),
        }
    }

    fn upstream(&self, e: tonic::Status) -> Error {
        Error::from(e).context(format!("upstream {}", self.addresses.join(",")))
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
            match call().await {
                Err(e)
                    if attempt < self.retry.max_retries && self.retry.codes.contains(&e.code()) =>
                {
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
    #[tracing::instrument(level = "debug", name = "store.has", skip_all, fields(store = "grpc", keys = keys.len()))]
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
                            let request = request.clone();
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

    #[tracing::instrument(level = "debug", name = "store.get", skip_all, fields(store = "grpc", digest = %key, offset = offset, length = ?length))]
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
        let request = ReadRequest {
            resource_name: format!("{}{}", self.prefix(), Self::path(key)),
            read_offset: offset as i64,
            read_limit: length.unwrap_or(0) as i64,
        };
        let permit = self.permit().await;
        let resp = self
            .retried(|| {
                let mut client = self.bytestream();
                let request = request.clone();
                async move { client.read(request).await }
            })
            .await
            .map_err(|e| self.upstream(e))?
            .into_inner();
        let addresses = self.addresses.join(",");
        Ok(resp
            .map(move |r| {
                // The permit lives as long as the stream.
                let _ = &permit;
                r.map(|m| Bytes::from(m.data))
                    .map_err(|e| Error::from(e).context(format!("upstream {addresses}")))
            })
            .boxed())
    }

    #[tracing::instrument(level = "debug", name = "store.put", skip_all, fields(store = "grpc", digest = %key, bytes = key.size()))]
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
                let request = request.clone();
                async move { client.update_action_result(request).await }
            })
            .await
            .map_err(|e| self.upstream(e))?;
            return Ok(());
        }
        let name = format!(
            "{}uploads/{}/{}",
            self.prefix(),
            uuid::Uuid::new_v4(),
            Self::path(key)
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
        let result = upload(self.bytestream(), feed).await;
        if let Some(e) = failure.get().cloned() {
            return Err(e);
        }
        let committed = result
            .map_err(|e| self.upstream(e))?
            .into_inner()
            .committed_size;
        if committed != size as i64 && committed != -1 {
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
                let request = request.clone();
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
        let msg = WriteRequest {
            resource_name: if f.first {
                f.name.clone()
            } else {
                String::new()
            },
            write_offset: f.offset as i64,
            finish_write: finish,
            data: data.to_vec(),
        };
        f.first = false;
        f.offset += data.len() as u64;
        return Some((msg, f));
    }
}

/// Sends one upload's messages. The body is pumped into a bounded channel by a task of its
/// own: tonic needs a request stream it can share between threads, which a body stream is not.
async fn upload(
    mut client: ByteStreamClient<Traced>,
    feed: Feed,
) -> Result<tonic::Response<cairn_core::proto::google::bytestream::WriteResponse>, tonic::Status> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
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
    let result = client.write(requests).await;
    pump.abort();
    result
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn code_names_in_either_spelling() {
        assert_eq!(code_named("Unavailable"), Some(tonic::Code::Unavailable));
        assert_eq!(
            code_named("RESOURCE_EXHAUSTED"),
            Some(tonic::Code::ResourceExhausted)
        );
        assert_eq!(
            code_named("deadline_exceeded"),
            Some(tonic::Code::DeadlineExceeded)
        );
        assert_eq!(code_named("Teapot"), None);
    }

    #[test]
    fn backoff_doubles_and_jitter_only_adds() {
        let p = RetryPolicy::from_config(Some(&cairn_config::stores::Retry {
            max_retries: Some(5),
            delay: Some(0.1),
            jitter: Some(0.5),
            retry_on_errors: None,
        }))
        .unwrap();
        for attempt in 0..4 {
            let base = 0.1 * f64::from(1u32 << attempt);
            let b = p.backoff(attempt).as_secs_f64();
            assert!(b >= base - 1e-9 && b <= base * 1.5 + 1e-9, "{attempt}: {b}");
        }
        let bad = RetryPolicy::from_config(Some(&cairn_config::stores::Retry {
            retry_on_errors: Some(vec!["Nope".into()]),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(bad.message.contains("retry_on_errors"), "{bad}");
    }
}
