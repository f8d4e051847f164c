//! `experimental_cloud_object_store`: blobs as objects in a bucket (S3 and the S3-compatible
//! ONTAP, R2 and OCI; Azure Blob; GCS), one object per key, named
//! `{key_prefix}{hash}-{size}` as NativeLink names them, so that NativeLink and Cairn can
//! share a bucket.
//!
//! Built on the `object_store` crate's clients, one file per provider turning the config into
//! a client ([`aws`], [`azure`], [`gcs`], [`ontap`], [`r2`], [`oci`]); `spec.rs` checks the config;
//! this module holds what every provider shares:
//! - **Reads stream** (`read.rs`). A GET with a range, its body passed on chunk by chunk. A
//!   body that breaks is resumed at the next unread byte (same object version: `If-Match` on
//!   its ETag), so a reader never receives a byte twice or a byte of another version.
//! - **Uploads are never visible in part** (`upload.rs`). A body shorter than one part is one PUT; a longer
//!   one is a multipart upload, completed only after the body ended cleanly (services end a
//!   body with an error when its size or hash is wrong), and aborted otherwise. Memory is at
//!   most `multipart_max_concurrent_uploads + 1` parts per upload whatever the blob size.
//! - **Retries** ([`retry`]) repeat one request from data the store still holds: a part's
//!   buffer, the next unread offset, a PUT body up to `max_retry_buffer_per_request`.
//! - **Existence** (`has_many`) is a HEAD per key, at most [`HAS_CONCURRENCY`] at once per
//!   call and [`STORE_HEAD_CONCURRENCY`] for the whole store; an
//!   object older than `consider_expired_after_s` counts as missing (the client uploads it
//!   again, which refreshes it), as in NativeLink.
//! - Every error names the store's key path and the object, with a gRPC code: UNAVAILABLE when
//!   the backend could not be reached or failed.

pub mod aws;
pub mod aws_process;
pub mod aws_profile;
pub mod aws_sts;
pub mod azure;
pub mod gcs;
pub mod metrics;
pub mod ontap;
pub mod r2;
pub mod retry;
pub mod transport;

pub mod oci;
mod read;
mod spec;
mod upload;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::{BlobStream, Code, Digest, Error};
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ClientOptions, GetOptions, ObjectStore, RetryConfig};

use crate::{check_range, Health, Store, StoreInfo};
use metrics::{BackendCounts, BackendEvents};
use read::resuming_body;
use retry::RetryPolicy;
pub(crate) use spec::required;
use spec::PROVIDERS;
pub use spec::{check, check_at};
use transport::{classify, CountingConnector};

/// HEAD requests of one `has_many` in flight at once.
pub const HAS_CONCURRENCY: usize = 64;
/// HEAD requests of the whole store in flight at once, whatever the number of callers.
pub const STORE_HEAD_CONCURRENCY: usize = 256;
/// Default of `max_retry_buffer_per_request` (NativeLink's).
const DEFAULT_MAX_RETRY_BUFFER: u64 = 5 * 1024 * 1024;
/// Default of `multipart_max_concurrent_uploads` (NativeLink's).
const DEFAULT_MAX_CONCURRENT_PARTS: u64 = 10;
/// A request that is not a streamed body must answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A GET's body may go this long without progress (gcs: `read_timeout_s` when set).
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A health check gets one attempt of at most this.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// What a provider file hands back: one client seen through both of its interfaces.
pub struct Client {
    pub objects: Arc<dyn ObjectStore>,
    pub multipart: Arc<dyn MultipartStore>,
    /// For messages and `check-config`: `bucket "b"`, `container "c"`.
    pub location: String,
    /// The smallest part of a multipart upload but the last.
    pub min_part_size: u64,
    /// The most parts of one upload.
    pub max_parts: u64,
}

/// Client options every provider shares: HTTP/2 allowed unless `disable_http2`, plain HTTP
/// only with `insecure_allow_http`, a connect timeout; whole-request timeouts are the store's.
pub(crate) fn client_options(spec: &Spec) -> ClientOptions {
    let options = ClientOptions::new()
        .with_allow_http(spec.insecure_allow_http)
        .with_connect_timeout(Duration::from_secs(15))
        .with_timeout_disabled();
    if spec.disable_http2 {
        options.with_http1_only()
    } else {
        options.with_allow_http2()
    }
}

