//! Local workers from `workers: [{local: {...}}]` (or the short `worker: {...}`): [`check`]
//! every key (the one check `cairn run` and `cairn check-config` share), resolve the scheduler
//! endpoint, the CAS (a `fast_slow` whose fast tier is a filesystem store is used for copying
//! inputs), the AC and historical store for results, platform properties (static or from a
//! `query_cmd`) and slots, then run the worker session until shutdown. A worker whose
//! endpoint is a worker API listener of this same process talks to that scheduler through
//! in-memory streams (the same messages, without two gRPC hops per action).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use cairn_config::workers::{EnvironmentSource, LocalWorker, PropertyValue, UploadStrategy};
use cairn_server::execution::ExecutionPipeline;
use cairn_store::StoreTree;
use cairn_worker::session::{run_worker, SchedulerLink, WorkerIdentity};
use cairn_worker::{ActionRunner, MessageTemplate, RunnerConfig};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// `worker_api_endpoint.timeout` when unset (NativeLink's default).
const DEFAULT_ENDPOINT_TIMEOUT: Duration = Duration::from_secs(5);
/// `max_action_timeout` when unset or 0 (NativeLink's default).
const DEFAULT_MAX_ACTION_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// `workers[index].local`, checked: every key is honoured as below or refused here, with its
/// key path. `cairn run` (through [`start`]) and `cairn check-config` call this same function.
pub struct CheckedWorker {
    /// The worker API address (its endpoint is made again for each connection).
    pub address: String,
    pub cas_store: String,
    pub ac_store: Option<String>,
    pub historical_store: Option<String>,
    /// What the runner is told (work root and name aside).
    pub runner: RunnerConfig,
    pub slots: u32,
}

