//! Provider `gcs`: Google Cloud Storage through its JSON API (the API of NativeLink's GCS
//! client, and the one the GCS emulators speak; `object_store`'s own GCS client uses the XML
//! API, which fake-gcs-server lacks). Requests go through `object_store`'s HTTP client (so
//! they are counted and classified like every provider's) with a bearer token from
//! `object_store`'s GCP credential chain: `GOOGLE_APPLICATION_CREDENTIALS`,
//! `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_SERVICE_ACCOUNT_KEY`, gcloud's application default
//! credentials, or the metadata server (GKE workload identity); with none of them, unsigned
//! requests, or an error at start under `authentication_required: true` (NativeLink's
//! meaning). With `STORAGE_EMULATOR_HOST` set (Google's convention), requests go there,
//! unauthenticated.
//!
//! Large blobs: each part is uploaded as an object of its own
//! (`{name}.{upload}.{index}.cairn-part`), then the parts are composed into the blob in one
//! `compose` per 32 of them (the API's limit; rounds of composes beyond 32 parts), which makes
//! the blob appear whole at once; the part objects are deleted afterwards. GCS allows 1024
//! components per object, so parts are sized to need at most 1000.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::CloudObjectStore as Spec;
use cairn_core::Error;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use http::{Method, StatusCode};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, HttpResponse};
use object_store::gcp::{GcpCredentialProvider, GoogleCloudStorageBuilder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartId,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use parking_lot::Mutex;

use super::transport::{BackendStatus, CountingConnector};
use super::{client_options, no_client_retries, required, Client};

const STORE: &str = "GCS";
const DEFAULT_BASE: &str = "https://storage.googleapis.com";
/// Sources of one `compose` (the API's limit).
const COMPOSE_FAN_IN: usize = 32;
/// Parts of one blob: under GCS's 1024 components per object.
pub const MAX_PARTS: u64 = 1000;
/// Suffix of part objects, for a lifecycle rule (`matchesSuffix`) that deletes leftovers.
pub const PART_SUFFIX: &str = ".cairn-part";

pub fn check(spec: &Spec, at: &str) -> Result<(), Error> {
    required(&spec.bucket, "bucket", at)?;
    if emulator_host().is_none() {
        credential_source(spec, at, &|k| std::env::var(k).ok(), &metadata_resolves)?;
    }
    Ok(())
}

/// Where requests get their credentials, decided at start as NativeLink decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CredentialSource {
    /// A key file or key (`GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `GOOGLE_SERVICE_ACCOUNT_PATH`, `GOOGLE_SERVICE_ACCOUNT_KEY`), or gcloud's application
    /// default credentials file.
    Explicit,
    /// The metadata server of GCE or GKE (workload identity), whose name resolves here.
    Metadata,
    /// None found, and `authentication_required` is not set: requests go unsigned (a public
    /// bucket), as NativeLink's client falls back to anonymous access.
    Anonymous,
}

/// Which credentials a `gcs` store uses: `env` looks up a variable, `metadata` says whether
/// the metadata server's name resolves. None found with `authentication_required: true` is
/// an error naming the key, as NativeLink refuses to start then.
fn credential_source(
    spec: &Spec,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    metadata: &dyn Fn(&str) -> bool,
) -> Result<CredentialSource, Error> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let keys = [
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_SERVICE_ACCOUNT",
        "GOOGLE_SERVICE_ACCOUNT_PATH",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
    ];
    let adc = set("HOME").is_some_and(|home| {
        std::path::Path::new(&home)
            .join(".config/gcloud/application_default_credentials.json")
            .exists()
    });
    if keys.iter().any(|k| set(k).is_some()) || adc {
        return Ok(CredentialSource::Explicit);
    }
    let host = set("GCE_METADATA_HOST").unwrap_or_else(|| "metadata.google.internal".into());
    if metadata(&host) {
        return Ok(CredentialSource::Metadata);
    }
    if spec.authentication_required == Some(true) {
        return Err(Error::invalid_argument(format!(
            "{at}.authentication_required: true, but no GCP credentials were found: set \
             GOOGLE_APPLICATION_CREDENTIALS (a service account key file) or \
             GOOGLE_SERVICE_ACCOUNT_KEY, run `gcloud auth application-default login`, or run \
             on GCE/GKE (the metadata server {host:?} does not resolve here)"
        )));
    }
    Ok(CredentialSource::Anonymous)
}