/// An `http://` endpoint needs `insecure_allow_http`: refused at start with the key to set,
/// rather than failing every request with the HTTP client's "builder error". `source` says
/// where the endpoint came from (a key or an environment variable).
pub(crate) fn plain_http_allowed(
    endpoint: &str,
    spec: &Spec,
    at: &str,
    source: &str,
) -> Result<(), Error> {
    if endpoint.starts_with("http://") && !spec.insecure_allow_http {
        return Err(Error::invalid_argument(format!(
            "{at}.insecure_allow_http: the endpoint {endpoint} ({source}) is plain HTTP, which \
             this store refuses unless insecure_allow_http is true (for emulators and tests; \
             use https:// in production)"
        )));
    }
    Ok(())
}

/// `object_store`'s own retries are off: the store retries, and counts, each operation.
pub(crate) fn no_client_retries() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

/// The store; clones share one client.
#[derive(Clone)]
pub struct CloudObjectStore(Arc<Inner>);

pub(crate) struct Inner {
    /// Key path and location, the prefix of every message.
    name: String,
    client: Client,
    key_prefix: String,
    retry: RetryPolicy,
    expire_after_s: u64,
    max_retry_buffer: u64,
    max_concurrent_parts: usize,
    /// How long a GET's body may go without progress.
    body_idle_timeout: Duration,
    /// Bounds the HEADs of all callers together ([`STORE_HEAD_CONCURRENCY`]).
    heads: tokio::sync::Semaphore,
    events: Arc<BackendEvents>,
}

impl CloudObjectStore {
    /// Builds the client of the spec's provider. `path` is the store's key path.
    pub fn new(spec: &Spec, path: &str) -> Result<CloudObjectStore, Error> {
        CloudObjectStore::new_at(
            spec,
            path,
            &format!("{path}.experimental_cloud_object_store"),
        )
    }

    /// [`CloudObjectStore::new`] of a spec at key path `at` (the `backend` of an
    /// `ontap_s3_existence_cache`); `path` names the store in metrics and messages.
    pub fn new_at(spec: &Spec, path: &str, at: &str) -> Result<CloudObjectStore, Error> {
        check_at(spec, at)?;
        let provider: &'static str = PROVIDERS
            .iter()
            .map(|(p, _)| *p)
            .find(|p| Some(*p) == spec.provider.as_deref())
            .unwrap_or("aws"); // checked above
        let events = Arc::new(BackendEvents::new(path, provider));
        let connector = CountingConnector {
            events: events.clone(),
        };
        let client = match provider {
            "aws" => aws::client(spec, at, connector)?,
            "azure" => azure::client(spec, at, connector)?,
            "gcs" => gcs::client(spec, at, connector)?,
            "ontap" => ontap::client(spec, at, connector)?,
            "r2" => r2::client(spec, at, connector)?,
            "oci" => oci::client(spec, at, connector)?,
            other => {
                return Err(Error::unimplemented(format!(
                    "{at}.provider: `{other}` is not built yet"
                )))
            }
        };
        CloudObjectStore::with_client(spec, path, events, client)
    }

    /// A store over a client already built (the provider files' or a test's).
    pub(crate) fn with_client(
        spec: &Spec,
        path: &str,
        events: Arc<BackendEvents>,
        client: Client,
    ) -> Result<CloudObjectStore, Error> {
        let at = format!("{path}.experimental_cloud_object_store");
        Ok(CloudObjectStore(Arc::new(Inner {
            name: format!("{path} ({} {})", events.provider(), client.location),
            client,
            key_prefix: spec.key_prefix.clone().unwrap_or_default(),
            retry: RetryPolicy::from_config(spec.retry.as_ref(), &format!("{at}.retry"))?,
            expire_after_s: spec.consider_expired_after_s.unwrap_or(0),
            max_retry_buffer: spec
                .max_retry_buffer_per_request
                .map_or(DEFAULT_MAX_RETRY_BUFFER, |b| b.0),
            max_concurrent_parts: usize::try_from(
                spec.multipart_max_concurrent_uploads
                    .unwrap_or(DEFAULT_MAX_CONCURRENT_PARTS),
            )
            .unwrap_or(usize::MAX),
            body_idle_timeout: spec
                .read_timeout_s
                .filter(|s| *s > 0)
                .map_or(BODY_IDLE_TIMEOUT, Duration::from_secs),
            heads: tokio::sync::Semaphore::new(STORE_HEAD_CONCURRENCY),
            events,
        })))
    }

