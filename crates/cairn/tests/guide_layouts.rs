//! The production guide's storage layouts end to end, on real servers: `moto_server` for S3
//! (through `AWS_ENDPOINT_URL`), Debian's `redis-server`, Bazel 4.2.3 offline.
//!
//! - The guide's `CAS_PRODUCTION` tree, as written in its fixture
//!   (`crates/config/fixtures/guide-production-storage.json5`: verify over dedup, the index and
//!   the lz4 content tier each `fast_slow` of memory over S3) serves a Bazel build with
//!   `--remote_executor`; after `bazel clean` every action is a remote cache hit; then a second
//!   Cairn process over the same buckets, with the first one killed, serves a clean rebuild
//!   wholly from S3.
//! - Three tiers, memory -> `redis_store` -> S3: a gRPC round trip, each tier checked to hold
//!   the blob, reads refilling the tiers above the one that had it, and a lying upload leaving
//!   nothing in any tier; Bazel building through them, then rebuilding from S3 alone.
//! - The guide's "CAS Server Redundancy" as the Kubernetes example ships it
//!   (`deployment-examples/kubernetes/shared-cas/cas.json5`): three processes over one bucket
//!   and one Redis serve each other's blobs and action results, large blobs bypassing Redis.

mod common;
#[path = "common/redis.rs"]
mod redis_kit;

use std::path::Path;
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
use cairn_core::{Digest, DigestFunction};
use common::emulators::Moto;
use common::{data, free_addr, Cairn};
use futures::StreamExt;
use re::action_cache_client::ActionCacheClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use redis_kit::RedisServer;
use tonic::transport::Channel;

fn sha(d: &[u8]) -> Digest {
    DigestFunction::Sha256.compute(d)
}

/// The guide's store tree, byte for byte as the fixture holds it.
const GUIDE_TREE: &str = include_str!("../../config/fixtures/guide-production-storage.json5");

/// What the guide's tree needs around it to serve remote execution: an action cache in a
/// bucket of its own (the guide's advice: CAS index, CAS content and AC in separate buckets),
/// a scheduler, and a local worker whose CAS is a filesystem tier over `CAS_PRODUCTION`.
const AROUND_THE_TREE: &str = r#"
    {
      name: "AC",
      experimental_cloud_object_store: {
        provider: "aws", region: "us-east-1", bucket: "nativelink-ac", key_prefix: "prod/ac/",
        insecure_allow_http: true, retry: { max_retries: 6, delay: 0.3, jitter: 0.5 },
      },
    },
    {
      name: "WORKER_CAS",
      fast_slow: {
        fast: { filesystem: { content_path: "@DIR@/worker-cas", temp_path: "@DIR@/tmp", eviction_policy: { max_bytes: "1gb" } } },
        slow: { ref_store: { name: "CAS_PRODUCTION" } },
      },
    },
  ],
  schedulers: [{
    name: "MAIN",
    cache_lookup: {
      ac_store: { ref_store: { name: "AC" } },
      scheduler: { simple: { supported_platform_properties: { OSFamily: "exact" } } },
    },
  }],
  servers: [
    {
      name: "public",
      listener: { http: { socket_address: "127.0.0.1:0" } },
      services: {
        cas: [{ instance_name: "", cas_store: "CAS_PRODUCTION" }],
        ac: [{ instance_name: "", ac_store: "AC" }],
        bytestream: [{ instance_name: "", cas_store: "CAS_PRODUCTION" }],
        execution: [{ instance_name: "", cas_store: "CAS_PRODUCTION", scheduler: "MAIN" }],
        capabilities: [{ instance_name: "", remote_execution: { scheduler: "MAIN" } }],
        health: {},
      },
    },
    {
      name: "worker_api",
      listener: { http: { socket_address: "@WORKER_API@" } },
      services: { worker_api: { scheduler: "MAIN" } },
    },
  ],
  workers: [{
    local: {
      name: "local",
      worker_api_endpoint: { uri: "grpc://@WORKER_API@" },
      cas_fast_slow_store: "WORKER_CAS",
      upload_action_result: { ac_store: "AC" },
      work_directory: "@DIR@/work",
      platform_properties: { OSFamily: { values: ["linux"] } },
      max_inflight_tasks: 4,
    },
  }],
}
"#;

