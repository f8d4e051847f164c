//! `experimental_cloud_object_store` end to end: the real binary over a real S3 API server
//! (`moto_server`), reached through `AWS_ENDPOINT_URL` as NativeLink reads it, and over
//! Azurite (provider `azure`, NativeLink's `endpoint` key) and fake-gcs-server (provider
//! `gcs`, `STORAGE_EMULATOR_HOST`), serving
//! ByteStream, the CAS and the AC over gRPC; two processes sharing a bucket; and a
//! fault-injecting proxy between Cairn and the server (failures retried away, a dead backend
//! reported as UNAVAILABLE and by `/status`, recovery without a restart).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
use cairn_core::{Digest, DigestFunction};
use common::emulators::{Azurite, FakeGcs, Moto};
use common::fault_proxy::FaultProxy;
use common::{data, Cairn};
use futures::StreamExt;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;

fn sha(d: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(d)
}

/// CAS: verify over fast_slow (memory over S3); AC: S3 under its own prefix.
const CONFIG: &str = r#"{
  stores: {
    CAS: { verify: { verify_size: true, verify_hash: true, backend: { fast_slow: {
      fast: @FAST@,
      slow: { experimental_cloud_object_store: {
        provider: "aws", region: "us-east-1", bucket: "cas", key_prefix: "cas/",
        insecure_allow_http: true, multipart_max_concurrent_uploads: 2,
        retry: { max_retries: @RETRIES@, delay: 0.02, jitter: 0.5 },
      } },
    } } } },
    AC: { experimental_cloud_object_store: {
      provider: "aws", region: "us-east-1", bucket: "cas", key_prefix: "ac/",
      insecure_allow_http: true,
      retry: { max_retries: @RETRIES@, delay: 0.02, jitter: 0.5 },
    } },
  },
  servers: [{
    listener: { http: { socket_address: "127.0.0.1:0" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

/// A memory fast tier.
const MEMORY: &str = r#"{ memory: { eviction_policy: { max_bytes: "64mb" } } }"#;
/// A fast tier that keeps nothing: every read goes to S3.
const NONE: &str = "{ noop: {} }";

/// Starts Cairn in `dir` with the S3 API at `endpoint` and `fast` as the CAS's fast tier.
fn start(dir: &Path, moto: &Moto, endpoint: &str, fast: &str, retries: u32) -> Cairn {
    let config = dir.join("cloud.json5");
    let text = CONFIG
        .replace("@FAST@", fast)
        .replace("@RETRIES@", &retries.to_string());
    std::fs::write(&config, text).unwrap();
    Cairn::start_config_env(dir, &config, &moto.aws_env(endpoint))
}

struct Clients {
    cas: ContentAddressableStorageClient<Channel>,
    ac: ActionCacheClient<Channel>,
    bs: ByteStreamClient<Channel>,
}

async fn clients(c: &Cairn) -> Clients {
    let ch = c.channel().await;
    Clients {
        cas: ContentAddressableStorageClient::new(ch.clone()).max_decoding_message_size(64 << 20),
        ac: ActionCacheClient::new(ch.clone()),
        bs: ByteStreamClient::new(ch).max_decoding_message_size(64 << 20),
    }
}

async fn write(bs: &mut ByteStreamClient<Channel>, blob: &[u8]) -> Result<i64, tonic::Status> {
    let d = sha(blob);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let chunk = 1 << 20;
    let mut msgs: Vec<WriteRequest> = blob
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: false,
            data: c.to_vec(),
        })
        .collect();
    msgs.last_mut().unwrap().finish_write = true;
    bs.write(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().committed_size)
}

async fn read(
    bs: &mut ByteStreamClient<Channel>,
    d: &Digest,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend_from_slice(&m?.data);
    }
    Ok(out)
}

async fn missing(cas: &mut ContentAddressableStorageClient<Channel>, ds: &[Digest]) -> Vec<Digest> {
    let r = cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: ds.iter().map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    r.missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto_with(DigestFunction::Sha256, d).unwrap())
        .collect()
}

async fn batch_put(cas: &mut ContentAddressableStorageClient<Channel>, blobs: &[Vec<u8>]) {
    let requests = blobs
        .iter()
        .map(|b| re::batch_update_blobs_request::Request {
            digest: Some(sha(b).to_proto()),
            data: b.clone(),
            compressor: 0,
        })
        .collect();
    let r = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for resp in r.responses {
        let status = resp.status.unwrap();
        assert_eq!(status.code, 0, "{}", status.message);
    }
}

fn action_result(marker: &[u8]) -> re::ActionResult {
    re::ActionResult {
        exit_code: 3,
        stdout_raw: marker.to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn bytestream_cas_and_ac_through_verify_and_fast_slow_over_s3() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    // Every read comes from S3.
    let c = start(dir.path(), &moto, &moto.endpoint(), NONE, 3);
    let mut cl = clients(&c).await;

    // A blob of several multipart parts (5 MiB each), through ByteStream.
    let big = data(11 << 20, 1);
    let db = sha(&big);
    assert_eq!(write(&mut cl.bs, &big).await.unwrap(), big.len() as i64);
    assert!(read(&mut cl.bs, &db, 0, 0).await.unwrap() == big);
    let part = read(&mut cl.bs, &db, (5 << 20) - 7, 1000).await.unwrap();
    assert_eq!(part, big[(5 << 20) - 7..(5 << 20) - 7 + 1000]);
    let tail = read(&mut cl.bs, &db, big.len() as i64 - 5, 0)
        .await
        .unwrap();
    assert_eq!(tail, big[big.len() - 5..]);
    let e = read(&mut cl.bs, &db, big.len() as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    // It is in the bucket under the prefix, named as NativeLink names it.
    let object = format!("/cas/cas/{}-{}", db.hash_hex(), db.size());
    assert_eq!(moto.request("HEAD", &object).await.unwrap(), 200);

    // Small blobs through BatchUpdateBlobs; FindMissingBlobs over present and absent ones.
    let small: Vec<Vec<u8>> = (0..20).map(|i| data(100 + i, 100 + i as u64)).collect();
    batch_put(&mut cl.cas, &small).await;
    let mut ds: Vec<Digest> = small.iter().map(|b| sha(b)).collect();
    let absent: Vec<Digest> = (0..200)
        .map(|i| sha(format!("absent {i}").as_bytes()))
        .collect();
    ds.extend(absent.iter().cloned());
    ds.push(db);
    let mut got = missing(&mut cl.cas, &ds).await;
    got.sort_by_key(|d| d.hash_hex());
    let mut want = absent.clone();
    want.sort_by_key(|d| d.hash_hex());
    assert_eq!(got, want);

    // A write whose data does not match its digest stores nothing, here or in S3.
    let liar = data(6 << 20, 9);
    let claimed = sha(&data(6 << 20, 10));
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        claimed.hash_hex(),
        claimed.size()
    );
    let msgs: Vec<WriteRequest> = liar
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, ch)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: i == 5,
            data: ch.to_vec(),
        })
        .collect();
    let e = cl.bs.write(futures::stream::iter(msgs)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(missing(&mut cl.cas, &[claimed]).await, vec![claimed]);
    let object = format!("/cas/cas/{}-{}", claimed.hash_hex(), claimed.size());
    assert_eq!(moto.request("HEAD", &object).await.unwrap(), 404);

    // The action cache in the same bucket under its own prefix.
    let action = sha(b"an action");
    let result = action_result(b"from s3");
    cl.ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let back = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.stdout_raw, result.stdout_raw);
    let e = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(sha(b"never run").to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn two_processes_sharing_a_bucket_see_each_others_blobs() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(da.path(), &moto, &moto.endpoint(), MEMORY, 3);
    let b = start(db.path(), &moto, &moto.endpoint(), MEMORY, 3);
    let (mut ca, mut cb) = (clients(&a).await, clients(&b).await);

    let blob = data(7 << 20, 5);
    let d = sha(&blob);
    assert_eq!(missing(&mut cb.cas, &[d]).await, vec![d]);
    write(&mut ca.bs, &blob).await.unwrap();
    assert!(missing(&mut cb.cas, &[d]).await.is_empty());
    assert!(read(&mut cb.bs, &d, 0, 0).await.unwrap() == blob);

    let small = vec![data(300, 6)];
    batch_put(&mut cb.cas, &small).await;
    let r = ca
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![sha(&small[0]).to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].data, small[0]);

    let action = sha(b"shared action");
    cb.ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(action_result(b"b wrote this")),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = ca
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"b wrote this");
}