    /// Calls `each(hash, size)` for every object under `key_prefix` named as this store names
    /// objects (`{key_prefix}{hex hash}-{size}`); other objects are skipped. Returns the number
    /// of objects seen. Fails as a whole on the first error (a listing is not resumable), each
    /// page of the listing bounded by the request timeout.
    pub async fn list_keys(&self, mut each: impl FnMut(&[u8], u64)) -> Result<u64, Error> {
        let prefix = &self.0.key_prefix;
        // object_store lists by whole path segments: list the prefix's directory and keep
        // what starts with the prefix itself.
        let dir = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let dir_path = Path::from(dir);
        let mut listing = self
            .0
            .client
            .objects
            .list((!dir.is_empty()).then_some(&dir_path));
        let mut seen = 0u64;
        let mut hash = Vec::with_capacity(64);
        loop {
            let next = match tokio::time::timeout(REQUEST_TIMEOUT, listing.next()).await {
                Ok(Some(Ok(meta))) => meta,
                Ok(Some(Err(e))) => return Err(self.0.error("list", &dir_path, &e)),
                Ok(None) => return Ok(seen),
                Err(_) => {
                    return Err(Error::new(
                        Code::DeadlineExceeded,
                        format!(
                            "{}: list {dir_path}: no answer within {REQUEST_TIMEOUT:?}",
                            self.0.name
                        ),
                    ))
                }
            };
            seen += 1;
            let Some(name) = next.location.as_ref().strip_prefix(prefix.as_str()) else {
                continue;
            };
            if self.0.expired(next.last_modified.timestamp()) {
                continue;
            }
            if let Some(size) = parse_object_name(name, &mut hash) {
                each(&hash, size);
            }
        }
    }

    /// Requests, errors and retries so far.
    pub fn backend_counts(&self) -> BackendCounts {
        self.0.events.counts()
    }
}

/// The hash (into `hash`) and size of an object name `{hex hash}-{size}` as the store writes
/// it: lower-case hex of 20 to 64 bytes, a decimal size without leading zeros.
fn parse_object_name(name: &str, hash: &mut Vec<u8>) -> Option<u64> {
    let (hex_hash, size) = name.split_once('-')?;
    if hex_hash.len() % 2 != 0
        || !(40..=128).contains(&hex_hash.len())
        || hex_hash.bytes().any(|b| b.is_ascii_uppercase())
    {
        return None;
    }
    let size: u64 = size.parse().ok()?;
    if size.to_string() != name[hex_hash.len() + 1..] {
        return None;
    }
    hash.clear();
    hash.resize(hex_hash.len() / 2, 0);
    hex::decode_to_slice(hex_hash, hash).ok()?;
    Some(size)
}

impl Inner {
    /// The object name of a key: NativeLink's `{key_prefix}{hash}-{size}`.
    fn path(&self, key: &Digest) -> Path {
        Path::from(format!(
            "{}{}-{}",
            self.key_prefix,
            key.hash_hex(),
            key.size()
        ))
    }

    /// An error of this store about `object`, with the backend's reason.
    fn error(&self, op: &str, object: &Path, e: &object_store::Error) -> Error {
        Error::new(classify(e), format!("{}: {op} {object}: {e}", self.name))
    }

    /// Runs `f` until it succeeds, fails with an error not worth retrying, or the retry budget
    /// is spent; each attempt gets `timeout`. `retry_allowed` false means one attempt whatever
    /// the policy.
    async fn with_retries<T, F, Fut>(
        &self,
        op: &'static str,
        object: &Path,
        retry_allowed: bool,
        timeout: Duration,
        mut f: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let mut retries = 0u32;
        loop {
            let err = match tokio::time::timeout(timeout, f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => self.error(op, object, &e),
                Err(_) => Error::new(
                    Code::DeadlineExceeded,
                    format!("{}: {op} {object}: no answer within {timeout:?}", self.name),
                ),
            };
            if !retry_allowed || retries >= self.retry.max_retries || !self.retry.retries(err.code)
            {
                return Err(if retries > 0 {
                    err.context(format_args!("after {retries} retries"))
                } else {
                    err
                });
            }
            retries += 1;
            self.events.retry(op);
            tracing::debug!(store = %self.name, op, %object, retry = retries, error = %err, "retrying");
            tokio::time::sleep(self.retry.wait(retries)).await;
        }
    }

