//! The Remote Asset API (`build.bazel.remote.asset.v1`): `Fetch` and `Push`, so that Bazel's
//! `--experimental_remote_downloader` gets external archives through Cairn.
//!
//! An asset is a URI with qualifiers. Its association with a blob is a small record in the
//! instance's `fetch_store` / `push_store`, keyed by the SHA-256 of the URI and the sorted
//! qualifiers (an action-cache-like store: its keys are not the hashes of its values).
//! `FetchBlob` answers from a recorded association whose blob is still in the CAS; otherwise
//! it downloads the URI (http or https, following redirects) into a temporary file while
//! hashing it, checks a `checksum.sri` qualifier, stores the blob in the instance's CAS and
//! records the association. Memory stays bounded whatever the download's size: the body goes
//! to disk as it arrives. Download failures are the response's `status` (the request itself
//! was fine); bad requests are gRPC errors.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::asset::v1 as asset;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::rpc::Status as RpcStatus;
use cairn_core::{Digest, DigestFunction, Error};
use cairn_store::{StoreExt, StoreRef};
use futures::StreamExt;
use http_body_util::BodyExt;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status};

use crate::instances::Instances;
use crate::metrics::Metrics;

/// Longest download when the request sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest blob a download may produce.
pub const MAX_DOWNLOAD_BYTES: u64 = 16 << 30;
/// Redirects followed per URI.
const MAX_REDIRECTS: usize = 8;
/// Longest record an association store may hand back.
const MAX_RECORD_BYTES: usize = 64 << 10;

/// What an association store keeps for one asset.
#[derive(Clone, PartialEq, prost::Message)]
struct AssetRecord {
    #[prost(message, optional, tag = "1")]
    blob_digest: Option<re::Digest>,
    #[prost(int32, tag = "2")]
    digest_function: i32,
    /// When the blob was fetched or pushed (Unix seconds).
    #[prost(uint64, tag = "3")]
    stored_unix_s: u64,
    /// When the association lapses (Unix seconds; 0: never).
    #[prost(uint64, tag = "4")]
    expires_unix_s: u64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The association key of `uri` with `qualifiers` (order-independent).
pub fn association_key(uri: &str, qualifiers: &[asset::Qualifier]) -> Digest {
    let mut q: Vec<(&str, &str)> = qualifiers
        .iter()
        .map(|q| (q.name.as_str(), q.value.as_str()))
        .collect();
    q.sort_unstable();
    let mut text = Vec::with_capacity(uri.len() + 64);
    text.extend_from_slice(b"cairn-asset-v1\0");
    text.extend_from_slice(uri.as_bytes());
    for (n, v) in q {
        text.push(0);
        text.extend_from_slice(n.as_bytes());
        text.push(b'=');
        text.extend_from_slice(v.as_bytes());
    }
    DigestFunction::Sha256.compute(&text)
}

/// A `checksum.sri` qualifier: `sha256-BASE64` (also sha384, sha512).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sri {
    pub function: DigestFunction,
    pub hash: Vec<u8>,
}

pub fn parse_sri(value: &str) -> Result<Sri, Error> {
    let bad = |why: &str| {
        Error::invalid_argument(format!(
            "qualifier checksum.sri {value:?}: {why} (expected sha256-, sha384- or sha512- and the base64 hash)"
        ))
    };
    let (algo, b64) = value.split_once('-').ok_or_else(|| bad("no algorithm"))?;
    let function = match algo {
        "sha256" => DigestFunction::Sha256,
        "sha384" => DigestFunction::Sha384,
        "sha512" => DigestFunction::Sha512,
        _ => return Err(bad("unsupported algorithm")),
    };
    use base64::Engine;
    let hash = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad("not base64"))?;
    if hash.len() != function.hash_len() {
        return Err(bad("wrong hash length"));
    }
    Ok(Sri { function, hash })
}