#[tokio::test]
async fn uploads_and_reads_succeed_when_a_fifth_of_backend_requests_fail() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    // Every read goes to S3 through the proxy.
    let c = start(dir.path(), &moto, &proxy.endpoint(), NONE, 10);
    let mut cl = clients(&c).await;
    proxy.set_failure_percent(20);

    let big = data(12 << 20, 21);
    let small: Vec<Vec<u8>> = (0..30).map(|i| data(2000 + i, 200 + i as u64)).collect();
    write(&mut cl.bs, &big).await.unwrap();
    batch_put(&mut cl.cas, &small).await;
    let mut ds: Vec<Digest> = small.iter().map(|b| sha(b)).collect();
    ds.push(sha(&big));
    for _ in 0..3 {
        assert!(missing(&mut cl.cas, &ds).await.is_empty());
        assert!(read(&mut cl.bs, &sha(&big), 0, 0).await.unwrap() == big);
        for b in &small[..10] {
            assert_eq!(&read(&mut cl.bs, &sha(b), 0, 0).await.unwrap(), b);
        }
    }
    let (requests, faults) = proxy.counts();
    eprintln!("fault proxy: {faults} of {requests} backend requests failed");
    assert!(
        requests > 100 && faults * 100 >= requests * 10,
        "{faults} of {requests}"
    );
    // What S3 holds is exactly what was written.
    proxy.set_failure_percent(0);
    let object = format!("/cas/cas/{}-{}", sha(&big).hash_hex(), big.len());
    assert_eq!(moto.request("HEAD", &object).await.unwrap(), 200);
}

#[tokio::test]
async fn a_dead_backend_is_unavailable_naming_the_store_until_it_returns() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &moto, &proxy.endpoint(), NONE, 2);
    let mut cl = clients(&c).await;
    let blob = data(5000, 31);
    batch_put(&mut cl.cas, std::slice::from_ref(&blob)).await;

    proxy.set_down(true);
    let e = read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("stores.CAS"), "{e:?}");
    let e = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![sha(&blob).to_proto()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("experimental_cloud_object_store")
            || e.message().contains("stores.CAS"),
        "{e:?}"
    );
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("stores/CAS") && body.contains("stores.CAS"),
        "{body}"
    );

    // Back up: the server recovers by itself.
    proxy.set_down(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = common::http_get(c.addr, "/status").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap(), blob);
}

/// Azure workload identity (what AKS injects: `AZURE_CLIENT_ID`, `AZURE_TENANT_ID` and
/// `AZURE_FEDERATED_TOKEN_FILE`), then a service principal (`AZURE_CLIENT_SECRET`). Cairn trades
/// the file's token (or the secret) at Azure AD's token endpoint
/// (`AZURE_AUTHORITY_HOST` points it at a stand-in here) for an access token, which azurite in
/// OAuth mode (HTTPS) accepts for the blobs; no account key is anywhere in the environment.
#[tokio::test]
async fn azure_workload_identity_and_a_service_principal_get_the_blob_requests_token() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::certs::Pki::new(&dir.path().join("pki"), "azurite");
    let azurite = Azurite::start_oauth(&pki.issue("azurite", 3, true)).await;
    azurite.create_container("cas");
    let tenant = "ab1f708d-50f6-404c-a006-d71b2ac7a606";
    let (aad, seen) = token_endpoint(storage_token(tenant)).await;
    let federated = dir.path().join("federated-token");
    std::fs::write(&federated, "projected-service-account-token").unwrap();
    let store = |prefix: &str| {
        format!(
            r#"{{ experimental_cloud_object_store: {{
              provider: "azure", account_name: "devstoreaccount1", container: "cas",
              endpoint: "{}", key_prefix: "{prefix}", insecure_allow_http: true,
              retry: {{ max_retries: 3, delay: 0.02, jitter: 0.5 }} }} }}"#,
            azurite.endpoint()
        )
    };
    let config = dir.path().join("azure.json5");
    std::fs::write(&config, cloud_config(&store)).unwrap();
    // Workload identity, then a service principal's secret.
    let cases: [(&str, &str, u64); 2] = [
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "client_assertion=projected-service-account-token",
            93,
        ),
        ("AZURE_CLIENT_SECRET", "client_secret=sp-secret", 95),
    ];
    for (var, field, seed) in cases {
        let value = if var == "AZURE_CLIENT_SECRET" {
            "sp-secret".to_string()
        } else {
            federated.display().to_string()
        };
        let command = cairn_command(
            &config,
            dir.path(),
            dir.path(),
            &["AZURE_"],
            &[
                ("AZURE_CLIENT_ID", "cairn-cas-client".into()),
                ("AZURE_TENANT_ID", tenant.into()),
                (var, value),
                ("AZURE_AUTHORITY_HOST", format!("http://{aad}")),
                ("SSL_CERT_FILE", pki.ca.display().to_string()),
            ],
        );
        let c = Cairn::spawn_until_listening(command, dir.path(), config.clone());
        let mut cl = clients(&c).await;
        let blob = data(200_000, seed);
        let d = sha(&blob);
        write(&mut cl.bs, &blob).await.unwrap();
        assert!(missing(&mut cl.cas, &[d]).await.is_empty());
        assert!(read(&mut cl.bs, &d, 0, 0).await.unwrap() == blob);
        drop(c);

        let asked = std::mem::take(&mut *seen.lock().unwrap());
        assert!(
            !asked.is_empty(),
            "{var}: Azure AD was never asked for a token"
        );
        for request in &asked {
            assert!(
                request.starts_with(&format!("POST /{tenant}/oauth2/v2.0/token ")),
                "{request}"
            );
            for field in [
                "client_id=cairn-cas-client",
                field,
                "grant_type=client_credentials",
            ] {
                assert!(request.contains(field), "{var}: {field} not in {request}");
            }
        }
    }
}

/// An access token as Azure AD issues one for Azure Storage (azurite checks its audience,
/// issuer and times, not its signature).
fn storage_token(tenant: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = b64.encode(
        serde_json::json!({
            "aud": "https://storage.azure.com",
            "iss": format!("https://sts.windows.net/{tenant}/"),
            "tid": tenant,
            "oid": "cairn",
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + 3600,
        })
        .to_string(),
    );
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

/// A stand-in for a token endpoint (Azure AD's, or GCE's metadata server) on a free loopback
/// port: every request gets `token`; each is recorded as its head and body.
async fn token_endpoint(
    token: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    json_endpoint(
        serde_json::json!({
            "token_type": "Bearer", "expires_in": 3599, "access_token": token,
        })
        .to_string(),
    )
    .await
}

/// A stand-in for a credential endpoint on a free loopback port: every request gets the JSON
/// `answer`; each is recorded as its head and body.
async fn json_endpoint(
    answer: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (record, answer) = (record.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(Some((head, body))) = common::fault_proxy::read_request(&mut conn).await
                else {
                    return;
                };
                let body = String::from_utf8_lossy(&body);
                record.lock().unwrap().push(format!("{head}{body}"));
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn azure_provider_serves_the_cas_and_ac_over_azurite() {
    let azurite = Azurite::start().await;
    azurite.create_container("cas");
    let dir = tempfile::tempdir().unwrap();
    let store = |prefix: &str| {
        format!(
            r#"{{ experimental_cloud_object_store: {{
              provider: "azure", account_name: "devstoreaccount1", container: "cas",
              endpoint: "{}", key_prefix: "{prefix}", insecure_allow_http: true,
              retry: {{ max_retries: 3, delay: 0.02, jitter: 0.5 }} }} }}"#,
            azurite.endpoint()
        )
    };
    let config = cloud_config(&store);
    let path = dir.path().join("azure.json5");
    std::fs::write(&path, config).unwrap();
    let c = Cairn::start_config_env(dir.path(), &path, &azurite.azure_env());
    let mut cl = clients(&c).await;

    let big = data(11 << 20, 41);
    let d = sha(&big);
    assert_eq!(missing(&mut cl.cas, &[d]).await, vec![d]);
    write(&mut cl.bs, &big).await.unwrap();
    assert!(missing(&mut cl.cas, &[d]).await.is_empty());
    assert!(read(&mut cl.bs, &d, 0, 0).await.unwrap() == big);
    let part = read(&mut cl.bs, &d, 6 << 20, 100).await.unwrap();
    assert_eq!(part, big[6 << 20..(6 << 20) + 100]);
    let end = read(&mut cl.bs, &d, big.len() as i64, 0).await.unwrap();
    assert!(end.is_empty());

    let action = sha(b"azure action");
    cl.ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(action_result(b"in azure")),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"in azure");
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn find_missing_blobs_of_ten_thousand_digests_answers_within_a_minute() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &moto, &moto.endpoint(), NONE, 3);
    let mut cl = clients(&c).await;
    let present: Vec<Vec<u8>> = (0..50).map(|i| data(64, 500 + i)).collect();
    batch_put(&mut cl.cas, &present).await;
    let mut ds: Vec<Digest> = present.iter().map(|b| sha(b)).collect();
    ds.extend((0..9_950).map(|i| sha(format!("never stored {i}").as_bytes())));
    let mut request = tonic::Request::new(re::FindMissingBlobsRequest {
        blob_digests: ds.iter().map(|d| d.to_proto()).collect(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(60));
    let start = Instant::now();
    let r = cl
        .cas
        .find_missing_blobs(request)
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "FindMissingBlobs of {} digests over moto: {:?}",
        ds.len(),
        start.elapsed()
    );
    assert_eq!(r.missing_blob_digests.len(), 9_950);
}