/// Checks `workers[index].local` of `file`; `has_store` says whether a store of that name is
/// declared.
pub fn check(
    file: &str,
    index: usize,
    cfg: &LocalWorker,
    has_store: &dyn Fn(&str) -> bool,
) -> anyhow::Result<CheckedWorker> {
    let at = format!("{file}: workers[{index}].local");
    let (address, _) = scheduler_endpoint(file, index, cfg)?;
    if cfg.stores.is_some() {
        bail!(
            "{at}.stores: not a key of a NativeLink 1.6.6 local worker; declare stores in the \
             top-level `stores` and name them in cas_fast_slow_store and upload_action_result"
        );
    }
    let namespaces = match (cfg.use_namespaces, cfg.use_mount_namespace) {
        (Some(true), mount) => cairn_worker::Namespaces::Isolated {
            mount: mount == Some(true),
        },
        (_, Some(true)) => bail!(
            "{at}.use_mount_namespace: a mount namespace needs use_namespaces: true (the mount \
             namespace belongs to the action's user namespace)"
        ),
        _ => cairn_worker::Namespaces::None,
    };
    let store = |name: &str, key: &str| -> anyhow::Result<String> {
        if has_store(name) {
            Ok(name.to_string())
        } else {
            Err(anyhow!("{at}.{key}: no store named {name:?}"))
        }
    };
    let cas_store = cfg.cas_fast_slow_store.as_deref().ok_or_else(|| {
        anyhow!("{at}.cas_fast_slow_store: name the store the worker reads inputs from and writes outputs to")
    })?;
    let cas_store = store(cas_store, "cas_fast_slow_store")?;

    let mut rc = RunnerConfig::new(PathBuf::new());
    let upload = cfg.upload_action_result.clone().unwrap_or_default();
    let ac_store = upload
        .ac_store
        .as_deref()
        .map(|n| store(n, "upload_action_result.ac_store"))
        .transpose()?;
    let historical_store = upload
        .historical_results_store
        .as_deref()
        .map(|n| store(n, "upload_action_result.historical_results_store"))
        .transpose()?;
    match upload.upload_ac_results_strategy {
        Some(s) if s != UploadStrategy::Never && ac_store.is_none() => bail!(
            "{at}.upload_action_result.upload_ac_results_strategy: {s:?} needs \
             upload_action_result.ac_store, the action cache to upload to"
        ),
        Some(s) => rc.ac_strategy = s,
        None => {}
    }
    if let Some(s) = upload.upload_historical_results_strategy {
        rc.historical_strategy = s;
    }
    for (key, text, slot) in [
        (
            "success_message_template",
            &upload.success_message_template,
            &mut rc.success_message,
        ),
        (
            "failure_message_template",
            &upload.failure_message_template,
            &mut rc.failure_message,
        ),
    ] {
        *slot = MessageTemplate::parse(text)
            .map_err(|e| anyhow!("{at}.upload_action_result.{key}: {e}"))?;
    }

    // NativeLink: an action that asks for no timeout gets the maximum.
    rc.max_timeout = match cfg.max_action_timeout {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => DEFAULT_MAX_ACTION_TIMEOUT,
    };
    rc.default_timeout = rc.max_timeout;
    rc.timeout_handled_externally = cfg.timeout_handled_externally;
    rc.namespaces = namespaces;
    if let Some(s) = cfg.max_upload_timeout_s.filter(|s| *s > 0) {
        rc.upload_timeout = Duration::from_secs(s);
    }
    if let Some(s) = cfg.max_cleanup_wait_s.filter(|s| *s > 0) {
        rc.cleanup.wait = Duration::from_secs(s);
    }
    if let Some(ms) = cfg.max_cleanup_backoff_ms.filter(|ms| *ms > 0) {
        rc.cleanup.max_backoff = Duration::from_millis(ms);
    }
    if let Some(dc) = &cfg.directory_cache {
        if dc.max_concurrent_fetches == Some(0) {
            bail!("{at}.directory_cache.max_concurrent_fetches: expected a number above 0");
        }
        // The root is settled where the work directory is known (`start`).
        rc.directory_cache = Some(cairn_worker::DirectoryCacheConfig {
            root: dc.cache_root.clone().map(PathBuf::from).unwrap_or_default(),
            max_entries: dc.max_entries.filter(|n| *n > 0).unwrap_or(1000) as usize,
            max_bytes: dc.max_size_bytes.map_or(10 << 30, |b| b.get()),
            max_concurrent_fetches: dc.max_concurrent_fetches.unwrap_or(64) as usize,
        });
    }
    if let Some(script) = &cfg.experimental_precondition_script {
        let argv = shlex::split(script)
            .filter(|a| !a.is_empty() && !a.iter().any(|w| w.contains('\0')))
            .ok_or_else(|| {
                anyhow!(
                    "{at}.experimental_precondition_script: {script:?} is not a command line \
                     (unbalanced quotes, or empty)"
                )
            })?;
        rc.precondition = Some(argv);
    }
    if let Some(e) = &cfg.entrypoint {
        rc.entrypoint = e.split_whitespace().map(str::to_string).collect();
    }
    for (name, source) in cfg.additional_environment.iter().flatten() {
        if name.is_empty() || name.contains(['=', '\0']) {
            bail!("{at}.additional_environment.{name}: not a valid variable name");
        }
        if let EnvironmentSource::Value(v) = source {
            if v.contains('\0') {
                bail!("{at}.additional_environment.{name}.value: contains a NUL byte");
            }
        }
        rc.additional_environment
            .push((name.clone(), source.clone()));
    }
    if let Some(n) = cfg.max_output_files {
        rc.max_output_files = n;
    }
    if let Some(b) = cfg.max_output_bytes {
        rc.max_output_bytes = b.get();
    }
    let slots = match cfg.max_inflight_tasks {
        Some(n) if n > 0 => n.min(u32::MAX as u64) as u32,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    Ok(CheckedWorker {
        address,
        cas_store,
        ac_store,
        historical_store,
        runner: rc,
        slots,
    })
}

/// The worker API address of `workers[index]` and its endpoint (TLS files read and checked,
/// `worker_api_endpoint.timeout` as its connect and call timeout).
pub fn scheduler_endpoint(
    file: &str,
    index: usize,
    cfg: &LocalWorker,
) -> anyhow::Result<(String, tonic::transport::Endpoint)> {
    let at = format!("workers[{index}].local");
    let address = cfg
        .worker_api_endpoint
        .as_ref()
        .map(|e| e.uri.clone())
        .or_else(|| cfg.scheduler_endpoint.clone())
        .ok_or_else(|| {
            anyhow!("{file}: {at}: worker_api_endpoint.uri (or scheduler_endpoint) is required")
        })?;
    let tls = cfg
        .worker_api_endpoint
        .as_ref()
        .and_then(|e| e.tls_config.as_ref());
    let timeout = match cfg.worker_api_endpoint.as_ref().and_then(|e| e.timeout) {
        None => DEFAULT_ENDPOINT_TIMEOUT,
        Some(s) => Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                anyhow!("{file}: {at}.worker_api_endpoint.timeout: {s} is not a positive number of seconds")
            })?,
    };
    let endpoint =
        cairn_store::channel::endpoint(&address, tls, &format!("{at}.worker_api_endpoint"))
            .map_err(|e| anyhow!("{file}: {e}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
    Ok((address, endpoint))
}

/// Starts one local worker; returns its task. `worker_apis` are this process's worker API
/// listeners and their schedulers.
pub async fn start(
    file: &str,
    index: usize,
    cfg: &LocalWorker,
    tree: &StoreTree,
    worker_apis: &[(SocketAddr, ExecutionPipeline)],
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let at = format!("{file}: workers[{index}].local");
    let checked = check(file, index, cfg, &|n| tree.stores.contains_key(n))?;
    let grpc_endpoint: cairn_worker::session::MakeEndpoint = {
        let (file, cfg) = (file.to_string(), cfg.clone());
        Arc::new(move || {
            scheduler_endpoint(&file, index, &cfg)
                .map(|(_, e)| e)
                .map_err(|e| cairn_core::Error::invalid_argument(e.to_string()))
        })
    };
    // `check` found each store named in `tree`.
    let store = |name: &str| {
        tree.stores
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{at}: no store named {name:?}"))
    };
    let cas_name = checked.cas_store.as_str();
    let whole = store(cas_name)?;
    let fast_fs = tree
        .filesystems
        .get(&format!("stores.{cas_name}.fast_slow.fast.filesystem"))
        .cloned();
    let slow = tree
        .nodes
        .get(&format!("stores.{cas_name}.fast_slow.slow"))
        .cloned();
    // fast_slow(filesystem, X): inputs are copied from the filesystem; reads and uploads go
    // through the whole store, as NativeLink's worker does (with X a `noop`, the filesystem is
    // the only copy).
    let (cas, local_files, fast_tier) = match (fast_fs, slow) {
        (Some(fs), Some(_)) => (whole, Some(fs), true),
        _ => (whole, None, false),
    };
    let ac = checked.ac_store.as_deref().map(store).transpose()?;
    let work_root = PathBuf::from(cfg.work_directory.clone().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("cairn-work")
            .display()
            .to_string()
    }));
    let name = cfg.name.clone().unwrap_or_else(|| format!("local-{index}"));
    let slots = checked.slots;
    let mut rc = checked.runner;
    if rc.namespaces != cairn_worker::Namespaces::None {
        let key = match rc.namespaces {
            cairn_worker::Namespaces::Isolated { mount: true } => "use_mount_namespace",
            _ => "use_namespaces",
        };
        cairn_worker::probe_namespaces(rc.namespaces)
            .await
            .map_err(|e| {
                anyhow!(
                    "{at}.{key}: this machine cannot run actions in new Linux namespaces: {e} \
                     (a container needs the privilege to make user namespaces; \
                     sysctl user.max_user_namespaces must be above 0)"
                )
            })?;
    }
    if let Some(dc) = rc.directory_cache.as_mut() {
        if dc.root.as_os_str().is_empty() {
            // NativeLink's default: beside the work directory.
            dc.root = work_root.parent().map_or_else(
                || PathBuf::from("directory_cache"),
                |p| p.join("directory_cache"),
            );
        }
        if dc.root.starts_with(&work_root) {
            bail!(
                "{at}.directory_cache.cache_root: {} is inside work_directory {}, which is emptied at start; put it beside",
                dc.root.display(),
                work_root.display()
            );
        }
        let flags = cfg.directory_cache.as_ref();
        for (key, on) in [
            (
                "experimental_subtree_caching",
                flags.is_some_and(|d| d.experimental_subtree_caching),
            ),
            (
                "experimental_get_tree_prefetch",
                flags.is_some_and(|d| d.experimental_get_tree_prefetch),
            ),
        ] {
            if on {
                tracing::warn!("{at}.directory_cache.{key}: accepted; Cairn keeps whole input roots and reads Directory messages from the worker's own store, so it changes nothing");
            }
        }
    }
    rc.work_root = work_root.clone();
    rc.worker_name = name.clone();
    // A directory ready for each slot (at most 16): a run never waits for a mkdir.
    rc.dirs_ahead = slots.min(16) as usize;
    let mut runner = ActionRunner::new(cas, ac, local_files, rc);
    if fast_tier {
        runner = runner.with_local_fast_tier();
    }
    if let Some(h) = &checked.historical_store {
        runner = runner.with_historical_store(store(h)?);
    }
    let runner = runner
        .open_directory_cache()
        .await
        .map_err(|e| anyhow!("{at}.directory_cache: {e}"))?;
    let runner = Arc::new(runner);
    runner
        .clean_work_root()
        .await
        .map_err(|e| anyhow!("{at}.work_directory {}: {e}", work_root.display()))?;
    let mut properties = Vec::new();
    for (prop, value) in &cfg.platform_properties {
        match value {
            PropertyValue::Values(vs) => {
                properties.extend(vs.iter().map(|v| (prop.clone(), v.clone())))
            }
            PropertyValue::QueryCmd(cmd) => {
                let out = tokio::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(cmd)
                    .output()
                    .await
                    .with_context(|| {
                        format!("{at}.platform_properties.{prop}.query_cmd: running {cmd:?}")
                    })?;
                if !out.status.success() {
                    bail!(
                        "{at}.platform_properties.{prop}.query_cmd: {cmd:?} exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let v = line.trim();
                    if !v.is_empty() {
                        properties.push((prop.clone(), v.to_string()));
                    }
                }
            }
        }
    }
    let identity = WorkerIdentity {
        name,
        properties,
        slots,
    };
    let link = link(checked.address, grpc_endpoint, worker_apis);
    tracing::info!(worker = %identity.name, scheduler = %link, slots, "starting local worker");
    Ok(tokio::spawn(run_worker(link, identity, runner, shutdown)))
}