/// One instance of `Fetch`: its association store and the CAS downloads go to.
#[derive(Clone)]
pub struct FetchInstance {
    pub associations: StoreRef,
    pub cas: Option<StoreRef>,
}

pub struct FetchService {
    instances: Instances<FetchInstance>,
    metrics: Arc<Metrics>,
    client: HttpClient,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
>;

fn http_client() -> Result<HttpClient, Error> {
    use hyper_rustls::ConfigBuilderExt;
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS client: {e}")))?
        .with_native_roots()
        .map_err(|e| Error::internal(format!("TLS client roots: {e}")))?
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

impl FetchService {
    pub fn new(instances: Instances<FetchInstance>, metrics: Arc<Metrics>) -> Result<Self, Error> {
        Ok(FetchService {
            instances,
            metrics,
            client: http_client()?,
        })
    }

    /// The blob of a recorded association, if it is recorded, fresh enough and still in the CAS.
    async fn recorded(
        &self,
        inst: &FetchInstance,
        key: &Digest,
        oldest_s: u64,
    ) -> Option<(re::Digest, i32)> {
        let bytes = inst
            .associations
            .get_all(key, MAX_RECORD_BYTES)
            .await
            .ok()?;
        let record = AssetRecord::decode(bytes.as_ref()).ok()?;
        if record.stored_unix_s < oldest_s
            || (record.expires_unix_s != 0 && record.expires_unix_s <= now_s())
        {
            return None;
        }
        let wire = record.blob_digest?;
        let digest = Digest::from_proto(record.digest_function, &wire).ok()?;
        if let Some(cas) = &inst.cas {
            if !digest.is_empty_blob() && cas.has(&digest).await.ok()?.is_none() {
                return None;
            }
        }
        Some((wire, record.digest_function))
    }

    /// Downloads `uri` into the CAS; the blob's digest.
    async fn download(
        &self,
        cas: &StoreRef,
        uri: &str,
        headers: &[(String, String)],
        sri: Option<&Sri>,
        function: DigestFunction,
        deadline: tokio::time::Instant,
    ) -> Result<Digest, Error> {
        let mut uri: http::Uri = uri
            .parse()
            .map_err(|e| Error::invalid_argument(format!("{uri}: not a URI ({e})")))?;
        let mut redirects = 0;
        let response = loop {
            match uri.scheme_str() {
                Some("http" | "https") => {}
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "{uri}: only http and https URIs can be fetched"
                    )))
                }
            }
            if uri.host().is_some_and(is_metadata_host) {
                return Err(Error::new(
                    cairn_core::Code::PermissionDenied,
                    format!("{uri}: link-local and cloud metadata addresses are never fetched"),
                ));
            }
            let mut req = http::Request::get(uri.clone()).header(
                http::header::USER_AGENT,
                concat!("cairn/", env!("CARGO_PKG_VERSION")),
            );
            for (name, value) in headers {
                req = req.header(name.as_str(), value.as_str());
            }
            let req = req
                .body(http_body_util::Empty::<Bytes>::new())
                .map_err(|e| Error::invalid_argument(format!("{uri}: {e}")))?;
            let response = tokio::time::timeout_at(deadline, self.client.request(req))
                .await
                .map_err(|_| {
                    Error::new(
                        cairn_core::Code::DeadlineExceeded,
                        format!("{uri}: no answer before the deadline"),
                    )
                })?
                .map_err(|e| Error::unavailable(format!("{uri}: {e}")))?;
            if response.status().is_redirection() {
                let location = response
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        Error::unavailable(format!("{uri}: redirect without a Location"))
                    })?;
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(Error::unavailable(format!(
                        "{uri}: more than {MAX_REDIRECTS} redirects"
                    )));
                }
                uri = resolve(&uri, location)?;
                continue;
            }
            if !response.status().is_success() {
                return Err(Error::not_found(format!(
                    "{uri}: the server answered {}",
                    response.status()
                )));
            }
            break response;
        };

        // The body goes to a temporary file as it arrives, hashed on the way.
        let tmp = tempfile::NamedTempFile::new()
            .map_err(|e| Error::io("creating a temporary file for a download", e))?;
        let mut file = tokio::fs::File::from_std(
            tmp.reopen()
                .map_err(|e| Error::io("opening a download's temporary file", e))?,
        );
        let mut cas_hasher = function.hasher();
        let mut sri_hasher = sri.map(|s| s.function.hasher());
        let mut size = 0u64;
        let mut body = response.into_body();
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(Error::new(
                        cairn_core::Code::DeadlineExceeded,
                        format!("{uri}: the download did not finish before the deadline"),
                    ))
                }
                Ok(None) => break,
                Ok(Some(f)) => f.map_err(|e| Error::unavailable(format!("{uri}: {e}")))?,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            size += data.len() as u64;
            if size > MAX_DOWNLOAD_BYTES {
                return Err(Error::resource_exhausted(format!(
                    "{uri}: larger than the {MAX_DOWNLOAD_BYTES} bytes a download may be"
                )));
            }
            cas_hasher.update(&data);
            if let Some(h) = sri_hasher.as_mut() {
                h.update(&data);
            }
            file.write_all(&data)
                .await
                .map_err(|e| Error::io("writing a download's temporary file", e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io("writing a download's temporary file", e))?;
        if let (Some(sri), Some(h)) = (sri, sri_hasher) {
            let got = h.finish_with_size(0);
            if got.hash() != sri.hash.as_slice() {
                return Err(Error::invalid_argument(format!(
                    "{uri}: the content does not match its checksum.sri (it hashes to {})",
                    got.hash_hex()
                )));
            }
        }
        let digest = cas_hasher.finish_with_size(size);
        if !digest.is_empty_blob() && cas.has(&digest).await?.is_none() {
            let reader = tokio::fs::File::open(tmp.path())
                .await
                .map_err(|e| Error::io("reading a download's temporary file", e))?;
            let stream =
                tokio_util::io::ReaderStream::with_capacity(reader, cairn_core::CHUNK_SIZE)
                    .map(|r| r.map_err(|e| Error::io("reading a download's temporary file", e)))
                    .boxed();
            cas.put(&digest, cairn_core::stream::verified(stream, digest, false))
                .await?;
        }
        Ok(digest)
    }
}

