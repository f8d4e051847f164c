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
    #[serde(default)]
    pub experimental_identity_header: Option<serde_json::Value>,
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
    #[serde(default)]
    pub compression: Option<HttpCompression>,
    #[serde(default)]
    pub advanced_http: Option<AdvancedHttp>,
    /// TLS (built in a later issue; parses now, and starting with it is an error).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
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

/// HTTP/2 tuning of a listener. Durations are seconds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvancedHttp {
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub http2_keepalive_interval: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub http2_keepalive_timeout: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_streams: Option<u64>,
    #[serde(default)]
    pub http2_initial_stream_window_size: Option<ByteSize>,
    #[serde(default)]
    pub http2_initial_connection_window_size: Option<ByteSize>,
    #[serde(default)]
    pub http2_adaptive_window: Option<bool>,
    #[serde(default)]
    pub http2_max_frame_size: Option<ByteSize>,
    #[serde(default)]
    pub http2_max_header_list_size: Option<ByteSize>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub http2_max_pending_accept_reset_streams: Option<u64>,
    #[serde(default)]
    pub tcp_nodelay: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: String,
    pub key_file: String,
    /// CA used to verify client certificates (mTLS).
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub client_ca_file: Option<String>,
    #[serde(default)]
    pub client_crl_file: Option<String>,
    /// Require a client certificate signed by `ca_file`.
    #[serde(default)]
    pub verify_client: bool,
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
    #[serde(default)]
    pub admin: Option<serde_json::Value>,
    #[serde(default)]
    pub fetch: Option<serde_json::Value>,
    #[serde(default)]
    pub push: Option<serde_json::Value>,
    #[serde(default)]
    pub experimental_bep: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasService {
    #[serde(default)]
    pub instance_name: String,
    pub cas_store: String,
}
instance_entry!(CasService);

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
    #[serde(default, deserialize_with = "num::opt_u64")]
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
    #[serde(default, deserialize_with = "num::opt_u64")]
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
