//! One listener: gRPC services and HTTP routes on one TCP port, HTTP/1 and HTTP/2 (h2c),
//! tuned by `advanced_http`, with graceful shutdown (stop accepting, drain in-flight requests
//! up to a deadline).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cairn_config::servers::{ServerConfig, Services};
use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::Error;
use cairn_store::StoreMap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;

use crate::ac::{AcInstance, AcService};
use crate::bytestream::ByteStreamService;
use crate::capabilities::{CapabilitiesService, InstanceCaps};
use crate::cas::CasService;
use crate::http::{self, HttpState};
use crate::instances::{store_named as lookup_store, Instances};
use crate::metered::MeteredStore;
use crate::metrics::Metrics;
use crate::Limits;

/// A listener that is accepting connections.
pub struct RunningServer {
    pub name: String,
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

fn unbuilt(path: &str, what: &str) -> Error {
    Error::unimplemented(format!(
        "{path}: {what} parses but is not built yet in this version of Cairn; remove it from the config to start"
    ))
}

/// Validates `servers[index]` and starts serving it.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    index: usize,
    cfg: &ServerConfig,
    stores: &StoreMap,
    schedulers: &std::collections::BTreeMap<String, crate::execution::ExecutionPipeline>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<RunningServer, Error> {
    let path = format!("servers[{index}]");
    let http_cfg = cfg.listener.http();
    if http_cfg.tls.is_some() {
        return Err(unbuilt(&format!("{path}.listener.http.tls"), "TLS"));
    }
    let services = cfg.services.clone().unwrap_or_default();
    let sp = format!("{path}.services");
    for (key, v) in [
        ("admin", &services.admin),
        ("fetch", &services.fetch),
        ("push", &services.push),
        ("experimental_bep", &services.experimental_bep),
    ] {
        if v.is_some() {
            return Err(unbuilt(&format!("{sp}.{key}"), key));
        }
    }
    let (send_zstd, accept) = compression(&path, http_cfg)?;
    let store_named = |name: &str, at: &str| -> Result<cairn_store::StoreRef, Error> {
        // `name` is the configured store name: bounded label cardinality.
        Ok(MeteredStore::wrap(
            name,
            lookup_store(stores, name, at)?,
            metrics.clone(),
        ))
    };

    let mut routes = tonic::service::Routes::builder();
    let Services {
        cas,
        ac,
        capabilities,
        bytestream,
        health,
        metrics: metrics_cfg,
        execution,
        worker_api,
        ..
    } = services;
    let scheduler_named = |name: &str, at: String| {
        schedulers.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = schedulers.keys().map(|s| s.as_str()).collect();
            Error::invalid_argument(format!(
                "{at}: no scheduler named {name:?} (schedulers are: {})",
                known.join(", ")
            ))
        })
    };
    let mut caps_by_instance: std::collections::BTreeMap<String, InstanceCaps> = Default::default();
    let mut used_stores: Vec<(String, cairn_store::StoreRef)> = Vec::new();
    let mut note_store = |name: &str, s: &cairn_store::StoreRef| {
        if !used_stores.iter().any(|(n, _)| n == name) {
            used_stores.push((name.to_string(), s.clone()));
        }
    };

    if let Some(cas) = cas {
        let mut inst = Instances::new("ContentAddressableStorage");
        for c in &cas.0 {
            let s = store_named(
                &c.cas_store,
                &format!("{sp}.cas.{}.cas_store", c.instance_name),
            )?;
            note_store(&c.cas_store, &s);
            inst.insert(c.instance_name.clone(), s);
            caps_by_instance
                .entry(c.instance_name.clone())
                .or_default()
                .cas = true;
        }
        let mut svc = re::content_addressable_storage_server::ContentAddressableStorageServer::new(
            CasService::new(inst, limits, metrics.clone()),
        )
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        for a in &accept {
            svc = svc.accept_compressed(*a);
        }
        if let Some(z) = send_zstd {
            svc = svc.send_compressed(z);
        }
        routes.add_service(svc);
    }
    if let Some(ac) = ac {
        let mut inst = Instances::new("ActionCache");
        for c in &ac.0 {
            let s = store_named(
                &c.ac_store,
                &format!("{sp}.ac.{}.ac_store", c.instance_name),
            )?;
            note_store(&c.ac_store, &s);
            inst.insert(
                c.instance_name.clone(),
                AcInstance {
                    store: s,
                    read_only: c.read_only,
                },
            );
            let caps = caps_by_instance.entry(c.instance_name.clone()).or_default();
            caps.ac = true;
            caps.ac_writable = !c.read_only;
        }
        let mut svc =
            re::action_cache_server::ActionCacheServer::new(AcService::new(inst, metrics.clone()))
                .max_decoding_message_size(limits.max_message_bytes)
                .max_encoding_message_size(limits.max_message_bytes);
        for a in &accept {
            svc = svc.accept_compressed(*a);
        }
        if let Some(z) = send_zstd {
            svc = svc.send_compressed(z);
        }
        routes.add_service(svc);
    }
    if let Some(bs) = bytestream {
        let mut inst = Instances::new("ByteStream");
        let mut limits = limits;
        for c in bs.instances() {
            let s = store_named(
                &c.cas_store,
                &format!("{sp}.bytestream.{}.cas_store", c.instance_name),
            )?;
            note_store(&c.cas_store, &s);
            if let Some(t) = c.persist_stream_on_disconnect_timeout {
                limits.resume_timeout = Duration::from_secs(t);
            }
            inst.insert(c.instance_name.clone(), s);
        }
        let svc = crate::bytestream_wire::ByteStreamServer::new(
            ByteStreamService::new(inst, limits, metrics.clone()),
            limits.max_message_bytes,
        );
        routes.add_service(svc);
    }
    if let Some(ex) = execution {
        let mut inst = Instances::new("Execution");
        let mut pipelines: Vec<crate::execution::ExecutionPipeline> = Vec::new();
        for e in &ex.0 {
            let at = format!("{sp}.execution.{}", e.instance_name);
            let cas = store_named(&e.cas_store, &format!("{at}.cas_store"))?;
            let pipeline = scheduler_named(&e.scheduler, format!("{at}.scheduler"))?;
            if !pipelines.iter().any(|p| p.name == pipeline.name) {
                pipelines.push(pipeline.clone());
            }
            inst.insert(
                e.instance_name.clone(),
                crate::execution::service::ExecutionInstance { cas, pipeline },
            );
            caps_by_instance
                .entry(e.instance_name.clone())
                .or_default()
                .execution = true;
        }
        routes.add_service(
            re::execution_server::ExecutionServer::new(
                crate::execution::service::ExecutionService::new(inst, metrics.clone()),
            )
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
        );
        routes.add_service(
            cairn_core::proto::google::longrunning::operations_server::OperationsServer::new(
                crate::execution::operations::OperationsService::new(pipelines, metrics.clone()),
            ),
        );
    }
    if let Some(w) = worker_api {
        let pipeline = scheduler_named(&w.scheduler, format!("{sp}.worker_api.scheduler"))?;
        routes.add_service(
            cairn_proto::worker::v1::worker_api_server::WorkerApiServer::new(
                crate::execution::worker_api::WorkerApiService::new(pipeline),
            )
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
        );
    }
    if let Some(c) = capabilities {
        let mut inst = Instances::new("Capabilities");
        for e in &c.0 {
            let mut caps = caps_by_instance
                .get(&e.instance_name)
                .cloned()
                .unwrap_or_default();
            if let Some(re) = &e.remote_execution {
                scheduler_named(
                    &re.scheduler,
                    format!(
                        "{sp}.capabilities.{}.remote_execution.scheduler",
                        e.instance_name
                    ),
                )?;
                caps.execution = true;
            }
            inst.insert(e.instance_name.clone(), caps);
        }
        routes.add_service(re::capabilities_server::CapabilitiesServer::new(
            CapabilitiesService::new(inst, limits, metrics.clone()),
        ));
    }

    let state = HttpState {
        schedulers: schedulers.values().cloned().collect(),
        stores: used_stores,
        metrics: metrics.clone(),
        health_timeout: Duration::from_secs(
            health.as_ref().and_then(|h| h.timeout_seconds).unwrap_or(5),
        ),
    };
    let status_path = health
        .as_ref()
        .map(|h| h.path.clone().unwrap_or_else(|| "/status".into()));
    // `/metrics` is served wherever `/status` is, unless configured otherwise.
    let metrics_path = match (&metrics_cfg, &health) {
        (Some(m), _) => Some(m.path.clone().unwrap_or_else(|| "/metrics".into())),
        (None, Some(_)) => Some("/metrics".to_string()),
        (None, None) => None,
    };
    let mut grpc = routes.routes().prepare().into_axum_router();
    if metrics.traces_enabled() {
        // Incoming `traceparent` headers become the parents of request spans.
        grpc = grpc.layer(axum::middleware::from_fn(
            crate::otlp::traces::with_incoming_parent,
        ));
    }
    let app = grpc.merge(http::router(
        state,
        status_path.as_deref(),
        metrics_path.as_deref(),
    ));

    let addr: SocketAddr = http_cfg.socket_address.parse().map_err(|e| {
        Error::invalid_argument(format!(
            "{path}.listener.http.socket_address: {:?} is not IP:PORT ({e})",
            http_cfg.socket_address
        ))
    })?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("{path}: binding {addr}"), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("{path}: local address"), e))?;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    {
        let adv = http_cfg.advanced_http.clone().unwrap_or_default();
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new());
        h2.max_concurrent_streams(
            adv.max_concurrent_streams
                .map(|v| v.min(u32::MAX as u64) as u32),
        );
        if let Some(i) = adv.http2_keepalive_interval {
            h2.keep_alive_interval(Duration::from_secs(i));
        }
        if let Some(t) = adv.http2_keepalive_timeout {
            h2.keep_alive_timeout(Duration::from_secs(t));
        }
        let clamp = |v: u64| v.min(u32::MAX as u64) as u32;
        match (
            adv.http2_initial_stream_window_size,
            adv.http2_initial_connection_window_size,
        ) {
            (None, None) if adv.http2_adaptive_window != Some(false) => {
                // Large windows: blobs stream at memory speed over loopback and LANs.
                h2.initial_stream_window_size(4 << 20);
                h2.initial_connection_window_size(16 << 20);
            }
            (s, c) => {
                h2.initial_stream_window_size(s.map(|v| clamp(v.0)));
                h2.initial_connection_window_size(c.map(|v| clamp(v.0)));
            }
        }
        if let Some(a) = adv.http2_adaptive_window {
            h2.adaptive_window(a);
        }
        if let Some(f) = adv.http2_max_frame_size {
            h2.max_frame_size(clamp(f.0));
        } else {
            h2.max_frame_size(1 << 20);
        }
        if let Some(h) = adv.http2_max_header_list_size {
            h2.max_header_list_size(clamp(h.0));
        }
        if let Some(p) = adv.http2_max_pending_accept_reset_streams {
            h2.max_pending_accept_reset_streams(p as usize);
        }
    }
    let nodelay = http_cfg
        .advanced_http
        .as_ref()
        .and_then(|a| a.tcp_nodelay)
        .unwrap_or(true);
    let name = cfg.name.clone().unwrap_or_else(|| local_addr.to_string());
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let server_name = name.clone();
    let task = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(server = %server_name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(nodelay);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc.clone());
                    let conn = graceful.watch(conn.into_owned());
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                _ = shutdown.cancelled() => break,
            }
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => tracing::info!(server = %server_name, "drained"),
            _ = tokio::time::sleep(drain) => tracing::warn!(server = %server_name, "drain deadline passed; closing remaining connections"),
        }
    });
    Ok(RunningServer {
        name,
        local_addr,
        task,
    })
}

/// `listener.http.compression`: what this listener sends and accepts besides identity.
fn compression(
    path: &str,
    http: &cairn_config::servers::HttpListener,
) -> Result<(Option<CompressionEncoding>, Vec<CompressionEncoding>), Error> {
    let Some(c) = &http.compression else {
        return Ok((None, vec![]));
    };
    let parse = |s: &str, key: &str| -> Result<Option<CompressionEncoding>, Error> {
        match s {
            "none" | "identity" => Ok(None),
            "gzip" => Ok(Some(CompressionEncoding::Gzip)),
            "zstd" => Ok(Some(CompressionEncoding::Zstd)),
            other => Err(Error::invalid_argument(format!(
                "{path}.listener.http.compression.{key}: expected none, gzip or zstd, found {other:?}"
            ))),
        }
    };
    let send = match &c.send_compression_algorithm {
        Some(s) => parse(s, "send_compression_algorithm")?,
        None => None,
    };
    let mut accept = Vec::new();
    for a in &c.accepted_compression_algorithms {
        if let Some(e) = parse(a, "accepted_compression_algorithms")? {
            accept.push(e);
        }
    }
    Ok((send, accept))
}