/// Hosts a download must never reach, even through a redirect: link-local addresses (where
/// clouds serve instance credentials) and the metadata host names.
fn is_metadata_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
    }
    matches!(
        host.to_ascii_lowercase().as_str(),
        "metadata.google.internal" | "metadata" | "instance-data"
    )
}

/// `location` (absolute, or relative to `base`) as a URI.
fn resolve(base: &http::Uri, location: &str) -> Result<http::Uri, Error> {
    if let Ok(u) = location.parse::<http::Uri>() {
        if u.scheme().is_some() {
            return Ok(u);
        }
    }
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|e| Error::unavailable(format!("redirect to {location:?}: not a URI ({e})")))
}

fn status(e: &Error) -> RpcStatus {
    e.clone().into()
}

fn ok() -> Option<RpcStatus> {
    Some(RpcStatus::default())
}

#[tonic::async_trait]
impl asset::fetch_server::Fetch for FetchService {
    async fn fetch_blob(
        &self,
        request: Request<asset::FetchBlobRequest>,
    ) -> Result<Response<asset::FetchBlobResponse>, Status> {
        let timer = self.metrics.rpc("fetch", "FetchBlob");
        let r = self
            .fetch_blob_inner(request.into_inner())
            .await
            .map_err(Status::from);
        timer.finish(&r);
        r.map(Response::new)
    }