#[tokio::test]
async fn a_backend_that_never_answers_fails_status_in_time_and_the_server_stays_up() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &moto, &proxy.endpoint(), NONE, 2);
    let mut cl = clients(&c).await;
    let blob = data(3000, 51);
    batch_put(&mut cl.cas, std::slice::from_ref(&blob)).await;

    proxy.set_stalled(true);
    let started = Instant::now();
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 503, "{body}");
    // The CAS (a `verify` over the cloud store) says so in its own words when its backend's
    // deadline fires first, or the check's when the check's own 5 s fire first.
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        status["components"]["stores/CAS"]["status"], "failed",
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // A client with a deadline is answered by then (tonic's client reports its own timeout as
    // CANCELLED "Timeout expired" when it fires first), and the server keeps serving.
    let mut request = tonic::Request::new(re::FindMissingBlobsRequest {
        blob_digests: vec![sha(&blob).to_proto()],
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let e = cl.cas.find_missing_blobs(request).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    proxy.set_stalled(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(c.addr, "/status").await.0 != 200 {
        assert!(Instant::now() < deadline, "never healthy again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap(), blob);
}

/// A process's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test]
async fn a_large_upload_and_read_use_memory_bounded_by_parts_not_blob_size() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &moto, &moto.endpoint(), NONE, 3);
    let mut cl = clients(&c).await;
    let warm = data(1000, 60);
    batch_put(&mut cl.cas, std::slice::from_ref(&warm)).await;
    let before = peak_rss(c.child.id());

    let len = 256 << 20;
    let big = data(len, 61);
    let d = sha(&big);
    let started = Instant::now();
    // Streamed in 1 MiB messages, without holding them all at once.
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash_hex(),
        d.size()
    );
    let blob = big.clone();
    let msgs = futures::stream::iter((0..len).step_by(1 << 20).map(move |off| {
        let end = (off + (1 << 20)).min(len);
        WriteRequest {
            resource_name: if off == 0 {
                name.clone()
            } else {
                String::new()
            },
            write_offset: off as i64,
            finish_write: end == len,
            data: blob[off..end].to_vec(),
        }
    }));
    cl.bs.write(msgs).await.unwrap();
    let upload = started.elapsed();
    let after_upload = peak_rss(c.child.id());
    let started = Instant::now();
    let mut s = cl
        .bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut hasher = DigestFunction::Sha256.hasher();
    let mut got = 0u64;
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        hasher.update(&m.data);
        got += m.data.len() as u64;
    }
    assert_eq!(hasher.finish_with_size(got), d);
    let read = started.elapsed();
    let after = peak_rss(c.child.id());
    eprintln!(
        "256 MiB through Cairn over moto: upload {upload:?}, read {read:?}; Cairn peak RSS {} MiB before, {} MiB after the upload, {} MiB after the read",
        before >> 20,
        after_upload >> 20,
        after >> 20
    );
    // Parts in flight (2 + 1 of 5 MiB), the service's buffers and the read's chunks: half
    // the blob's size at most (buffering it whole would take all of it).
    assert!(
        after - before < 128 << 20,
        "peak RSS grew by {} MiB for a 256 MiB blob",
        (after - before) >> 20
    );
}

/// Bazel 4.2.3 (Debian's `bazel-bootstrap`, offline) builds with its remote cache on Cairn,
/// whose CAS (verify over fast_slow of memory over S3) and AC live in moto behind the fault
/// proxy failing a fifth of the requests: the build, and a clean rebuild served wholly from
/// the cache, see no error.
#[test]
fn bazel_builds_and_rebuilds_from_s3_with_a_fifth_of_backend_requests_failing() {
    let Some(program) = common::bazel::find_or_skip("cloud_store") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(Moto::start());
    rt.block_on(moto.create_bucket("cas"));
    let proxy = rt.block_on(FaultProxy::start(([127, 0, 0, 1], moto.port).into()));
    proxy.set_failure_percent(20);
    let tmp = tempfile::tempdir().unwrap();
    let cairn_dir = tmp.path().join("cairn");
    std::fs::create_dir(&cairn_dir).unwrap();
    let cairn = start(&cairn_dir, &moto, &proxy.endpoint(), MEMORY, 10);
    let bazel = common::bazel::Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");
    let mut args = bazel.cache_flags(cairn.addr);
    args.push("//...".to_string());

    let first = bazel.run("build", &args);
    let executed = first.all_processes_were("local");
    first.assert_no_remote_cache_warning();
    bazel.run("clean", &[]);
    let second = bazel.run("build", &args);
    assert_eq!(executed, second.all_processes_were("remote cache hit"));
    second.assert_no_remote_cache_warning();
    let report = std::fs::read_to_string(bazel.bin("report.txt")).unwrap();
    assert_eq!(report, "A CACHE THAT REMEMBERS\n23\nhello, cairn\n");
    let (requests, faults) = proxy.counts();
    eprintln!("Bazel over S3: {faults} of {requests} backend requests failed");
    assert!(faults > 0, "no fault was injected");
    drop(bazel);
    cairn.kill9();
}

#[tokio::test]
async fn gcs_provider_serves_the_cas_and_ac_over_fake_gcs_server() {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let store = |prefix: &str| {
        format!(
            r#"{{ experimental_cloud_object_store: {{
              provider: "gcs", bucket: "cas", key_prefix: "{prefix}",
              retry: {{ max_retries: 3, delay: 0.02, jitter: 0.5 }} }} }}"#
        )
    };
    let config = cloud_config(&store);
    let path = dir.path().join("gcs.json5");
    std::fs::write(&path, config).unwrap();
    let c = Cairn::start_config_env(dir.path(), &path, &[("STORAGE_EMULATOR_HOST", gcs.host())]);
    let mut cl = clients(&c).await;

    let big = data(12 << 20, 71);
    let d = sha(&big);
    assert_eq!(missing(&mut cl.cas, &[d]).await, vec![d]);
    write(&mut cl.bs, &big).await.unwrap();
    assert!(missing(&mut cl.cas, &[d]).await.is_empty());
    assert!(read(&mut cl.bs, &d, 0, 0).await.unwrap() == big);
    let part = read(&mut cl.bs, &d, (5 << 20) + 3, 100).await.unwrap();
    assert_eq!(part, big[(5 << 20) + 3..(5 << 20) + 103]);
    let end = read(&mut cl.bs, &d, big.len() as i64, 0).await.unwrap();
    assert!(end.is_empty());

    let action = sha(b"gcs action");
    cl.ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(action_result(b"in gcs")),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"in gcs");
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

