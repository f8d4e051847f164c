//! Store specs: one variant per store kind, named as in the file. Wrapper kinds hold nested
//! specs, so any tree can be written inline.

use serde::Deserialize;

use crate::num::{self, ByteSize};

/// A store tree node: exactly one kind key.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreSpec {
    Memory(MemoryStore),
    Filesystem(FilesystemStore),
    FastSlow(Box<FastSlowStore>),
    Verify(Box<VerifyStore>),
    Compression(Box<CompressionStore>),
    Dedup(Box<DedupStore>),
    SizePartitioning(Box<SizePartitioningStore>),
    Shard(ShardStore),
    ExistenceCache(Box<ExistenceCacheStore>),
    CompletenessChecking(Box<CompletenessCheckingStore>),
    Noop(NoopStore),
    RefStore(RefStore),
    /// Cache operation metrics (`cache_operations_total` and its histogram) for the wrapped
    /// store, labelled `cache_type` (NativeLink's wrapper).
    CacheMetrics(Box<CacheMetricsStore>),
    // Kinds whose behaviour a later issue builds: they parse, and starting them is an error.
    ExperimentalCloudObjectStore(Box<CloudObjectStore>),
    /// NetApp ONTAP S3 with a local existence index (NativeLink's).
    OntapS3ExistenceCache(OntapS3ExistenceCache),
    /// MongoDB (NativeLink's `experimental_mongo`); its body is kept as written. There is no
    /// MongoDB server here to build it against, so it is refused at start.
    ExperimentalMongo(serde_json::Value),
    RedisStore(RedisStore),
    Grpc(GrpcStore),
}

impl StoreSpec {
    /// The config key of this kind.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreSpec::Memory(_) => "memory",
            StoreSpec::Filesystem(_) => "filesystem",
            StoreSpec::FastSlow(_) => "fast_slow",
            StoreSpec::Verify(_) => "verify",
            StoreSpec::Compression(_) => "compression",
            StoreSpec::Dedup(_) => "dedup",
            StoreSpec::SizePartitioning(_) => "size_partitioning",
            StoreSpec::Shard(_) => "shard",
            StoreSpec::ExistenceCache(_) => "existence_cache",
            StoreSpec::CompletenessChecking(_) => "completeness_checking",
            StoreSpec::Noop(_) => "noop",
            StoreSpec::RefStore(_) => "ref_store",
            StoreSpec::CacheMetrics(_) => "cache_metrics",
            StoreSpec::ExperimentalCloudObjectStore(_) => "experimental_cloud_object_store",
            StoreSpec::OntapS3ExistenceCache(_) => "ontap_s3_existence_cache",
            StoreSpec::ExperimentalMongo(_) => "experimental_mongo",
            StoreSpec::RedisStore(_) => "redis_store",
            StoreSpec::Grpc(_) => "grpc",
        }
    }

    /// Calls `f` on every `grpc` store of this tree, nested ones included.
    pub fn visit_grpc_mut(&mut self, f: &mut dyn FnMut(&mut GrpcStore)) {
        let children: Vec<&mut StoreSpec> = match self {
            StoreSpec::Grpc(g) => return f(g),
            StoreSpec::FastSlow(s) => vec![&mut s.fast, &mut s.slow],
            StoreSpec::Verify(s) => vec![&mut s.backend],
            StoreSpec::Compression(s) => vec![&mut s.backend],
            StoreSpec::Dedup(s) => vec![&mut s.index_store, &mut s.content_store],
            StoreSpec::SizePartitioning(s) => vec![&mut s.lower_store, &mut s.upper_store],
            StoreSpec::Shard(s) => s.stores.iter_mut().map(|w| &mut w.store).collect(),
            StoreSpec::ExistenceCache(s) => vec![&mut s.backend],
            StoreSpec::CacheMetrics(s) => vec![&mut s.backend],
            StoreSpec::CompletenessChecking(s) => vec![&mut s.backend, &mut s.cas_store],
            _ => vec![],
        };
        for c in children {
            c.visit_grpc_mut(f);
        }
    }

    /// The nested specs, with the key each sits under.
    pub fn children(&self) -> Vec<(&'static str, &StoreSpec)> {
        match self {
            StoreSpec::FastSlow(s) => vec![("fast", &s.fast), ("slow", &s.slow)],
            StoreSpec::Verify(s) => vec![("backend", &s.backend)],
            StoreSpec::Compression(s) => vec![("backend", &s.backend)],
            StoreSpec::Dedup(s) => vec![
                ("index_store", &s.index_store),
                ("content_store", &s.content_store),
            ],
            StoreSpec::SizePartitioning(s) => {
                vec![
                    ("lower_store", &s.lower_store),
                    ("upper_store", &s.upper_store),
                ]
            }
            StoreSpec::Shard(s) => s.stores.iter().map(|w| ("stores", &w.store)).collect(),
            StoreSpec::ExistenceCache(s) => vec![("backend", &s.backend)],
            StoreSpec::CacheMetrics(s) => vec![("backend", &s.backend)],
            StoreSpec::CompletenessChecking(s) => {
                vec![("backend", &s.backend), ("cas_store", &s.cas_store)]
            }
            _ => vec![],
        }
    }
}

