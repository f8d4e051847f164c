//! Cairn's configuration file: JSON5 in the format of the NativeLink guides.
//!
//! Loading goes text -> JSON5 parse -> `${VAR}` / `${VAR:-default}` expansion in every string ->
//! typed deserialization with the key path tracked. Every error names the file, the key path
//! (`stores.CAS.filesystem.eviction_policy.max_bytes`) and what was expected. Types mirror the
//! file exactly and reject unknown keys.

mod expand;
mod named;
mod num;
pub mod schedulers;
pub mod servers;
pub mod stores;
pub mod workers;

use std::path::Path;

use serde::Deserialize;

pub use expand::expand_env;
pub use named::{InstanceMap, Named, NamedList};
pub use num::{parse_size, ByteSize};
pub use schedulers::SchedulerSpec;
pub use servers::ServerConfig;
pub use stores::StoreSpec;
pub use workers::WorkerSpec;

/// A configuration error: where (file and key path) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {where_}: {message}")]
pub struct ConfigError {
    pub file: String,
    /// The key path, or `line L column C` for syntax errors.
    pub where_: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &str, where_: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            where_: where_.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CairnConfig {
    /// Store trees, by name: a list of `{name, KIND: {...}}` or a map `{NAME: {KIND: {...}}}`.
    #[serde(default)]
    pub stores: NamedList<StoreSpec>,
    /// Schedulers, by name, in the same two forms as `stores`.
    #[serde(default)]
    pub schedulers: NamedList<SchedulerSpec>,
    /// Listeners and the services each serves.
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
    /// Workers run by this process.
    #[serde(default)]
    pub workers: Vec<WorkerSpec>,
    /// A single local worker, in the troubleshooting guide's short form `worker: {...}`.
    #[serde(default)]
    pub worker: Option<workers::LocalWorker>,
    #[serde(default)]
    pub global: Option<GlobalConfig>,
    /// Events about the requests this process serves, published to a store for an outside
    /// service to process (NativeLink's key).
    #[serde(default)]
    pub experimental_origin_events: Option<OriginEvents>,
}

/// `experimental_origin_events`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginEvents {
    pub publisher: OriginEventsPublisher,
    /// Events waiting to be stored; when it is full, requests wait for room (which slows
    /// every client). 0 or unset: 65536.
    #[serde(default, deserialize_with = "num::u64")]
    pub max_event_queue_size: u64,
}

impl OriginEvents {
    pub const DEFAULT_MAX_EVENT_QUEUE_SIZE: u64 = 65_536;

    /// `max_event_queue_size` with its default.
    pub fn queue_size(&self) -> u64 {
        if self.max_event_queue_size == 0 {
            Self::DEFAULT_MAX_EVENT_QUEUE_SIZE
        } else {
            self.max_event_queue_size
        }
    }
}

/// `experimental_origin_events.publisher`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginEventsPublisher {
    /// The store (by name) events are written to.
    pub store: String,
}

/// Process-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    /// Raise the process's open-file limit (RLIMIT_NOFILE) to this many at start-up.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_open_files: Option<u64>,
    /// Digest function assumed when a request does not name one and its hash has 64 hex
    /// digits (SHA-256 and BLAKE3 both do): `sha256` (default) or `blake3`.
    #[serde(default)]
    pub default_digest_hash_function: Option<DigestHashFunction>,
    /// When set, `/status` also writes a blob of this many bytes to each store and reads it
    /// back (the same bytes every time, so it is stored once); without it, `/status` asks each
    /// store for its health without writing.
    #[serde(default)]
    pub default_digest_size_health_check: Option<ByteSize>,
    /// Turn metrics off: no `/metrics` route and no OTLP metric export.
    #[serde(default)]
    pub disable_metrics: bool,
    /// Prefix of every metric name (default `nativelink`, so that the guides' queries work).
    #[serde(default)]
    pub metrics_prefix: Option<String>,
}

/// `global.default_digest_hash_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestHashFunction {
    Sha256,
    Blake3,
}

impl CairnConfig {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<CairnConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(&name, "file", format!("cannot read: {e}")))?;
        parse_str(&name, &text)
    }

    /// NativeLink's rule for `grpc.experimental_remote_cache_compression` left unset: when
    /// zstd is on anywhere in the file (a `capabilities` instance with
    /// `remote_cache_compression`, or a CAS `grpc` store with the key true), every CAS `grpc`
    /// store that does not say false uses it.
    fn apply_zstd_grpc_store_default(&mut self) {
        let is_cas = |g: &stores::GrpcStore| g.store_type.as_deref().unwrap_or("cas") == "cas";
        let mut on = self
            .servers
            .iter()
            .filter_map(|s| s.services.as_ref()?.capabilities.as_ref())
            .flat_map(|c| c.0.iter())
            .any(|c| c.remote_cache_compression);
        for n in self.stores.0.iter_mut() {
            n.spec.visit_grpc_mut(&mut |g| {
                on |= is_cas(g) && g.experimental_remote_cache_compression == Some(true)
            });
        }
        if !on {
            return;
        }
        for n in self.stores.0.iter_mut() {
            n.spec.visit_grpc_mut(&mut |g| {
                if is_cas(g) && g.experimental_remote_cache_compression.is_none() {
                    g.experimental_remote_cache_compression = Some(true);
                }
            });
        }
    }

    /// All local workers, whichever form they were written in.
    pub fn local_workers(&self) -> Vec<&workers::LocalWorker> {
        let mut out: Vec<&workers::LocalWorker> = self
            .workers
            .iter()
            .map(|w| match w {
                WorkerSpec::Local(l) => l,
            })
            .collect();
        out.extend(self.worker.as_ref());
        out
    }
}

/// Parses configuration text; `file` is used in error messages.
pub fn parse_str(file: &str, text: &str) -> Result<CairnConfig, ConfigError> {
    let mut cfg: CairnConfig = parse_as(file, text)?;
    cfg.apply_zstd_grpc_store_default();
    Ok(cfg)
}

/// Parses any config fragment type (used by tests and by `check-config` for parts).
pub fn parse_as<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let mut value: serde_json::Value = json5::from_str(text).map_err(|e| {
        let where_ = match e.position() {
            Some(p) => format!("line {} column {}", p.line + 1, p.column + 1),
            None => "syntax".to_string(),
        };
        ConfigError::new(file, where_, format!("invalid JSON5: {e}"))
    })?;
    expand::expand_value(&mut value, &mut Vec::new())
        .map_err(|(path, msg)| ConfigError::new(file, path, msg))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let mut path = if path == "." {
            "top level".to_string()
        } else {
            path
        };
        let mut message = e.into_inner().to_string();
        // A list entry reports its own inner path: `stores[0]` + `CAS.memory.x` becomes
        // `stores.CAS.memory.x`.
        let mut parts = message.splitn(3, named::SPLICE);
        if let (Some(""), Some(inner), Some(rest)) = (parts.next(), parts.next(), parts.next()) {
            if let Some(i) = path.rfind('[') {
                path.truncate(i);
            }
            path = format!("{path}.{inner}");
            message = rest.to_string();
        }
        ConfigError::new(file, path, message)
    })
}

#[cfg(test)]
mod tests;