/// Whether `host` (the metadata server's name, with a port or not) resolves.
fn metadata_resolves(host: &str) -> bool {
    use std::net::ToSocketAddrs;
    let found = |r: std::io::Result<std::vec::IntoIter<std::net::SocketAddr>>| {
        r.is_ok_and(|mut a| a.next().is_some())
    };
    found(host.to_socket_addrs()) || found((host, 80).to_socket_addrs())
}

fn emulator_host() -> Option<String> {
    std::env::var("STORAGE_EMULATOR_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
}

pub fn client(spec: &Spec, at: &str, connector: CountingConnector) -> Result<Client, Error> {
    client_for(spec, at, connector, emulator_host())
}

/// The client, on the emulator at `emulator` (`host:port` or a URL) when given.
pub(crate) fn client_for(
    spec: &Spec,
    at: &str,
    connector: CountingConnector,
    emulator: Option<String>,
) -> Result<Client, Error> {
    let bucket = required(&spec.bucket, "bucket", at)?;
    let mut options = client_options(spec);
    if let Some(s) = spec.connection_timeout_s.filter(|s| *s > 0) {
        options = options.with_connect_timeout(std::time::Duration::from_secs(s));
    }
    let (base, credentials) = match emulator {
        Some(host) => {
            let base = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            // The emulator convention is plain HTTP on a local port.
            options = options.with_allow_http(true);
            (base.trim_end_matches('/').to_string(), None)
        }
        None if credential_source(spec, at, &|k| std::env::var(k).ok(), &metadata_resolves)?
            == CredentialSource::Anonymous =>
        {
            tracing::info!(
                store = at,
                "gcs: no GCP credentials found and authentication_required is not set: requests go unsigned (a public bucket)"
            );
            (DEFAULT_BASE.to_string(), None)
        }
        None => {
            let gcs = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(no_client_retries())
                .build()
                .map_err(|e| Error::invalid_argument(format!("{at}: {e}")))?;
            (DEFAULT_BASE.to_string(), Some(gcs.credentials().clone()))
        }
    };
    let http = connector
        .connect(&options)
        .map_err(|e| Error::invalid_argument(format!("{at}: {e}")))?;
    let gcs = Arc::new(GcsJson {
        http,
        base,
        bucket: bucket.to_string(),
        credentials,
        uploads: Mutex::new(HashMap::new()),
    });
    let min_part = spec.resumable_chunk_size.map_or(0, |s| s.0);
    Ok(Client {
        objects: gcs.clone(),
        multipart: gcs,
        location: format!("bucket {bucket:?}"),
        min_part_size: min_part.max(super::upload::MIN_PART_SIZE),
        max_parts: MAX_PARTS,
    })
}

/// A GCS bucket over the JSON API.
pub struct GcsJson {
    http: HttpClient,
    base: String,
    bucket: String,
    credentials: Option<GcpCredentialProvider>,
    /// Part objects of multipart uploads in progress, by upload id.
    uploads: Mutex<HashMap<MultipartId, Vec<String>>>,
}

impl fmt::Debug for GcsJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GcsJson({}, {})", self.base, self.bucket)
    }
}

impl fmt::Display for GcsJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GCS bucket {} at {}", self.bucket, self.base)
    }
}

/// Percent-encodes an object name or query value (everything but unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn generic(source: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(source),
    }
}

fn not_implemented(operation: &str) -> object_store::Error {
    object_store::Error::NotImplemented {
        operation: operation.to_string(),
        implementer: "Cairn's GCS JSON client".to_string(),
    }
}

/// A JSON answer that could not be read.
#[derive(Debug)]
struct BadAnswer(String);

