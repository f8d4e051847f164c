//! `servers`: listeners and the services each serves, tied to stores and schedulers by name.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::named::{InstanceEntry, InstanceMap};
use crate::num::{self, ByteSize};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A name for logs and `/status` (default: the socket address).
    #[serde(default)]
    pub name: Option<String>,
    pub listener: Listener,
    #[serde(default)]
    pub services: Option<Services>,
    /// The request header that names who sent a request (NativeLink's key): it is logged
    /// with the request, and with `required: true` a gRPC request without it is refused with
    /// UNAUTHENTICATED.
    #[serde(default)]
    pub experimental_identity_header: Option<IdentityHeader>,
}

/// `servers[].experimental_identity_header`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeader {
    /// Header name (default `x-identity`).
    #[serde(default)]
    pub header_name: Option<String>,
    /// Refuse gRPC requests that do not carry the header.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Listener {
    Http(HttpListener),
}

impl Listener {
    pub fn http(&self) -> &HttpListener {
        match self {
            Listener::Http(h) => h,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpListener {
    /// `IP:PORT` to listen on, such as `"0.0.0.0:50051"`.
    pub socket_address: String,
    /// Bind `socket_address` even when the address is not (yet) assigned to this machine
    /// (`IP_FREEBIND`), such as a floating address that arrives later. Default false.
    #[serde(default, deserialize_with = "num::boolean")]
    pub freebind: bool,
    #[serde(default)]
    pub compression: Option<HttpCompression>,
    #[serde(default)]
    pub advanced_http: Option<AdvancedHttp>,
    /// TLS for everything this listener serves (gRPC, `/status`, `/metrics`). Without it the
    /// listener speaks plaintext HTTP/1.1 and h2c.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Largest gRPC message a client may send to this listener (default 8 MiB). Also the
    /// largest message it sends.
    #[serde(default)]
    pub max_decoding_message_size: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCompression {
    /// `gzip`, `zstd` or `none`.
    #[serde(default)]
    pub send_compression_algorithm: Option<String>,
    #[serde(default)]
    pub accepted_compression_algorithms: Vec<String>,
}

/// HTTP/2 and connection tuning of a listener. Durations are seconds. NativeLink's
/// `experimental_http2_*` spellings are accepted for the same keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvancedHttp {
    /// HTTP/2 ping interval (default 30 s): a peer that stops answering is dropped.
    #[serde(
        default,
        alias = "http2_keep_alive_interval",
        deserialize_with = "num::opt_u64"
    )]
    pub http2_keepalive_interval: Option<u64>,
    /// How long a ping may go unanswered (default 20 s).
    #[serde(
        default,
        alias = "experimental_http2_keep_alive_timeout",
        alias = "experimental_http2_keep_alive_timeout_s",
        deserialize_with = "num::opt_secs"
    )]
    pub http2_keepalive_timeout: Option<u64>,
    /// Concurrent streams per HTTP/2 connection (default 1000).
    #[serde(
        default,
        alias = "experimental_http2_max_concurrent_streams",
        deserialize_with = "num::opt_u64"
    )]
    pub max_concurrent_streams: Option<u64>,
    #[serde(default, alias = "experimental_http2_initial_stream_window_size")]
    pub http2_initial_stream_window_size: Option<ByteSize>,
    #[serde(default, alias = "experimental_http2_initial_connection_window_size")]
    pub http2_initial_connection_window_size: Option<ByteSize>,
    #[serde(default, alias = "experimental_http2_adaptive_window")]
    pub http2_adaptive_window: Option<bool>,
    #[serde(default, alias = "experimental_http2_max_frame_size")]
    pub http2_max_frame_size: Option<ByteSize>,
    /// Largest header block a client may send (default 64 KiB).
    #[serde(default, alias = "experimental_http2_max_header_list_size")]
    pub http2_max_header_list_size: Option<ByteSize>,
    /// Streams a client may open and reset before the server stops answering them (default
    /// 20: the "rapid reset" guard).
    #[serde(
        default,
        alias = "experimental_http2_max_pending_accept_reset_streams",
        deserialize_with = "num::opt_u64"
    )]
    pub http2_max_pending_accept_reset_streams: Option<u64>,
    /// Bytes buffered per stream for sending (default 400 KiB).
    #[serde(default, alias = "experimental_http2_max_send_buf_size")]
    pub http2_max_send_buf_size: Option<ByteSize>,
    /// Allow the extended CONNECT protocol (RFC 8441).
    #[serde(default, alias = "experimental_http2_enable_connect_protocol")]
    pub http2_enable_connect_protocol: Option<bool>,
    #[serde(default)]
    pub tcp_nodelay: Option<bool>,
    /// Open connections this listener keeps at once (default 10,000); past it a new
    /// connection is closed as soon as it is accepted. Cairn addition.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_connections: Option<u64>,
    /// Seconds a new connection has to finish its TLS handshake, or to send its first byte on
    /// a plaintext listener (default 10). Cairn addition.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub handshake_timeout: Option<u64>,
    /// ByteStream uploads in progress at once on this listener, interrupted ones waiting to be
    /// resumed included (default 10,000); past it a new upload gets RESOURCE_EXHAUSTED. Cairn
    /// addition.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_uploads: Option<u64>,
    /// Bytes of upload chunks received on this listener and not yet taken by their stores,
    /// together (default 256 MiB; at least 1 MiB); past it writers wait, and HTTP/2 flow
    /// control holds their clients back. Cairn addition.
    #[serde(default)]
    pub upload_buffer_bytes: Option<ByteSize>,
}