/// The guide's tree with the one change an emulator on plain HTTP needs
/// (`insecure_allow_http`, NativeLink's key for it), followed by `AROUND_THE_TREE`.
fn production_config(dir: &Path) -> String {
    let tree = GUIDE_TREE.replace(
        "retry: {",
        "insecure_allow_http: true,\n                    retry: {",
    );
    assert_eq!(
        tree.matches("insecure_allow_http").count(),
        2,
        "the guide's tree no longer has two cloud stores with a `retry`"
    );
    // The fixture ends with the closing `],` of its one-store list and the file's `}`.
    let (stores, _) = tree
        .rsplit_once("],")
        .expect("the fixture ends its store list with `],`");
    format!("{stores}{AROUND_THE_TREE}")
        .replace("@DIR@", &dir.display().to_string())
        .replace("@WORKER_API@", &free_addr().to_string())
}

/// Starts Cairn in `dir` over moto with the production config.
fn start_production(dir: &Path, moto: &Moto) -> Cairn {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join("production.json5");
    std::fs::write(&config, production_config(dir)).unwrap();
    Cairn::start_config_env(dir, &config, &moto.aws_env(&moto.endpoint()))
}

/// What `//:report` writes (`tests/bazel-workspace`).
const REPORT: &str = "A CACHE THAT REMEMBERS\n23\nhello, cairn\n";

#[test]
fn guide_cas_production_tree_serves_remote_execution_and_a_clean_rebuild_from_s3() {
    let Some(program) = common::bazel::find_or_skip("guide_layouts") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = rt.block_on(Moto::start());
    for bucket in [
        "nativelink-cas-index",
        "nativelink-cas-content",
        "nativelink-ac",
    ] {
        rt.block_on(moto.create_bucket(bucket));
    }
    let tmp = tempfile::tempdir().unwrap();
    let first = start_production(&tmp.path().join("first"), &moto);
    let bazel = common::bazel::Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");
    let with_target = |addr| {
        let mut args = bazel.remote_flags(addr, None, "OSFamily=linux");
        args.push("//...".to_string());
        args
    };

    // Every action runs on the worker; its outputs go through the guide's tree into S3.
    let build = bazel.run("build", &with_target(first.addr));
    let executed = build.all_processes_were("remote");
    assert_eq!(
        std::fs::read_to_string(bazel.bin("report.txt")).unwrap(),
        REPORT
    );
    // The report is one chunk (smaller than dedup's minimum): its index entry and its lz4
    // content are both in their buckets, under the guide's prefixes, named as NativeLink
    // names them.
    let d = sha(REPORT.as_bytes());
    let name = format!("{}-{}", d.hash_hex(), d.size());
    for (bucket, prefix) in [
        ("nativelink-cas-index", "prod/index/"),
        ("nativelink-cas-content", "prod/content/"),
    ] {
        let keys = rt.block_on(moto.list(bucket, prefix));
        assert!(
            keys.contains(&format!("{prefix}{name}")),
            "{prefix}{name} is not in {bucket}: {keys:?}"
        );
    }

    // A clean rebuild on the same process: every action is a remote cache hit.
    bazel.run("clean", &[]);
    let again = bazel.run("build", &with_target(first.addr));
    assert_eq!(again.all_processes_were("remote cache hit"), executed);
    assert_eq!(
        std::fs::read_to_string(bazel.bin("report.txt")).unwrap(),
        REPORT
    );

    // A second process over the same buckets, the first one gone: its memory tiers are empty,
    // so every hit and every output comes out of S3 through dedup and lz4.
    first.kill9();
    let second = start_production(&tmp.path().join("second"), &moto);
    bazel.run("clean", &[]);
    let from_s3 = bazel.run("build", &with_target(second.addr));
    assert_eq!(from_s3.all_processes_were("remote cache hit"), executed);
    assert_eq!(
        std::fs::read_to_string(bazel.bin("report.txt")).unwrap(),
        REPORT
    );
    let (code, body) = rt.block_on(common::http_get(second.addr, "/status"));
    assert_eq!(code, 200, "{body}");
    drop(bazel);
    second.kill9();
}

