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
use crate::chunking::Chunker;
use crate::http::{self, HttpState};
use crate::instances::{store_named as lookup_store, Instances};
use crate::metered::MeteredStore;
use crate::metrics::Metrics;
use crate::tls::{ReloadingTls, TlsFiles};
use crate::Limits;

/// A listener that is accepting connections.
pub struct RunningServer {
    pub name: String,
    pub local_addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// What [`check`] finds in a listener's config: its TLS, loaded, and its limits.
pub struct Checked {
    tls: Option<Arc<ReloadingTls>>,
    limits: Limits,
    send_zstd: Option<CompressionEncoding>,
    accept: Vec<CompressionEncoding>,
    addr: SocketAddr,
}

/// Everything about `servers[index]` that can be checked without binding or serving: TLS
/// files load, the worker API is not beside client services, limits, compression, the
/// address, services not built yet. `cairn run` and `cairn check-config` both call it, so they
/// give the same verdict.
pub fn check(index: usize, cfg: &ServerConfig, limits: Limits) -> Result<Checked, Error> {
    let path = format!("servers[{index}]");
    let http_cfg = cfg.listener.http();
    let tls = match &http_cfg.tls {
        Some(t) => {
            let at = format!("{path}.listener.http.tls");
            Some(Arc::new(ReloadingTls::load(TlsFiles::from_config(
                t, &at,
            )?)?))
        }
        None => None,
    };
    let mut limits = limits;
    if let Some(m) = http_cfg.max_decoding_message_size {
        limits.max_message_bytes = message_limit(
            m.0,
            &format!("{path}.listener.http.max_decoding_message_size"),
        )?;
    }
    if let Some(adv) = &http_cfg.advanced_http {
        let at = format!("{path}.listener.http.advanced_http");
        if let Some(n) = adv.max_uploads {
            if n == 0 {
                return Err(Error::invalid_argument(format!(
                    "{at}.max_uploads: 0 would refuse every upload; expected at least 1"
                )));
            }
            limits.max_uploads = n.min(1 << 24) as usize;
        }
        if let Some(b) = adv.upload_buffer_bytes {
            if b.0 < 1 << 20 {
                return Err(Error::invalid_argument(format!(
                    "{at}.upload_buffer_bytes: {} bytes is below the least, 1 MiB",
                    b.0
                )));
            }
            // The semaphore counts KiB in a u32-sized permit count.
            limits.upload_buffer_bytes = b.0.min(1 << 40) as usize;
        }
    }
    let services = cfg.services.clone().unwrap_or_default();
    check_worker_api_alone(&path, &services)?;
    if let Some(id) = &cfg.experimental_identity_header {
        identity_header(&path, id)?;
    }
    let sp = format!("{path}.services");
    if let Some(p) = services.admin.as_ref().and_then(|a| a.path.as_deref()) {
        if !p.starts_with('/') {
            return Err(Error::invalid_argument(format!(
                "{sp}.admin.path: {p:?} must start with /"
            )));
        }
    }
    if let Some(bs) = &services.bytestream {
        if let cairn_config::servers::ByteStreamService::Map(m) = bs {
            if let Some(n) = m.max_decoding_message_size {
                message_limit(n.0, &format!("{sp}.bytestream.max_decoding_message_size"))?;
            }
        }
        for c in bs.instances() {
            if c.max_bytes_per_stream.is_some_and(|n| n.0 == 0) {
                return Err(Error::invalid_argument(format!(
                    "{sp}.bytestream.{}.max_bytes_per_stream: expected a size above 0",
                    c.instance_name
                )));
            }
        }
    }
    let (send_zstd, accept) = compression(&path, http_cfg)?;
    let addr: SocketAddr = http_cfg.socket_address.parse().map_err(|e| {
        Error::invalid_argument(format!(
            "{path}.listener.http.socket_address: {:?} is not IP:PORT ({e})",
            http_cfg.socket_address
        ))
    })?;
    Ok(Checked {
        tls,
        limits,
        send_zstd,
        accept,
        addr,
    })
}

/// Checks `servers[index]` (see [`check`]) and starts serving it.
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
    let Checked {
        tls,
        limits,
        send_zstd,
        accept,
        addr,
    } = check(index, cfg, limits)?;
    let path = format!("servers[{index}]");
    let http_cfg = cfg.listener.http();
    let services = cfg.services.clone().unwrap_or_default();
    let sp = format!("{path}.services");
    let store_named = |name: &str, at: &str| -> Result<cairn_store::StoreRef, Error> {
        // `name` is the configured store name: bounded label cardinality.
        Ok(MeteredStore::wrap(
            name,
            lookup_store(stores, name, at)?,
            metrics.clone(),
        ))
    };

