//! `workers`: local workers run by this process, with NativeLink 1.6.6's `LocalWorkerConfig`
//! keys (the ones Cairn knows; any other key is refused by the parser) and two Cairn keys,
//! `max_output_files` and `max_output_bytes`. What each key does: `docs/operations.md`,
//! "Worker keys".

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::num::{self, ByteSize};
use crate::stores::StoreSpec;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerSpec {
    Local(LocalWorker),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorker {
    /// Name in logs and `ExecutedActionMetadata.worker`. Default: `local-<index>`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub worker_api_endpoint: Option<Endpoint>,
    /// Short form of `worker_api_endpoint.uri` (the troubleshooting guide's key).
    #[serde(default)]
    pub scheduler_endpoint: Option<String>,
    #[serde(default)]
    pub cas_fast_slow_store: Option<String>,
    /// Where results go. Default: no action cache writes; failures' `HistoricalExecuteResponse`s
    /// to the worker's CAS.
    #[serde(default)]
    pub upload_action_result: Option<UploadActionResult>,
    #[serde(default)]
    pub work_directory: Option<String>,
    #[serde(default)]
    pub platform_properties: BTreeMap<String, PropertyValue>,
    /// Concurrent actions (default, and 0: the CPU count).
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_inflight_tasks: Option<u64>,
    /// Seconds: the largest timeout an action may ask for, and the timeout of an action that
    /// asks for none (NativeLink's meaning). Default (and 0): 1200. NativeLink 1.6.6 spells it
    /// `max_action_timeout_s`; both are accepted.
    #[serde(
        default,
        alias = "max_action_timeout_s",
        deserialize_with = "num::opt_secs"
    )]
    pub max_action_timeout: Option<u64>,
    /// Seconds the upload of an action's outputs may take; past it the attempt fails with
    /// DEADLINE_EXCEEDED and the scheduler retries the action (within `max_job_retries`).
    /// Default (and 0): 600. `max_upload_timeout` is accepted too.
    #[serde(
        default,
        alias = "max_upload_timeout",
        deserialize_with = "num::opt_secs"
    )]
    pub max_upload_timeout_s: Option<u64>,
    /// Seconds the removal of a finished action's directory is retried for before it is left
    /// (and logged). Default (and 0): 30.
    #[serde(default, deserialize_with = "num::opt_secs")]
    pub max_cleanup_wait_s: Option<u64>,
    /// Longest pause between two removal attempts (they back off exponentially from 10 ms).
    /// Default (and 0): 500.
    #[serde(default, deserialize_with = "num::opt_millis")]
    pub max_cleanup_backoff_ms: Option<u64>,
    /// A program (split as a shell would, run without one) run before each action; any exit
    /// other than 0 gives the action back to the scheduler with RESOURCE_EXHAUSTED (it is
    /// retried, within `max_job_retries`), so that a worker short of a resource takes no
    /// work. It gets `additional_environment`'s property, value and from_environment
    /// variables. Default: none.
    #[serde(default)]
    pub experimental_precondition_script: Option<String>,
    /// Cache of materialized input roots (NativeLink's `directory_cache`): an action whose
    /// input root was seen before gets a copy of it. Default: none.
    #[serde(default)]
    pub directory_cache: Option<DirectoryCache>,
    /// NativeLink's: keep inputs from being evicted from the worker's filesystem tier while an
    /// action prepares them. Cairn's inputs are copies made from an open file of the local
    /// store, so an eviction during preparation never takes an input away: `true` and `false`
    /// behave alike.
    #[serde(default)]
    pub experimental_active_input_leases: bool,
    /// The entrypoint (or another wrapper) enforces the action's timeout: the worker kills the
    /// command only at `max_action_timeout`. Default false.
    #[serde(default)]
    pub timeout_handled_externally: bool,
    /// A program (and arguments, separated by whitespace; no shell) that every command is run
    /// through: the command's argv is appended to it. Default: none.
    #[serde(default)]
    pub entrypoint: Option<String>,
    /// Variables set in each command's environment, before the Command's own (which win).
    #[serde(default)]
    pub additional_environment: Option<BTreeMap<String, EnvironmentSource>>,
    /// Not a key of NativeLink 1.6.6's `LocalWorkerConfig`: parsed so that the message can say
    /// where stores belong, and refused at start.
    #[serde(default)]
    pub stores: Option<Vec<StoreSpec>>,
    /// NativeLink's: each action runs in new user, PID, IPC and UTS namespaces (process 1 of
    /// its own PID namespace: what it leaves running dies with it). The worker refuses to start
    /// when the machine cannot make them. Default false.
    #[serde(default)]
    pub use_namespaces: Option<bool>,
    /// NativeLink's: also a mount namespace (needs `use_namespaces: true`): the action's mounts
    /// are private and `/proc` shows its own processes only. Default false.
    #[serde(default)]
    pub use_mount_namespace: Option<bool>,
    /// Cairn: most files, directories and symlinks one action may output. Default 1,000,000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_output_files: Option<u64>,
    /// Cairn: most bytes one action's output files may add up to (stdout and stderr apart).
    /// Default 64 GiB.
    #[serde(default)]
    pub max_output_bytes: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `grpc://host:port`, or `grpcs://host:port` for TLS with `tls_config`.
    pub uri: String,
    /// Seconds (fractions allowed) to connect, and for a call to be answered. Default 5.
    #[serde(default, deserialize_with = "num::opt_f64")]
    pub timeout: Option<f64>,
    #[serde(default)]
    pub tls_config: Option<crate::servers::ClientTlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PropertyValue {
    Values(Vec<String>),
    QueryCmd(String),
}