/// A CAS (verify over the cloud store) and an AC on `store(prefix)`, on a free port.
fn cloud_config(store: &dyn Fn(&str) -> String) -> String {
    format!(
        r#"{{
  stores: {{
    CAS: {{ verify: {{ verify_size: true, verify_hash: true, backend: {} }} }},
    AC: {},
  }},
  servers: [{{
    listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      ac: [{{ instance_name: "", ac_store: "AC" }}],
      bytestream: [{{ instance_name: "", cas_store: "CAS" }}],
      health: {{}},
    }},
  }}],
}}"#,
        store("cas/"),
        store("ac/")
    )
}

/// Uploads a multipart blob and small ones, then reads and finds them all, three times.
async fn round_trips_under_faults(c: &Cairn) {
    let mut cl = clients(c).await;
    let big = data(11 << 20, 81);
    let small: Vec<Vec<u8>> = (0..15).map(|i| data(3000 + i, 800 + i as u64)).collect();
    write(&mut cl.bs, &big).await.unwrap();
    batch_put(&mut cl.cas, &small).await;
    let mut ds: Vec<Digest> = small.iter().map(|b| sha(b)).collect();
    ds.push(sha(&big));
    for _ in 0..3 {
        assert!(missing(&mut cl.cas, &ds).await.is_empty());
        assert!(read(&mut cl.bs, &sha(&big), 0, 0).await.unwrap() == big);
        for b in &small[..5] {
            assert_eq!(&read(&mut cl.bs, &sha(b), 0, 0).await.unwrap(), b);
        }
    }
}

#[tokio::test]
async fn gcs_and_azure_ride_out_a_fifth_of_backend_requests_failing() {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let gcs_proxy = FaultProxy::start(([127, 0, 0, 1], gcs.port).into()).await;
    let azurite = Azurite::start().await;
    azurite.create_container("cas");
    let az_proxy = FaultProxy::start(([127, 0, 0, 1], azurite.port).into()).await;

    let dir = tempfile::tempdir().unwrap();
    let gcs_dir = dir.path().join("gcs");
    std::fs::create_dir(&gcs_dir).unwrap();
    let path = gcs_dir.join("cairn.json5");
    std::fs::write(
        &path,
        cloud_config(&|prefix| {
            format!(
                r#"{{ experimental_cloud_object_store: {{ provider: "gcs", bucket: "cas",
                  key_prefix: "{prefix}", retry: {{ max_retries: 10, delay: 0.02, jitter: 0.5 }} }} }}"#
            )
        }),
    )
    .unwrap();
    let gcs_host = gcs_proxy.addr.to_string();
    let on_gcs = Cairn::start_config_env(&gcs_dir, &path, &[("STORAGE_EMULATOR_HOST", gcs_host)]);

    let az_dir = dir.path().join("azure");
    std::fs::create_dir(&az_dir).unwrap();
    let path = az_dir.join("cairn.json5");
    let endpoint = format!(
        "{}/{}",
        az_proxy.endpoint(),
        common::emulators::AZURITE_ACCOUNT
    );
    std::fs::write(
        &path,
        cloud_config(&|prefix| {
            format!(
                r#"{{ experimental_cloud_object_store: {{ provider: "azure",
                  account_name: "devstoreaccount1", container: "cas", endpoint: "{endpoint}",
                  key_prefix: "{prefix}", insecure_allow_http: true,
                  retry: {{ max_retries: 10, delay: 0.02, jitter: 0.5 }} }} }}"#
            )
        }),
    )
    .unwrap();
    let on_azure = Cairn::start_config_env(&az_dir, &path, &azurite.azure_env());

    gcs_proxy.set_failure_percent(20);
    az_proxy.set_failure_percent(20);
    round_trips_under_faults(&on_gcs).await;
    round_trips_under_faults(&on_azure).await;
    for (name, proxy) in [("gcs", &gcs_proxy), ("azure", &az_proxy)] {
        let (requests, faults) = proxy.counts();
        eprintln!("{name}: {faults} of {requests} backend requests failed");
        assert!(
            faults * 100 >= requests * 10,
            "{name}: {faults} of {requests}"
        );
    }
}

/// `GOOGLE_APPLICATION_CREDENTIALS`, with `authentication_required: true`: every request to
/// Google's endpoint carries a JWT of the service account, signed with the account's key (what
/// Google checks). Google's endpoint is reached through `HTTPS_PROXY`: a test proxy ends TLS
/// for `storage.googleapis.com` and hands the requests, through the fault proxy that records
/// their tokens, to fake-gcs-server.
#[tokio::test]
async fn gcs_requests_carry_a_token_signed_by_the_service_account_key_file() {
    let dir = tempfile::tempdir().unwrap();
    // The account's key, RSA in PKCS#8 as Google issues them, and its public half.
    let (key, public) = (dir.path().join("sa.pem"), dir.path().join("sa.pub"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        out.stdout
    };
    let (key_s, public_s) = (key.display().to_string(), public.display().to_string());
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &key_s,
    ]);
    openssl(&["pkey", "-in", &key_s, "-pubout", "-out", &public_s]);
    let email = "cairn-cas@project.iam.gserviceaccount.com";
    let account = dir.path().join("account.json");
    std::fs::write(
        &account,
        serde_json::json!({
            "type": "service_account",
            "project_id": "project",
            "private_key_id": "key-1",
            "private_key": std::fs::read_to_string(&key).unwrap(),
            "client_email": email,
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string(),
    )
    .unwrap();
    let tokens = gcs_tokens_through_google(
        dir.path(),
        &[(
            "GOOGLE_APPLICATION_CREDENTIALS",
            account.display().to_string(),
        )],
        None,
    )
    .await;
    assert!(!tokens.is_empty(), "no request carried a token");
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut checked = std::collections::BTreeSet::new();
    for token in &tokens {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "not a JWT: {token}");
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256", "{header}");
        assert_eq!(header["kid"], "key-1", "{header}");
        assert_eq!(claims["iss"], email, "{claims}");
        if checked.insert(token.clone()) {
            // Signed by the account's key.
            let signed = dir.path().join("signed");
            let signature = dir.path().join("signature");
            std::fs::write(&signed, format!("{}.{}", parts[0], parts[1])).unwrap();
            std::fs::write(&signature, b64.decode(parts[2]).unwrap()).unwrap();
            let verdict = openssl(&[
                "dgst",
                "-sha256",
                "-verify",
                &public_s,
                "-signature",
                &signature.display().to_string(),
                &signed.display().to_string(),
            ]);
            assert_eq!(String::from_utf8_lossy(&verdict).trim(), "Verified OK");
        }
    }
    eprintln!(
        "{} requests to Google's endpoint, {} distinct tokens, each signed by the account's key",
        tokens.len(),
        checked.len()
    );
}

