//! The `redis_store` against real Redis processes (Debian's `redis-server`, `redis-sentinel`):
//! the store on its own (contract, large blobs, atomic publication, TTL, NativeLink's keys),
//! Cairn serving gRPC with it as CAS and AC, two Cairns sharing one Redis, Redis going away
//! and coming back, a sentinel failover and a cluster master loss.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use std::time::Duration;

use bytes::Bytes;
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, DigestFunction, Error};
use cairn_store::{Store, StoreExt, StoreRef};
use common::{data, http_get, Cairn};
use futures::StreamExt;
use re::content_addressable_storage_client::ContentAddressableStorageClient as CasClient;
use redis_kit::{Cluster, RedisServer, SentinelSet};

async fn build(config_body: &str) -> StoreRef {
    let cfg = cairn_config::parse_str(
        "t.json5",
        &format!("{{stores: {{R: {{redis_store: {config_body}}}}}}}"),
    )
    .unwrap();
    cairn_store::build_stores(&cfg.stores)
        .await
        .unwrap()
        .remove("R")
        .unwrap()
}

async fn read_all(s: &dyn Store, d: &cairn_core::Digest, off: u64, len: Option<u64>) -> Bytes {
    cairn_core::stream::collect(s.get(d, off, len).await.unwrap(), usize::MAX)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_mode_keeps_the_store_contract_under_nativelink_keys() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let store = build(&format!(
        r#"{{addresses: ["{}/"], key_prefix: "cas:", read_chunk_size: 1000, max_chunk_uploads_per_update: 3}}"#,
        redis.url()
    ))
    .await;
    let f = DigestFunction::Sha256;
    let small = Bytes::from(data(1000, 1));
    let big = Bytes::from(data(300_000, 2));
    let ds = f.compute(&small);
    let db = f.compute(&big);
    let missing = f.compute(b"missing");

    store.put_bytes(&ds, small.clone()).await.unwrap();
    // Many body chunks of odd sizes: 300 GETRANGE pieces on the way back.
    let body = futures::stream::iter(
        big.chunks(7_777)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
    .boxed();
    store.put(&db, body).await.unwrap();
    assert_eq!(
        store.has_many(&[ds, missing, db]).await.unwrap(),
        vec![Some(1000), None, Some(300_000)]
    );
    assert_eq!(read_all(&*store, &ds, 0, None).await, small);
    assert_eq!(read_all(&*store, &db, 0, None).await, big);
    assert_eq!(
        read_all(&*store, &db, 100_000, Some(70_001)).await,
        big.slice(100_000..170_001)
    );
    assert_eq!(
        read_all(&*store, &db, 299_990, None).await,
        big.slice(299_990..)
    );
    assert!(read_all(&*store, &db, 300_000, None).await.is_empty());
    let e = store.get(&db, 300_001, None).await.err().unwrap();
    assert_eq!(e.code, Code::OutOfRange, "{e}");
    let e = store.get(&missing, 0, None).await.err().unwrap();
    assert_eq!(e.code, Code::NotFound, "{e}");
    assert!(e.message.contains("stores.R"), "{e}");

    // NativeLink's key form, and nothing left but the two values.
    let key = format!("cas:{}-{}", db.hash_hex(), db.size());
    assert_eq!(redis.cli(&["STRLEN", &key]).trim(), "300000");
    let mut keys: Vec<String> = redis
        .cli(&["KEYS", "*"])
        .lines()
        .map(String::from)
        .collect();
    keys.sort();
    let mut want = vec![key, format!("cas:{}-1000", ds.hash_hex())];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(redis.cli(&["TTL", &want[0]]).trim(), "-1");

    // A body that fails midway leaves nothing visible, and its temporary key goes away.
    let aborted = f.compute(b"aborted-body");
    let body = futures::stream::iter(vec![
        Ok(Bytes::from(data(5000, 3))),
        Err(Error::cancelled("client went away")),
    ])
    .boxed();
    assert!(store.put(&aborted, body).await.is_err());
    assert_eq!(store.has(&aborted).await.unwrap(), None);
    redis_kit::wait_until(
        "the aborted temp key is deleted",
        Duration::from_secs(10),
        || !redis.cli(&["KEYS", "temp-*"]).contains("temp-"),
    );

    // The empty blob is always there; an empty value under another name is stored.
    let empty = f.empty_digest();
    assert_eq!(store.has(&empty).await.unwrap(), Some(0));
    store.put_bytes(&empty, Bytes::new()).await.unwrap();
    assert!(read_all(&*store, &empty, 0, None).await.is_empty());
    let empty_named = f.compute(b"an action").with_size(9);
    store.put_bytes(&empty_named, Bytes::new()).await.unwrap();
    assert_eq!(store.has(&empty_named).await.unwrap(), Some(0));

    // Hostile: a key of another type under a blob's name reads as absent, in a batch too,
    // and an upload replaces it.
    let odd = f.compute(b"odd");
    redis.cli(&["HSET", &format!("cas:{}-3", odd.hash_hex()), "f", "v"]);
    assert_eq!(
        store.has_many(&[ds, odd]).await.unwrap(),
        vec![Some(1000), None]
    );
    let e = store.get(&odd, 0, None).await.err().unwrap();
    assert_eq!(e.code, Code::NotFound, "{e}");
    store
        .put_bytes(&odd, Bytes::from_static(b"odd"))
        .await
        .unwrap();
    assert_eq!(read_all(&*store, &odd, 0, None).await, "odd");

    // FindMissing-sized lookups are batched: 5,000 keys in one call.
    let many: Vec<_> = (0..5000u32)
        .map(|i| f.compute(&i.to_le_bytes()))
        .chain([ds, db])
        .collect();
    let t = std::time::Instant::now();
    let sizes = store.has_many(&many).await.unwrap();
    eprintln!("has_many of {} keys: {:?}", many.len(), t.elapsed());
    assert_eq!(sizes.iter().filter(|s| s.is_some()).count(), 2);
    assert_eq!(sizes[5000], Some(1000));
}

#[tokio::test]
async fn credentials_in_the_url_are_used_and_a_wrong_password_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_args(
        dir.path(),
        common::free_addr().port(),
        &["--requirepass", "s3cret"],
    );
    let blob = Bytes::from(data(5000, 8));
    let d = DigestFunction::Sha256.compute(&blob);
    let good = build(&format!(
        r#"{{addresses: ["redis://:s3cret@127.0.0.1:{}/3"]}}"#,
        redis.port
    ))
    .await;
    good.put_bytes(&d, blob.clone()).await.unwrap();
    assert_eq!(read_all(&*good, &d, 0, None).await, blob);
    // Database 3, as the URL says.
    let key = format!("{}-{}", d.hash_hex(), d.size());
    assert_eq!(
        redis
            .cli(&["-a", "s3cret", "-n", "3", "STRLEN", &key])
            .trim(),
        "5000"
    );
    let bad = build(&format!(
        r#"{{addresses: ["redis://:wrong@127.0.0.1:{}"]}}"#,
        redis.port
    ))
    .await;
    let e = bad.has(&d).await.expect_err("wrong password");
    assert_eq!(e.code, Code::PermissionDenied, "{e}");
    assert!(e.message.contains("redis_store stores.R"), "{e}");
    assert!(!e.message.contains("wrong"), "the password leaked: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_writes_are_published_to_the_pub_sub_channel() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let store = build(&format!(
        r#"{{addresses: ["{}"], key_prefix: "p:", experimental_pub_sub_channel: "cairn-writes", read_chunk_size: 1000, max_chunk_uploads_per_update: 2}}"#,
        redis.url()
    ))
    .await;
    let mut sub = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "SUBSCRIBE", "cairn-writes"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The subscription is live once redis-cli printed its confirmation (three lines).
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    let mut want = Vec::new();
    for size in [1500, 10_000] {
        let blob = Bytes::from(data(size, 9));
        let d = DigestFunction::Sha256.compute(&blob);
        store.put_bytes(&d, blob).await.unwrap();
        want.push(format!("p:{}-{size}", d.hash_hex()));
    }
    let mut got = Vec::new();
    while got.len() < want.len() {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a published key");
        if line.starts_with("p:") {
            got.push(line);
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
    assert_eq!(got, want);
}

/// A Redis out of memory with `noeviction` refuses writes: RESOURCE_EXHAUSTED naming the
/// store, nothing half-written left; with `allkeys-lru` (what docs/operations.md advises for a
/// cache) writes go on and old values are evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_writes_clearly_or_evicts_with_lru() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_args(
        dir.path(),
        common::free_addr().port(),
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    );
    let config = format!(
        r#"{{addresses: ["{}"], read_chunk_size: 65536, max_chunk_uploads_per_update: 4}}"#,
        redis.url()
    );
    let store = build(&config).await;
    let f = DigestFunction::Sha256;
    let mut refused = None;
    for i in 0..40u64 {
        let blob = Bytes::from(data(500_000, 600 + i));
        if let Err(e) = store.put_bytes(&f.compute(&blob), blob).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a 4 MB Redis took 20 MB");
    assert_eq!(e.code, Code::ResourceExhausted, "{e}");
    assert!(
        e.message.contains("redis_store stores.R") && e.message.contains("OOM"),
        "{e}"
    );
    redis_kit::wait_until(
        "the refused upload's temp key is deleted",
        Duration::from_secs(10),
        || !redis.cli(&["KEYS", "temp-*"]).contains("temp-"),
    );

    // With LRU, Redis evicts to make room; an upload whose own temporary key is evicted
    // under it fails cleanly (the hole is detected), never stores a torn value.
    redis.cli(&["CONFIG", "SET", "maxmemory", "16mb"]);
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let mut stored = Vec::new();
    for i in 0..60u64 {
        let blob = Bytes::from(data(500_000, 700 + i));
        let d = f.compute(&blob);
        match store.put_bytes(&d, blob.clone()).await {
            Ok(()) => stored.push((d, blob)),
            Err(e) => {
                assert_eq!(e.code, Code::Unavailable, "{e}");
                assert!(e.message.contains("evicted"), "{e}");
            }
        }
    }
    eprintln!("allkeys-lru: {} of 60 uploads stored", stored.len());
    assert!(
        stored.len() >= 45,
        "only {} of 60 uploads succeeded",
        stored.len()
    );
    let mut present = 0;
    for (d, blob) in &stored {
        if store.has(d).await.unwrap().is_some() {
            assert_eq!(read_all(&*store, d, 0, None).await, *blob);
            present += 1;
        }
    }
    assert!(
        present > 0 && present < stored.len(),
        "{present} of {} present",
        stored.len()
    );
}

