//! `cairn run`: stores, then listeners, in that order; SIGTERM or SIGINT stops accepting,
//! drains in-flight requests up to a deadline, and exits 0.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cairn_config::CairnConfig;
use cairn_server::{Limits, Metrics};
use tokio_util::sync::CancellationToken;

pub const DEFAULT_CONFIG: &str = include_str!("default.json5");

/// How long in-flight requests get to finish after a stop signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// How long stopping waits for the last OTLP export (an unreachable collector costs this much).
const OTLP_FLUSH_DEADLINE: Duration = Duration::from_secs(2);

pub fn main(config: Option<&Path>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Trace export (when the environment asks for it) runs on the runtime.
    let traces = {
        let _in_runtime = rt.enter();
        init_logging()
    };
    let loaded = match config {
        Some(p) => CairnConfig::load(p),
        None => cairn_config::parse_str("<built-in default config>", DEFAULT_CONFIG),
    };
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let file = config.map_or("<built-in default config>".to_string(), |p| {
        p.display().to_string()
    });
    if let Err(e) = crate::check::validate(&file, &cfg) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    for w in crate::check::warnings(&cfg) {
        tracing::warn!("{file}: {w}");
    }
    if let Some(n) = cfg.global.as_ref().and_then(|g| g.max_open_files) {
        match rlimit::increase_nofile_limit(n) {
            Ok(got) if got < n => tracing::warn!(
                wanted = n,
                got,
                "global.max_open_files: the hard limit is lower"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "global.max_open_files: could not raise the limit")
            }
        }
    }
    match rt.block_on(serve(&file, cfg, config.is_none(), traces)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `RUST_LOG` says and, when the `OTEL_*` variables ask for trace export,
/// spans to the collector (their own filter: Cairn's spans whatever `RUST_LOG` says). Call it
/// inside the runtime.
fn init_logging() -> Option<cairn_server::otlp::traces::TraceExport> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    match cairn_server::otlp::traces::layer() {
        Some((export, otel)) => {
            let _ = tracing_subscriber::registry()
                .with(fmt)
                .with(otel)
                .try_init();
            Some(export)
        }
        None => {
            let _ = tracing_subscriber::registry().with(fmt).try_init();
            None
        }
    }
}