/// Three tiers, each also served under an instance of its own so the test can ask each one
/// what it holds.
const THREE_TIERS: &str = r#"{
  stores: {
    MEMORY: { memory: { eviction_policy: { max_bytes: "256mb" } } },
    REDIS: { redis_store: { addresses: ["@REDIS@"], key_prefix: "cas:" } },
    S3: { experimental_cloud_object_store: {
      provider: "aws", region: "us-east-1", bucket: "tiers", key_prefix: "cas/",
      insecure_allow_http: true, retry: { max_retries: 3, delay: 0.05, jitter: 0.5 },
    } },
    TIERED: { fast_slow: {
      fast: { ref_store: { name: "MEMORY" } },
      slow: { fast_slow: { fast: { ref_store: { name: "REDIS" } }, slow: { ref_store: { name: "S3" } } } },
    } },
    AC: { fast_slow: {
      fast: { redis_store: { addresses: ["@REDIS@"], key_prefix: "ac:" } },
      slow: { experimental_cloud_object_store: {
        provider: "aws", region: "us-east-1", bucket: "tiers", key_prefix: "ac/",
        insecure_allow_http: true, retry: { max_retries: 3, delay: 0.05, jitter: 0.5 },
      } },
    } },
  },
  servers: [{
    listener: { http: { socket_address: "127.0.0.1:0" } },
    services: {
      cas: [
        { instance_name: "", cas_store: "TIERED" },
        { instance_name: "memory", cas_store: "MEMORY" },
        { instance_name: "redis", cas_store: "REDIS" },
        { instance_name: "s3", cas_store: "S3" },
      ],
      ac: [{ instance_name: "", ac_store: "AC" }],
      bytestream: [{ instance_name: "", cas_store: "TIERED" }],
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

struct Tiers {
    moto: Moto,
    redis: RedisServer,
}

impl Tiers {
    fn start_cairn(&self, dir: &Path) -> Cairn {
        let config = dir.join("tiers.json5");
        std::fs::write(&config, THREE_TIERS.replace("@REDIS@", &self.redis.url())).unwrap();
        Cairn::start_config_env(dir, &config, &self.moto.aws_env(&self.moto.endpoint()))
    }

    fn in_redis(&self, d: &Digest) -> bool {
        let key = format!("cas:{}-{}", d.hash_hex(), d.size());
        self.redis.cli(&["EXISTS", &key]).trim() == "1"
    }

    async fn in_s3(&self, d: &Digest) -> bool {
        let object = format!("cas/{}-{}", d.hash_hex(), d.size());
        self.moto.list("tiers", &object).await.contains(&object)
    }
}

/// The digests of `ds` that `instance` reports missing.
async fn missing(ch: &Channel, instance: &str, ds: &[Digest]) -> Vec<Digest> {
    ContentAddressableStorageClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.to_string(),
            blob_digests: ds.iter().map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto_with(DigestFunction::Sha256, d).unwrap())
        .collect()
}

/// ByteStream.Write of `body` under the name of `claimed`, 1 MiB per message.
async fn write(ch: &Channel, claimed: &Digest, body: &[u8]) -> Result<i64, tonic::Status> {
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        claimed.hash_hex(),
        claimed.size()
    );
    let n = body.chunks(1 << 20).count();
    let msgs: Vec<WriteRequest> = body
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: i + 1 == n,
            data: c.to_vec(),
        })
        .collect();
    ByteStreamClient::new(ch.clone())
        .write(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().committed_size)
}