#[tokio::test]
async fn key_ttl_applies_to_published_values() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let store = build(&format!(
        r#"{{addresses: ["{}"], key_ttl_s: 1000, read_chunk_size: 1000, max_chunk_uploads_per_update: 2}}"#,
        redis.url()
    ))
    .await;
    // One value by a single SET, one through a temporary key.
    for size in [1500, 10_000] {
        let blob = Bytes::from(data(size, 4));
        let d = DigestFunction::Sha256.compute(&blob);
        store.put_bytes(&d, blob).await.unwrap();
        let ttl: i64 = redis
            .cli(&["TTL", &format!("{}-{}", d.hash_hex(), d.size())])
            .trim()
            .parse()
            .unwrap();
        assert!((990..=1000).contains(&ttl), "{size} bytes: ttl {ttl}");
    }
}

#[tokio::test]
async fn a_reader_never_sees_an_upload_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let store = build(&format!(
        r#"{{addresses: ["{}"], read_chunk_size: 4096, max_chunk_uploads_per_update: 1}}"#,
        redis.url()
    ))
    .await;
    let blob = Bytes::from(data(200_000, 5));
    let d = DigestFunction::Sha256.compute(&blob);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Error>>(1);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { store.put(&d, tokio_stream_from(rx)).await })
    };
    // Feed the body slowly; between pieces, the value is absent to every reader.
    for (i, c) in blob.chunks(10_000).enumerate() {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
        if i > 0 {
            // The previous piece has been taken by the store (the channel holds one).
            assert_eq!(store.has(&d).await.unwrap(), None, "after piece {i}");
            let e = store.get(&d, 0, None).await.err().unwrap();
            assert_eq!(e.code, Code::NotFound);
        }
    }
    assert!(redis.cli(&["KEYS", "temp-*"]).contains("temp-"));
    drop(tx);
    writer.await.unwrap().unwrap();
    assert_eq!(store.has(&d).await.unwrap(), Some(200_000));
    assert_eq!(read_all(&*store, &d, 0, None).await, blob);
    assert!(!redis.cli(&["KEYS", "temp-*"]).contains("temp-"));
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, Error>>,
) -> cairn_core::BlobStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

