//! The worker's side of the worker API: connect to a scheduler, register, keep alive, run
//! each StartAction with the [`ActionRunner`], answer with ActionDone, and kill on KillAction.
//! A lost connection cancels what runs (the scheduler re-queues it) and reconnects with
//! backoff, until shutdown. The scheduler is reached over gRPC, or, for a worker in the
//! scheduler's own process, through in-memory streams ([`SchedulerLink::InProcess`]) carrying
//! the same messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_core::{Digest, DigestFunction, Error};
use cairn_proto::worker::v1 as wapi;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{ActionRunner, RunRequest};

/// How the worker presents itself.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub name: String,
    pub properties: Vec<(String, String)>,
    pub slots: u32,
}

/// What a worker receives from its scheduler.
pub type Inbound = BoxStream<'static, Result<wapi::SchedulerMessage, tonic::Status>>;
/// What a worker sends to its scheduler.
pub type Outbound = BoxStream<'static, wapi::WorkerMessage>;
/// Opens a session with a scheduler of this process: takes what the worker sends, returns
/// what it receives (as the gRPC service would).
pub type OpenSession =
    Arc<dyn Fn(Outbound) -> BoxFuture<'static, Result<Inbound, tonic::Status>> + Send + Sync>;

/// Builds the endpoint for each connection, reading the TLS files again, so that a renewed
/// client certificate is used from the next connection on. It carries its connect and call
/// timeouts (`worker_api_endpoint.timeout`).
pub type MakeEndpoint = Arc<dyn Fn() -> Result<tonic::transport::Endpoint, Error> + Send + Sync>;

/// How a worker reaches its scheduler.
// One per worker, made once: the size of the larger variant costs nothing.
#[derive(Clone)]
pub enum SchedulerLink {
    /// The worker API at `address` (`grpc://host:port`, or `grpcs://` with its TLS settings
    /// in `endpoint`).
    Grpc {
        address: String,
        endpoint: MakeEndpoint,
    },
    /// A scheduler in this process, `name`d in logs.
    InProcess { name: String, open: OpenSession },
}

impl std::fmt::Display for SchedulerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchedulerLink::Grpc { address, .. } => f.write_str(address),
            SchedulerLink::InProcess { name, .. } => write!(f, "in-process scheduler {name}"),
        }
    }
}

/// Runs the worker until `shutdown`; returns only then.
pub async fn run_worker(
    link: SchedulerLink,
    identity: WorkerIdentity,
    runner: Arc<ActionRunner>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match session(&link, &identity, runner.clone(), shutdown.clone()).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(worker = %identity.name, scheduler = %link, error = %e, "worker session ended; reconnecting");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Connects to `endpoint` and opens a session there; `outbound` feeds what the worker sends.
async fn open_grpc(
    address: &str,
    endpoint: &MakeEndpoint,
    mut outbound: mpsc::Receiver<wapi::WorkerMessage>,
) -> Result<Inbound, Error> {
    let channel = endpoint()?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Error::unavailable(format!("connecting to {address}: {e:?}")))?;
    let mut client = wapi::worker_api_client::WorkerApiClient::new(channel);
    // A concrete stream type: tonic's client cannot be proven `Send` over a boxed one.
    let outbound = futures::stream::poll_fn(move |cx| outbound.poll_recv(cx));
    let inbound = client
        .session(outbound)
        .await
        .map_err(Error::from)?
        .into_inner();
    Ok(inbound.boxed())
}