async fn read(ch: &Channel, d: &Digest) -> Vec<u8> {
    let mut s = ByteStreamClient::new(ch.clone())
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend_from_slice(&m.unwrap().data);
    }
    out
}

/// Polls `check` every 50 ms for up to 20 s: a fast tier is filled by a task that runs on
/// after the read that started it has been answered.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_tiers_memory_redis_s3_each_hold_the_blob_and_refill_from_below() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    moto.create_bucket("tiers").await;
    let redis = RedisServer::start(tmp.path());
    let tiers = Tiers { moto, redis };
    let run = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        tiers.start_cairn(&dir)
    };

    // A write through the top puts the blob in all three tiers before it is acknowledged.
    let c = run("first");
    let ch = c.channel().await;
    let blob = data(3 << 20, 31);
    let d = sha(&blob);
    assert_eq!(write(&ch, &d, &blob).await.unwrap(), blob.len() as i64);
    for instance in ["", "memory", "redis", "s3"] {
        assert!(
            missing(&ch, instance, &[d]).await.is_empty(),
            "{instance:?}"
        );
    }
    assert!(tiers.in_redis(&d));
    assert!(tiers.in_s3(&d).await);
    assert!(read(&ch, &d).await == blob);

    // A lying upload (its body is not its digest's) is refused and lands in no tier.
    let claimed = sha(&data(2 << 20, 33));
    let e = write(&ch, &claimed, &data(2 << 20, 32)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    for instance in ["", "memory", "redis", "s3"] {
        assert_eq!(missing(&ch, instance, &[claimed]).await, vec![claimed]);
    }
    assert!(!tiers.in_redis(&claimed));
    assert!(!tiers.in_s3(&claimed).await);
    c.kill9();

    // A new process has an empty memory tier: the read comes from Redis and fills memory.
    let c = run("second");
    let ch = c.channel().await;
    assert_eq!(missing(&ch, "memory", &[d]).await, vec![d]);
    assert!(read(&ch, &d).await == blob);
    eventually("memory filled from redis", async || {
        missing(&ch, "memory", &[d]).await.is_empty()
    })
    .await;
    c.kill9();

    // Without it in Redis, a third process reads it from S3 and fills Redis and memory.
    tiers
        .redis
        .cli(&["DEL", &format!("cas:{}-{}", d.hash_hex(), d.size())]);
    assert!(!tiers.in_redis(&d));
    let c = run("third");
    let ch = c.channel().await;
    assert_eq!(missing(&ch, "redis", &[d]).await, vec![d]);
    assert!(missing(&ch, "", &[d]).await.is_empty());
    assert!(read(&ch, &d).await == blob);
    eventually("memory and redis filled from s3", async || {
        missing(&ch, "memory", &[d]).await.is_empty() && tiers.in_redis(&d)
    })
    .await;
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
}

/// Bazel through the three tiers (the AC in Redis over S3): a build, then, with the process
/// gone (its memory tier with it) and Redis emptied, a clean rebuild against a new process is
/// all remote cache hits, served from S3 alone, and refills Redis on the way.
#[test]
fn bazel_builds_through_the_three_tiers_and_rebuilds_from_s3_alone() {
    let Some(program) = common::bazel::find_or_skip("guide_layouts") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let moto = rt.block_on(Moto::start());
    rt.block_on(moto.create_bucket("tiers"));
    let redis = RedisServer::start(tmp.path());
    let tiers = Tiers { moto, redis };
    let run = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        tiers.start_cairn(&dir)
    };
    let bazel = common::bazel::Bazel::new(program, &tmp.path().join("bazel"), "bazel-workspace");
    let args = |c: &Cairn| {
        let mut args = bazel.cache_flags(c.addr);
        args.push("//...".to_string());
        args
    };

    let first = run("first");
    let build = bazel.run("build", &args(&first));
    let executed = build.all_processes_were("local");
    build.assert_no_remote_cache_warning();
    first.kill9();
    tiers.redis.cli(&["FLUSHALL"]);
    let report = sha(REPORT.as_bytes());
    assert!(!tiers.in_redis(&report));

    let second = run("second");
    bazel.run("clean", &[]);
    let again = bazel.run("build", &args(&second));
    assert_eq!(again.all_processes_were("remote cache hit"), executed);
    again.assert_no_remote_cache_warning();
    assert_eq!(
        std::fs::read_to_string(bazel.bin("report.txt")).unwrap(),
        REPORT
    );
    redis_kit::wait_until(
        "the report, read from S3, is back in Redis",
        Duration::from_secs(20),
        || tiers.in_redis(&report),
    );
    drop(bazel);
    second.kill9();
}