impl fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected answer from GCS: {}", self.0)
    }
}

impl std::error::Error for BadAnswer {}

impl GcsJson {
    fn object_url(&self, name: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            encode(&self.bucket),
            encode(name)
        )
    }

    /// Sends a request with the bearer token; a 404 is NOT_FOUND, 401/403 a refusal, any
    /// other non-2xx an error with its status.
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: object_store::client::HttpRequestBody,
        name: &str,
    ) -> object_store::Result<HttpResponse> {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(c) = &self.credentials {
            let token = c.get_credential().await?;
            req = req.header("Authorization", format!("Bearer {}", token.bearer));
        }
        let req: HttpRequest = req
            .body(body)
            .map_err(|e| generic(BadAnswer(e.to_string())))?;
        let resp = self.http.execute(req).await.map_err(generic)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let source = Box::new(BackendStatus(status));
        Err(match status {
            StatusCode::NOT_FOUND => object_store::Error::NotFound {
                path: name.to_string(),
                source,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                object_store::Error::PermissionDenied {
                    path: name.to_string(),
                    source,
                }
            }
            StatusCode::PRECONDITION_FAILED => object_store::Error::Precondition {
                path: name.to_string(),
                source,
            },
            _ => object_store::Error::Generic {
                store: STORE,
                source,
            },
        })
    }

    async fn json(resp: HttpResponse) -> object_store::Result<serde_json::Value> {
        let body = resp.into_body().bytes().await.map_err(generic)?;
        serde_json::from_slice(&body).map_err(|e| generic(BadAnswer(e.to_string())))
    }

    /// The object's metadata: size, update time, generation.
    async fn metadata(&self, location: &Path) -> object_store::Result<ObjectMeta> {
        let name = location.as_ref();
        let resp = self
            .send(
                Method::GET,
                &self.object_url(name),
                &[],
                Bytes::new().into(),
                name,
            )
            .await?;
        meta_from_json(location, &Self::json(resp).await?)
    }

    async fn upload(&self, name: &str, payload: PutPayload) -> object_store::Result<PutResult> {
        let url = format!(
            "{}/upload/storage/v1/b/{}/o?uploadType=media&name={}",
            self.base,
            encode(&self.bucket),
            encode(name)
        );
        let len = payload.content_length();
        let resp = self
            .send(
                Method::POST,
                &url,
                &[
                    ("Content-Type", "application/octet-stream".into()),
                    ("Content-Length", len.to_string()),
                ],
                payload.into(),
                name,
            )
            .await?;
        let v = Self::json(resp).await?;
        Ok(PutResult {
            e_tag: v["generation"].as_str().map(str::to_string),
            version: None,
        })
    }

    async fn compose(&self, sources: &[String], dest: &str) -> object_store::Result<()> {
        let body = serde_json::json!({
            "sourceObjects": sources.iter().map(|s| serde_json::json!({"name": s})).collect::<Vec<_>>(),
            "destination": {"contentType": "application/octet-stream"},
        });
        let url = format!("{}/compose", self.object_url(dest));
        self.send(
            Method::POST,
            &url,
            &[("Content-Type", "application/json".into())],
            body.to_string().into(),
            dest,
        )
        .await?;
        Ok(())
    }

    async fn delete_object(&self, name: &str) -> object_store::Result<()> {
        match self
            .send(
                Method::DELETE,
                &self.object_url(name),
                &[],
                Bytes::new().into(),
                name,
            )
            .await
        {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes part objects, a few at a time; failures are left to a lifecycle rule.
    async fn delete_parts(&self, names: Vec<String>) {
        futures::stream::iter(names)
            .for_each_concurrent(8, |n| async move {
                if let Err(e) = self.delete_object(&n).await {
                    tracing::warn!(object = %n, error = %e, "could not delete a part object");
                }
            })
            .await;
    }
}

fn meta_from_json(location: &Path, v: &serde_json::Value) -> object_store::Result<ObjectMeta> {
    let size = v["size"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| generic(BadAnswer(format!("no size in {v}"))))?;
    let updated = v["updated"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .ok_or_else(|| generic(BadAnswer(format!("no update time in {v}"))))?;
    Ok(ObjectMeta {
        location: location.clone(),
        last_modified: updated,
        size,
        e_tag: v["generation"].as_str().map(str::to_string),
        version: None,
    })
}

/// `bytes a-b/total` of a 206 answer, as `a..b+1`.
fn content_range(resp: &HttpResponse) -> Option<Range<u64>> {
    let v = resp.headers().get("content-range")?.to_str().ok()?;
    let (a, b) = v
        .strip_prefix("bytes ")?
        .split_once('/')?
        .0
        .split_once('-')?;
    Some(a.parse().ok()?..b.parse::<u64>().ok()? + 1)
}

#[async_trait]
impl ObjectStore for GcsJson {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.upload(location.as_ref(), payload).await
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(not_implemented(
            "put_multipart_opts (the store uses MultipartStore)",
        ))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if options.head {
            let meta = self.metadata(location).await?;
            return Ok(GetResult {
                payload: GetResultPayload::Stream(futures::stream::empty().boxed()),
                range: 0..meta.size,
                meta,
                attributes: Default::default(),
            });
        }
        let name = location.as_ref();
        let mut url = format!("{}?alt=media", self.object_url(name));
        if let Some(generation) = &options.if_match {
            url.push_str(&format!("&ifGenerationMatch={}", encode(generation)));
        }
        let mut headers = Vec::new();
        if let Some(r) = &options.range {
            let v = match r {
                GetRange::Bounded(r) if r.end > r.start => {
                    format!("bytes={}-{}", r.start, r.end - 1)
                }
                GetRange::Bounded(r) => format!("bytes={}-{}", r.start, r.start),
                GetRange::Offset(o) => format!("bytes={o}-"),
                GetRange::Suffix(n) => format!("bytes=-{n}"),
            };
            headers.push(("Range", v));
        }
        let resp = self
            .send(Method::GET, &url, &headers, Bytes::new().into(), name)
            .await?;
        let generation = resp
            .headers()
            .get("x-goog-generation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let length = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let (range, size) = if resp.status() == StatusCode::PARTIAL_CONTENT {
            let range = content_range(&resp)
                .ok_or_else(|| generic(BadAnswer("a 206 without Content-Range".into())))?;
            let total = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(range.end);
            (range, total)
        } else {
            let len =
                length.ok_or_else(|| generic(BadAnswer("an answer without a length".into())))?;
            // A whole object where a range was asked: an offset at or past its end.
            match &options.range {
                Some(GetRange::Offset(o)) | Some(GetRange::Bounded(Range { start: o, .. }))
                    if *o > 0 =>
                {
                    if *o >= len {
                        return Err(generic(BackendStatus(StatusCode::RANGE_NOT_SATISFIABLE)));
                    }
                    return Err(generic(BadAnswer("a whole object for a range".into())));
                }
                _ => (0..len, len),
            }
        };
        let body = resp.into_body().bytes_stream().map_err(generic).boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta: ObjectMeta {
                location: location.clone(),
                last_modified: chrono::Utc::now(),
                size,
                e_tag: generation,
                version: None,
            },
            range,
            attributes: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations
            .map(|_| Err(not_implemented("delete_stream")))
            .boxed()
    }

    fn list(&self, _prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        futures::stream::once(async { Err(not_implemented("list")) }).boxed()
    }

    async fn list_with_delimiter(
        &self,
        _prefix: Option<&Path>,
    ) -> object_store::Result<ListResult> {
        Err(not_implemented("list_with_delimiter"))
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(not_implemented("copy_opts"))
    }
}

#[async_trait]
impl MultipartStore for GcsJson {
    async fn create_multipart(&self, _path: &Path) -> object_store::Result<MultipartId> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.uploads.lock().insert(id.clone(), Vec::new());
        Ok(id)
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let name = format!("{path}.{id}.{part_idx:05}{PART_SUFFIX}");
        if let Some(names) = self.uploads.lock().get_mut(id) {
            if !names.contains(&name) {
                names.push(name.clone());
            }
        }
        self.upload(&name, data).await?;
        Ok(PartId { content_id: name })
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let mut names: Vec<String> = parts.into_iter().map(|p| p.content_id).collect();
        let mut round = 0;
        while names.len() > COMPOSE_FAN_IN {
            let mut next = Vec::new();
            for (n, group) in names.chunks(COMPOSE_FAN_IN).enumerate() {
                let dest = format!("{path}.{id}.r{round}-{n:04}{PART_SUFFIX}");
                self.compose(group, &dest).await?;
                if let Some(all) = self.uploads.lock().get_mut(id) {
                    all.push(dest.clone());
                }
                next.push(dest);
            }
            names = next;
            round += 1;
        }
        self.compose(&names, path.as_ref()).await?;
        let leftovers = self.uploads.lock().remove(id).unwrap_or_default();
        self.delete_parts(leftovers).await;
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn abort_multipart(&self, _path: &Path, id: &MultipartId) -> object_store::Result<()> {
        let leftovers = self.uploads.lock().remove(id).unwrap_or_default();
        self.delete_parts(leftovers).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_decided_at_start_as_nativelink_decides() {
        let home = tempfile::tempdir().unwrap();
        let home_s = home.path().display().to_string();
        let spec = |required: Option<bool>| Spec {
            authentication_required: required,
            ..Default::default()
        };
        let no_metadata = |_: &str| false;
        let env = |vars: Vec<(&'static str, String)>| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        let source = |required, vars, metadata: &dyn Fn(&str) -> bool| {
            credential_source(&spec(required), "stores.CAS", &env(vars), metadata)
        };
        // Nothing: unsigned, unless authentication is required.
        let bare = || vec![("HOME", home_s.clone())];
        assert_eq!(
            source(None, bare(), &no_metadata).unwrap(),
            CredentialSource::Anonymous
        );
        assert_eq!(
            source(Some(false), bare(), &no_metadata).unwrap(),
            CredentialSource::Anonymous
        );
        let e = source(Some(true), bare(), &no_metadata).unwrap_err();
        assert!(
            e.message
                .contains("stores.CAS.authentication_required: true, but no GCP credentials"),
            "{e}"
        );
        // A key in the environment (empty does not count), the gcloud file, the metadata server.
        for key in [
            "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
        ] {
            let mut vars = bare();
            vars.push((key, "/k.json".into()));
            assert_eq!(
                source(Some(true), vars, &no_metadata).unwrap(),
                CredentialSource::Explicit
            );
        }
        let mut vars = bare();
        vars.push(("GOOGLE_APPLICATION_CREDENTIALS", " ".into()));
        assert!(source(Some(true), vars, &no_metadata).is_err());
        let seen = std::sync::Mutex::new(Vec::new());
        let metadata = |h: &str| {
            seen.lock().unwrap().push(h.to_string());
            true
        };
        assert_eq!(
            source(Some(true), bare(), &metadata).unwrap(),
            CredentialSource::Metadata
        );
        let mut vars = bare();
        vars.push(("GCE_METADATA_HOST", "169.254.169.254".into()));
        assert_eq!(
            source(Some(true), vars, &metadata).unwrap(),
            CredentialSource::Metadata
        );
        assert_eq!(
            *seen.lock().unwrap(),
            ["metadata.google.internal", "169.254.169.254"]
        );
        assert!(metadata_resolves("127.0.0.1:8080") && metadata_resolves("127.0.0.1"));
        assert!(!metadata_resolves("metadata.invalid"));
        let adc = home.path().join(".config/gcloud");
        std::fs::create_dir_all(&adc).unwrap();
        std::fs::write(adc.join("application_default_credentials.json"), "{}").unwrap();
        assert_eq!(
            source(Some(true), bare(), &no_metadata).unwrap(),
            CredentialSource::Explicit
        );
    }
}