    async fn fetch_directory(
        &self,
        _request: Request<asset::FetchDirectoryRequest>,
    ) -> Result<Response<asset::FetchDirectoryResponse>, Status> {
        let timer = self.metrics.rpc("fetch", "FetchDirectory");
        let r = Err(Status::unimplemented(
            "FetchDirectory is not supported by this server; fetch archives with FetchBlob",
        ));
        timer.finish(&r);
        r
    }
}

impl FetchService {
    async fn fetch_blob_inner(
        &self,
        req: asset::FetchBlobRequest,
    ) -> Result<asset::FetchBlobResponse, Error> {
        let inst = self.instances.get(&req.instance_name)?.clone();
        if req.uris.is_empty() {
            return Err(Error::invalid_argument("FetchBlob: no uris"));
        }
        let function = DigestFunction::from_request(req.digest_function, 64)?;
        let mut sri = None;
        let mut headers = Vec::new();
        for q in &req.qualifiers {
            match q.name.as_str() {
                "checksum.sri" => sri = Some(parse_sri(&q.value)?),
                name if name.starts_with("http_header:") => {
                    headers.push((name["http_header:".len()..].to_string(), q.value.clone()))
                }
                // Part of the association key only (e.g. bazel.canonical_id).
                _ => {}
            }
        }
        let oldest_s = req
            .oldest_content_accepted
            .as_ref()
            .map_or(0, |t| t.seconds.max(0) as u64);
        let timeout = req
            .timeout
            .as_ref()
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT);
        let deadline = tokio::time::Instant::now() + timeout;
        let response = |uri: &str, digest: re::Digest, function: i32| asset::FetchBlobResponse {
            status: ok(),
            uri: uri.to_string(),
            qualifiers: req.qualifiers.clone(),
            expires_at: None,
            blob_digest: Some(digest),
            digest_function: function,
        };
        for uri in &req.uris {
            let key = association_key(uri, &req.qualifiers);
            if let Some((digest, f)) = self.recorded(&inst, &key, oldest_s).await {
                return Ok(response(uri, digest, f));
            }
        }
        let Some(cas) = inst.cas.clone() else {
            return Ok(asset::FetchBlobResponse {
                status: Some(status(&Error::not_found(format!(
                    "no blob is recorded for {:?}, and instance {:?} has no CAS on this listener to download into",
                    req.uris, req.instance_name
                )))),
                uri: req.uris[0].clone(),
                ..Default::default()
            });
        };
        let mut errors = Vec::new();
        for uri in &req.uris {
            match self
                .download(&cas, uri, &headers, sri.as_ref(), function, deadline)
                .await
            {
                Ok(digest) => {
                    let record = AssetRecord {
                        blob_digest: Some(digest.to_proto()),
                        digest_function: function.to_proto(),
                        stored_unix_s: now_s(),
                        expires_unix_s: 0,
                    };
                    let key = association_key(uri, &req.qualifiers);
                    if let Err(e) = inst
                        .associations
                        .put_bytes(&key, record.encode_to_vec().into())
                        .await
                    {
                        tracing::warn!(%uri, error = %e, "remote asset: could not record the association");
                    }
                    return Ok(response(uri, digest.to_proto(), function.to_proto()));
                }
                Err(e) => errors.push(e),
            }
        }
        // The first failure's code; every URI's reason in the message.
        let code = errors[0].code;
        let message = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        Ok(asset::FetchBlobResponse {
            status: Some(status(&Error::new(code, message))),
            uri: req.uris[0].clone(),
            qualifiers: req.qualifiers.clone(),
            ..Default::default()
        })
    }
}

/// One instance of `Push`.
#[derive(Clone)]
pub struct PushInstance {
    pub associations: StoreRef,
    pub read_only: bool,
}

pub struct PushService {
    instances: Instances<PushInstance>,
    metrics: Arc<Metrics>,
}

impl PushService {
    pub fn new(instances: Instances<PushInstance>, metrics: Arc<Metrics>) -> Self {
        PushService { instances, metrics }
    }