    let mut routes = tonic::service::Routes::builder();
    let (has_cas, has_ac, has_bytestream, has_capabilities, has_execution) = (
        services.cas.is_some(),
        services.ac.is_some(),
        services.bytestream.is_some(),
        services.capabilities.is_some(),
        services.execution.is_some(),
    );
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
    // `capabilities[].remote_cache_compression`: where zstd is advertised, CAS and ByteStream
    // take and send it (NativeLink's rule: advertising and accepting cannot differ).
    let zstd_instances: Arc<std::collections::BTreeSet<String>> = Arc::new(
        capabilities
            .iter()
            .flat_map(|c| c.0.iter())
            .filter(|c| c.remote_cache_compression)
            .map(|c| c.instance_name.clone())
            .collect(),
    );
    let mut used_stores: Vec<(String, cairn_store::StoreRef)> = Vec::new();
    let mut note_store = |name: &str, s: &cairn_store::StoreRef| {
        if !used_stores.iter().any(|(n, _)| n == name) {
            used_stores.push((name.to_string(), s.clone()));
        }
    };

    let mut cas_by_instance: std::collections::BTreeMap<String, cairn_store::StoreRef> =
        Default::default();
    if let Some(cas) = cas {
        let mut inst = Instances::new("ContentAddressableStorage");
        let mut chunkers = Vec::new();
        for c in &cas.0 {
            let s = store_named(
                &c.cas_store,
                &format!("{sp}.cas.{}.cas_store", c.instance_name),
            )?;
            note_store(&c.cas_store, &s);
            cas_by_instance.insert(c.instance_name.clone(), s.clone());
            let caps = caps_by_instance.entry(c.instance_name.clone()).or_default();
            caps.cas = true;
            if let Some(ch) = &c.experimental_chunking {
                let index = match &ch.index_store {
                    Some(name) => Some(store_named(
                        name,
                        &format!(
                            "{sp}.cas.{}.experimental_chunking.index_store",
                            c.instance_name
                        ),
                    )?),
                    None => None,
                };
                let chunker = Arc::new(Chunker::new(
                    s.clone(),
                    index,
                    ch.avg_chunk_size(),
                    ch.max_chunks(),
                ));
                caps.chunking_avg = Some(chunker.avg_chunk_size());
                chunkers.push((c.instance_name.clone(), chunker));
            }
            inst.insert(c.instance_name.clone(), s);
        }
        let mut cas_svc =
            CasService::new(inst, limits, metrics.clone()).with_zstd(zstd_instances.clone());
        for (name, chunker) in chunkers {
            cas_svc = cas_svc.with_chunker(name, chunker);
        }
        let mut svc =
            re::content_addressable_storage_server::ContentAddressableStorageServer::new(cas_svc)
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
        if let cairn_config::servers::ByteStreamService::Map(m) = &bs {
            if let Some(n) = m.max_decoding_message_size {
                // Checked in `check`.
                limits.max_message_bytes = n.0 as usize;
            }
        }
        for c in bs.instances() {
            let s = store_named(
                &c.cas_store,
                &format!("{sp}.bytestream.{}.cas_store", c.instance_name),
            )?;
            note_store(&c.cas_store, &s);
            if let Some(t) = c.persist_stream_on_disconnect_timeout {
                limits.resume_timeout = Duration::from_secs(t);
            }
            if let Some(n) = c.max_bytes_per_stream {
                limits.read_chunk_bytes = limits
                    .read_chunk_bytes
                    .min(n.0.min(limits.max_message_bytes as u64 / 2) as usize);
            }
            inst.insert(c.instance_name.clone(), s);
        }
        let svc = crate::bytestream_wire::ByteStreamServer::new(
            ByteStreamService::new(inst, limits, metrics.clone()).with_zstd(zstd_instances.clone()),
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
    if let Some(fetch) = &services.fetch {
        let mut inst = Instances::new("Fetch");
        for f in &fetch.0 {
            let associations = store_named(
                &f.fetch_store,
                &format!("{sp}.fetch.{}.fetch_store", f.instance_name),
            )?;
            note_store(&f.fetch_store, &associations);
            inst.insert(
                f.instance_name.clone(),
                crate::asset::FetchInstance {
                    associations,
                    cas: cas_by_instance.get(&f.instance_name).cloned(),
                },
            );
        }
        routes.add_service(
            cairn_core::proto::build::bazel::remote::asset::v1::fetch_server::FetchServer::new(
                crate::asset::FetchService::new(inst, metrics.clone())?,
            )
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
        );
    }
    if let Some(push) = &services.push {
        let mut inst = Instances::new("Push");
        for p in &push.0 {
            let associations = store_named(
                &p.push_store,
                &format!("{sp}.push.{}.push_store", p.instance_name),
            )?;
            note_store(&p.push_store, &associations);
            inst.insert(
                p.instance_name.clone(),
                crate::asset::PushInstance {
                    associations,
                    read_only: p.read_only,
                },
            );
        }
        routes.add_service(
            cairn_core::proto::build::bazel::remote::asset::v1::push_server::PushServer::new(
                crate::asset::PushService::new(inst, metrics.clone()),
            )
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
        );
    }
    if let Some(bep) = &services.experimental_bep {
        let store = store_named(&bep.store, &format!("{sp}.experimental_bep.store"))?;
        note_store(&bep.store, &store);
        crate::web_ui::index::load(&crate::web_ui::index_for(&bep.store), &store).await;
        routes.add_service(
            cairn_proto::bes::v1::publish_build_event_server::PublishBuildEventServer::new(
                crate::bep::BepService::new(
                    store,
                    metrics.clone(),
                    crate::web_ui::index_for(&bep.store),
                ),
            )
            .max_decoding_message_size(limits.max_message_bytes)
            .max_encoding_message_size(limits.max_message_bytes),
        );
    }
    if let Some(w) = worker_api {
        let pipeline = scheduler_named(&w.scheduler, format!("{sp}.worker_api.scheduler"))?;
        let Some(handle) = pipeline.local() else {
            return Err(Error::invalid_argument(format!(
                "{sp}.worker_api.scheduler: {:?} is a grpc scheduler, which forwards to another \
                 scheduler and has no workers; serve the worker API where that scheduler runs",
                w.scheduler
            )));
        };
        // `kill_revoked_operations_interval_s` bounds how long a dropped action runs on:
        // Cairn kills it at once, within any interval.
        if w.disable_kill_revoked_operations {
            handle.run_revoked_to_end().await?;
        }
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
                let pipeline = scheduler_named(
                    &re.scheduler,
                    format!(
                        "{sp}.capabilities.{}.remote_execution.scheduler",
                        e.instance_name
                    ),
                )?;
                caps.execution = true;
                caps.scheduler = Some(pipeline);
            }
            caps.zstd = e.remote_cache_compression;
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
        probe_bytes: limits.health_probe_bytes,
    };
    let status_path = health
        .as_ref()
        .map(|h| h.path.clone().unwrap_or_else(|| "/status".into()));
    // `/metrics` is served wherever `/status` is, unless configured otherwise.
    let metrics_path = match (&metrics_cfg, &health) {
        _ if !metrics.enabled() => None,
        (Some(m), _) => Some(m.path.clone().unwrap_or_else(|| "/metrics".into())),
        (None, Some(_)) => Some("/metrics".to_string()),
        (None, None) => None,
    };
    for (service, served) in [
        ("cas", has_cas),
        ("ac", has_ac),
        ("bytestream", has_bytestream),
        ("capabilities", has_capabilities),
        ("execution", has_execution),
        ("operations", has_execution),
        ("fetch", services.fetch.is_some()),
        ("push", services.push.is_some()),
        ("bep", services.experimental_bep.is_some()),
    ] {
        if served {
            metrics.init_service(service);
        }
    }
    if has_execution {
        metrics.init_execution();
    }
    let mut grpc = routes.routes().prepare().into_axum_router();
    if let Some(id) = &cfg.experimental_identity_header {
        let header = identity_header(&path, id)?;
        let required = id.required;
        grpc = grpc.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let header = header.clone();
                async move { identity(&header, required, req, next).await }
            },
        ));
    }
    if crate::origin_events::enabled() {
        // `experimental_origin_events`: an event per request, named by this listener's
        // identity header.
        let header = match &cfg.experimental_identity_header {
            Some(id) => Some(identity_header(&path, id)?),
            None => None,
        };
        grpc = grpc.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                crate::origin_events::record(header.clone(), req, next)
            },
        ));
    }
    if cairn_store::client_headers::wanted() {
        // A `grpc` store forwards headers of the request it serves.
        grpc = grpc.layer(axum::middleware::from_fn(
            |req: axum::extract::Request, next: axum::middleware::Next| async move {
                let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
                cairn_store::client_headers::scope(Arc::new(md), next.run(req)).await
            },
        ));
    }
    if crate::otlp::traces::exporting() {
        // Each request runs in its span; an incoming `traceparent` becomes its parent.
        grpc = grpc.layer(axum::middleware::from_fn(crate::otlp::traces::request_span));
    }
    let mut app = grpc.merge(http::router(
        state,
        status_path.as_deref(),
        metrics_path.as_deref(),
    ));
    if let Some(admin) = &services.admin {
        let path = admin.path.as_deref().unwrap_or("/admin");
        app = app.merge(http::admin_router(path, schedulers.clone()));
    }
    if let Some(ui) = &services.web_ui {
        let ui = crate::web_ui::WebUi::from_config(
            ui,
            &format!("{sp}.web_ui"),
            stores,
            metrics.clone(),
            |name, at| store_named(name, at),
            |name, at| scheduler_named(name, at),
        )
        .await?;
        app = app.merge(crate::web_ui::router(Arc::new(ui)));
    }
    let app = app.layer(axum::middleware::from_fn(not_found_for_plain_http));

    let listener = bind(addr, http_cfg.freebind)
        .map_err(|e| Error::io(format!("{path}: binding {addr}"), e))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("{path}: local address"), e))?;

    let adv = http_cfg.advanced_http.clone().unwrap_or_default();
    let handshake_timeout = Duration::from_secs(
        adv.handshake_timeout
            .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_S)
            .max(1),
    );
    let connections = Arc::new(tokio::sync::Semaphore::new(
        adv.max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS)
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
    ));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    {
        let adv = http_cfg.advanced_http.clone().unwrap_or_default();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(handshake_timeout);
        let mut h2 = builder.http2();
        h2.timer(TokioTimer::new());
        h2.max_concurrent_streams(
            adv.max_concurrent_streams
                .map_or(DEFAULT_MAX_CONCURRENT_STREAMS, |v| {
                    v.min(u32::MAX as u64) as u32
                }),
        );
        h2.keep_alive_interval(Duration::from_secs(
            adv.http2_keepalive_interval
                .unwrap_or(DEFAULT_KEEPALIVE_INTERVAL_S),
        ));
        h2.keep_alive_timeout(Duration::from_secs(
            adv.http2_keepalive_timeout
                .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT_S),
        ));
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
        h2.max_header_list_size(
            adv.http2_max_header_list_size
                .map_or(DEFAULT_MAX_HEADER_LIST_SIZE, |h| clamp(h.0)),
        );
        if let Some(p) = adv.http2_max_pending_accept_reset_streams {
            h2.max_pending_accept_reset_streams(p as usize);
        }
        if let Some(b) = adv.http2_max_send_buf_size {
            h2.max_send_buf_size(b.0.min(usize::MAX as u64) as usize);
        }
        if adv.http2_enable_connect_protocol == Some(true) {
            h2.enable_connect_protocol();
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
    if let Some(t) = &tls {
        t.clone().watch(name.clone(), shutdown.clone());
    }
    let task = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(server = %server_name, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = connections.clone().try_acquire_owned() else {
                        tracing::warn!(server = %server_name, %peer, "connection limit reached (advanced_http.max_connections); closing the new connection");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(nodelay);
                    let conn = Connection {
                        builder: builder.clone(),
                        svc: svc.clone(),
                        watcher: graceful.watcher(),
                        tls: tls.as_ref().map(|t| t.acceptor()),
                        handshake_timeout,
                        server: server_name.clone(),
                    };
                    tokio::spawn(async move {
                        conn.serve(stream, peer).await;
                        drop(permit);
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

/// Concurrent HTTP/2 streams per connection when `advanced_http` does not say.
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Largest header block a client may send when `advanced_http` does not say.
const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 64 << 10;
const DEFAULT_KEEPALIVE_INTERVAL_S: u64 = 30;
const DEFAULT_KEEPALIVE_TIMEOUT_S: u64 = 20;
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
const DEFAULT_HANDSHAKE_TIMEOUT_S: u64 = 10;
/// Most a `max_decoding_message_size` may be: the gRPC length prefix is 32 bits, and a
/// message is buffered whole.
const MAX_MESSAGE_LIMIT: u64 = 1 << 30;

fn message_limit(n: u64, at: &str) -> Result<usize, Error> {
    if n == 0 || n > MAX_MESSAGE_LIMIT {
        return Err(Error::invalid_argument(format!(
            "{at}: expected a size from 1 byte to 1GiB, found {n}"
        )));
    }
    Ok(n as usize)
}

/// The worker API lets whoever reaches it register as a worker and write action results: it is
/// refused on a listener with client services unless the config asks for it explicitly.
fn check_worker_api_alone(path: &str, services: &Services) -> Result<(), Error> {
    let Some(w) = &services.worker_api else {
        return Ok(());
    };
    if w.allow_client_services_on_same_listener {
        return Ok(());
    }
    let client: Vec<&str> = [
        ("cas", services.cas.is_some()),
        ("ac", services.ac.is_some()),
        ("capabilities", services.capabilities.is_some()),
        ("bytestream", services.bytestream.is_some()),
        ("execution", services.execution.is_some()),
        ("fetch", services.fetch.is_some()),
        ("push", services.push.is_some()),
        ("experimental_bep", services.experimental_bep.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if client.is_empty() {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "{path}.services.worker_api: served on the same listener as client services ({}); anyone who can reach this port could register as a worker and write action results. Serve worker_api on its own listener (the guides use port 50061, reachable by workers only, with mTLS), or set {path}.services.worker_api.allow_client_services_on_same_listener: true",
        client.join(", ")
    )))
}

/// The header of `experimental_identity_header` (default `x-identity`).
fn identity_header(
    path: &str,
    id: &cairn_config::servers::IdentityHeader,
) -> Result<::http::HeaderName, Error> {
    let name = id.header_name.as_deref().unwrap_or("x-identity");
    ::http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(|e| {
        Error::invalid_argument(format!(
            "{path}.experimental_identity_header.header_name: {name:?} is not a header name ({e})"
        ))
    })
}

/// Binds `addr` as `TcpListener::bind` does (SO_REUSEADDR, backlog 1024), with
/// `IP_FREEBIND` first when `freebind` (`listener.http.freebind`): the address need not be
/// assigned to this machine yet.
fn bind(addr: SocketAddr, freebind: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if freebind {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: an open socket, and a pointer to a c_int of the size passed, valid for the
        // call. IP_FREEBIND at SOL_IP sets the flag IPv6 sockets use too.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IP,
                libc::IP_FREEBIND,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// `experimental_identity_header`: logs who sent each gRPC request; refuses one without the
/// header when it is required.
async fn identity(
    header: &::http::HeaderName,
    required: bool,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let who = req
        .headers()
        .get(header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match who {
        Some(who) => {
            let span = tracing::info_span!("request", identity = %who, path = %req.uri().path());
            tracing::Instrument::instrument(next.run(req), span).await
        }
        None if required => tonic::Status::unauthenticated(format!(
            "this server requires the {header} header naming who sends the request"
        ))
        .into_http(),
        None => next.run(req).await,
    }
}

/// One accepted connection, before its TLS handshake (if any) and HTTP.
struct Connection<S> {
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    svc: S,
    watcher: hyper_util::server::graceful::Watcher,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    server: String,
}

impl<S> Connection<S>
where
    S: hyper::service::Service<
            ::http::Request<hyper::body::Incoming>,
            Response = ::http::Response<axum::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Serves the connection until it closes. A peer that does not finish its TLS handshake
    /// (or, in plaintext, send its first byte) within the handshake timeout is dropped, so
    /// idle connections cannot pile up.
    async fn serve(self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let Connection {
            builder,
            svc,
            watcher,
            tls,
            handshake_timeout,
            server,
        } = self;
        match tls {
            Some(acceptor) => {
                let tls_stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(server, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(server, %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), svc);
                let _ = watcher.watch(conn.into_owned()).await;
            }
            None => {
                let mut first = [0u8; 1];
                match tokio::time::timeout(handshake_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => {
                        tracing::debug!(server, %peer, "connection sent nothing in time; closed");
                        return;
                    }
                }
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let _ = watcher.watch(conn.into_owned()).await;
            }
        }
    }
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

/// A plain HTTP request (not gRPC) for a path nothing serves gets 404, not the gRPC router's
/// "unimplemented" answer (HTTP 200 with a `grpc-status` header), so that `/metrics` with
/// metrics disabled, or a mistyped path, looks missing to curl and to Prometheus.
async fn not_found_for_plain_http(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let grpc = req
        .headers()
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let unimplemented = resp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"12");
    if grpc || !unimplemented {
        return resp;
    }
    let mut out = axum::response::Response::new(axum::body::Body::from(format!(
        "404: nothing is served at {path}\n"
    )));
    *out.status_mut() = ::http::StatusCode::NOT_FOUND;
    out.headers_mut().insert(
        ::http::header::CONTENT_TYPE,
        ::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    out
}