/// One connection: until the stream ends, fails or shutdown.
async fn session(
    link: &SchedulerLink,
    identity: &WorkerIdentity,
    runner: Arc<ActionRunner>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (tx, mut rx) = mpsc::channel::<wapi::WorkerMessage>(256);
    tx.send(wapi::WorkerMessage {
        message: Some(wapi::worker_message::Message::Register(wapi::Register {
            name: identity.name.clone(),
            properties: identity
                .properties
                .iter()
                .map(|(n, v)| wapi::Property {
                    name: n.clone(),
                    value: v.clone(),
                })
                .collect(),
            slots: identity.slots,
        })),
    })
    .await
    .map_err(|_| Error::internal("worker outbox closed"))?;
    let mut inbound = match link {
        SchedulerLink::Grpc { address, endpoint } => open_grpc(address, endpoint, rx).await?,
        SchedulerLink::InProcess { open, .. } => {
            let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
            open(outbound).await.map_err(Error::from)?
        }
    };

    let running: Arc<Mutex<HashMap<String, CancellationToken>>> = Arc::default();
    let session_done = CancellationToken::new();
    let _cancel_on_exit = session_done.clone().drop_guard();
    let mut keepalive: Option<tokio::time::Interval> = None;
    // On shutdown the worker drains: it finishes what runs (the caller bounds how long) and
    // hands any new action straight back, then ends the session.
    let mut draining = false;
    let finished = Arc::new(tokio::sync::Notify::new());
    let result = loop {
        let tick = async {
            match keepalive.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                if running.lock().is_empty() {
                    break Ok(true);
                }
                tracing::info!(worker = %identity.name, running = running.lock().len(), "draining: finishing running actions");
            }
            _ = finished.notified(), if draining => {
                if running.lock().is_empty() {
                    break Ok(true);
                }
            }
            _ = tick => {
                let ka = wapi::WorkerMessage { message: Some(wapi::worker_message::Message::Keepalive(wapi::Keepalive {})) };
                if tx.send(ka).await.is_err() {
                    break Err(Error::unavailable("worker stream closed"));
                }
            }
            msg = inbound.next() => match msg.transpose() {
                Ok(Some(m)) => match m.message {
                    Some(wapi::scheduler_message::Message::Registered(r)) => {
                        let every = Duration::from_millis(r.keepalive_interval_ms.max(50));
                        tracing::info!(worker = %r.worker_id, "registered with the scheduler");
                        keepalive = Some(tokio::time::interval(every));
                    }
                    Some(wapi::scheduler_message::Message::StartAction(s)) if draining => {
                        let done = wapi::ActionDone {
                            action_id: s.action_id,
                            execute_response: vec![],
                            error_code: tonic::Code::Unavailable as i32,
                            error_message: "the worker is shutting down".into(),
                        };
                        let _ = tx.send(wapi::WorkerMessage { message: Some(wapi::worker_message::Message::ActionDone(done)) }).await;
                    }
                    Some(wapi::scheduler_message::Message::StartAction(s)) => {
                        start(s, runner.clone(), tx.clone(), running.clone(), session_done.clone(), finished.clone());
                    }
                    Some(wapi::scheduler_message::Message::KillAction(k)) => {
                        if let Some(t) = running.lock().get(&k.action_id) {
                            t.cancel();
                        }
                    }
                    None => {}
                },
                Ok(None) => break Ok(false),
                Err(e) => break Err(Error::from(e)),
            }
        }
    };
    // Whatever still runs belongs to a session the scheduler has given up on.
    for (_, t) in running.lock().drain() {
        t.cancel();
    }
    if let Ok(true) = result {
        // Drained: end our side of the stream and let the scheduler read every ActionDone
        // before it closes its side, so that no finished result is lost.
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = inbound.next().await {}
        })
        .await;
    }
    result.map(|_| ())
}

fn start(
    s: wapi::StartAction,
    runner: Arc<ActionRunner>,
    tx: mpsc::Sender<wapi::WorkerMessage>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    session_done: CancellationToken,
    finished: Arc<tokio::sync::Notify>,
) {
    let cancel = session_done.child_token();
    running.lock().insert(s.action_id.clone(), cancel.clone());
    // The worker's part of the client's trace: a child of the scheduler's dispatch.
    let span = tracing::debug_span!(
        target: "cairn_worker::session",
        "worker.action",
        attempt = %s.action_id,
        instance = %s.instance_name,
    );
    cairn_core::trace_context::set_parent(
        &span,
        s.trace_context
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_str())),
    );
    let run = async move {
        let mut dir = None;
        let done = match parse_digest(&s) {
            Err(e) => wapi::ActionDone {
                action_id: s.action_id.clone(),
                execute_response: vec![],
                error_code: e.code.rpc_code(),
                error_message: e.message,
            },
            Ok(digest) => {
                let queued_at = (s.queued_at_unix_ms > 0)
                    .then(|| UNIX_EPOCH + Duration::from_millis(s.queued_at_unix_ms as u64));
                let req = RunRequest {
                    action_digest: digest,
                    skip_cache_write: s.skip_cache_write,
                    queued_at: queued_at.or_else(|| Some(SystemTime::now())),
                    platform: Some(
                        s.platform
                            .iter()
                            .map(|p| (p.name.clone(), p.value.clone()))
                            .collect(),
                    ),
                };
                match runner.run_keeping_dir(req, cancel).await {
                    Ok((resp, action_dir)) => {
                        dir = Some(action_dir);
                        wapi::ActionDone {
                            action_id: s.action_id.clone(),
                            execute_response: resp.encode_to_vec(),
                            error_code: 0,
                            error_message: String::new(),
                        }
                    }
                    Err(e) => wapi::ActionDone {
                        action_id: s.action_id.clone(),
                        execute_response: vec![],
                        error_code: e.code.rpc_code().max(1),
                        error_message: e.message,
                    },
                }
            }
        };
        let _ = tx
            .send(wapi::WorkerMessage {
                message: Some(wapi::worker_message::Message::ActionDone(done)),
            })
            .await;
        // The client has its answer; the directory goes before the slot counts as free here
        // (a draining worker waits for it too).
        if let Some(dir) = dir {
            dir.remove().await;
        }
        running.lock().remove(&s.action_id);
        finished.notify_one();
    };
    tokio::spawn(tracing::Instrument::instrument(run, span));
}

fn parse_digest(s: &wapi::StartAction) -> Result<Digest, Error> {
    let f = DigestFunction::from_request(s.digest_function, s.action_hash.len())?;
    Digest::parse(f, &s.action_hash, s.action_size)
}