/// Where the value of an `additional_environment` variable comes from. Written
/// `{"property": "cpu_count"}`, `{"value": "x"}`, or a bare name for the others
/// (`"timeout_millis"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EnvironmentSource {
    /// The value of the action's platform property of this name (empty when it has none).
    Property(String),
    /// This text.
    Value(String),
    /// The worker process's own variable of the same name (empty when unset).
    FromEnvironment,
    /// The action's timeout in milliseconds (`max_action_timeout` when it asks for none).
    TimeoutMillis,
    /// A path the command may write JSON to; `{"failure": "timeout"}` makes the action a
    /// timeout (DEADLINE_EXCEEDED).
    SideChannelFile,
    /// A scratch directory of the action's own, removed with it.
    ActionDirectory,
}

/// `workers[].local.directory_cache`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryCache {
    /// Input roots kept at most. Default (and 0): 1000.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_entries: Option<u64>,
    /// Bytes the kept roots may add up to (0: no limit). Default 10 GiB.
    #[serde(default)]
    pub max_size_bytes: Option<ByteSize>,
    /// Where the roots are kept, on the file system of `work_directory`. Default:
    /// `directory_cache` beside `work_directory`.
    #[serde(default)]
    pub cache_root: Option<String>,
    /// Also keep each subdirectory by its own digest.
    #[serde(default)]
    pub experimental_subtree_caching: bool,
    /// Concurrent blob fetches of all materializations. Default (and 0): 64.
    #[serde(default, deserialize_with = "num::opt_u64")]
    pub max_concurrent_fetches: Option<u64>,
    /// Fetch a missing tree's Directory messages with one GetTree (a `grpc` CAS only).
    #[serde(default)]
    pub experimental_get_tree_prefetch: bool,
}

/// `upload_action_result`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadActionResult {
    /// Action cache the worker writes results to. Default: none.
    #[serde(default)]
    pub ac_store: Option<String>,
    /// Which results go to `ac_store`. Default `success_only`.
    #[serde(default)]
    pub upload_ac_results_strategy: Option<UploadStrategy>,
    /// CAS that `HistoricalExecuteResponse`s go to. Default: the worker's CAS.
    #[serde(default)]
    pub historical_results_store: Option<String>,
    /// Which results go to `historical_results_store`. Default `failures_only`.
    #[serde(default)]
    pub upload_historical_results_strategy: Option<UploadStrategy>,
    /// `ExecuteResponse.message` of a successful action whose result was uploaded, with
    /// `{digest_function}`, `{action_digest_hash}`, `{action_digest_size}`,
    /// `{historical_results_hash}` and `{historical_results_size}` replaced. Default: none.
    #[serde(default)]
    pub success_message_template: String,
    /// The same for a failed action.
    #[serde(default)]
    pub failure_message_template: String,
}

