//! Local workers from `workers: [{local: {...}}]` (or the short `worker: {...}`): resolve the
//! scheduler endpoint, the CAS (a `fast_slow` whose fast tier is a filesystem store is used
//! for hardlinking inputs), the AC for results, platform properties (static or from a
//! `query_cmd`) and slots, then run the worker session until shutdown. A worker whose
//! endpoint is a worker API listener of this same process talks to that scheduler through
//! in-memory streams (the same messages, without two gRPC hops per action).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use cairn_config::workers::{LocalWorker, PropertyValue};
use cairn_server::execution::ExecutionPipeline;
use cairn_store::StoreTree;
use cairn_worker::session::{run_worker, SchedulerLink, WorkerIdentity};
use cairn_worker::{ActionRunner, RunnerConfig};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// The worker API address of `workers[index]` and its endpoint (TLS files read and checked).
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
    let endpoint =
        cairn_store::channel::endpoint(&address, tls, &format!("{at}.worker_api_endpoint"))
            .map_err(|e| anyhow!("{file}: {e}"))?;
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
    let (endpoint, _) = scheduler_endpoint(file, index, cfg)?;
    let grpc_endpoint: cairn_worker::session::MakeEndpoint = {
        let (file, cfg) = (file.to_string(), cfg.clone());
        Arc::new(move || {
            scheduler_endpoint(&file, index, &cfg)
                .map(|(_, e)| e)
                .map_err(|e| cairn_core::Error::invalid_argument(e.to_string()))
        })
    };
    let cas_name = cfg
        .cas_fast_slow_store
        .as_deref()
        .ok_or_else(|| anyhow!("{at}.cas_fast_slow_store: name the store the worker reads inputs from and writes outputs to"))?;
    let whole = tree
        .stores
        .get(cas_name)
        .cloned()
        .ok_or_else(|| anyhow!("{at}.cas_fast_slow_store: no store named {cas_name:?}"))?;
    // fast_slow(filesystem, X): hardlink from the filesystem, fetch from and upload to X.
    let fast_fs = tree
        .filesystems
        .get(&format!("stores.{cas_name}.fast_slow.fast.filesystem"))
        .cloned();
    let slow = tree
        .nodes
        .get(&format!("stores.{cas_name}.fast_slow.slow"))
        .cloned();
    let (cas, local_files) = match (fast_fs, slow) {
        (Some(fs), Some(slow)) => (slow, Some(fs)),
        _ => (whole, None),
    };
    let ac = match cfg
        .upload_action_result
        .as_ref()
        .and_then(|v| v.get("ac_store"))
        .and_then(|v| v.as_str())
    {
        Some(name) => Some(tree.stores.get(name).cloned().ok_or_else(|| {
            anyhow!("{at}.upload_action_result.ac_store: no store named {name:?}")
        })?),
        None => None,
    };
    let work_root = PathBuf::from(cfg.work_directory.clone().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("cairn-work")
            .display()
            .to_string()
    }));
    let name = cfg.name.clone().unwrap_or_else(|| format!("local-{index}"));
    let slots = match cfg.max_inflight_tasks {
        Some(n) if n > 0 => n.min(u32::MAX as u64) as u32,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let mut rc = RunnerConfig::new(work_root.clone());
    rc.worker_name = name.clone();
    // A directory ready for each slot (at most 16): a run never waits for a mkdir.
    rc.dirs_ahead = slots.min(16) as usize;
    if let Some(t) = cfg.max_action_timeout {
        rc.max_timeout = Duration::from_secs(t);
        rc.default_timeout = rc.default_timeout.min(rc.max_timeout);
    }
    let runner = Arc::new(ActionRunner::new(cas, ac, local_files, rc));
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
    let link = link(endpoint, grpc_endpoint, worker_apis);
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