/// In memory when `endpoint` (`grpc://host:port`) is one of `worker_apis`, else gRPC.
fn link(
    endpoint: String,
    grpc_endpoint: cairn_worker::session::MakeEndpoint,
    worker_apis: &[(SocketAddr, ExecutionPipeline)],
) -> SchedulerLink {
    let addr = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, rest)| rest)
        .trim_end_matches('/')
        .parse::<SocketAddr>();
    let Some((_, pipeline)) = worker_apis.iter().find(|(a, _)| Ok(*a) == addr) else {
        return SchedulerLink::Grpc {
            address: endpoint,
            endpoint: grpc_endpoint,
        };
    };
    let pipeline = pipeline.clone();
    SchedulerLink::InProcess {
        name: pipeline.name.clone(),
        open: Arc::new(move |outbound| {
            let pipeline = pipeline.clone();
            Box::pin(cairn_server::execution::worker_api::open_session(
                pipeline,
                outbound.map(Ok).boxed(),
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn the_endpoint_timeout_bounds_a_call_to_a_silent_scheduler() {
        // The kernel accepts the connection; nobody ever answers on it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let text =
            format!(r#"{{ worker_api_endpoint: {{ uri: "grpc://{addr}", timeout: 0.3 }} }}"#);
        let cfg: LocalWorker = cairn_config::parse_as("t.json5", &text).unwrap();
        let (_, endpoint) = scheduler_endpoint("t.json5", 0, &cfg).unwrap();
        let started = Instant::now();
        let call = async {
            let channel = endpoint.connect().await?;
            let request =
                http::Request::post(format!("http://{addr}/cairn.worker.v1.WorkerApi/Session"))
                    .header("content-type", "application/grpc")
                    .body(tonic::body::Body::empty())?;
            tower::ServiceExt::oneshot(channel, request).await?;
            anyhow::Ok(())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(matches!(outcome, Ok(Err(_))), "the call was not cut short");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