/// A listener's TLS. The files are PEM and are reloaded when they change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, leaf first.
    pub cert_file: String,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CAs that client certificates are verified against (the deployment guide's key). Without
    /// `verify_client` a client may connect without a certificate, and one it presents must
    /// verify.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// CAs of client certificates, which are then required (NativeLink's key).
    #[serde(default)]
    pub client_ca_file: Option<String>,
    /// Revoked client certificates (PEM CRLs).
    #[serde(default)]
    pub client_crl_file: Option<String>,
    /// Require a client certificate signed by `ca_file` (mTLS).
    #[serde(default)]
    pub verify_client: bool,
}

/// TLS of an outbound connection (`grpcs://` endpoints), NativeLink's `tls_config`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// CAs the server's certificate is verified against.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// This client's certificate, for servers that require one (mTLS).
    #[serde(default)]
    pub cert_file: Option<String>,
    /// The key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Also trust the operating system's CAs.
    #[serde(default)]
    pub use_native_roots: Option<bool>,
}

macro_rules! instance_entry {
    ($t:ty) => {
        impl InstanceEntry for $t {
            fn set_instance_name(&mut self, name: String) {
                self.instance_name = name;
            }
            fn instance_name(&self) -> &str {
                &self.instance_name
            }
        }
    };
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    #[serde(default)]
    pub cas: Option<InstanceMap<CasService>>,
    #[serde(default)]
    pub ac: Option<InstanceMap<AcService>>,
    #[serde(default)]
    pub capabilities: Option<InstanceMap<CapabilitiesService>>,
    #[serde(default)]
    pub bytestream: Option<ByteStreamService>,
    #[serde(default)]
    pub execution: Option<InstanceMap<ExecutionService>>,
    #[serde(default)]
    pub worker_api: Option<WorkerApiService>,
    /// `/status`: 200 with each component's health, 503 when one is unhealthy.
    #[serde(default)]
    pub health: Option<HealthService>,
    /// `/metrics` (Cairn addition; on by default where `health` is served).
    #[serde(default)]
    pub metrics: Option<MetricsService>,
    /// The admin API (NativeLink's): `POST {path}/scheduler/NAME/set_drain_worker/WORKER/1`
    /// drains a worker (0 undrains it). Off unless configured.
    #[serde(default)]
    pub admin: Option<AdminService>,
    /// Remote Asset API `Fetch`: `[{instance_name, fetch_store}]` (or the map form).
    #[serde(default)]
    pub fetch: Option<InstanceMap<FetchService>>,
    /// Remote Asset API `Push`: `[{instance_name, push_store, read_only}]`.
    #[serde(default)]
    pub push: Option<InstanceMap<PushService>>,
    /// Build Event Protocol (`bazel --bes_backend=grpc://...`): every event is stored in
    /// `store` (NativeLink's key).
    #[serde(default)]
    pub experimental_bep: Option<BepService>,
    /// The operator's web UI (Cairn's own key; NativeLink has none): `/invocations`,
    /// `/invocation/ID`, `/action/HASH-SIZE`, `/tree/..`, `/blob/..`, `/queue`, `/workers`,
    /// served as HTML on this listener (so its TLS and client-certificate settings apply).
    #[serde(default)]
    pub web_ui: Option<WebUiService>,
}

