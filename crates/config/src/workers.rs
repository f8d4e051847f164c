//! `workers` (built in a later issue; the keys parse now).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::num;
use crate::stores::StoreSpec;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerSpec {
    Local(LocalWorker),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorker {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub worker_api_endpoint: Option<Endpoint>,
    /// Short form of `worker_api_endpoint.uri` (the troubleshooting guide's key).
    #[serde(default)]
    pub scheduler_endpoint: Option<String>,
    #[serde(default)]
    pub cas_fast_slow_store: Option<String>,
    #[serde(default)]
    pub upload_action_result: Option<serde_json::Value>,
    #[serde(default)]
    pub work_directory: Option<String>,
    #[serde(default)]
    pub platform_properties: BTreeMap<String, PropertyValue>,
    /// Concurrent actions (default: CPU count).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_inflight_tasks: Option<u64>,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_action_timeout: Option<u64>,
    #[serde(default)]
    pub timeout_handled_externally: bool,
    #[serde(default)]
    pub entrypoint: Option<String>,
    #[serde(default)]
    pub additional_environment: Option<serde_json::Value>,
    #[serde(default)]
    pub stores: Option<Vec<StoreSpec>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `grpc://host:port`, or `grpcs://host:port` for TLS with `tls_config`.
    pub uri: String,
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub tls_config: Option<crate::servers::ClientTlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PropertyValue {
    Values(Vec<String>),
    QueryCmd(String),
}