/// GKE workload identity (or a GCE machine's account): no key anywhere, the metadata server
/// (`GCE_METADATA_HOST`, a stand-in here) gives the token every request to Google's endpoint
/// carries; `authentication_required: true` starts because the server is there. Then gcloud's
/// application default credentials (`gcloud auth application-default login`): the refresh token
/// in `~/.config/gcloud/application_default_credentials.json` is traded at Google's token
/// endpoint (a stand-in behind the same proxy) for the requests' token.
#[tokio::test]
async fn gcs_requests_carry_tokens_from_the_metadata_server_and_gcloud_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (metadata, seen) = token_endpoint("ya29.from-the-metadata-server".into()).await;
    let tokens = gcs_tokens_through_google(
        dir.path(),
        &[("GCE_METADATA_HOST", metadata.to_string())],
        None,
    )
    .await;
    assert!(
        tokens.iter().all(|t| t == "ya29.from-the-metadata-server"),
        "{tokens:?}"
    );
    let asked = std::mem::take(&mut *seen.lock().unwrap());
    assert!(!asked.is_empty(), "the metadata server was never asked");
    for request in &asked {
        assert!(
            request.starts_with("GET /computeMetadata/v1/instance/service-accounts/default/token")
                && request
                    .to_ascii_lowercase()
                    .contains("metadata-flavor: google"),
            "{request}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let gcloud = dir.path().join(".config/gcloud");
    std::fs::create_dir_all(&gcloud).unwrap();
    std::fs::write(
        gcloud.join("application_default_credentials.json"),
        serde_json::json!({
            "type": "authorized_user",
            "client_id": "gcloud-client",
            "client_secret": "gcloud-secret",
            "refresh_token": "a-refresh-token",
        })
        .to_string(),
    )
    .unwrap();
    let (accounts, seen) = token_endpoint("ya29.from-a-refresh-token".into()).await;
    let tokens = gcs_tokens_through_google(dir.path(), &[], Some(accounts)).await;
    assert!(
        tokens.iter().all(|t| t == "ya29.from-a-refresh-token"),
        "{tokens:?}"
    );
    let asked = seen.lock().unwrap().clone();
    assert!(!asked.is_empty(), "Google's token endpoint was never asked");
    for request in &asked {
        assert!(request.starts_with("POST /o/oauth2/token "), "{request}");
        for field in [
            "grant_type=refresh_token",
            "refresh_token=a-refresh-token",
            "client_id=gcloud-client",
        ] {
            assert!(request.contains(field), "{field} not in {request}");
        }
    }
}

/// A Cairn (HOME `dir`, and `env`) whose `gcs` store, with `authentication_required: true`,
/// reaches Google's endpoint through `HTTPS_PROXY`: a test proxy ends TLS for
/// `storage.googleapis.com` and hands the requests, through a fault proxy that records their
/// tokens, to fake-gcs-server; `accounts.google.com` goes to `accounts` when given. Writes and
/// reads a blob back; returns the bearer tokens the requests carried (at least one).
async fn gcs_tokens_through_google(
    dir: &Path,
    env: &[(&str, String)],
    accounts: Option<std::net::SocketAddr>,
) -> Vec<String> {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let recorder = FaultProxy::start(([127, 0, 0, 1], gcs.port).into()).await;
    let pki = common::certs::Pki::new(&dir.join("pki"), "google");
    let cert = pki.issue_for(
        "google",
        9,
        true,
        vec![
            "storage.googleapis.com".into(),
            "accounts.google.com".into(),
        ],
    );
    let routes = accounts
        .map(|a| vec![("accounts.google.com".to_string(), a)])
        .unwrap_or_default();
    let proxy = common::https_proxy::HttpsProxy::start_routes(&cert, recorder.addr, routes).await;
    let store = |prefix: &str| {
        format!(
            r#"{{ experimental_cloud_object_store: {{
              provider: "gcs", bucket: "cas", key_prefix: "{prefix}", authentication_required: true,
              retry: {{ max_retries: 3, delay: 0.02, jitter: 0.5 }} }} }}"#
        )
    };
    let config = dir.join("gcs.json5");
    std::fs::write(&config, cloud_config(&store)).unwrap();
    let mut extra = env.to_vec();
    extra.push(("HTTPS_PROXY", format!("http://{}", proxy.addr)));
    extra.push(("SSL_CERT_FILE", pki.ca.display().to_string()));
    let command = cairn_command(
        &config,
        dir,
        dir,
        &[
            "GOOGLE_",
            "GCE_",
            "STORAGE_EMULATOR_HOST",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "NO_PROXY",
            "ALL_PROXY",
        ],
        &extra,
    );
    let c = Cairn::spawn_until_listening(command, dir, config.clone());
    let mut cl = clients(&c).await;
    let blob = data(100_000, 94);
    let d = sha(&blob);
    write(&mut cl.bs, &blob).await.unwrap();
    assert!(missing(&mut cl.cas, &[d]).await.is_empty());
    assert!(read(&mut cl.bs, &d, 0, 0).await.unwrap() == blob);
    let expected = if accounts.is_some() {
        vec!["accounts.google.com", "storage.googleapis.com"]
    } else {
        vec!["storage.googleapis.com"]
    };
    assert_eq!(proxy.hosts(), expected);
    let tokens = recorder.bearers();
    assert!(!tokens.is_empty(), "no request carried a token");
    tokens
}

#[tokio::test]
async fn gcs_read_timeout_s_bounds_a_body_that_stops_coming() {
    let gcs = FakeGcs::start().await;
    gcs.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], gcs.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cairn.json5");
    std::fs::write(
        &path,
        cloud_config(&|prefix| {
            format!(
                r#"{{ experimental_cloud_object_store: {{ provider: "gcs", bucket: "cas",
                  key_prefix: "{prefix}", read_timeout_s: 1,
                  retry: {{ max_retries: 1, delay: 0.02, jitter: 0.5 }} }} }}"#
            )
        }),
    )
    .unwrap();
    let c = Cairn::start_config_env(
        dir.path(),
        &path,
        &[("STORAGE_EMULATOR_HOST", proxy.addr.to_string())],
    );
    let mut cl = clients(&c).await;
    let blob = data(300_000, 91);
    write(&mut cl.bs, &blob).await.unwrap();

    proxy.set_stall_bodies(true);
    let started = Instant::now();
    let e = read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("no data for 1s"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    proxy.set_stall_bodies(false);
    assert_eq!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap(), blob);
}