/// Which results are uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadStrategy {
    SuccessOnly,
    Never,
    Everything,
    FailuresOnly,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_as;

    fn local(text: &str) -> LocalWorker {
        parse_as("t.json5", text).unwrap()
    }

    #[test]
    fn additional_environment_in_both_forms() {
        // NativeLink 1.6.6's basic_cas.json5, plus a property.
        let w = local(
            r#"{ additional_environment: {
                foo: "from_environment",
                bar: { value: "something" },
                baz: "timeout_millis",
                channel: "side_channel_file",
                action: "action_directory",
                cpus: { property: "cpu_count" },
            } }"#,
        );
        let env = w.additional_environment.unwrap();
        use EnvironmentSource::*;
        assert_eq!(env["foo"], FromEnvironment);
        assert_eq!(env["bar"], Value("something".into()));
        assert_eq!(env["baz"], TimeoutMillis);
        assert_eq!(env["channel"], SideChannelFile);
        assert_eq!(env["action"], ActionDirectory);
        assert_eq!(env["cpus"], Property("cpu_count".into()));
    }

    #[test]
    fn unknown_environment_sources_are_refused_with_their_path() {
        let e = parse_as::<LocalWorker>("t.json5", r#"{ additional_environment: { a: "cwd" } }"#)
            .unwrap_err();
        assert!(e.where_.contains("additional_environment.a"), "{e}");
        assert!(e.message.contains("timeout_millis"), "{e}");
        let e = parse_as::<LocalWorker>(
            "t.json5",
            r#"{ additional_environment: { a: { value: 3 } } }"#,
        )
        .unwrap_err();
        assert!(e.where_.contains("additional_environment.a"), "{e}");
    }

    #[test]
    fn upload_action_result_keys() {
        let w = local(
            r#"{ upload_action_result: {
                ac_store: "AC",
                upload_ac_results_strategy: "everything",
                historical_results_store: "CAS",
                upload_historical_results_strategy: "never",
                success_message_template: "ok {action_digest_hash}",
                failure_message_template: "https://x/{digest_function}/{historical_results_hash}-{historical_results_size}/",
            } }"#,
        );
        let u = w.upload_action_result.unwrap();
        assert_eq!(u.ac_store.as_deref(), Some("AC"));
        assert_eq!(
            u.upload_ac_results_strategy,
            Some(UploadStrategy::Everything)
        );
        assert_eq!(u.historical_results_store.as_deref(), Some("CAS"));
        assert_eq!(
            u.upload_historical_results_strategy,
            Some(UploadStrategy::Never)
        );
        assert_eq!(u.success_message_template, "ok {action_digest_hash}");
        for s in ["success_only", "failures_only"] {
            let text =
                format!("{{ upload_action_result: {{ upload_ac_results_strategy: {s:?} }} }}");
            assert!(local(&text).upload_action_result.is_some());
        }
        assert!(parse_as::<LocalWorker>(
            "t.json5",
            r#"{ upload_action_result: { upload_ac_results_strategy: "sometimes" } }"#
        )
        .is_err());
        assert!(parse_as::<LocalWorker>(
            "t.json5",
            r#"{ upload_action_result: { acstore: "AC" } }"#
        )
        .is_err());
    }

    #[test]
    fn timeouts_caps_and_entrypoint() {
        let w = local(
            r#"{
                worker_api_endpoint: { uri: "grpc://s:1", timeout: 0.5 },
                max_action_timeout_s: "30",
                timeout_handled_externally: true,
                entrypoint: "/usr/bin/env FOO=1",
                max_output_files: 10,
                max_output_bytes: "64GiB",
            }"#,
        );
        assert_eq!(w.worker_api_endpoint.unwrap().timeout, Some(0.5));
        assert_eq!(w.max_action_timeout, Some(30));
        assert!(w.timeout_handled_externally);
        assert_eq!(w.entrypoint.as_deref(), Some("/usr/bin/env FOO=1"));
        assert_eq!(w.max_output_files, Some(10));
        assert_eq!(w.max_output_bytes, Some(ByteSize(64 << 30)));
        assert_eq!(
            local("{ max_action_timeout: 7 }").max_action_timeout,
            Some(7)
        );
    }
}