    async fn push_blob_inner(&self, req: asset::PushBlobRequest) -> Result<(), Error> {
        let inst = self.instances.get(&req.instance_name)?.clone();
        if inst.read_only {
            return Err(Error::new(
                cairn_core::Code::PermissionDenied,
                format!(
                    "Push on instance {:?} is read-only (push.read_only)",
                    req.instance_name
                ),
            ));
        }
        if req.uris.is_empty() {
            return Err(Error::invalid_argument("PushBlob: no uris"));
        }
        let wire = req
            .blob_digest
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("PushBlob: blob_digest is missing"))?;
        let digest = Digest::from_proto(req.digest_function, wire)?;
        let expires = req
            .expire_at
            .as_ref()
            .map_or(0, |t| t.seconds.max(0) as u64);
        let record = AssetRecord {
            blob_digest: Some(digest.to_proto()),
            digest_function: digest.function().to_proto(),
            stored_unix_s: now_s(),
            expires_unix_s: expires,
        };
        let value: Bytes = record.encode_to_vec().into();
        for uri in &req.uris {
            inst.associations
                .put_bytes(&association_key(uri, &req.qualifiers), value.clone())
                .await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl asset::push_server::Push for PushService {
    async fn push_blob(
        &self,
        request: Request<asset::PushBlobRequest>,
    ) -> Result<Response<asset::PushBlobResponse>, Status> {
        let timer = self.metrics.rpc("push", "PushBlob");
        let r = self
            .push_blob_inner(request.into_inner())
            .await
            .map(|()| Response::new(asset::PushBlobResponse {}))
            .map_err(Status::from);
        timer.finish(&r);
        r
    }

    async fn push_directory(
        &self,
        _request: Request<asset::PushDirectoryRequest>,
    ) -> Result<Response<asset::PushDirectoryResponse>, Status> {
        let timer = self.metrics.rpc("push", "PushDirectory");
        let r = Err(Status::unimplemented(
            "PushDirectory is not supported by this server; push archives with PushBlob",
        ));
        timer.finish(&r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn association_keys_ignore_qualifier_order_only() {
        let q = |n: &str, v: &str| asset::Qualifier {
            name: n.into(),
            value: v.into(),
        };
        let a = association_key("http://x/a.tgz", &[q("a", "1"), q("b", "2")]);
        let b = association_key("http://x/a.tgz", &[q("b", "2"), q("a", "1")]);
        assert_eq!(a, b);
        assert_ne!(a, association_key("http://x/a.tgz", &[q("a", "1")]));
        assert_ne!(
            a,
            association_key("http://x/b.tgz", &[q("a", "1"), q("b", "2")])
        );
    }

    #[test]
    fn sri_values_are_checked() {
        let s = parse_sri("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(s.function, DigestFunction::Sha256);
        assert_eq!(s.hash, DigestFunction::Sha256.compute(b"").hash());
        for bad in [
            "md5-abc",
            "sha256",
            "sha256-!!!",
            "sha256-AAAA",
            "sha512-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            assert!(parse_sri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_hosts_are_recognised() {
        for h in ["169.254.169.254", "[fe80::1]", "metadata.google.internal"] {
            assert!(is_metadata_host(h), "{h}");
        }
        for h in ["127.0.0.1", "10.0.0.1", "example.com", "[::1]"] {
            assert!(!is_metadata_host(h), "{h}");
        }
    }

    #[test]
    fn redirects_resolve_against_the_base() {
        let base: http::Uri = "http://h:1/a/b.tgz".parse().unwrap();
        assert_eq!(
            resolve(&base, "/c.tgz").unwrap().to_string(),
            "http://h:1/c.tgz"
        );
        assert_eq!(
            resolve(&base, "d.tgz").unwrap().to_string(),
            "http://h:1/a/d.tgz"
        );
        assert_eq!(
            resolve(&base, "https://o/e.tgz").unwrap().to_string(),
            "https://o/e.tgz"
        );
    }
}