/// `services.web_ui`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebUiService {
    /// The store the Build Event Protocol writes to (`experimental_bep.store` of some
    /// listener of this process); without it there are no invocation pages.
    #[serde(default)]
    pub bep_store: Option<String>,
    /// The CAS store actions, trees, logs and outputs are read from.
    #[serde(default)]
    pub cas_store: Option<String>,
    /// The action cache store results are read from.
    #[serde(default)]
    pub ac_store: Option<String>,
    /// Schedulers whose queue and workers are shown (default: none).
    #[serde(default)]
    pub schedulers: Vec<String>,
    /// Default true: no page changes anything. False shows a drain button on `/workers`.
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// Most invocations remembered (default 1000); the oldest is forgotten first.
    #[serde(default)]
    pub max_invocations: Option<u64>,
    /// Invocations older than this many seconds are forgotten (default 7 days; 0: never).
    #[serde(default)]
    pub max_invocation_age_s: Option<u64>,
    /// The file the record of each invocation's remote actions is kept in across restarts
    /// (default `$CAIRN_DATA/web_ui/activity.json`, `CAIRN_DATA` defaulting to
    /// `./cairn-data`, the data directory of the built-in config; `""`: memory only).
    #[serde(default)]
    pub activity_path: Option<String>,
}

fn default_true() -> bool {
    true
}

/// `services.admin`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminService {
    /// Where the admin routes are (default `/admin`).
    #[serde(default)]
    pub path: Option<String>,
}

/// `services.experimental_bep`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BepService {
    /// Where build events are kept (keys are not the hashes of their values).
    pub store: String,
}

/// `services.fetch` (Remote Asset API): URIs and qualifiers resolve to blobs through the
/// associations in `fetch_store`; what is not there is downloaded into the instance's CAS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchService {
    #[serde(default)]
    pub instance_name: String,
    /// Where the URI -> blob associations are kept (an action-cache-like store: its keys are
    /// not the hashes of its values).
    pub fetch_store: String,
}
instance_entry!(FetchService);

/// `services.push` (Remote Asset API): records URI -> blob associations in `push_store`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushService {
    #[serde(default)]
    pub instance_name: String,
    pub push_store: String,
    /// Refuse PushBlob and PushDirectory.
    #[serde(default)]
    pub read_only: bool,
}
instance_entry!(PushService);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasService {
    #[serde(default)]
    pub instance_name: String,
    pub cas_store: String,
    /// Content-defined chunking (NativeLink's): SplitBlob / GetChunkMapping and SpliceBlob /
    /// RegisterChunkMapping are served and advertised (FastCDC 2020) for this instance.
    #[serde(default)]
    pub experimental_chunking: Option<CasChunking>,
}
instance_entry!(CasService);

/// `services.cas[].experimental_chunking`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasChunking {
    /// Store (by name) that keeps each blob's chunk layout under the blob's digest. It must not
    /// verify content (a layout does not hash to its key) and must not be the `cas_store`.
    /// Required unless the `cas_store` is a `grpc` store (then layouts are not kept: each
    /// split is computed again, with the same FastCDC parameters, so with the same result).
    #[serde(default)]
    pub index_store: Option<String>,
    /// Average chunk size advertised (FastCDC 2020 parameters) and used when splitting:
    /// chunks are between a quarter and four times this. 1 KiB to 1 MiB. Default 512 KiB.
    #[serde(default, deserialize_with = "num::u64")]
    pub avg_chunk_size_bytes: u64,
    /// Most chunks a splice may name or a split may produce; a blob that would need more is
    /// not split (NOT_FOUND, clients then download it whole). Default 50000.
    #[serde(default, deserialize_with = "num::u64")]
    pub max_chunk_count: u64,
}

impl CasChunking {
    pub const DEFAULT_AVG_CHUNK_SIZE_BYTES: u64 = 512 * 1024;
    pub const MIN_AVG_CHUNK_SIZE_BYTES: u64 = 1024;
    pub const MAX_AVG_CHUNK_SIZE_BYTES: u64 = 1024 * 1024;
    pub const DEFAULT_MAX_CHUNK_COUNT: u64 = 50_000;

    /// `avg_chunk_size_bytes` with its default.
    pub fn avg_chunk_size(&self) -> u64 {
        if self.avg_chunk_size_bytes == 0 {
            Self::DEFAULT_AVG_CHUNK_SIZE_BYTES
        } else {
            self.avg_chunk_size_bytes
        }
    }