    /// The size of the object of `key`, or `None` when it is missing or expired.
    async fn head(&self, key: &Digest) -> Result<Option<u64>, Error> {
        // Never closed: the semaphore lives as long as the store.
        let _permit = self.heads.acquire().await.ok();
        let path = self.path(key);
        let objects = &self.client.objects;
        let meta = self
            .with_retries("head", &path, true, REQUEST_TIMEOUT, || {
                let opts = GetOptions {
                    head: true,
                    ..GetOptions::default()
                };
                async { objects.get_opts(&path, opts).await.map(|r| r.meta) }
            })
            .await;
        match meta {
            Ok(meta) if self.expired(meta.last_modified.timestamp()) => Ok(None),
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether an object last modified at `modified` (Unix seconds) counts as missing.
    fn expired(&self, modified: i64) -> bool {
        if self.expire_after_s == 0 {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let modified = u64::try_from(modified).unwrap_or(0);
        now.saturating_sub(modified) >= self.expire_after_s
    }
}

#[async_trait]
impl Store for CloudObjectStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let heads = keys.iter().copied().map(|k| {
            let inner = self.0.clone();
            async move {
                if k.is_empty_blob() {
                    return Ok(Some(0));
                }
                inner.head(&k).await
            }
        });
        futures::stream::iter(heads)
            .buffered(HAS_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let path = self.0.path(key);
        if length == Some(0) {
            let size = self.0.head(key).await?.ok_or_else(|| {
                Error::not_found(format!("{}: {path}: no such object", self.0.name))
            })?;
            check_range(key, size, offset, length)?;
            return Ok(cairn_core::stream::empty());
        }
        let end = match length {
            Some(l) => Some(offset.checked_add(l).ok_or_else(|| {
                Error::out_of_range(format!(
                    "read of {key}: offset {offset} + length {l} overflows"
                ))
            })?),
            None => None,
        };
        let first = self.0.open(&path, offset, end, None).await;
        let first = match first {
            Ok(r) => r,
            Err(e) if e.code == Code::OutOfRange => {
                // Past the end, or exactly at it (an empty read that a range cannot express).
                let size = self.0.head(key).await?.ok_or_else(|| {
                    Error::not_found(format!("{}: {path}: no such object", self.0.name))
                })?;
                check_range(key, size, offset, length)?;
                return Ok(cairn_core::stream::empty());
            }
            Err(e) if e.is_not_found() => {
                return Err(Error::not_found(format!(
                    "{}: {path}: no such object",
                    self.0.name
                )))
            }
            Err(e) => return Err(e),
        };
        Ok(resuming_body(self.0.clone(), path, first))
    }

    async fn put(&self, key: &Digest, body: BlobStream) -> Result<(), Error> {
        upload::put(&self.0, key, body).await
    }

    fn info(&self) -> StoreInfo {
        StoreInfo::leaf("experimental_cloud_object_store")
    }

    /// A GET of an object that is never written: "no such object" is healthy; "no such bucket"
    /// (or container), a refusal, an error status or no answer within [`HEALTH_TIMEOUT`] is
    /// not. A GET rather than a HEAD, because only a GET's answer says which of the two is
    /// missing.
    async fn health(&self) -> Health {
        let probe = Path::from(format!("{}.cairn-health-probe", self.0.key_prefix));
        let get = self
            .0
            .client
            .objects
            .get_opts(&probe, GetOptions::default());
        match tokio::time::timeout(HEALTH_TIMEOUT, get).await {
            Ok(Ok(_)) => Health::Ok,
            Ok(Err(e)) if classify(&e) == Code::NotFound => {
                let why = e.to_string();
                if why.contains("NoSuchBucket") || why.contains("ContainerNotFound") {
                    Health::Failed(format!(
                        "{}: the {} does not exist",
                        self.0.name, self.0.client.location
                    ))
                } else {
                    Health::Ok
                }
            }
            Ok(Err(e)) => Health::Failed(self.0.error("health check", &probe, &e).message),
            Err(_) => Health::Failed(format!(
                "{}: health check: no answer within {HEALTH_TIMEOUT:?}",
                self.0.name
            )),
        }
    }
}