/// The per-backend metrics: every request to the bucket, its errors and the retries, labelled
/// with the store's key path and the provider, as `/metrics` exports them.
#[tokio::test]
async fn backend_requests_errors_and_retries_are_exported_by_store() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), &moto, &proxy.endpoint(), NONE, 10);
    let mut cl = clients(&c).await;
    proxy.set_failure_percent(30);
    let blobs: Vec<Vec<u8>> = (0..20).map(|i| data(1000, 700 + i)).collect();
    batch_put(&mut cl.cas, &blobs).await;
    let (code, text) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(code, 200);
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with(prefix)
                    && l.contains("store=\"CAS.verify.backend.fast_slow.slow\"")
                    && l.contains("backend=\"aws\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let requests = value("nativelink_store_backend_requests_total{");
    let errors = value("nativelink_store_backend_request_errors_total{");
    let retries = value("nativelink_store_backend_retries_total{");
    let timed = value("nativelink_store_backend_request_duration_seconds_count{");
    assert!(
        requests >= 20.0 && errors >= 1.0 && retries >= 1.0,
        "requests {requests}, errors {errors}, retries {retries}\n{text}"
    );
    assert_eq!(requests, timed, "{text}");
}

/// `ontap_s3_existence_cache` over the S3 API (ONTAP S3 is S3): a digest the bucket lacks is
/// missing without a request, one written by another process is found after the next
/// listing, one put through the store is found at once, and the index file is written.
#[tokio::test]
async fn ontap_s3_existence_cache_answers_from_its_index_and_follows_the_bucket() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let writer_dir = dir.path().join("writer");
    std::fs::create_dir_all(&writer_dir).unwrap();
    let writer = start(&writer_dir, &moto, &moto.endpoint(), NONE, 2);
    let mut w = clients(&writer).await;
    let before = data(3000, 901);
    batch_put(&mut w.cas, std::slice::from_ref(&before)).await;

    let index = dir.path().join("index/existence");
    let config = dir.path().join("ontap.json5");
    std::fs::write(
        &config,
        format!(
            r#"{{
  stores: {{ CAS: {{ ontap_s3_existence_cache: {{
    index_path: "{}",
    sync_interval_seconds: 1,
    backend: {{
      endpoint: "{}", vserver_name: "svm0", bucket: "cas", key_prefix: "cas/",
      insecure_allow_http: true, retry: {{ max_retries: 2, delay: 0.02, jitter: 0.5 }},
    }},
  }} }} }},
  servers: [{{
    listener: {{ http: {{ socket_address: "127.0.0.1:0" }} }},
    services: {{
      cas: [{{ instance_name: "", cas_store: "CAS" }}],
      bytestream: [{{ instance_name: "", cas_store: "CAS" }}],
      capabilities: [{{ instance_name: "" }}],
    }},
  }}],
}}"#,
            index.display(),
            moto.endpoint()
        ),
    )
    .unwrap();
    let ontap_dir = dir.path().join("ontap");
    std::fs::create_dir_all(&ontap_dir).unwrap();
    let c = Cairn::start_config_env(&ontap_dir, &config, &moto.aws_env(&moto.endpoint()));
    let mut cl = clients(&c).await;

    // The blob written before the start is found (by the bucket, then by the index).
    assert!(missing(&mut cl.cas, &[sha(&before)]).await.is_empty());
    assert_eq!(read(&mut cl.bs, &sha(&before), 0, 0).await.unwrap(), before);

    // Once the index is listed, a digest the bucket lacks costs no request.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !index.exists() {
        assert!(
            Instant::now() < deadline,
            "no index file at {}",
            index.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let heads = || async {
        let (_, text) = common::http_get(c.addr, "/metrics").await;
        text.lines()
            .filter(|l| {
                l.starts_with("nativelink_store_backend_requests_total{")
                    && l.contains("backend=\"ontap\"")
                    && l.contains("operation=\"head\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let absent: Vec<Digest> = (0..50).map(|i| sha(&data(10, 5000 + i))).collect();
    let h0 = heads().await;
    assert_eq!(missing(&mut cl.cas, &absent).await.len(), 50);
    assert_eq!(
        heads().await,
        h0,
        "missing digests were asked of the bucket"
    );
    let e = read(&mut cl.bs, &absent[0], 0, 0).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("index"), "{e:?}");

    // Put through the store: found at once, and in the next index file.
    let put = data(2000, 902);
    assert_eq!(write(&mut cl.bs, &put).await.unwrap(), put.len() as i64);
    assert!(missing(&mut cl.cas, &[sha(&put)]).await.is_empty());
    assert_eq!(read(&mut cl.bs, &sha(&put), 0, 0).await.unwrap(), put);

    // Written behind the index's back: found after a listing.
    let behind = data(1500, 903);
    batch_put(&mut w.cas, std::slice::from_ref(&behind)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing(&mut cl.cas, &[sha(&behind)]).await.is_empty() {
        assert!(Instant::now() < deadline, "a listing never found the blob");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&index).unwrap();
    for d in [sha(&before), sha(&put), sha(&behind)] {
        let line = format!("{}-{}", d.hash_hex(), d.size());
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    assert!(text.starts_with("# cairn ontap_s3_existence_cache index v1\n"));

    // A lying upload is refused and leaves nothing indexed.
    let lie = data(100, 904);
    let mut bad = sha(&lie);
    bad = bad.with_size(99);
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(bad.to_proto()),
                data: lie.clone(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(r.responses[0].status.as_ref().unwrap().code, 0);
    assert_eq!(missing(&mut cl.cas, &[bad]).await.len(), 1);
}

/// The `aws` provider's credentials from the shared files when the environment has no keys:
/// `~/.aws/credentials` (profile `default`), then `AWS_SHARED_CREDENTIALS_FILE` with
/// `AWS_PROFILE`, then a profile's `credential_process`; the requests reaching the bucket are
/// signed with the key each gives (seen by the proxy). A profile that does not exist stops the start with the store's key path.
#[tokio::test]
async fn aws_credentials_come_from_the_shared_files_when_the_environment_has_none() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        "[default]\naws_access_key_id = AKIDFROMHOMEFILE\naws_secret_access_key = s\n",
    )
    .unwrap();
    std::fs::write(home.join(".aws/config"), "[default]\nregion = us-east-1\n").unwrap();
    let other = dir.path().join("ci-credentials");
    std::fs::write(
        &other,
        "[ci]\naws_access_key_id = AKIDCIPROFILE\naws_secret_access_key = s\naws_session_token = t\n",
    )
    .unwrap();
    // A profile whose credentials come from a command (`credential_process`).
    let process_config = dir.path().join("process-config");
    std::fs::write(
        &process_config,
        "[profile proc]\nregion = us-east-1\ncredential_process = printf '{\"Version\": 1, \"AccessKeyId\": \"AKIDFROMPROCESS\", \"SecretAccessKey\": \"s\", \"SessionToken\": \"t\"}'\n",
    )
    .unwrap();
    let config = dir.path().join("cloud.json5");
    std::fs::write(
        &config,
        CONFIG.replace("@FAST@", NONE).replace("@RETRIES@", "2"),
    )
    .unwrap();
    let command = |extra: &[(&str, String)]| {
        let mut extra = extra.to_vec();
        extra.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
        aws_command(&config, dir.path(), &home, &extra)
    };

    for (extra, key) in [
        (vec![], "AKIDFROMHOMEFILE"),
        (
            vec![
                ("AWS_SHARED_CREDENTIALS_FILE", other.display().to_string()),
                ("AWS_PROFILE", "ci".to_string()),
            ],
            "AKIDCIPROFILE",
        ),
        (
            vec![
                ("AWS_CONFIG_FILE", process_config.display().to_string()),
                ("AWS_PROFILE", "proc".to_string()),
            ],
            "AKIDFROMPROCESS",
        ),
    ] {
        let c = Cairn::spawn_until_listening(command(&extra), dir.path(), config.clone());
        let mut cl = clients(&c).await;
        let blob = data(3000, key.len() as u64);
        write(&mut cl.bs, &blob).await.unwrap();
        assert!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap() == blob);
        let keys = proxy.access_key_ids();
        assert!(keys.contains(&key.to_string()), "{key} not among {keys:?}");
        c.kill9();
    }
    assert_eq!(
        proxy.access_key_ids(),
        ["AKIDCIPROFILE", "AKIDFROMHOMEFILE", "AKIDFROMPROCESS"]
    );

    // A profile that is in neither file: the start fails, naming the store and the profile.
    let stderr = start_fails(command(&[("AWS_PROFILE", "missing".to_string())])).await;
    assert!(
        stderr.contains(".experimental_cloud_object_store: AWS credentials")
            && stderr.contains("AWS_PROFILE \"missing\": no such profile"),
        "{stderr}"
    );
}

/// `cairn run config` in `dir` with `HOME` at `home`: the variables of this process whose
/// names start with one of `clear` (any case) removed, so that only what the test gives is
/// seen, then `extra` set.
fn cairn_command(
    config: &Path,
    dir: &Path,
    home: &Path,
    clear: &[&str],
    extra: &[(&str, String)],
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("run").arg(config).current_dir(dir);
    for (var, _) in std::env::vars() {
        let upper = var.to_ascii_uppercase();
        if clear.iter().any(|p| upper.starts_with(p)) {
            c.env_remove(var);
        }
    }
    c.env("HOME", home).envs(extra.iter().map(|(k, v)| (k, v)));
    c
}

/// Where the AWS credential tests start: moto with the bucket `cas` behind a fault proxy that
/// records who signed what, a temp dir with an empty `home`, and `config`, a CAS and AC on
/// that bucket with no fast tier.
struct AwsBed {
    moto: Moto,
    proxy: FaultProxy,
    dir: tempfile::TempDir,
    home: std::path::PathBuf,
    config: std::path::PathBuf,
}

async fn aws_bed() -> AwsBed {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let config = dir.path().join("cloud.json5");
    std::fs::write(
        &config,
        CONFIG.replace("@FAST@", NONE).replace("@RETRIES@", "2"),
    )
    .unwrap();
    AwsBed {
        moto,
        proxy,
        dir,
        home,
        config,
    }
}

/// [`cairn_command`] without any variable of the AWS credential chain but `extra`.
fn aws_command(
    config: &Path,
    dir: &Path,
    home: &Path,
    extra: &[(&str, String)],
) -> std::process::Command {
    cairn_command(config, dir, home, &["AWS_"], extra)
}

/// Runs a Cairn that must fail to start; its stderr.
async fn start_fails(mut c: std::process::Command) -> String {
    let mut child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cairn kept running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

/// Profiles that assume roles through STS (moto's, behind the fault proxy that records who
/// signed what): `role_arn` with a `source_profile` of static keys, a chain of two roles,
/// `credential_source = Environment`, a profile's `web_identity_token_file`, and the
/// environment's web identity (IRSA: `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`). In each,
/// the STS call is signed by the source's key (web identity: unsigned), every S3 request by
/// the temporary key STS returned (moto's start with `ASIA`), and the role is assumed once
/// for several blobs.
#[tokio::test]
async fn aws_roles_are_assumed_through_sts_and_their_keys_sign_the_requests() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwb2QifQ.c2ln\n").unwrap();
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile base]\naws_access_key_id = AKIDROLESOURCE\naws_secret_access_key = s\n\
             [profile role]\nrole_arn = arn:aws:iam::123456789012:role/cairn-cas\n\
             source_profile = base\nrole_session_name = cairn-test\nexternal_id = ext-42\n\
             duration_seconds = 900\nregion = us-east-1\n\
             [profile chained]\nrole_arn = arn:aws:iam::123456789012:role/cairn-second\n\
             source_profile = role\n\
             [profile from-env]\nrole_arn = arn:aws:iam::123456789012:role/cairn-env\n\
             credential_source = Environment\n\
             [profile web]\nrole_arn = arn:aws:iam::123456789012:role/cairn-web\n\
             web_identity_token_file = {}\n",
            token.display()
        ),
    )
    .unwrap();
    let config = dir.path().join("cloud.json5");
    std::fs::write(
        &config,
        CONFIG.replace("@FAST@", NONE).replace("@RETRIES@", "2"),
    )
    .unwrap();
    let profile = |name: &str| {
        vec![
            ("AWS_CONFIG_FILE", aws_config.display().to_string()),
            ("AWS_PROFILE", name.to_string()),
        ]
    };
    let mut from_env = profile("from-env");
    from_env.push(("AWS_ACCESS_KEY_ID", "AKIDFROMENVIRONMENT".into()));
    from_env.push(("AWS_SECRET_ACCESS_KEY", "s".into()));
    let irsa = vec![
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()),
        (
            "AWS_ROLE_ARN",
            "arn:aws:iam::123456789012:role/irsa".to_string(),
        ),
        ("AWS_ROLE_SESSION_NAME", "pod-0".to_string()),
    ];
    for (case, extra, actions, sts_signers) in [
        (
            "role",
            profile("role"),
            vec!["AssumeRole"],
            vec!["AKIDROLESOURCE"],
        ),
        (
            "chained",
            profile("chained"),
            vec!["AssumeRole", "AssumeRole"],
            vec!["AKIDROLESOURCE", "ASIA"],
        ),
        (
            "from-env",
            from_env,
            vec!["AssumeRole"],
            vec!["AKIDFROMENVIRONMENT"],
        ),
        (
            "web",
            profile("web"),
            vec!["AssumeRoleWithWebIdentity"],
            vec![],
        ),
        ("irsa", irsa, vec!["AssumeRoleWithWebIdentity"], vec![]),
    ] {
        let proxy = FaultProxy::start(([127, 0, 0, 1], moto.port).into()).await;
        let mut extra = extra;
        extra.push(("AWS_ENDPOINT_URL", proxy.endpoint()));
        let c = Cairn::spawn_until_listening(
            aws_command(&config, dir.path(), &home, &extra),
            dir.path(),
            config.clone(),
        );
        let mut cl = clients(&c).await;
        for i in 0..3 {
            let blob = data(3000 + i, case.len() as u64 * 10 + i as u64);
            write(&mut cl.bs, &blob).await.unwrap();
            assert!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap() == blob);
        }
        c.kill9();
        assert_eq!(proxy.actions(), actions, "{case}: STS calls");
        let signers = proxy.signers();
        let (sts, s3): (Vec<&String>, Vec<&String>) =
            signers.iter().partition(|s| s.ends_with(" sts"));
        assert_eq!(sts.len(), sts_signers.len(), "{case}: {signers:?}");
        for want in &sts_signers {
            assert!(
                sts.iter().any(|s| s.starts_with(want)),
                "{case}: no STS call signed by {want}: {signers:?}"
            );
        }
        assert!(
            !s3.is_empty()
                && s3
                    .iter()
                    .all(|s| s.starts_with("ASIA") && s.ends_with(" s3")),
            "{case}: S3 requests not all signed by STS's keys: {signers:?}"
        );
    }
}