    /// `max_chunk_count` with its default.
    pub fn max_chunks(&self) -> u64 {
        if self.max_chunk_count == 0 {
            Self::DEFAULT_MAX_CHUNK_COUNT
        } else {
            self.max_chunk_count
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcService {
    #[serde(default)]
    pub instance_name: String,
    pub ac_store: String,
    /// Refuse UpdateActionResult.
    #[serde(default)]
    pub read_only: bool,
}
instance_entry!(AcService);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilitiesService {
    #[serde(default)]
    pub instance_name: String,
    #[serde(default)]
    pub remote_execution: Option<RemoteExecutionCaps>,
    /// Accept and advertise zstd wire compression (`compressed-blobs/zstd` ByteStream names,
    /// zstd batch entries) for this instance (NativeLink's key; Bazel's
    /// `--remote_cache_compression`). Default false: zstd is neither advertised nor accepted.
    #[serde(default, deserialize_with = "num::boolean")]
    pub remote_cache_compression: bool,
}
instance_entry!(CapabilitiesService);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteExecutionCaps {
    pub scheduler: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionService {
    #[serde(default)]
    pub instance_name: String,
    pub cas_store: String,
    pub scheduler: String,
}
instance_entry!(ExecutionService);

/// ByteStream: the older map form `{cas_stores: {INSTANCE: STORE}}` or a list of
/// `{instance_name, cas_store}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteStreamService {
    List(InstanceMap<ByteStreamInstance>),
    Map(ByteStreamMap),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByteStreamMap {
    pub cas_stores: BTreeMap<String, String>,
    #[serde(default)]
    pub max_bytes_per_stream: Option<ByteSize>,
    #[serde(default)]
    pub max_decoding_message_size: Option<ByteSize>,
    /// Seconds an upload interrupted by a disconnect can be resumed. NativeLink 1.6.6 spells it
    /// `persist_stream_on_disconnect_timeout_s`; both are accepted.
    #[serde(
        default,
        alias = "persist_stream_on_disconnect_timeout_s",
        deserialize_with = "num::opt_secs"
    )]
    pub persist_stream_on_disconnect_timeout: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByteStreamInstance {
    #[serde(default)]
    pub instance_name: String,
    pub cas_store: String,
    #[serde(default)]
    pub max_bytes_per_stream: Option<ByteSize>,
    /// Seconds an upload interrupted by a disconnect can be resumed. NativeLink 1.6.6 spells it
    /// `persist_stream_on_disconnect_timeout_s`; both are accepted.
    #[serde(
        default,
        alias = "persist_stream_on_disconnect_timeout_s",
        deserialize_with = "num::opt_secs"
    )]
    pub persist_stream_on_disconnect_timeout: Option<u64>,
}
instance_entry!(ByteStreamInstance);

impl ByteStreamService {
    /// `(instance, store, max_bytes_per_stream)` for each instance.
    pub fn instances(&self) -> Vec<ByteStreamInstance> {
        match self {
            ByteStreamService::List(l) => l.0.clone(),
            ByteStreamService::Map(m) => m
                .cas_stores
                .iter()
                .map(|(k, v)| ByteStreamInstance {
                    instance_name: k.clone(),
                    cas_store: v.clone(),
                    max_bytes_per_stream: m.max_bytes_per_stream,
                    persist_stream_on_disconnect_timeout: m.persist_stream_on_disconnect_timeout,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerApiService {
    pub scheduler: String,
    /// Serve the worker API on a listener that also serves client services (CAS, AC,
    /// execution...). Off by default: a worker API on a client listener lets any client that
    /// reaches it register as a worker and write action results. Cairn addition.
    #[serde(default)]
    pub allow_client_services_on_same_listener: bool,
    /// Let an action run to its end on its worker when the scheduler drops it (every client
    /// went away, or it was cancelled): its result still goes to the action cache. Default
    /// false: such actions are killed on their workers. With `true` a dropped action keeps
    /// its worker slot until it ends; it applies to every worker of the scheduler.
    #[serde(default, deserialize_with = "num::boolean")]
    pub disable_kill_revoked_operations: bool,
    /// Seconds between the passes that tell workers to kill the actions the scheduler has
    /// dropped (0 or unset: 5): the longest a dropped action runs on. Cairn tells the worker
    /// at once, so any value is met.
    #[serde(default, deserialize_with = "num::secs")]
    pub kill_revoked_operations_interval_s: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthService {
    /// Route (default `/status`).
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsService {
    /// Route (default `/metrics`).
    #[serde(default)]
    pub path: Option<String>,
}