/// When entries leave a memory, filesystem or existence-cache index. Every limit is optional;
/// none set means unbounded.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictionPolicy {
    /// Evict least recently used entries once the total size passes this.
    #[serde(default)]
    pub max_bytes: ByteSize,
    /// When evicting for size, go this far below `max_bytes` (hysteresis), so that eviction
    /// runs in batches.
    #[serde(default)]
    pub evict_bytes: ByteSize,
    /// Evict entries not touched for this many seconds.
    #[serde(default, deserialize_with = "num::secs")]
    pub max_seconds: u64,
    /// Evict least recently used entries past this many.
    #[serde(default, deserialize_with = "num::u64")]
    pub max_count: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryStore {
    #[serde(default)]
    pub eviction_policy: Option<EvictionPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesystemStore {
    /// Directory of complete blobs.
    pub content_path: String,
    /// Directory for blobs being written; must be on the same file system as `content_path`.
    /// Default: `<content_path>.tmp`, a sibling directory.
    #[serde(default)]
    pub temp_path: Option<String>,
    #[serde(default)]
    pub eviction_policy: Option<EvictionPolicy>,
    /// Read chunk size (default 64 KiB).
    #[serde(default)]
    pub read_buffer_size: Option<ByteSize>,
    /// File-system block size, used to account for small files (default 4096).
    #[serde(default)]
    pub block_size: Option<ByteSize>,
    /// Writes (puts) in progress at once; more wait their turn (0 or unset: no limit).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_writes: Option<u64>,
    /// Keep this store's blobs out of the page cache (NativeLink's key): after a blob is
    /// written its pages are written back and dropped, and after a read ends the pages it
    /// brought in are dropped (`posix_fadvise(POSIX_FADV_DONTNEED)`). Costs a write-back per
    /// put and rereads from disk; for stores whose data should not push other data out of
    /// memory. Default false.
    #[serde(default, deserialize_with = "num::boolean")]
    pub evict_page_cache: bool,
}

/// `cache_metrics`: a store whose operations are counted under `cache_type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheMetricsStore {
    /// The `cache_type` label (low cardinality: `cas`, `ac`, ...).
    pub cache_type: String,
    pub backend: StoreSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastSlowStore {
    pub fast: StoreSpec,
    pub slow: StoreSpec,
    /// `both` (default), `get` (only fill on reads), `update` (only write), `read_only`.
    #[serde(default)]
    pub fast_direction: Option<String>,
    #[serde(default)]
    pub slow_direction: Option<String>,
    /// Reads of blobs at least this large that miss the fast tier stream from the slow tier
    /// without filling the fast tier (NativeLink's key). NativeLink also skips its map of
    /// shared in-flight reads for them; Cairn has no such map (every read is its own stream),
    /// so not filling the fast tier is the whole effect. 0 (the default) turns it off.
    #[serde(default)]
    pub bypass_dedup_threshold_bytes: ByteSize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyStore {
    pub backend: StoreSpec,
    #[serde(default)]
    pub verify_size: bool,
    #[serde(default)]
    pub verify_hash: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionStore {
    pub compression_algorithm: CompressionAlgorithm,
    pub backend: StoreSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CompressionAlgorithm {
    Lz4(Lz4Config),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lz4Config {
    /// Uncompressed bytes per frame block (default 64 KiB).
    #[serde(default)]
    pub block_size: Option<ByteSize>,
    /// Largest block accepted when decoding (default 4 MiB... or `block_size` if larger).
    #[serde(default)]
    pub max_decode_block_size: Option<ByteSize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupStore {
    pub index_store: StoreSpec,
    pub content_store: StoreSpec,
    #[serde(default)]
    pub min_size: Option<ByteSize>,
    #[serde(default)]
    pub normal_size: Option<ByteSize>,
    #[serde(default)]
    pub max_size: Option<ByteSize>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_fetch_per_get: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizePartitioningStore {
    /// Blobs smaller than this go to `lower_store`, the rest to `upper_store`.
    pub size: ByteSize,
    pub lower_store: StoreSpec,
    pub upper_store: StoreSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardStore {
    pub stores: Vec<WeightedStore>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedStore {
    pub store: StoreSpec,
    /// Relative share of keys (default 1).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub weight: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExistenceCacheStore {
    pub backend: StoreSpec,
    #[serde(default)]
    pub eviction_policy: Option<EvictionPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletenessCheckingStore {
    /// The action cache itself.
    pub backend: StoreSpec,
    /// The CAS whose contents an action result must reference completely.
    pub cas_store: StoreSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoopStore {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefStore {
    /// The top-level store this refers to.
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_retries: Option<u64>,
    /// Base delay in seconds.
    #[serde(default, deserialize_with = "num::opt_f64")]
    pub delay: Option<f64>,
    /// Random fraction added to each delay.
    #[serde(default, deserialize_with = "num::opt_f64")]
    pub jitter: Option<f64>,
    #[serde(default)]
    pub retry_on_errors: Option<Vec<String>>,
}

/// NativeLink's `ontap_s3_existence_cache`: an ONTAP S3 bucket with an index of the digests
/// it holds, kept in memory and in `index_path`, rebuilt by listing the bucket every
/// `sync_interval_seconds`. A digest not in the index is missing without a request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OntapS3ExistenceCache {
    /// Where the index is written (and read at start).
    pub index_path: String,
    /// Seconds between listings of the bucket (at least 1).
    #[serde(deserialize_with = "num::u64")]
    pub sync_interval_seconds: u64,
    /// NativeLink's ONTAP S3 spec: `endpoint`, `vserver_name`, `bucket`, `root_certificates`
    /// and the common object-store keys; `provider` is `ontap` when written.
    pub backend: Box<CloudObjectStore>,
}

/// NativeLink's `experimental_cloud_object_store`: one flat struct holding the keys of every
/// provider (`aws`, `gcs`, `azure`, `ontap`, `r2`, `oci`), so that a file parses whatever the
/// provider and the store's check can name a key that does not belong to the chosen provider
/// (or one that is missing) by its path. Which keys each provider takes: `docs/operations.md`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudObjectStore {
    /// `aws`, `gcs`, `azure`, `ontap`, `r2` or `oci` (required; checked when the store is
    /// built, so that the guides' fragments without it still parse).
    #[serde(default)]
    pub provider: Option<String>,
    /// aws, oci: the region (oci: also part of the endpoint host).
    #[serde(default)]
    pub region: Option<String>,
    /// aws, gcs, ontap, r2, oci: the bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// gcs: chunk size of resumable uploads (default 2MB).
    #[serde(default)]
    pub resumable_chunk_size: Option<ByteSize>,
    /// gcs: fail when no credentials are found.
    #[serde(default)]
    pub authentication_required: Option<bool>,
    /// gcs: connect timeout in seconds.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connection_timeout_s: Option<u64>,
    /// gcs: read timeout in seconds.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub read_timeout_s: Option<u64>,
    /// azure: the storage account.
    #[serde(default)]
    pub account_name: Option<String>,
    /// azure: the container.
    #[serde(default)]
    pub container: Option<String>,
    /// azure: blob endpoint override (an Azurite URL, say); ontap: the S3 endpoint (required).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// azure: a container URL with a SAS token in it; replaces account, container, endpoint.
    #[serde(default)]
    pub sas_url: Option<String>,
    /// ontap: the SVM name.
    #[serde(default)]
    pub vserver_name: Option<String>,
    /// ontap: a PEM file of CA certificates to trust for `endpoint`.
    #[serde(default)]
    pub root_certificates: Option<String>,
    /// r2: the Cloudflare account (the endpoint is `https://{account_id}.r2.cloudflarestorage.com`).
    #[serde(default)]
    pub account_id: Option<String>,
    /// r2, oci: access key (with `secret_access_key`); else the environment's credentials.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// r2, oci: secret key.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// oci: the Object Storage namespace (part of the endpoint host).
    #[serde(default)]
    pub namespace: Option<String>,
    /// Prefix of every object name.
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Objects last modified longer ago than this count as missing (0: never).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub consider_expired_after_s: Option<u64>,
    /// Largest single-request upload kept in memory to be sent again on a retryable error
    /// (default 5MiB; 0: such uploads are not retried).
    #[serde(default)]
    pub max_retry_buffer_per_request: Option<ByteSize>,
    /// Parts of one multipart upload in flight at once (default 10).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub multipart_max_concurrent_uploads: Option<u64>,
    /// `true`, `false` or a string holding one (`"${S3_ALLOW_HTTP:-false}"`), as in NativeLink.
    #[serde(default, deserialize_with = "num::boolean")]
    pub insecure_allow_http: bool,
    #[serde(default, deserialize_with = "num::boolean")]
    pub disable_http2: bool,
}

/// `redis_store`: blobs as Redis string values under `<key_prefix><hash>-<size>` (NativeLink
/// 1.6.6's keys and defaults; a zero or absent number means its default).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStore {
    /// `redis://[user:password@]host:port[/db]` URLs: one server (`standard`), the sentinels
    /// (`sentinel`; the master's name from `?sentinelServiceName=`, default `master`), or
    /// the cluster's seed nodes (`cluster`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Deprecated in NativeLink and ignored (`command_timeout_ms` replaces it).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub response_timeout_s: Option<u64>,
    /// Deprecated: `connection_timeout_ms` in seconds; setting both is an error.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connection_timeout_s: Option<u64>,
    /// Channel to which the name of every key written is published.
    #[serde(default)]
    pub experimental_pub_sub_channel: Option<String>,
    /// Prepended to every key. Default: empty.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// `standard` (default), `sentinel` or `cluster`.
    #[serde(default)]
    pub mode: RedisMode,
    /// Deprecated in NativeLink and ignored.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub broadcast_channel_capacity: Option<u64>,
    /// Time allowed for one command. Default: 10000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub command_timeout_ms: Option<u64>,
    /// Time allowed for connecting. Default: 3000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connection_timeout_ms: Option<u64>,
    /// Time allowed for the health check's PING. Default: 4000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub health_check_timeout_ms: Option<u64>,
    /// Bytes per GETRANGE of a read, and per piece of an upload. Default: 64 KiB.
    #[serde(default)]
    pub read_chunk_size: Option<ByteSize>,
    /// Connections kept open. Default: 3.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connection_pool_size: Option<u64>,
    /// Expire written keys after this many seconds. Default: 0 (never).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub key_ttl_s: Option<u64>,
    /// Upload pieces sent per round trip. Default: 10.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_chunk_uploads_per_update: Option<u64>,
    /// COUNT of SCAN calls. Default: 10000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub scan_count: Option<u64>,
    #[serde(default)]
    pub retry: Option<Retry>,
    /// Commands in flight at once. Default: 500.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_client_permits: Option<u64>,
    /// Items per cursor of the scheduler's search indexes. Default: 1500.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_count_per_cursor: Option<u64>,
}

/// How a `redis_store` reaches Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    #[default]
    Standard,
    Sentinel,
    Cluster,
}

#[cfg(test)]
mod redis_store_tests {
    use super::*;

    /// Every key of NativeLink 1.6.6's `redis_store`, numbers as numbers or strings.
    #[test]
    fn every_nativelink_key_parses() {
        let cfg = crate::parse_str(
            "r.json5",
            r#"{stores: {R: {redis_store: {
                addresses: ["redis+sentinel://127.0.0.1:26379/?sentinelServiceName=cache"],
                response_timeout_s: 10, connection_timeout_s: 0,
                experimental_pub_sub_channel: "writes", key_prefix: "cas:",
                mode: "sentinel", broadcast_channel_capacity: 4096,
                command_timeout_ms: "5000", connection_timeout_ms: 2000,
                health_check_timeout_ms: 1000, read_chunk_size: "128KiB",
                connection_pool_size: 3, key_ttl_s: 86400,
                max_chunk_uploads_per_update: 10, scan_count: 10000,
                retry: {max_retries: 6, delay: 0.3, jitter: 0.5},
                max_client_permits: 1000, max_count_per_cursor: 1500,
            }}}}"#,
        )
        .unwrap();
        let StoreSpec::RedisStore(r) = cfg.stores.get("R").unwrap() else {
            panic!("redis_store expected")
        };
        assert_eq!(r.mode, RedisMode::Sentinel);
        assert_eq!(r.command_timeout_ms, Some(5000));
        assert_eq!(r.read_chunk_size.unwrap().get(), 128 * 1024);
        assert_eq!(r.key_ttl_s, Some(86400));
        assert_eq!(r.key_prefix.as_deref(), Some("cas:"));
        let e = crate::parse_str(
            "r.json5",
            r#"{stores: {R: {redis_store: {addresses: ["redis://h"], mode: "replicated"}}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stores.R.redis_store.mode"), "{e}");
        let cfg = crate::parse_str(
            "r.json5",
            r#"{stores: {R: {redis_store: {addresses: ["redis://h"]}}}}"#,
        )
        .unwrap();
        let StoreSpec::RedisStore(r) = cfg.stores.get("R").unwrap() else {
            panic!("redis_store expected")
        };
        assert_eq!(r.mode, RedisMode::Standard);
    }
}

/// A remote REAPI CAS or AC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcStore {
    #[serde(default)]
    pub instance_name: String,
    #[serde(default)]
    pub endpoints: Vec<GrpcEndpoint>,
    /// `cas` or `ac`.
    #[serde(default)]
    pub store_type: Option<String>,
    #[serde(default)]
    pub retry: Option<Retry>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_requests: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connections_per_endpoint: Option<u64>,
    /// Longest time one upstream call may take, in seconds (an integer or `"5m"`), before it
    /// is cancelled with DEADLINE_EXCEEDED; for an upload or a read that is the whole
    /// transfer. 0 (the default) sets no limit: dead connections are still found by the
    /// endpoints' keepalives.
    #[serde(default, deserialize_with = "num::secs")]
    pub rpc_timeout_s: u64,
    /// Name blobs `{instance}/blobs/{hash}/{size}` without the digest function, for servers
    /// that predate it (they read the function from the hash length). Default false: names
    /// are `{instance}/blobs/{function}/{hash}/{size}`.
    #[serde(default, deserialize_with = "num::boolean")]
    pub use_legacy_resource_names: bool,
    /// Headers added to every upstream call (such as `{"authorization": "Bearer ..."}`).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// Headers copied from the client request being served to the upstream calls made for
    /// it (such as `["authorization"]`). Calls made for no client request (a worker's own,
    /// start-up checks) carry none.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Serve whole reads of small CAS blobs with `BatchReadBlobs` calls that carry many
    /// blobs, instead of one ByteStream read each. Off unless given.
    #[serde(default)]
    pub experimental_read_batching: Option<GrpcReadBatching>,
    /// Send and fetch CAS blobs of 64 KiB and more as `compressed-blobs/zstd` (the upstream
    /// must accept zstd: `capabilities.remote_cache_compression` on a Cairn or NativeLink
    /// upstream). Unset means false, unless some `capabilities` instance of this file has
    /// `remote_cache_compression`, which turns it on for every CAS grpc store that does not
    /// say false (NativeLink's rule).
    #[serde(default, deserialize_with = "num::opt_boolean")]
    pub experimental_remote_cache_compression: Option<bool>,
}

/// `grpc.experimental_read_batching`: whole reads of small blobs are queued and sent as
/// `BatchReadBlobs` calls.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcReadBatching {
    /// Blobs up to this size are batched; larger ones use ByteStream. Default 128 KiB.
    #[serde(default = "GrpcReadBatching::default_max_blob_size")]
    pub max_blob_size_bytes: ByteSize,
    /// Blob bytes per `BatchReadBlobs` call. Default 3 MiB (under the 4 MiB message limit).
    #[serde(default = "GrpcReadBatching::default_max_batch")]
    pub max_batch_bytes: ByteSize,
    /// `BatchReadBlobs` calls in flight at once; at least 1. Default 4.
    #[serde(
        default = "GrpcReadBatching::default_dispatch_slots",
        deserialize_with = "num::u64"
    )]
    pub dispatch_slots: u64,
    /// Blob bytes waiting for a batch; a read that would pass it uses ByteStream instead of
    /// waiting. Default 32 MiB.
    #[serde(default = "GrpcReadBatching::default_max_queued")]
    pub max_queued_bytes: ByteSize,
}

impl GrpcReadBatching {
    fn default_max_blob_size() -> ByteSize {
        ByteSize(128 << 10)
    }
    fn default_max_batch() -> ByteSize {
        ByteSize(3 << 20)
    }
    fn default_dispatch_slots() -> u64 {
        4
    }
    fn default_max_queued() -> ByteSize {
        ByteSize(32 << 20)
    }
}

impl Default for GrpcReadBatching {
    fn default() -> Self {
        GrpcReadBatching {
            max_blob_size_bytes: Self::default_max_blob_size(),
            max_batch_bytes: Self::default_max_batch(),
            dispatch_slots: Self::default_dispatch_slots(),
            max_queued_bytes: Self::default_max_queued(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcEndpoint {
    pub address: String,
    #[serde(default)]
    pub tls_config: Option<crate::servers::ClientTlsConfig>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub concurrency_limit: Option<u64>,
    /// Seconds to establish the TCP connection (0 or unset: 30).
    #[serde(default, deserialize_with = "num::secs")]
    pub connect_timeout_s: u64,
    /// Seconds between TCP keepalive probes on the connection (0 or unset: 30).
    #[serde(default, deserialize_with = "num::secs")]
    pub tcp_keepalive_s: u64,
    /// Seconds between HTTP/2 PINGs on the connection (0 or unset: 30).
    #[serde(default, deserialize_with = "num::secs")]
    pub http2_keepalive_interval_s: u64,
    /// Seconds a PING may go unanswered before the connection is dropped and its calls fail
    /// UNAVAILABLE (0 or unset: 20).
    #[serde(default, deserialize_with = "num::secs")]
    pub http2_keepalive_timeout_s: u64,
}