/// Nothing in the environment or the files: the credentials of the instance metadata service
/// (IMDSv2; moto serves one, reached through `AWS_EC2_METADATA_SERVICE_ENDPOINT` as the SDKs
/// name it) sign the requests, which go to `AWS_ENDPOINT_URL_S3` rather than
/// `AWS_ENDPOINT_URL` (here a closed port), as in the SDKs.
#[tokio::test]
async fn aws_credentials_come_from_instance_metadata_when_nothing_else_gives_them() {
    let AwsBed {
        moto: _moto,
        proxy,
        dir,
        home,
        config,
    } = aws_bed().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let extra = [
        (
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{closed_port}"),
        ),
        ("AWS_ENDPOINT_URL_S3", proxy.endpoint()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", proxy.endpoint()),
    ];
    let c = Cairn::spawn_until_listening(
        aws_command(&config, dir.path(), &home, &extra),
        dir.path(),
        config.clone(),
    );
    let mut cl = clients(&c).await;
    let blob = data(3000, 77);
    write(&mut cl.bs, &blob).await.unwrap();
    assert!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap() == blob);
    c.kill9();
    assert_eq!(proxy.signers(), ["test-key s3"]);
}

/// EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_FULL_URI` (the pod identity agent; a stand-in
/// here) asked with the token of `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` gives the keys that
/// sign every S3 request.
#[tokio::test]
async fn aws_eks_pod_identity_gives_the_keys_that_sign_the_requests() {
    let AwsBed {
        moto: _moto,
        proxy,
        dir,
        home,
        config,
    } = aws_bed().await;
    let expires = (chrono::Utc::now() + chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let (agent, seen) = json_endpoint(
        serde_json::json!({
            "AccessKeyId": "ASIAPODIDENTITY",
            "SecretAccessKey": "pod-secret",
            "Token": "pod-session-token",
            "Expiration": expires,
        })
        .to_string(),
    )
    .await;
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, "projected-pod-token").unwrap();
    let extra = [
        ("AWS_ENDPOINT_URL", proxy.endpoint()),
        (
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            format!("http://{agent}/v1/credentials"),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token_file.display().to_string(),
        ),
    ];
    let c = Cairn::spawn_until_listening(
        aws_command(&config, dir.path(), &home, &extra),
        dir.path(),
        config.clone(),
    );
    let mut cl = clients(&c).await;
    let blob = data(3000, 78);
    write(&mut cl.bs, &blob).await.unwrap();
    assert!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap() == blob);
    c.kill9();
    assert_eq!(proxy.signers(), ["ASIAPODIDENTITY s3"]);
    let asked = seen.lock().unwrap().clone();
    assert!(!asked.is_empty(), "the pod identity agent was never asked");
    for request in &asked {
        assert!(request.starts_with("GET /v1/credentials "), "{request}");
        assert!(
            request
                .to_ascii_lowercase()
                .contains("authorization: projected-pod-token"),
            "{request}"
        );
    }
}

/// A profile's `endpoint_url` names S3's endpoint when no variable does, whether the
/// credentials are the profile's or the environment's; a plain-HTTP one needs
/// `insecure_allow_http`, and the refusal names the profile.
#[tokio::test]
async fn aws_profile_endpoint_url_names_s3_when_no_variable_does() {
    let AwsBed {
        moto: _moto,
        proxy,
        dir,
        home,
        config,
    } = aws_bed().await;
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        format!(
            "[profile ep]\nendpoint_url = {}\naws_access_key_id = AKIDPROFILEENDPOINT\n\
             aws_secret_access_key = s\n",
            proxy.endpoint()
        ),
    )
    .unwrap();
    let profile = vec![
        ("AWS_CONFIG_FILE", aws_config.display().to_string()),
        ("AWS_PROFILE", "ep".to_string()),
    ];
    let mut with_env_keys = profile.clone();
    with_env_keys.push(("AWS_ACCESS_KEY_ID", "AKIDENVIRONMENTKEY".into()));
    with_env_keys.push(("AWS_SECRET_ACCESS_KEY", "s".into()));
    for (seed, extra) in [profile.clone(), with_env_keys].into_iter().enumerate() {
        let c = Cairn::spawn_until_listening(
            aws_command(&config, dir.path(), &home, &extra),
            dir.path(),
            config.clone(),
        );
        let mut cl = clients(&c).await;
        let blob = data(3000, 100 + seed as u64);
        write(&mut cl.bs, &blob).await.unwrap();
        assert!(read(&mut cl.bs, &sha(&blob), 0, 0).await.unwrap() == blob);
        c.kill9();
    }
    assert_eq!(
        proxy.signers(),
        ["AKIDENVIRONMENTKEY s3", "AKIDPROFILEENDPOINT s3"]
    );
    let plain = config.with_file_name("plain.json5");
    std::fs::write(
        &plain,
        CONFIG
            .replace("@FAST@", NONE)
            .replace("@RETRIES@", "1")
            .replace("insecure_allow_http: true,", ""),
    )
    .unwrap();
    let stderr = start_fails(aws_command(&plain, dir.path(), &home, &profile)).await;
    assert!(
        stderr.contains(".insecure_allow_http: the endpoint http://")
            && stderr.contains("endpoint_url of profile \"ep\""),
        "{stderr}"
    );
}