/// The Kubernetes example's shared CAS config, unchanged.
const SHARED_CAS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deployment-examples/kubernetes/shared-cas/cas.json5"
);

#[tokio::test]
async fn three_replicas_of_the_kubernetes_shared_cas_serve_each_others_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    moto.create_bucket("shared-cas").await;
    let redis = RedisServer::start(tmp.path());
    let mut env = moto.aws_env(&moto.endpoint());
    env.extend([
        ("CAIRN_CAS_LISTEN", "127.0.0.1:0".to_string()),
        ("CAIRN_MEMORY_BYTES", "128mb".to_string()),
        ("CAIRN_REDIS_URL", redis.url()),
        ("CAIRN_BUCKET", "shared-cas".to_string()),
        ("CAIRN_S3_ALLOW_HTTP", "true".to_string()),
    ]);
    let replicas: Vec<Cairn> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            Cairn::start_config_env(&dir, Path::new(SHARED_CAS), &env)
        })
        .collect();
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(r.channel().await);
    }
    let in_redis = |prefix: &str, d: &Digest| {
        redis
            .cli(&["EXISTS", &format!("{prefix}{}-{}", d.hash_hex(), d.size())])
            .trim()
            == "1"
    };
    let in_bucket = async |prefix: &str, d: &Digest| {
        let key = format!("{prefix}{}-{}", d.hash_hex(), d.size());
        moto.list("shared-cas", &key).await.contains(&key)
    };

    // A blob written to one replica is found and read on the others, from Redis or the bucket.
    let small = data(200_000, 41);
    let ds = sha(&small);
    assert_eq!(missing(&channels[1], "", &[ds]).await, vec![ds]);
    write(&channels[0], &ds, &small).await.unwrap();
    for ch in &channels[1..] {
        assert!(missing(ch, "", &[ds]).await.is_empty());
        assert!(read(ch, &ds).await == small);
    }
    assert!(in_redis("cas:", &ds) && in_bucket("cas/", &ds).await);

    // A blob of 64 MB or more goes to the bucket only (Redis keeps values in memory whole).
    let big = data(65_000_000, 42);
    let db = sha(&big);
    write(&channels[1], &db, &big).await.unwrap();
    assert!(read(&channels[2], &db).await == big);
    assert!(!in_redis("cas:", &db) && in_bucket("cas/", &db).await);

    // An action result written through one replica is served by another (its output is in the
    // CAS, so completeness checking lets it through).
    let action = sha(b"shared-cas action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".to_string(),
            digest: Some(ds.to_proto()),
            ..Default::default()
        }],
        stdout_raw: b"from replica 2".to_vec(),
        ..Default::default()
    };
    ActionCacheClient::new(channels[2].clone())
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = ActionCacheClient::new(channels[0].clone())
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(action.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.stdout_raw, b"from replica 2");
    assert!(in_redis("ac:", &action) && in_bucket("ac/", &action).await);

    // A replica lost: the others serve on, with nothing of it needed.
    let mut replicas = replicas;
    replicas.remove(0).kill9();
    assert!(read(&channels[1], &ds).await == small);
    for r in &replicas {
        let (code, body) = common::http_get(r.addr, "/status").await;
        assert_eq!(code, 200, "{body}");
    }
}