#[tokio::test]
async fn a_value_that_shrinks_under_a_reader_ends_the_read_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let store = build(&format!(
        r#"{{addresses: ["{}"], read_chunk_size: 1000}}"#,
        redis.url()
    ))
    .await;
    let blob = Bytes::from(data(50_000, 6));
    let d = DigestFunction::Sha256.compute(&blob);
    store.put_bytes(&d, blob.clone()).await.unwrap();
    let mut body = store.get(&d, 0, None).await.unwrap();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(first, blob.slice(0..1000));
    // Someone (a hostile or broken writer) replaces the value with a shorter one.
    redis.cli(&["SET", &format!("{}-{}", d.hash_hex(), d.size()), "short"]);
    let mut total = first.len();
    let mut failed = None;
    while let Some(r) = body.next().await {
        match r {
            Ok(c) => total += c.len(),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("the read must fail, not end short");
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(e.message.contains("changed"), "{e}");
    assert!(total < blob.len());
}

const SERVER: &str = r#"{
  stores: {
    CAS: { redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:", retry: { max_retries: 2, delay: 0.05 }, command_timeout_ms: 2000, connection_timeout_ms: 1000 } },
    AC: { completeness_checking: { backend: { redis_store: { addresses: ["@REDIS@"], key_prefix: "ac:" } }, cas_store: { ref_store: { name: "CAS" } } } },
    TIERED: { fast_slow: { fast: { memory: {} }, slow: { redis_store: { addresses: ["@REDIS@"], key_prefix: "tiered:" } } } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "tiered", cas_store: "TIERED" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }, { instance_name: "tiered", cas_store: "TIERED" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

async fn upload(cas: &mut CasClient<tonic::transport::Channel>, instance: &str, blobs: &[Vec<u8>]) {
    let r = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: blobs
                .iter()
                .map(|b| re::batch_update_blobs_request::Request {
                    digest: Some(DigestFunction::Sha256.compute(b).to_proto()),
                    data: b.clone(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for r in r.responses {
        assert_eq!(r.status.unwrap_or_default().code, 0);
    }
}

async fn missing(
    cas: &mut CasClient<tonic::transport::Channel>,
    instance: &str,
    blobs: &[Vec<u8>],
) -> Result<usize, tonic::Status> {
    Ok(cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: blobs
                .iter()
                .map(|b| DigestFunction::Sha256.compute(b).to_proto())
                .collect(),
            digest_function: 0,
        })
        .await?
        .into_inner()
        .missing_blob_digests
        .len())
}

async fn read_back(
    cas: &mut CasClient<tonic::transport::Channel>,
    instance: &str,
    blob: &[u8],
) -> Vec<u8> {
    let r = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: instance.into(),
            digests: vec![DigestFunction::Sha256.compute(blob).to_proto()],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let r = &r.responses[0];
    assert_eq!(
        r.status.clone().unwrap_or_default().code,
        0,
        "{:?}",
        r.status
    );
    r.data.clone()
}

#[tokio::test]
async fn cairn_serves_cas_and_ac_from_redis_and_two_cairns_share_it() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let config = SERVER.replace("@REDIS@", &redis.url());
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = Cairn::start_with(d1.path(), &config, None);
    let b = Cairn::start_with(d2.path(), &config, None);
    let mut ca = CasClient::new(a.channel().await);
    let mut cb = CasClient::new(b.channel().await);

    let blobs: Vec<Vec<u8>> = (0..20).map(|i| data(1000 + i * 5000, i as u64)).collect();
    for instance in ["", "tiered"] {
        assert_eq!(missing(&mut cb, instance, &blobs).await.unwrap(), 20);
        upload(&mut ca, instance, &blobs).await;
        // The other process sees them through the shared Redis.
        assert_eq!(missing(&mut cb, instance, &blobs).await.unwrap(), 0);
        for blob in &blobs {
            assert_eq!(&read_back(&mut cb, instance, blob).await, blob);
        }
    }
    assert!(redis.cli(&["KEYS", "tiered:*"]).lines().count() >= 20);

    // An ActionResult written through one is read through the other.
    let out = &blobs[3];
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(DigestFunction::Sha256.compute(out).to_proto()),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    let action = DigestFunction::Sha256.compute(b"an action");
    let mut aca = re::action_cache_client::ActionCacheClient::new(a.channel().await);
    let mut acb = re::action_cache_client::ActionCacheClient::new(b.channel().await);
    aca.update_action_result(re::UpdateActionResultRequest {
        instance_name: String::new(),
        action_digest: Some(action.to_proto()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = acb
        .get_action_result(re::GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.output_files, result.output_files);

    // Hostile: garbage planted under the AC key is never served as a result.
    let key = format!("ac:{}-{}", action.hash_hex(), action.size());
    redis.cli(&["SET", &key, "\u{1}\u{2}garbage that is no ActionResult"]);
    let e = acb
        .get_action_result(re::GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .expect_err("garbage must not be served");
    assert_ne!(e.code(), tonic::Code::Ok);
    // The server is still up.
    assert_eq!(missing(&mut ca, "", &blobs).await.unwrap(), 0);
}

#[tokio::test]
async fn redis_down_is_unavailable_naming_the_store_and_recovery_needs_no_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let config = SERVER.replace("@REDIS@", &redis.url());
    let d1 = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(d1.path(), &config, None);
    let mut cas = CasClient::new(cairn.channel().await);
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| data(2000, 100 + i)).collect();
    upload(&mut cas, "", &blobs).await;
    let (code, _) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200);

    let (_, metrics) = http_get(cairn.addr, "/metrics").await;
    let series = |text: &str, name: &str, operation: &str| -> u64 {
        let head = format!(
            "nativelink_{name}{{store=\"CAS\",backend=\"redis_store\",operation=\"{operation}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&head))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    };
    // Three small blobs: one SET each.
    assert!(
        series(&metrics, "store_backend_requests_total", "write") >= 3,
        "{metrics}"
    );
    assert!(
        series(
            &metrics,
            "store_backend_request_duration_seconds_count",
            "write"
        ) >= 1,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, "store_backend_request_errors_total", "lookup"),
        0
    );

    redis.kill();
    let t = std::time::Instant::now();
    let e = missing(&mut cas, "", &blobs)
        .await
        .expect_err("redis is down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("redis_store stores.CAS"), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let (code, body) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("stores/CAS") && body.contains("redis_store"),
        "{body}"
    );
    // The failed attempts and the retries are counted (max_retries: 2 for this store).
    let (_, metrics) = http_get(cairn.addr, "/metrics").await;
    assert_eq!(
        series(&metrics, "store_backend_request_errors_total", "lookup"),
        3,
        "{metrics}"
    );
    assert_eq!(series(&metrics, "store_backend_retries_total", "lookup"), 2);
    assert!(series(&metrics, "store_backend_request_errors_total", "ping") >= 1);

    redis.restart();
    // Redis restarted empty (nothing saved): the blobs are missing, and the server answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while missing(&mut cas, "", &blobs).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store never answered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    upload(&mut cas, "", &blobs).await;
    assert_eq!(missing(&mut cas, "", &blobs).await.unwrap(), 0);
    let (code, body) = http_get(cairn.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_the_store_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut set = SentinelSet::start(dir.path());
    let urls: Vec<String> = set.urls().iter().map(|u| format!("{u:?}")).collect();
    let store = build(&format!(
        r#"{{addresses: [{}], mode: "sentinel", retry: {{max_retries: 12, delay: 0.1, jitter: 0.2}}, command_timeout_ms: 1000, connection_timeout_ms: 1000}}"#,
        urls.join(", ")
    ))
    .await;
    let blobs: Vec<Bytes> = (0..10)
        .map(|i| Bytes::from(data(30_000, 200 + i)))
        .collect();
    let f = DigestFunction::Sha256;
    for b in &blobs {
        store.put_bytes(&f.compute(b), b.clone()).await.unwrap();
    }
    // Let the replica catch up, so the failover loses nothing already written.
    let offset_of = |info: String, key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    redis_kit::wait_until(
        "the replica has every write",
        Duration::from_secs(10),
        || {
            let m = offset_of(
                set.master.cli(&["INFO", "replication"]),
                "master_repl_offset:",
            );
            let r = offset_of(
                set.replica.cli(&["INFO", "replication"]),
                "slave_repl_offset:",
            );
            !m.is_empty() && m == r
        },
    );
    let old_master = set.master.port;
    set.master.kill();
    let t = std::time::Instant::now();
    // Through the failover: every read and a new write succeed within the retry budget.
    for b in &blobs {
        assert_eq!(read_all(&*store, &f.compute(b), 0, None).await, *b);
    }
    let fresh = Bytes::from(data(40_000, 299));
    store
        .put_bytes(&f.compute(&fresh), fresh.clone())
        .await
        .unwrap();
    assert_eq!(read_all(&*store, &f.compute(&fresh), 0, None).await, fresh);
    eprintln!("served through the sentinel failover in {:?}", t.elapsed());
    assert_eq!(set.master_port(), Some(set.replica.port));
    assert_ne!(set.master_port(), Some(old_master));
    assert_eq!(set.replica.role(), "master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_spreads_keys_and_survives_a_master_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path());
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let store = build(&format!(
        r#"{{addresses: [{}], mode: "cluster", key_prefix: "c:", retry: {{max_retries: 15, delay: 0.1}}, command_timeout_ms: 1000, connection_timeout_ms: 1000}}"#,
        urls.join(", ")
    ))
    .await;
    let f = DigestFunction::Sha256;
    let blobs: Vec<Bytes> = (0..30)
        .map(|i| Bytes::from(data(20_000, 300 + i)))
        .collect();
    for b in &blobs {
        store.put_bytes(&f.compute(b), b.clone()).await.unwrap();
    }
    let digests: Vec<_> = blobs.iter().map(|b| f.compute(b)).collect();
    assert!(store
        .has_many(&digests)
        .await
        .unwrap()
        .iter()
        .all(|s| s.is_some()));
    // Spread over the three masters.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for &m in &masters {
        let n: u64 = cluster.nodes[m].cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(n > 0, "master {m} holds no key");
    }
    // Wait for the replicas to hold every key, then lose one master.
    redis_kit::wait_until("replicas hold every key", Duration::from_secs(10), || {
        let total = |role: &str| -> u64 {
            cluster
                .nodes
                .iter()
                .filter(|n| n.role() == role)
                .map(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0))
                .sum()
        };
        total("slave") == 30 && total("master") == 30
    });
    let victim = masters[0];
    cluster.nodes[victim].kill();
    let t = std::time::Instant::now();
    for (b, d) in blobs.iter().zip(&digests) {
        assert_eq!(read_all(&*store, d, 0, None).await, *b);
    }
    assert!(store
        .has_many(&digests)
        .await
        .unwrap()
        .iter()
        .all(|s| s.is_some()));
    let fresh: Vec<Bytes> = (0..10).map(|i| Bytes::from(data(5_000, 400 + i))).collect();
    for b in &fresh {
        store.put_bytes(&f.compute(b), b.clone()).await.unwrap();
        assert_eq!(read_all(&*store, &f.compute(b), 0, None).await, *b);
    }
    eprintln!("served through the cluster failover in {:?}", t.elapsed());
    cluster.wait_ok();
    assert_eq!(cluster.masters().len(), 3, "a replica was promoted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A Redis that stops answering (DEBUG SLEEP): the command's deadline, then the reconnect's,
/// both named in an error that names the store, well before the sleep ends.
async fn a_hung_redis_fails_within_its_deadlines_naming_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_args(
        dir.path(),
        common::free_addr().port(),
        &["--enable-debug-command", "yes"],
    );
    let store = build(&format!(
        r#"{{addresses: ["{}"], command_timeout_ms: 300, connection_timeout_ms: 300, retry: {{max_retries: 1, delay: 0.01}}}}"#,
        redis.url()
    ))
    .await;
    let d = DigestFunction::Sha256.compute(b"x");
    assert_eq!(store.has(&d).await.unwrap(), None);
    let port = redis.port;
    let sleeper = std::thread::spawn(move || redis_kit::cli(port, &["DEBUG", "SLEEP", "2"]));
    redis_kit::wait_until("DEBUG SLEEP has started", Duration::from_secs(5), || {
        // Asleep: a PING gets no answer within 100 ms.
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        c.write_all(b"PING\r\n").unwrap();
        c.read(&mut [0u8; 16]).is_err()
    });
    let t = std::time::Instant::now();
    let e = store.has(&d).await.expect_err("Redis is asleep");
    // The command timed out, then the reconnect did too.
    assert_eq!(e.code, Code::Unavailable, "{e}");
    assert!(
        e.message.contains("redis_store stores.R")
            && e.message.contains("connection_timeout_ms")
            && e.message
                .contains("the first failed with: no answer within 300ms (command_timeout_ms)"),
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    sleeper.join().unwrap();
    // Awake again: served, without a restart.
    assert_eq!(store.has(&d).await.unwrap(), None);
}

/// 20% of what the client sends makes the proxy cut the connection: the retry budget hides
/// every fault, and nothing wrong is ever stored or served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_connections_are_retried_and_never_store_a_wrong_value() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let proxy = redis_kit::FaultyProxy::start(redis.port, 200).await;
    let store = build(&format!(
        r#"{{addresses: ["{}"], read_chunk_size: 8192, max_chunk_uploads_per_update: 2, retry: {{max_retries: 20, delay: 0.005, jitter: 0.5}}, command_timeout_ms: 2000}}"#,
        proxy.url()
    ))
    .await;
    let f = DigestFunction::Sha256;
    let blobs: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(data(1000 + i * 3000, 500 + i as u64)))
        .collect();
    let digests: Vec<_> = blobs.iter().map(|b| f.compute(b)).collect();
    let mut failed_puts = 0;
    for (b, d) in blobs.iter().zip(&digests) {
        if let Err(e) = store.put_bytes(d, b.clone()).await {
            // Only a retry budget spent entirely on faults may fail a put, and then loudly.
            assert_eq!(e.code, Code::Unavailable, "{e}");
            failed_puts += 1;
        }
    }
    assert!(failed_puts <= 2, "{failed_puts} puts failed");
    let sizes = store.has_many(&digests).await.unwrap();
    for ((b, d), size) in blobs.iter().zip(&digests).zip(sizes) {
        if let Some(size) = size {
            assert_eq!(size, b.len() as u64);
            let got = cairn_core::stream::collect(store.get(d, 0, None).await.unwrap(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(got, *b, "{d}");
        }
    }
    // What Redis holds is exactly the blobs (checked around the proxy), and no temp key.
    for (b, d) in blobs.iter().zip(&digests) {
        let len = redis.cli(&["STRLEN", &format!("{}-{}", d.hash_hex(), d.size())]);
        let len: usize = len.trim().parse().unwrap();
        assert!(len == 0 || len == b.len(), "{d}: {len}");
    }
    let broken = proxy.broken.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("proxy broke {broken} connections; {failed_puts} puts failed");
    assert!(broken > 10, "the proxy broke only {broken} connections");
}

/// VmHWM (peak resident memory) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A blob far larger than any buffer goes through Cairn into Redis and back in bounded
/// memory: the server's peak RSS grows by a fraction of the blob's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_streams_through_in_bounded_memory() {
    use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
    use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
    use sha2::Digest as _;

    const SIZE: usize = 256 << 20;
    const CHUNK: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let d1 = tempfile::tempdir().unwrap();
    let cairn = Cairn::start_with(d1.path(), &SERVER.replace("@REDIS@", &redis.url()), None);
    // Never held whole: 1 MiB pieces cycled from 8 made once (so the client's own time
    // stays out of the figures), hashed, then sent.
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| data(CHUNK, 7000 + i)).collect();
    let chunk_of = move |i: usize| -> Vec<u8> { pieces[i % 8].clone() };
    let mut h = sha2::Sha256::new();
    for i in 0..SIZE / CHUNK {
        h.update(chunk_of(i));
    }
    let hash = hex_of(&h.finalize());
    let mut bs = ByteStreamClient::new(cairn.channel().await);
    // Warm up (connections, allocator) before taking the baseline.
    let small = data(1000, 1);
    upload(&mut CasClient::new(cairn.channel().await), "", &[small]).await;
    let before = peak_rss(cairn.child.id());
    let name = format!("uploads/{}/blobs/{hash}/{SIZE}", uuid::Uuid::new_v4());
    let msgs = futures::stream::iter(0..SIZE / CHUNK).map(move |i| WriteRequest {
        resource_name: if i == 0 { name.clone() } else { String::new() },
        write_offset: (i * CHUNK) as i64,
        finish_write: (i + 1) * CHUNK == SIZE,
        data: chunk_of(i),
    });
    let t = std::time::Instant::now();
    bs.write(msgs).await.unwrap();
    let up = t.elapsed();
    let t = std::time::Instant::now();
    let mut body = bs
        .read(ReadRequest {
            resource_name: format!("blobs/{hash}/{SIZE}"),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut h = sha2::Sha256::new();
    let mut n = 0;
    while let Some(m) = body.next().await {
        let m = m.unwrap();
        n += m.data.len();
        h.update(&m.data);
    }
    let down = t.elapsed();
    assert_eq!(n, SIZE);
    assert_eq!(hex_of(&h.finalize()), hash);
    let grew = peak_rss(cairn.child.id()).saturating_sub(before);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "256 MiB through Cairn into Redis: write {up:?} ({:.0} MiB/s), read {down:?} ({:.0} MiB/s), server peak RSS grew {:.1} MiB",
        256.0 / up.as_secs_f64(),
        256.0 / down.as_secs_f64(),
        mib(grew)
    );
    // Measured: about 50 MiB for 128 MiB and 256 MiB alike (the ByteStream queue, HTTP/2
    // windows, allocator); a copy of the blob would be 256.
    assert!(
        grew < (SIZE * 3 / 8) as u64,
        "peak RSS grew {:.1} MiB",
        mib(grew)
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The guide's tiers with Redis: CAS = verify over fast_slow(memory, redis), AC =
/// completeness_checking over redis; Cairn reaches Redis through a proxy that cuts the
/// connection on 20% of what Cairn sends.
const BAZEL_LAYOUT: &str = r#"{
  stores: {
    CAS: { verify: { verify_size: true, verify_hash: true, backend: { fast_slow: {
      fast: { memory: { eviction_policy: { max_bytes: "64mb" } } },
      slow: { redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:", retry: { max_retries: 20, delay: 0.005, jitter: 0.5 } } },
    } } } },
    AC: { completeness_checking: {
      backend: { redis_store: { addresses: ["@REDIS@"], key_prefix: "ac:", retry: { max_retries: 20, delay: 0.005, jitter: 0.5 } } },
      cas_store: { ref_store: { name: "CAS" } },
    } },
  },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#;

/// Bazel builds, cleans and rebuilds with every action from the cache, through a Cairn whose
/// stores are in Redis behind a proxy that breaks 20% of connections, and a second Cairn
/// (fresh memory tier, same Redis) serves the rebuild too.
#[test]
fn bazel_builds_through_redis_tiers_with_broken_connections() {
    let Some(program) = common::bazel::find_or_skip("redis_store") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(tmp.path());
    let proxy = rt.block_on(redis_kit::FaultyProxy::start(redis.port, 200));
    let config = BAZEL_LAYOUT.replace("@REDIS@", &proxy.url());
    let d1 = tmp.path().join("cairn1");
    let d2 = tmp.path().join("cairn2");
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let first_cairn = Cairn::start_with(&d1, &config, None);
    let bazel = common::bazel::Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");
    let mut args = bazel.cache_flags(first_cairn.addr);
    args.push("//...".to_string());
    let first = bazel.run("build", &args);
    let executed = first.all_processes_were("local");
    first.assert_no_remote_cache_warning();

    // A second Cairn on the same Redis, its memory tier empty.
    let second_cairn = Cairn::start_with(&d2, &config, None);
    drop(first_cairn);
    bazel.run("clean", &[]);
    let mut args = bazel.cache_flags(second_cairn.addr);
    args.push("//...".to_string());
    let second = bazel.run("build", &args);
    assert_eq!(second.all_processes_were("remote cache hit"), executed);
    second.assert_no_remote_cache_warning();
    let report = std::fs::read_to_string(bazel.bin("report.txt")).unwrap();
    assert_eq!(report, "A CACHE THAT REMEMBERS\n23\nhello, cairn\n");
    let broken = proxy.broken.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("bazel through Redis: {executed} actions, {broken} connections cut by the proxy");
    assert!(broken > 0);
    drop(bazel);
}

/// `rediss://`: Cairn reaches a `redis-server --tls-port` whose certificate a test CA issued,
/// trusting that CA through `SSL_CERT_FILE`; the blob lands in Redis (seen over the plain
/// port). A Cairn that does not trust the CA fails its requests with UNAVAILABLE naming the
/// store, answers `/status` 503, and stays up.
#[tokio::test]
async fn rediss_reaches_a_tls_redis_with_the_ca_from_ssl_cert_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = common::certs::Pki::new(&tmp.path().join("pki"), "redis");
    let server = pki.issue("redis-server", 1, true);
    let tls_port = common::free_addr().port();
    let plain_port = common::free_addr().port();
    let ca = pki.ca.display().to_string();
    let tls = tls_args(tls_port, &server, &pki);
    let redis = RedisServer::start_args(tmp.path(), plain_port, &as_strs(&tls));
    let config = tmp.path().join("rediss.json5");
    std::fs::write(
        &config,
        SERVER
            .replace("@REDIS@", &format!("rediss://127.0.0.1:{tls_port}"))
            .replace("@ADDR@", "127.0.0.1:0"),
    )
    .unwrap();
    let start = |name: &str, env: &[(&str, String)]| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Cairn::start_config_env(&dir, &config, env)
    };

    let trusting = start("trusting", &[("SSL_CERT_FILE", ca.clone())]);
    let mut cas = CasClient::new(trusting.channel().await);
    let blobs = vec![data(200_000, 71), data(5, 72)];
    upload(&mut cas, "", &blobs).await;
    assert_eq!(missing(&mut cas, "", &blobs).await.unwrap(), 0);
    for b in &blobs {
        assert!(read_back(&mut cas, "", b).await == *b);
        let d = DigestFunction::Sha256.compute(b);
        let key = format!("cas:{}-{}", d.hash_hex(), d.size());
        assert_eq!(redis.cli(&["STRLEN", &key]).trim(), b.len().to_string());
    }
    let (code, body) = http_get(trusting.addr, "/status").await;
    assert_eq!(code, 200, "{body}");

    // An empty trust file: the server's certificate is not trusted.
    let empty = tmp.path().join("no-cas.pem");
    std::fs::write(&empty, "").unwrap();
    let doubting = start(
        "doubting",
        &[("SSL_CERT_FILE", empty.display().to_string())],
    );
    let mut cas = CasClient::new(doubting.channel().await);
    let e = missing(&mut cas, "", &blobs).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("stores.CAS"), "{e:?}");
    let (code, body) = http_get(doubting.addr, "/status").await;
    assert_eq!(code, 503, "{body}");
    // Still serving: the trusting one is unaffected, and this one answers.
    assert_eq!(
        missing(&mut CasClient::new(trusting.channel().await), "", &blobs)
            .await
            .unwrap(),
        0
    );
    let (code, _) = http_get(doubting.addr, "/status").await;
    assert_eq!(code, 503);
}

/// `rediss://` in sentinel mode: a master and a sentinel that both speak TLS only to clients
/// of the test's CA (`tls-replication yes`: the sentinel reaches the master over TLS too).
/// Cairn asks the sentinel over TLS for the master and reaches the master over TLS; the blob
/// lands in Redis (seen over the master's plain port, which the test keeps for itself).
#[tokio::test]
async fn rediss_sentinel_reaches_the_master_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = common::certs::Pki::new(&tmp.path().join("pki"), "redis");
    let server = pki.issue("redis-server", 1, true);
    // The same settings as the master's arguments, as lines of the sentinel's config file.
    let tls = |port: u16| -> String {
        tls_args(port, &server, &pki)
            .chunks(2)
            .map(|kv| format!("{} {}\n", kv[0].trim_start_matches("--"), kv[1]))
            .collect()
    };
    let master_tls = common::free_addr().port();
    let ca = pki.ca.display().to_string();
    let master = RedisServer::start_args(
        tmp.path(),
        common::free_addr().port(),
        &as_strs(&tls_args(master_tls, &server, &pki)),
    );
    let sentinel_tls = common::free_addr().port();
    let sentinel = RedisServer::start_sentinel(
        tmp.path(),
        common::free_addr().port(),
        &format!(
            "{}sentinel monitor tlsmaster 127.0.0.1 {master_tls} 1\n\
             sentinel down-after-milliseconds tlsmaster 1000\n",
            tls(sentinel_tls)
        ),
    );
    redis_kit::wait_until(
        "the sentinel names the TLS master",
        Duration::from_secs(20),
        || {
            sentinel
                .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "tlsmaster"])
                .contains(&master_tls.to_string())
        },
    );
    let c = cairn_on_rediss(
        tmp.path(),
        &format!("rediss://127.0.0.1:{sentinel_tls}/?sentinelServiceName=tlsmaster"),
        "sentinel",
        &ca,
    );
    let mut cas = CasClient::new(c.channel().await);
    let blobs = vec![data(100_000, 81), data(7, 82)];
    upload(&mut cas, "", &blobs).await;
    assert_eq!(missing(&mut cas, "", &blobs).await.unwrap(), 0);
    for b in &blobs {
        assert!(read_back(&mut cas, "", b).await == *b);
        let d = DigestFunction::Sha256.compute(b);
        let key = format!("cas:{}-{}", d.hash_hex(), d.size());
        assert_eq!(master.cli(&["STRLEN", &key]).trim(), b.len().to_string());
    }
    let (code, body) = http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

/// `rediss://` in cluster mode: three masters that speak TLS to clients and on their cluster
/// bus (`tls-cluster yes`, so the slots they hand out name their TLS ports). Cairn learns the
/// slots from one seed over TLS and follows them to every master over TLS.
#[tokio::test]
async fn rediss_cluster_spreads_blobs_over_tls_masters() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = common::certs::Pki::new(&tmp.path().join("pki"), "redis");
    let server = pki.issue("redis-server", 1, true);
    // Nodes present a client certificate to each other on the cluster bus.
    let node = pki.issue("redis-node", 2, false);
    let ca = pki.ca.display().to_string();
    let (node_cert, node_key) = (
        node.cert.display().to_string(),
        node.key.display().to_string(),
    );
    let mut nodes = Vec::new();
    let mut tls_ports = Vec::new();
    while nodes.len() < 3 {
        // The cluster bus listens on `cluster-port`; a MEET names the TLS port and reaches the
        // bus at that port + 10000, so the bus is put there.
        let tls_port = common::free_addr().port();
        if tls_port > 55_000
            || std::net::TcpListener::bind(("127.0.0.1", tls_port + 10_000)).is_err()
        {
            continue;
        }
        let bus = (tls_port + 10_000).to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--tls-client-cert-file",
            &node_cert,
            "--tls-client-key-file",
            &node_key,
            "--tls-cluster",
            "yes",
            "--cluster-port",
            &bus,
        ];
        let tls = tls_args(tls_port, &server, &pki);
        args.extend(as_strs(&tls));
        nodes.push(RedisServer::start_args(
            tmp.path(),
            common::free_addr().port(),
            &args,
        ));
        tls_ports.push(tls_port);
    }
    let out = std::process::Command::new("timeout")
        .args([
            "60",
            "redis-cli",
            "--tls",
            "--cacert",
            &ca,
            "--cluster",
            "create",
        ])
        .args(tls_ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    redis_kit::wait_until("cluster_state:ok", Duration::from_secs(30), || {
        nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    });
    let c = cairn_on_rediss(
        tmp.path(),
        &format!("rediss://127.0.0.1:{}", tls_ports[0]),
        "cluster",
        &ca,
    );
    let mut cas = CasClient::new(c.channel().await);
    let blobs: Vec<Vec<u8>> = (0..24).map(|i| data(2_000 + i, 90 + i as u64)).collect();
    upload(&mut cas, "", &blobs).await;
    assert_eq!(missing(&mut cas, "", &blobs).await.unwrap(), 0);
    for b in &blobs {
        assert!(read_back(&mut cas, "", b).await == *b);
    }
    // Every master holds some of them (each was reached over TLS: the slots name TLS ports).
    for n in &nodes {
        let keys: u64 = n.cli(&["DBSIZE"]).trim().parse().unwrap();
        assert!(keys > 0, "a master holds no blob");
    }
}

/// `redis-server` arguments for TLS only on `port`, with `server`'s certificate, to clients
/// of `pki`'s CA that show no certificate, and to its replicas over TLS too.
fn tls_args(port: u16, server: &common::certs::Pair, pki: &common::certs::Pki) -> Vec<String> {
    [
        "--tls-port".to_string(),
        port.to_string(),
        "--tls-cert-file".into(),
        server.cert.display().to_string(),
        "--tls-key-file".into(),
        server.key.display().to_string(),
        "--tls-ca-cert-file".into(),
        pki.ca.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
        "--tls-replication".into(),
        "yes".into(),
    ]
    .into()
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A Cairn whose CAS is a `redis_store` at `address` in `mode` (key prefix `cas:`), trusting
/// the CA file `ca` through `SSL_CERT_FILE`.
fn cairn_on_rediss(tmp: &std::path::Path, address: &str, mode: &str, ca: &str) -> Cairn {
    let config = tmp.join(format!("rediss-{mode}.json5"));
    std::fs::write(
        &config,
        r#"{
  stores: {
    CAS: { redis_store: { addresses: ["@ADDRESS@"], mode: "@MODE@", key_prefix: "cas:", retry: { max_retries: 5, delay: 0.1 }, command_timeout_ms: 2000, connection_timeout_ms: 1000 } },
  },
  servers: [{
    listener: { http: { socket_address: "127.0.0.1:0" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#
        .replace("@ADDRESS@", address)
        .replace("@MODE@", mode),
    )
    .unwrap();
    let dir = tmp.join(format!("cairn-{mode}"));
    std::fs::create_dir_all(&dir).unwrap();
    Cairn::start_config_env(&dir, &config, &[("SSL_CERT_FILE", ca.to_string())])
}