async fn serve(
    file: &str,
    cfg: CairnConfig,
    is_default: bool,
    traces: Option<cairn_server::otlp::traces::TraceExport>,
) -> anyhow::Result<()> {
    // Refused worker keys stop the start before any store or listener is opened.
    for (i, w) in cfg.local_workers().into_iter().enumerate() {
        crate::workers::check(file, i, w, &|name| cfg.stores.get(name).is_some())?;
    }
    let tree = cairn_store::build_store_tree(&cfg.stores)
        .await
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let stores = tree.stores.clone();
    let prefix = cfg
        .global
        .as_ref()
        .and_then(|g| g.metrics_prefix.clone())
        .unwrap_or_else(|| "nativelink".to_string());
    let metrics = Metrics::with_prefix(&prefix);
    let global = cfg.global.clone().unwrap_or_default();
    {
        // `cache_metrics` stores count into the same metrics as everything else.
        let metrics = metrics.clone();
        cairn_store::cache_metrics::set_observer(std::sync::Arc::new(
            move |cache_type, op, result, seconds| {
                metrics.cache_op(cache_type, op, result, seconds)
            },
        ));
    }
    {
        // Leaf stores' backend requests (Redis, object storage) too.
        let metrics = metrics.clone();
        cairn_store::backend_metrics::set_observer(std::sync::Arc::new(move |event| {
            metrics.backend_event(event)
        }));
    }
    if global.disable_metrics {
        metrics.disable();
    }
    if let Some(f) = global.default_digest_hash_function {
        cairn_core::DigestFunction::set_default_for_64_hex(match f {
            cairn_config::DigestHashFunction::Sha256 => cairn_core::DigestFunction::Sha256,
            cairn_config::DigestHashFunction::Blake3 => cairn_core::DigestFunction::Blake3,
        });
    }
    let limits = Limits {
        health_probe_bytes: global.default_digest_size_health_check.map_or(0, |b| b.0),
        ..Limits::default()
    };
    let mut schedulers = std::collections::BTreeMap::new();
    for n in cfg.schedulers.iter() {
        let p = cairn_server::execution::pipeline::build(
            &n.name,
            &n.spec,
            &stores,
            format!("schedulers.{}", n.name),
            Some(metrics.clone()),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        schedulers.insert(n.name.clone(), p);
    }
    let shared: Vec<_> = schedulers
        .values()
        .filter_map(|p| match &p.backend {
            cairn_server::execution::Backend::Shared(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    // Installed before any listener starts: a stop signal sent as soon as a listener is
    // announced drains like any other, instead of killing the process.
    let mut stop = StopSignals::install().context("installing signal handlers")?;
    // Before the listeners: they record requests only if a publisher runs.
    let origin_events = match &cfg.experimental_origin_events {
        Some(o) => {
            let store = stores.get(&o.publisher.store).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "{file}: experimental_origin_events.publisher.store: no store named {:?}",
                    o.publisher.store
                )
            })?;
            Some(cairn_server::origin_events::start(store, o.queue_size())?)
        }
        None => None,
    };
    let shutdown = CancellationToken::new();
    let otlp = cairn_server::otlp::start(metrics.clone());
    let mut running = Vec::new();
    for (i, s) in cfg.servers.iter().enumerate() {
        let r = cairn_server::serve(
            i,
            s,
            &stores,
            &schedulers,
            metrics.clone(),
            limits,
            shutdown.clone(),
            DRAIN_DEADLINE,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        println!("cairn: server {:?} listening on {}", r.name, r.local_addr);
        running.push(r);
    }
    // Worker API listeners of this process: a local worker that dials one talks to its
    // scheduler in memory instead.
    let worker_apis: Vec<_> = cfg
        .servers
        .iter()
        .zip(&running)
        .filter_map(|(s, r)| {
            let name = &s.services.as_ref()?.worker_api.as_ref()?.scheduler;
            Some((r.local_addr, schedulers.get(name)?.clone()))
        })
        .collect();
    let worker_stop = CancellationToken::new();
    let mut workers = Vec::new();
    for (i, w) in cfg.local_workers().into_iter().enumerate() {
        let started = crate::workers::start(file, i, w, &tree, &worker_apis, worker_stop.clone());
        workers.push(started.await?);
    }
    if running.is_empty() && workers.is_empty() {
        anyhow::bail!("{file}: `servers` and `workers` are empty: nothing to run");
    }
    if let (true, Some(first)) = (is_default, running.first()) {
        let a = first.local_addr;
        println!(
            "cairn: data under {}",
            std::env::var("CAIRN_DATA").unwrap_or_else(|_| "./cairn-data".into())
        );
        println!("cairn: point Bazel at it with");
        println!("    bazel build --remote_executor=grpc://{a} //...   (remote execution)");
        println!("    bazel build --remote_cache=grpc://{a} //...      (cache only)");
        println!("cairn: health at http://{a}/status, metrics at http://{a}/metrics");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    stop.wait().await;
    tracing::info!("stop signal: no new connections; draining in-flight requests");
    // Shared schedulers claim no more work for this process's (draining) workers.
    for s in &shared {
        s.stop_claiming();
    }
    // Listeners stop accepting and local workers stop taking actions at once; running actions
    // finish (their Execute streams get the results) within the drain deadline.
    shutdown.cancel();
    worker_stop.cancel();
    let drain = async {
        for w in workers {
            let _ = w.await;
        }
        for r in running {
            let _ = r.task.await;
        }
    };
    if tokio::time::timeout(DRAIN_DEADLINE + Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; exiting with work still in flight");
    }
    // The web UI's record of the drained requests (when it is kept in a file).
    cairn_server::web_ui::activity_file::flush().await;
    if let Some(p) = origin_events {
        // The events of the drained requests.
        p.stop(OTLP_FLUSH_DEADLINE).await;
    }
    // The last metrics and the spans of the drained requests.
    if let Some(otlp) = otlp {
        otlp.stop(OTLP_FLUSH_DEADLINE).await;
    }
    if let Some(traces) = traces {
        traces.stop(OTLP_FLUSH_DEADLINE).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
