//! `schedulers` (built in a later issue; every key of the troubleshooting guide parses now).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::num;
use crate::stores::StoreSpec;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SchedulerSpec {
    Simple(SimpleScheduler),
    CacheLookup(Box<CacheLookupScheduler>),
    PropertyModifier(Box<PropertyModifierScheduler>),
    /// Raises the CPU and memory minimums of actions that history says need more
    /// (NativeLink's `historical_resource`).
    HistoricalResource(Box<HistoricalResourceScheduler>),
    Grpc(GrpcScheduler),
}

impl SchedulerSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            SchedulerSpec::Simple(_) => "simple",
            SchedulerSpec::CacheLookup(_) => "cache_lookup",
            SchedulerSpec::PropertyModifier(_) => "property_modifier",
            SchedulerSpec::HistoricalResource(_) => "historical_resource",
            SchedulerSpec::Grpc(_) => "grpc",
        }
    }
}

/// How a platform property of an action matches a worker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertyType {
    Exact,
    Minimum,
    Priority,
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AllocationStrategy {
    #[default]
    LeastRecentlyUsed,
    MostRecentlyUsed,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleScheduler {
    #[serde(default)]
    pub supported_platform_properties: BTreeMap<String, PropertyType>,
    /// Seconds completed operations stay for WaitExecution.
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub retain_completed_for_s: Option<u64>,
    /// A worker without keepalive this long is removed (default 5).
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub worker_timeout_s: Option<u64>,
    /// An action whose clients all stopped listening this long is dropped.
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub client_action_timeout_s: Option<u64>,
    /// A running action past this is re-queued.
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub max_action_executing_timeout_s: Option<u64>,
    /// Retries before the client gets the last error (default 3).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_job_retries: Option<u64>,
    #[serde(default)]
    pub allocation_strategy: AllocationStrategy,
    /// Seconds an action that no worker can run waits before FAILED_PRECONDITION (Cairn).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub unschedulable_grace_period_s: Option<u64>,
    /// Where operations and the queue live: `"memory"` (this process, the default) or
    /// `{redis: {redis_store: "NAME"}}` (shared by every replica pointing at that store).
    #[serde(default)]
    pub experimental_backend: Option<SchedulerBackend>,
    /// Seconds between log lines that say why queued actions wait (default 10; -1 turns
    /// them off).
    #[serde(default, deserialize_with = "num::opt_f64")]
    pub worker_match_logging_interval_s: Option<f64>,
    /// Seconds between matching passes run whatever happened (NativeLink's safety net for
    /// missed notifications; default 5; 0 or less turns it off).
    #[serde(default, deserialize_with = "num::opt_f64")]
    pub fallback_match_interval_s: Option<f64>,
    /// A worker that has not answered a kill within this many seconds is removed and its
    /// other actions re-queued (default 60; 0 means the default).
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub unacknowledged_kill_timeout_s: Option<u64>,
}

/// `simple.experimental_backend` (NativeLink 1.6.6's externally tagged enum).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SchedulerBackend {
    /// Operations in this process's memory (the default).
    Memory,
    /// Operations, the queue and leases in Redis, shared by several scheduler replicas.
    Redis(RedisSchedulerBackend),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSchedulerBackend {
    /// The name of a top-level `redis_store` whose connection the scheduler uses.
    pub redis_store: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheLookupScheduler {
    /// The action cache: a store inline (`{ref_store: {name: "AC"}}`, ...) or, as NativeLink
    /// 1.6.6 writes it, the name of a top-level store (`"AC"`), which means the same as a
    /// `ref_store` of that name.
    #[serde(deserialize_with = "store_or_name")]
    pub ac_store: StoreSpec,
    pub scheduler: SchedulerSpec,
}

/// A store spec, or a store's name as a `ref_store` to it.
fn store_or_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreSpec, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(name) => {
            Ok(StoreSpec::RefStore(crate::stores::RefStore { name }))
        }
        other => StoreSpec::deserialize(other).map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyModifierScheduler {
    pub modifications: Vec<PropertyModification>,
    pub scheduler: SchedulerSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PropertyModification {
    Add(PropertyKv),
    Remove(String),
    /// Renames (and optionally revalues) a property: every value of `name` (only those equal
    /// to `value` when it is given) becomes `new_name`, with `new_value` when given.
    Replace(PropertyReplacement),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyReplacement {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    pub new_name: String,
    #[serde(default)]
    pub new_value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyKv {
    pub name: String,
    pub value: String,
}

/// `historical_resource`: hints read from a JSON file, matched to each action by the
/// `target_id` and `action_mnemonic` of its `RequestMetadata` (both, else `target_id`
/// alone, else the mnemonic alone), raise the action's CPU and memory platform properties to
/// at least the hint's before the wrapped scheduler sees them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoricalResourceScheduler {
    /// `[{target_id, action_mnemonic, cpu_count, memory_kb | memory_mib}, ...]`, or that list
    /// under `{hints: ...}`. A file that is missing or does not parse is logged and leaves the
    /// last hints in place (none at start).
    pub hints_file: String,
    /// Seconds between reloads of the file (0: read once). Default 30.
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub refresh_interval_s: Option<u64>,
    /// Property raised to the hint's `cpu_count`. Default `cpu_count`.
    #[serde(default)]
    pub cpu_property_name: Option<String>,
    /// Property (in KiB) raised to the hint's memory. Default `memory_kb`.
    #[serde(default)]
    pub memory_property_name: Option<String>,
    pub scheduler: SchedulerSpec,
}

/// `grpc`: forwards Execute, WaitExecution and the Operations calls to another scheduler.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcScheduler {
    /// The scheduler's address (`grpc://` or `grpcs://` with `tls_config`).
    pub endpoint: crate::stores::GrpcEndpoint,
    /// Retries of calls that failed before any answer arrived.
    #[serde(default)]
    pub retry: Option<crate::stores::Retry>,
    /// Forwarded calls in flight at most (0 or absent: no limit).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_requests: Option<u64>,
    /// Connections opened to the endpoint (calls go round-robin over them). Default 1.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub connections_per_endpoint: Option<u64>,
}