/// A loopback STS that refuses every call (`403 AccessDenied`).
async fn refusing_sts() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let body = "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>\
                            <Message>not authorized to perform sts:AssumeRole</Message></Error>\
                            </ErrorResponse>";
                let answer = format!(
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

/// A role STS refuses: requests fail with a message naming the role, the profile and STS's
/// answer, nothing reaches the bucket, and the server keeps answering. A role whose source
/// profile does not exist, a cycle of source profiles, and a plain-HTTP STS endpoint without
/// `insecure_allow_http`: the start fails, naming the store and the profile or key.
#[tokio::test]
async fn aws_role_failures_are_clear_and_the_server_stays_up() {
    let moto = Moto::start().await;
    moto.create_bucket("cas").await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        "[profile base]\naws_access_key_id = AKIDROLESOURCE\naws_secret_access_key = s\n\
         [profile role]\nrole_arn = arn:aws:iam::123456789012:role/cairn-cas\nsource_profile = base\n\
         [profile orphan]\nrole_arn = arn:aws:iam::123456789012:role/x\nsource_profile = gone\n\
         [profile a]\nrole_arn = arn:aws:iam::123456789012:role/a\nsource_profile = b\n\
         [profile b]\nrole_arn = arn:aws:iam::123456789012:role/b\nsource_profile = a\n",
    )
    .unwrap();
    let config = dir.path().join("cloud.json5");
    std::fs::write(
        &config,
        CONFIG.replace("@FAST@", NONE).replace("@RETRIES@", "1"),
    )
    .unwrap();
    let sts = refusing_sts().await;
    let env = |name: &str| {
        vec![
            ("AWS_CONFIG_FILE", aws_config.display().to_string()),
            ("AWS_PROFILE", name.to_string()),
            ("AWS_ENDPOINT_URL", moto.endpoint()),
            ("AWS_ENDPOINT_URL_STS", sts.clone()),
        ]
    };
    let c = Cairn::spawn_until_listening(
        aws_command(&config, dir.path(), &home, &env("role")),
        dir.path(),
        config.clone(),
    );
    let mut cl = clients(&c).await;
    for seed in 0..2 {
        let blob = data(3000, seed);
        let e = write(&mut cl.bs, &blob).await.unwrap_err();
        assert!(
            e.message().contains("AccessDenied")
                && e.message()
                    .contains("arn:aws:iam::123456789012:role/cairn-cas")
                && e.message().contains("profile \"role\""),
            "{e:?}"
        );
    }
    let e = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(sha(b"action").to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("AccessDenied"), "{e:?}");
    assert!(moto.list("cas", "").await.is_empty(), "nothing is stored");
    c.kill9();

    for (profile, says) in [
        (
            "orphan",
            "profile \"gone\" (the source_profile of profile \"orphan\"): no such profile",
        ),
        ("a", "source_profile chain a -> b -> a is a cycle"),
    ] {
        let stderr = start_fails(aws_command(&config, dir.path(), &home, &env(profile))).await;
        assert!(
            stderr.contains(".experimental_cloud_object_store: AWS credentials")
                && stderr.contains(says),
            "{profile}: {stderr}"
        );
    }
    let plain = config.with_file_name("plain.json5");
    std::fs::write(
        &plain,
        CONFIG
            .replace("@FAST@", NONE)
            .replace("@RETRIES@", "1")
            .replace("insecure_allow_http: true,", ""),
    )
    .unwrap();
    let mut extra = env("role");
    extra.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    let stderr = start_fails(aws_command(&plain, dir.path(), &home, &extra)).await;
    assert!(
        stderr.contains(".insecure_allow_http: the STS endpoint http://")
            && stderr.contains("profile \"role\""),
        "{stderr}"
    );
}

/// Providers `r2` and `oci` build their endpoints from the account or the namespace and
/// region (`https://ACCOUNT.r2.cloudflarestorage.com`,
/// `https://NAMESPACE.compat.objectstorage.REGION.oci.customer-oci.com`). The test reaches
/// them as a deployment behind a corporate proxy would: `HTTPS_PROXY` names a proxy that
/// answers CONNECT for those hosts with certificates of the test's CA (`SSL_CERT_FILE`) and
/// hands the requests to moto. Blobs are written and read back through each, with the key
/// prefix and the bucket each names.
#[tokio::test]
async fn r2_and_oci_serve_through_their_own_endpoints() {
    let moto = Moto::start_env(&[("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")]).await;
    moto.create_bucket("r2-cas").await;
    moto.create_bucket("oci-cas").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = common::certs::Pki::new(&dir.path().join("pki"), "proxy");
    let r2_host = "acct0123.r2.cloudflarestorage.com";
    let oci_host = "tenancy.compat.objectstorage.us-phoenix-1.oci.customer-oci.com";
    let cert = pki.issue_for(
        "clouds",
        7,
        true,
        vec![r2_host.to_string(), oci_host.to_string()],
    );
    let proxy =
        common::https_proxy::HttpsProxy::start(&cert, ([127, 0, 0, 1], moto.port).into()).await;
    let config = dir.path().join("clouds.json5");
    std::fs::write(
        &config,
        r#"{
  stores: {
    R2: { experimental_cloud_object_store: {
      provider: "r2", account_id: "acct0123", bucket: "r2-cas", key_prefix: "r2/",
      access_key_id: "r2key", secret_access_key: "r2secret",
    } },
    OCI: { experimental_cloud_object_store: {
      provider: "oci", namespace: "tenancy", region: "us-phoenix-1", bucket: "oci-cas",
      key_prefix: "oci/", access_key_id: "ocikey", secret_access_key: "ocisecret",
    } },
  },
  servers: [{
    listener: { http: { socket_address: "127.0.0.1:0" } },
    services: {
      cas: [{ instance_name: "r2", cas_store: "R2" }, { instance_name: "oci", cas_store: "OCI" }],
      bytestream: [{ instance_name: "r2", cas_store: "R2" }, { instance_name: "oci", cas_store: "OCI" }],
      capabilities: [{ instance_name: "r2" }, { instance_name: "oci" }],
      health: {},
    },
  }],
}"#,
    )
    .unwrap();
    let command = cairn_command(
        &config,
        dir.path(),
        dir.path(),
        &["AWS_", "NO_PROXY"],
        &[
            ("HTTPS_PROXY", format!("http://{}", proxy.addr)),
            ("SSL_CERT_FILE", pki.ca.display().to_string()),
        ],
    );
    let c = Cairn::spawn_until_listening(command, dir.path(), config.clone());
    let ch = c.channel().await;
    for (instance, bucket, prefix, seed) in
        [("r2", "r2-cas", "r2/", 1u64), ("oci", "oci-cas", "oci/", 2)]
    {
        let blob = data(200_000, 9000 + seed);
        let d = sha(&blob);
        let name = format!(
            "{instance}/uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash_hex(),
            d.size()
        );
        let mut bs = ByteStreamClient::new(ch.clone()).max_decoding_message_size(64 << 20);
        bs.write(futures::stream::iter([WriteRequest {
            resource_name: name,
            write_offset: 0,
            finish_write: true,
            data: blob.clone(),
        }]))
        .await
        .unwrap_or_else(|e| panic!("{instance}: write: {e}"));
        let mut s = bs
            .read(ReadRequest {
                resource_name: format!("{instance}/blobs/{}/{}", d.hash_hex(), d.size()),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("{instance}: read: {e}"))
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = s.next().await {
            got.extend_from_slice(&m.unwrap().data);
        }
        assert!(got == blob, "{instance}: the blob read back differs");
        let keys = moto.list(bucket, prefix).await;
        assert!(
            keys.iter().any(|k| k.contains(&d.hash_hex())),
            "{instance}: {bucket}/{prefix} holds {keys:?}"
        );
    }
    assert_eq!(proxy.hosts(), [r2_host, oci_host]);
    c.kill9();
}
