//! The scheduler's I/O driver: one task owns the pure `cairn_scheduler::Scheduler`, feeds it
//! what clients and workers do, and carries out its decisions (start or kill an action on a
//! worker's stream, update the operations' watchers, drop a timed-out worker). Between events
//! it sleeps until the core's next deadline. Everyone else talks to it through a
//! [`SchedulerHandle`] (a bounded command channel); no lock is shared.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::trace_context;
use cairn_core::{Digest, Error};
use cairn_proto::worker::v1 as wapi;
use cairn_scheduler::{
    ActionRequest, AttemptId, Decision, EventError, OperationId, OperationStatus, Outcome,
    Scheduler, SchedulerOptions, WorkerId,
};
use tokio::sync::{mpsc, oneshot};

mod ui_views;
pub use ui_views::{
    platform_key, InvocationQueue, PlatformQueue, QueueQuery, QueueSummary, WorkersPage, MAX_OFFSET,
};

/// What a worker needs to run an action.
#[derive(Debug, Clone)]
pub struct ActionPayload {
    pub instance: String,
    pub digest: Digest,
    pub skip_cache_write: bool,
    pub timeout: Option<Duration>,
    pub queued_at_unix_ms: i64,
    /// The platform properties the action is matched with (after `property_modifier`).
    pub platform: Vec<(String, String)>,
    /// W3C trace context of the Execute call that queued it (empty when not traced).
    pub trace_context: Vec<(String, String)>,
}

/// A snapshot of one operation, sent to its watchers at every stage change.
#[derive(Debug, Clone)]
pub struct OpUpdate {
    pub op_id: String,
    pub action_digest: Digest,
    pub status: OperationStatus<re::ExecuteResponse>,
}

/// Worker slots, for `/metrics` and `/status`.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub queued: usize,
    pub executing: usize,
    pub workers: usize,
    pub total_slots: u64,
    pub busy_slots: u64,
    pub retries_total: u64,
    pub completed: u64,
}

// Commands are moved once through a channel; boxing the large ones would only add allocations.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    Add {
        op_id: String,
        digest: Digest,
        request: Box<ActionRequest<ActionPayload>>,
        watcher: mpsc::Sender<OpUpdate>,
        reply: oneshot::Sender<Result<u64, Error>>,
    },
    Attach {
        op_id: String,
        watcher: mpsc::Sender<OpUpdate>,
        reply: oneshot::Sender<Result<(u64, OpUpdate), Error>>,
    },
    Detach {
        op_id: String,
        watcher_no: u64,
    },
    Cancel {
        op_id: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Delete {
        op_id: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Get {
        op_id: String,
        reply: oneshot::Sender<Option<OpUpdate>>,
    },
    List {
        reply: oneshot::Sender<Vec<OpUpdate>>,
    },
    WorkerConnect {
        worker_id: String,
        properties: Vec<(String, String)>,
        slots: u32,
        tx: mpsc::Sender<Result<wapi::SchedulerMessage, tonic::Status>>,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    WorkerKeepalive {
        worker_id: String,
    },
    WorkerDone {
        worker_id: String,
        attempt: u64,
        outcome: Outcome<re::ExecuteResponse>,
    },
    WorkerGone {
        worker_id: String,
    },
    Stats {
        reply: oneshot::Sender<SchedulerStats>,
    },
    Drain {
        worker_id: String,
        draining: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    RunRevokedToEnd,
    Overview {
        reply: oneshot::Sender<Overview>,
    },
    QueueSummary {
        query: QueueQuery,
        reply: oneshot::Sender<QueueSummary>,
    },
    WorkersPage {
        offset: usize,
        limit: usize,
        reply: oneshot::Sender<WorkersPage>,
    },
    Operations {
        of: OpFilter,
        limit: usize,
        reply: oneshot::Sender<Vec<OpRow>>,
    },
    LastOutcome {
        digest: Digest,
        reply: oneshot::Sender<Option<Outcome<re::ExecuteResponse>>>,
    },
    CouldStart {
        platforms: Vec<Vec<(String, String)>>,
        reply: oneshot::Sender<Vec<bool>>,
    },
}

/// Which operations [`SchedulerHandle::operations`] copies out.
#[derive(Debug, Clone)]
pub enum OpFilter {
    /// Those sent with this `tool_invocation_id`.
    Invocation(String),
    /// Those of this action.
    Action(Digest),
}

/// One operation, for the web UI.
#[derive(Debug, Clone)]
pub struct OpRow {
    pub op_id: String,
    pub digest: Digest,
    /// `queued`, `executing` or `completed`.
    pub stage: &'static str,
    pub invocation_id: String,
    pub priority: i32,
    /// How long ago it was (last) queued, while queued or executing.
    pub queued_for: Option<Duration>,
    /// How long it has run, while executing.
    pub executing_for: Option<Duration>,
    pub worker: Option<String>,
    /// While queued or executing: the properties it is matched with.
    pub platform: Vec<(String, String)>,
    /// Once completed: [`result_kind`] and the exit code, when there is a result.
    pub result: Option<&'static str>,
    pub exit_code: Option<i32>,
    pub retries: u32,
}

/// One connected worker, for the web UI.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub worker_id: String,
    pub properties: Vec<(String, String)>,
    pub total_slots: u32,
    pub busy_slots: u32,
    /// Operation ids of what it runs.
    pub running: Vec<String>,
    pub connected_for: Duration,
    pub last_keepalive_ago: Duration,
    pub draining: bool,
}

/// Everything the scheduler holds, copied out at one instant.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    pub operations: Vec<OpRow>,
    pub workers: Vec<WorkerRow>,
}

/// A cheap, cloneable handle on a running scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Cmd>,
    pub keepalive_interval: Duration,
    /// The names of `supported_platform_properties`, sorted.
    supported: std::sync::Arc<Vec<String>>,
    /// Notified when a worker may have room for more work (it connected, answered, or was
    /// undrained).
    capacity: std::sync::Arc<tokio::sync::Notify>,
}

/// Commands queued to the driver before senders wait.
const COMMAND_DEPTH: usize = 4096;
/// Most operations a scheduler holds at once (queued, executing, and completed ones kept for
/// `retain_completed_for_s`); past it Execute gets RESOURCE_EXHAUSTED, so no client can grow
/// the scheduler's memory without bound.
pub const MAX_OPERATIONS: usize = 200_000;
/// Messages queued to one worker or one watcher.
pub const STREAM_DEPTH: usize = 1024;

fn gone() -> Error {
    Error::unavailable("the scheduler has stopped")
}

impl SchedulerHandle {
    /// Starts the driver task.
    pub fn spawn(
        opts: SchedulerOptions,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> SchedulerHandle {
        SchedulerHandle::spawn_with(opts, DriverOptions::default(), metrics)
    }

    /// Starts the driver task with the options the driver itself carries out.
    pub fn spawn_with(
        opts: SchedulerOptions,
        driver_opts: DriverOptions,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> SchedulerHandle {
        let (tx, rx) = mpsc::channel(COMMAND_DEPTH);
        let keepalive_interval = (opts.worker_timeout / 3).max(Duration::from_millis(100));
        let mut supported: Vec<String> =
            opts.supported_platform_properties.keys().cloned().collect();
        supported.sort();
        let capacity = std::sync::Arc::new(tokio::sync::Notify::new());
        let driver = Driver {
            capacity: capacity.clone(),
            core: Scheduler::new(opts),
            start: Instant::now(),
            watchers: HashMap::new(),
            digests: HashMap::new(),
            traces: HashMap::new(),
            sweep_at: 1024,
            workers: HashMap::new(),
            next_watcher: 1,
            metrics,
            unacked_kills: HashMap::new(),
            run_to_end: None,
            next_match_log: driver_opts.match_log_interval.map(|i| Instant::now() + i),
            next_fallback_match: driver_opts
                .fallback_match_interval
                .map(|i| Instant::now() + i),
            opts: driver_opts,
        };
        tokio::spawn(driver.run(rx));
        SchedulerHandle {
            tx,
            keepalive_interval,
            supported: std::sync::Arc::new(supported),
            capacity,
        }
    }

    /// Which of these platforms would start at once on this process's workers
    /// (`Scheduler::could_start`).
    pub async fn could_start(
        &self,
        platforms: Vec<Vec<(String, String)>>,
    ) -> Result<Vec<bool>, Error> {
        self.call(|reply| Cmd::CouldStart { platforms, reply })
            .await
    }

    /// Resolves when a worker may have room for more work (after the call, or since the last
    /// time it resolved).
    pub async fn capacity_changed(&self) {
        self.capacity.notified().await
    }

    /// The platform properties this scheduler matches on.
    pub fn supported_properties(&self) -> Vec<String> {
        self.supported.as_ref().clone()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Queues (or merges) an operation; updates arrive on `watcher`. Returns the watcher's
    /// number, for [`SchedulerHandle::detach`].
    pub async fn add(
        &self,
        op_id: String,
        digest: Digest,
        request: ActionRequest<ActionPayload>,
        watcher: mpsc::Sender<OpUpdate>,
    ) -> Result<u64, Error> {
        self.call(|reply| Cmd::Add {
            op_id,
            digest,
            request: Box::new(request),
            watcher,
            reply,
        })
        .await?
    }

    /// Watches an existing operation (WaitExecution); returns the watcher's number and the
    /// operation's current state.
    pub async fn attach(
        &self,
        op_id: String,
        watcher: mpsc::Sender<OpUpdate>,
    ) -> Result<(u64, OpUpdate), Error> {
        self.call(|reply| Cmd::Attach {
            op_id,
            watcher,
            reply,
        })
        .await?
    }

    /// A watcher's stream closed. Never waits.
    pub fn detach(&self, op_id: String, watcher_no: u64) {
        let cmd = Cmd::Detach { op_id, watcher_no };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    pub async fn cancel(&self, op_id: String) -> Result<(), Error> {
        self.call(|reply| Cmd::Cancel { op_id, reply }).await?
    }

    pub async fn delete(&self, op_id: String) -> Result<(), Error> {
        self.call(|reply| Cmd::Delete { op_id, reply }).await?
    }

    pub async fn get(&self, op_id: String) -> Result<Option<OpUpdate>, Error> {
        self.call(|reply| Cmd::Get { op_id, reply }).await
    }

    pub async fn list(&self) -> Result<Vec<OpUpdate>, Error> {
        self.call(|reply| Cmd::List { reply }).await
    }

    pub async fn stats(&self) -> Result<SchedulerStats, Error> {
        self.call(|reply| Cmd::Stats { reply }).await
    }

    /// Every operation and worker (read only; for the web UI).
    pub async fn overview(&self) -> Result<Overview, Error> {
        self.call(|reply| Cmd::Overview { reply }).await
    }

    /// Counts of the live operations per platform and per invocation, and one page of rows
    /// (read only; `/queue`: bounded copies however long the queue).
    pub async fn queue_summary(&self, query: QueueQuery) -> Result<QueueSummary, Error> {
        self.call(|reply| Cmd::QueueSummary { query, reply }).await
    }

    /// Connected workers by id from `offset`, at most `limit`, each with what it runs (read
    /// only; `/workers`).
    pub async fn workers_page(&self, offset: usize, limit: usize) -> Result<WorkersPage, Error> {
        self.call(|reply| Cmd::WorkersPage {
            offset,
            limit,
            reply,
        })
        .await
    }

    /// The operations that `of` selects, at most `limit` (read only; for the web UI's
    /// invocation and action pages, which need a few of many).
    pub async fn operations(&self, of: OpFilter, limit: usize) -> Result<Vec<OpRow>, Error> {
        self.call(|reply| Cmd::Operations { of, limit, reply })
            .await
    }

    /// How the latest completed operation of the action `digest` still held ended (read
    /// only; the web UI shows failed results, which are not in the action cache, from here).
    pub async fn last_outcome(
        &self,
        digest: Digest,
    ) -> Result<Option<Outcome<re::ExecuteResponse>>, Error> {
        self.call(|reply| Cmd::LastOutcome { digest, reply }).await
    }

    /// Drains a worker (it finishes what it runs and gets nothing new) or undrains it;
    /// NOT_FOUND for a worker that is not connected.
    pub async fn set_worker_draining(
        &self,
        worker_id: String,
        draining: bool,
    ) -> Result<(), Error> {
        self.call(|reply| Cmd::Drain {
            worker_id,
            draining,
            reply,
        })
        .await?
    }

    pub async fn worker_connect(
        &self,
        worker_id: String,
        properties: Vec<(String, String)>,
        slots: u32,
        tx: mpsc::Sender<Result<wapi::SchedulerMessage, tonic::Status>>,
    ) -> Result<(), Error> {
        self.call(|reply| Cmd::WorkerConnect {
            worker_id,
            properties,
            slots,
            tx,
            reply,
        })
        .await?
    }

    pub async fn worker_keepalive(&self, worker_id: String) {
        let _ = self.tx.send(Cmd::WorkerKeepalive { worker_id }).await;
    }

    pub async fn worker_done(
        &self,
        worker_id: String,
        attempt: u64,
        outcome: Outcome<re::ExecuteResponse>,
    ) {
        let _ = self
            .tx
            .send(Cmd::WorkerDone {
                worker_id,
                attempt,
                outcome,
            })
            .await;
    }

    /// A worker's stream ended. Never waits.
    /// `worker_api.disable_kill_revoked_operations`: from now on an action the scheduler drops
    /// is not killed on its worker but runs to its end (keeping its slot until then).
    pub async fn run_revoked_to_end(&self) -> Result<(), Error> {
        self.tx.send(Cmd::RunRevokedToEnd).await.map_err(|_| gone())
    }

    pub fn worker_gone(&self, worker_id: String) {
        let cmd = Cmd::WorkerGone { worker_id };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

/// What the driver carries out itself, beside the core's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct DriverOptions {
    /// `unacknowledged_kill_timeout_s`: a worker that has not answered a kill within this long
    /// is removed (its other actions re-queued).
    pub kill_ack_timeout: Option<Duration>,
    /// `worker_match_logging_interval_s`: how often to log why queued actions wait.
    pub match_log_interval: Option<Duration>,
    /// `fallback_match_interval_s`: a matching pass at least this often, whatever happened.
    /// The core matches after every event already; this is NativeLink's safety net, kept so
    /// that a pass that an event should have caused and did not still happens.
    pub fallback_match_interval: Option<Duration>,
    /// The core runs only what a replica claimed from shared state: its completions are
    /// attempts, counted by the shared scheduler when the operation itself ends.
    pub claims_only: bool,
}

struct Driver {
    core: Scheduler<ActionPayload, re::ExecuteResponse>,
    capacity: std::sync::Arc<tokio::sync::Notify>,
    opts: DriverOptions,
    /// Kills sent and not yet answered: (worker, attempt) -> when the worker is given up.
    unacked_kills: HashMap<(String, u64), Instant>,
    next_match_log: Option<Instant>,
    next_fallback_match: Option<Instant>,
    start: Instant,
    watchers: HashMap<String, Vec<(u64, mpsc::Sender<OpUpdate>)>>,
    digests: HashMap<String, Digest>,
    /// Trace context of the traced operations not yet completed, for the span of their end.
    traces: HashMap<String, Vec<(String, String)>>,
    /// Size of `digests` at which it is next swept of operations the core has forgotten.
    sweep_at: usize,
    workers: HashMap<String, mpsc::Sender<Result<wapi::SchedulerMessage, tonic::Status>>>,
    next_watcher: u64,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    /// `worker_api.disable_kill_revoked_operations`: dropped actions run to their end.
    run_to_end: Option<super::run_to_end::RunToEnd>,
}

/// How an answered execution counts in `execution_completed_count`.
pub fn result_kind(outcome: &Outcome<re::ExecuteResponse>) -> &'static str {
    let deadline = tonic::Code::DeadlineExceeded as i32;
    match outcome {
        Ok(r) if r.cached_result => "cache_hit",
        Ok(r) => match r.status.as_ref().map_or(0, |s| s.code) {
            0 if r.result.as_ref().is_some_and(|x| x.exit_code == 0) => "success",
            c if c == deadline => "timeout",
            _ => "failure",
        },
        Err(e) if e.code == cairn_scheduler::ErrorCode::DeadlineExceeded => "timeout",
        Err(_) => "failure",
    }
}

fn event_error(e: EventError) -> Error {
    match e {
        EventError::UnknownOperation(op) => {
            Error::not_found(format!("operation {op:?} does not exist (or has expired)"))
        }
        EventError::OperationNotDone(op) => Error::failed_precondition(format!(
            "operation {op:?} has not completed; cancel it first"
        )),
        EventError::InvalidWorker { worker_id, reason } => {
            Error::invalid_argument(format!("worker {worker_id}: {reason}"))
        }
        other => Error::invalid_argument(other.to_string()),
    }
}

impl Driver {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        loop {
            let deadline = [
                self.core.next_deadline().map(|d| self.start + d),
                self.unacked_kills.values().min().copied(),
                self.next_match_log,
                self.next_fallback_match,
            ]
            .into_iter()
            .flatten()
            .min();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = sleep => {
                    let now = self.now();
                    // A tick settles the core: due timers, then a matching pass.
                    if let (Some(at), Some(every)) =
                        (self.next_fallback_match, self.opts.fallback_match_interval)
                    {
                        if Instant::now() >= at {
                            self.next_fallback_match = Some(Instant::now() + every);
                        }
                    }
                    let decisions = self.core.tick(now);
                    self.apply(decisions);
                    self.check_kills();
                    self.log_matching();
                }
            }
        }
    }

    fn snapshot(&self, op_id: &str) -> Option<OpUpdate> {
        let view = self.core.operation(&OperationId(op_id.to_string()))?;
        let status = match view.stage {
            cairn_scheduler::Stage::Queued => OperationStatus::Queued,
            cairn_scheduler::Stage::Executing => OperationStatus::Executing,
            cairn_scheduler::Stage::Completed => OperationStatus::Completed(view.outcome.cloned()?),
        };
        Some(OpUpdate {
            op_id: op_id.to_string(),
            action_digest: *self.digests.get(op_id)?,
            status,
        })
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Add {
                op_id,
                digest,
                request,
                watcher,
                reply,
            } => {
                if self.digests.len() >= self.sweep_at {
                    // Operations the core forgot (completed and expired) leave here too.
                    let core = &self.core;
                    self.digests
                        .retain(|op, _| core.operation(&OperationId(op.clone())).is_some());
                    self.traces
                        .retain(|op, _| core.operation(&OperationId(op.clone())).is_some());
                    self.sweep_at = (self.digests.len() * 2).max(1024);
                }
                let span = tracing::debug_span!(
                    target: "cairn_server::scheduler",
                    "scheduler.queue",
                    operation = %op_id,
                    action = %digest,
                    priority = request.priority,
                    cacheable = request.cacheable,
                );
                trace_context::set_parent(&span, pairs(&request.payload.trace_context));
                let _in = span.enter();
                if self.digests.len() >= MAX_OPERATIONS {
                    let _ = reply.send(Err(Error::resource_exhausted(format!(
                        "the scheduler holds {} operations, its limit; retry when some have completed",
                        self.digests.len()
                    ))));
                    return;
                }
                let no = self.next_watcher;
                self.next_watcher += 1;
                self.digests.insert(op_id.clone(), digest);
                if !request.payload.trace_context.is_empty() {
                    self.traces
                        .insert(op_id.clone(), request.payload.trace_context.clone());
                }
                self.watchers
                    .entry(op_id.clone())
                    .or_default()
                    .push((no, watcher));
                match self
                    .core
                    .add_operation(now, OperationId(op_id.clone()), *request)
                {
                    Ok(d) => {
                        let _ = reply.send(Ok(no));
                        self.apply(d);
                    }
                    Err(e) => {
                        self.watchers.remove(&op_id);
                        self.digests.remove(&op_id);
                        self.traces.remove(&op_id);
                        let _ = reply.send(Err(event_error(e)));
                    }
                }
            }
            Cmd::Attach {
                op_id,
                watcher,
                reply,
            } => {
                let Some(snap) = self.snapshot(&op_id) else {
                    let _ = reply.send(Err(Error::not_found(format!(
                        "operation {op_id:?} does not exist (or has expired)"
                    ))));
                    return;
                };
                let no = self.next_watcher;
                self.next_watcher += 1;
                if matches!(snap.status, OperationStatus::Completed(_)) {
                    let _ = reply.send(Ok((no, snap)));
                    return;
                }
                self.watchers
                    .entry(op_id.clone())
                    .or_default()
                    .push((no, watcher));
                match self.core.watcher_attached(now, &OperationId(op_id)) {
                    Ok(d) => {
                        let _ = reply.send(Ok((no, snap)));
                        self.apply(d);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(event_error(e)));
                    }
                }
            }
            Cmd::Detach { op_id, watcher_no } => {
                let Some(list) = self.watchers.get_mut(&op_id) else {
                    return;
                };
                let before = list.len();
                list.retain(|(n, _)| *n != watcher_no);
                if list.len() < before {
                    if let Ok(d) = self.core.watcher_detached(now, &OperationId(op_id)) {
                        self.apply(d);
                    }
                }
            }
            Cmd::Cancel { op_id, reply } => {
                match self.core.cancel_operation(now, &OperationId(op_id)) {
                    Ok(d) => {
                        let _ = reply.send(Ok(()));
                        self.apply(d);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(event_error(e)));
                    }
                }
            }
            Cmd::Delete { op_id, reply } => {
                match self.core.delete_operation(&OperationId(op_id.clone())) {
                    Ok(()) => {
                        self.digests.remove(&op_id);
                        self.traces.remove(&op_id);
                        self.watchers.remove(&op_id);
                        let _ = reply.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(event_error(e)));
                    }
                }
            }
            Cmd::Get { op_id, reply } => {
                let _ = reply.send(self.snapshot(&op_id));
            }
            Cmd::List { reply } => {
                let ids: Vec<String> = self.core.operations().map(|v| v.op_id.0.clone()).collect();
                let _ = reply.send(ids.iter().filter_map(|id| self.snapshot(id)).collect());
            }
            Cmd::WorkerConnect {
                worker_id,
                properties,
                slots,
                tx,
                reply,
            } => {
                match self.core.worker_connected(
                    now,
                    WorkerId(worker_id.clone()),
                    properties,
                    slots,
                ) {
                    Ok(d) => {
                        if let Some(r) = &mut self.run_to_end {
                            r.connected(&worker_id, slots);
                        }
                        self.workers.insert(worker_id, tx);
                        let _ = reply.send(Ok(()));
                        self.apply(d);
                        self.capacity.notify_one();
                    }
                    Err(e) => {
                        let _ = reply.send(Err(event_error(e)));
                    }
                }
            }
            Cmd::WorkerKeepalive { worker_id } => {
                if let Ok(d) = self.core.worker_keepalive(now, &WorkerId(worker_id)) {
                    self.apply(d);
                }
            }
            Cmd::WorkerDone {
                worker_id,
                attempt,
                outcome,
            } => {
                self.unacked_kills.remove(&(worker_id.clone(), attempt));
                // Starts that waited for this attempt's slot go out now.
                let ready = match &mut self.run_to_end {
                    Some(r) => r.done(&worker_id, attempt),
                    None => vec![],
                };
                for msg in ready {
                    if !self.send_worker(&worker_id, msg) {
                        let d = self.drop_worker(&worker_id);
                        self.apply(d);
                        break;
                    }
                }
                // An answer is a sign of life, as a keepalive is.
                if let Ok(d) = self
                    .core
                    .worker_keepalive(now, &WorkerId(worker_id.clone()))
                {
                    self.apply(d);
                }
                if let Ok(d) = self.core.action_completed(
                    now,
                    &WorkerId(worker_id),
                    AttemptId(attempt),
                    outcome,
                ) {
                    self.apply(d);
                }
                self.capacity.notify_one();
            }
            Cmd::RunRevokedToEnd => {
                self.run_to_end.get_or_insert_with(Default::default);
            }
            Cmd::WorkerGone { worker_id } => {
                if let Some(r) = &mut self.run_to_end {
                    r.gone(&worker_id);
                }
                self.workers.remove(&worker_id);
                if let Ok(d) = self.core.worker_disconnected(now, &WorkerId(worker_id)) {
                    self.apply(d);
                }
            }
            Cmd::Drain {
                worker_id,
                draining,
                reply,
            } => {
                // The worker's id, or its configured name (ids are `NAME-` and 8 hex digits).
                let ids: Vec<String> = self
                    .workers
                    .keys()
                    .filter(|id| {
                        *id == &worker_id
                            || id
                                .strip_prefix(worker_id.as_str())
                                .and_then(|rest| rest.strip_prefix('-'))
                                .is_some_and(|r| {
                                    r.len() == 8 && r.bytes().all(|b| b.is_ascii_hexdigit())
                                })
                    })
                    .cloned()
                    .collect();
                if ids.is_empty() {
                    let _ = reply.send(Err(Error::not_found(format!(
                        "no worker {worker_id:?} (an id, or a worker's configured name) is connected to this scheduler"
                    ))));
                    return;
                }
                for id in ids {
                    if let Ok(d) =
                        self.core
                            .set_worker_draining(now, &WorkerId(id.clone()), draining)
                    {
                        tracing::info!(worker = %id, draining, "worker drain changed by the admin API");
                        self.apply(d);
                    }
                }
                self.capacity.notify_one();
                let _ = reply.send(Ok(()));
            }
            Cmd::CouldStart { platforms, reply } => {
                let _ = reply.send(self.core.could_start(&platforms));
            }
            Cmd::Overview { reply } => {
                let _ = reply.send(self.overview());
            }
            Cmd::QueueSummary { query, reply } => {
                let _ = reply.send(self.queue_summary(&query));
            }
            Cmd::WorkersPage {
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(self.workers_page(offset, limit));
            }
            Cmd::Operations { of, limit, reply } => {
                let now = self.now();
                let rows = self
                    .core
                    .operations()
                    .filter(|v| match &of {
                        OpFilter::Invocation(id) => v.invocation_id == id.as_str(),
                        OpFilter::Action(d) => self.digests.get(&v.op_id.0) == Some(d),
                    })
                    .filter_map(|v| self.op_row(&v, now))
                    .take(limit)
                    .collect();
                let _ = reply.send(rows);
            }
            Cmd::LastOutcome { digest, reply } => {
                let last = self
                    .core
                    .operations()
                    .filter(|v| self.digests.get(&v.op_id.0) == Some(&digest))
                    .filter_map(|v| Some((v.completed_at?, v.outcome?)))
                    .max_by_key(|(at, _)| *at)
                    .map(|(_, o)| o.clone());
                let _ = reply.send(last);
            }
            Cmd::Stats { reply } => {
                let mut s = SchedulerStats {
                    queued: self.core.queue_length(),
                    executing: self.core.executing_count(),
                    retries_total: self.core.counters().retries_total,
                    completed: self.core.counters().operations_completed,
                    ..Default::default()
                };
                for w in self.core.workers() {
                    s.workers += 1;
                    s.total_slots += w.total_slots as u64;
                    s.busy_slots += w.busy_slots as u64;
                }
                let _ = reply.send(s);
            }
        }
    }

    /// A copy of what the core holds (read only).
    fn overview(&self) -> Overview {
        let now = self.now();
        let mut running: HashMap<&str, Vec<String>> = HashMap::new();
        let operations: Vec<OpRow> = self
            .core
            .operations()
            .filter_map(|v| {
                if let Some(w) = v.worker_id {
                    running.entry(&w.0).or_default().push(v.op_id.0.clone());
                }
                self.op_row(&v, now)
            })
            .collect();
        let workers = self
            .core
            .workers()
            .map(|w| WorkerRow {
                worker_id: w.worker_id.0.clone(),
                properties: w.properties.to_vec(),
                total_slots: w.total_slots,
                busy_slots: w.busy_slots,
                running: running.remove(w.worker_id.0.as_str()).unwrap_or_default(),
                connected_for: now.saturating_sub(w.connected_at),
                last_keepalive_ago: now.saturating_sub(w.last_seen),
                draining: w.draining,
            })
            .collect();
        Overview {
            operations,
            workers,
        }
    }

    /// One operation as the web UI shows it.
    fn op_row(
        &self,
        v: &cairn_scheduler::OperationView<'_, re::ExecuteResponse>,
        now: Duration,
    ) -> Option<OpRow> {
        let digest = *self.digests.get(&v.op_id.0)?;
        let stage = match v.stage {
            cairn_scheduler::Stage::Queued => "queued",
            cairn_scheduler::Stage::Executing => "executing",
            cairn_scheduler::Stage::Completed => "completed",
        };
        let (result, exit_code) = match v.outcome {
            Some(o) => (
                Some(result_kind(o)),
                o.as_ref()
                    .ok()
                    .and_then(|r| r.result.as_ref())
                    .map(|r| r.exit_code),
            ),
            None => (None, None),
        };
        Some(OpRow {
            op_id: v.op_id.0.clone(),
            digest,
            stage,
            invocation_id: v.invocation_id.to_string(),
            priority: v.priority,
            queued_for: v.queued_at.map(|q| now.saturating_sub(q)),
            executing_for: v.started_at.map(|s| now.saturating_sub(s)),
            worker: v.worker_id.map(|w| w.0.clone()),
            platform: self
                .core
                .operation_payload(v.op_id)
                .map(|p| p.platform.clone())
                .unwrap_or_default(),
            result,
            exit_code,
            retries: v.retries,
        })
    }

    /// Carries out decisions; a worker whose stream cannot take a message is disconnected,
    /// and what that decides is carried out too.
    fn apply(&mut self, decisions: Vec<Decision<ActionPayload, re::ExecuteResponse>>) {
        let mut pending = decisions;
        while !pending.is_empty() {
            let mut next = Vec::new();
            for d in pending {
                match d {
                    Decision::StartAction {
                        worker_id,
                        attempt_id,
                        payload,
                        ..
                    } => {
                        // The match of an action to a worker, in the trace of the Execute
                        // call; the worker's spans are its children.
                        let span = tracing::debug_span!(
                            target: "cairn_server::scheduler",
                            "scheduler.start_action",
                            worker = %worker_id.0,
                            attempt = %attempt_id.0,
                            action = %payload.digest,
                            instance = %payload.instance,
                        );
                        trace_context::set_parent(&span, pairs(&payload.trace_context));
                        let _in = span.enter();
                        let msg = wapi::SchedulerMessage {
                            message: Some(wapi::scheduler_message::Message::StartAction(
                                wapi::StartAction {
                                    action_id: attempt_id.0.to_string(),
                                    instance_name: payload.instance.clone(),
                                    action_hash: payload.digest.hash_hex(),
                                    action_size: payload.digest.size() as i64,
                                    digest_function: payload.digest.function().to_proto(),
                                    skip_cache_write: payload.skip_cache_write,
                                    timeout_ms: payload.timeout.map_or(0, |t| t.as_millis() as u64),
                                    queued_at_unix_ms: payload.queued_at_unix_ms,
                                    platform: payload
                                        .platform
                                        .iter()
                                        .map(|(name, value)| wapi::Property {
                                            name: name.clone(),
                                            value: value.clone(),
                                        })
                                        .collect(),
                                    trace_context: trace_context::inject(&span)
                                        .into_iter()
                                        .map(|(name, value)| wapi::Property { name, value })
                                        .collect(),
                                },
                            )),
                        };
                        // With dropped actions running to their end, a start may wait for
                        // the worker's slot.
                        let msg = match &mut self.run_to_end {
                            Some(r) => match r.start(&worker_id.0, attempt_id.0, msg) {
                                Some(m) => m,
                                None => continue,
                            },
                            None => msg,
                        };
                        if !self.send_worker(&worker_id.0, msg) {
                            tracing::warn!(worker = %worker_id.0, "the worker's stream cannot take the action; dropping the worker");
                            next.extend(self.drop_worker(&worker_id.0));
                        }
                    }
                    Decision::KillAction {
                        worker_id,
                        attempt_id,
                    } if self.run_to_end.is_some() => {
                        tracing::debug!(worker = %worker_id.0, attempt = attempt_id.0, "dropped action runs to its end (disable_kill_revoked_operations)");
                        if let Some(r) = &mut self.run_to_end {
                            r.kill(&worker_id.0, attempt_id.0);
                        }
                    }
                    Decision::KillAction {
                        worker_id,
                        attempt_id,
                    } => {
                        tracing::debug!(
                            target: "cairn_server::scheduler",
                            worker = %worker_id.0,
                            attempt = %attempt_id.0,
                            "scheduler.kill_action"
                        );
                        let msg = wapi::SchedulerMessage {
                            message: Some(wapi::scheduler_message::Message::KillAction(
                                wapi::KillAction {
                                    action_id: attempt_id.0.to_string(),
                                },
                            )),
                        };
                        if !self.send_worker(&worker_id.0, msg) {
                            next.extend(self.drop_worker(&worker_id.0));
                        } else if let Some(t) = self.opts.kill_ack_timeout {
                            self.unacked_kills
                                .insert((worker_id.0.clone(), attempt_id.0), Instant::now() + t);
                        }
                    }
                    Decision::OperationUpdate { op_id, status } => {
                        let done = matches!(status, OperationStatus::Completed(_));
                        if let (OperationStatus::Completed(outcome), Some(m), false) =
                            (&status, &self.metrics, self.opts.claims_only)
                        {
                            m.execution_completed(result_kind(outcome));
                        }
                        if let OperationStatus::Completed(outcome) = &status {
                            crate::web_ui::activity::completed(&op_id.0, outcome);
                        }
                        let trace = done.then(|| self.traces.remove(&op_id.0)).flatten();
                        if let (OperationStatus::Completed(outcome), Some(trace)) = (&status, trace)
                        {
                            // The end of the operation (success, failure, timeout, ...) in
                            // its client's trace.
                            let span = tracing::debug_span!(
                                target: "cairn_server::scheduler",
                                "scheduler.complete",
                                operation = %op_id.0,
                                result = result_kind(outcome),
                            );
                            trace_context::set_parent(&span, pairs(&trace));
                            drop(span.enter());
                        }
                        if let Some(digest) = self.digests.get(&op_id.0).copied() {
                            let update = OpUpdate {
                                op_id: op_id.0.clone(),
                                action_digest: digest,
                                status,
                            };
                            if let Some(list) = self.watchers.get_mut(&op_id.0) {
                                // A watcher too slow to take an update loses it (the next one,
                                // or the final one, still comes); a closed one is dropped.
                                list.retain(|(_, w)| {
                                    !matches!(
                                        w.try_send(update.clone()),
                                        Err(mpsc::error::TrySendError::Closed(_))
                                    )
                                });
                            }
                        }
                        if done {
                            self.watchers.remove(&op_id.0);
                        }
                    }
                    Decision::WorkerRemoved { worker_id, reason } => {
                        if let Some(r) = &mut self.run_to_end {
                            r.gone(&worker_id.0);
                        }
                        if let Some(tx) = self.workers.remove(&worker_id.0) {
                            let _ = tx.try_send(Err(tonic::Status::unavailable(format!(
                                "worker removed by the scheduler: {reason:?}"
                            ))));
                        }
                    }
                }
            }
            pending = next;
        }
    }

    fn send_worker(&self, worker_id: &str, msg: wapi::SchedulerMessage) -> bool {
        match self.workers.get(worker_id) {
            Some(tx) => tx.try_send(Ok(msg)).is_ok(),
            None => false,
        }
    }

    /// Removes workers that have not answered a kill in time.
    fn check_kills(&mut self) {
        let now = Instant::now();
        let mut late: Vec<String> = self
            .unacked_kills
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|((w, _), _)| w.clone())
            .collect();
        late.sort();
        late.dedup();
        for worker in late {
            tracing::warn!(worker = %worker, timeout = ?self.opts.kill_ack_timeout, "worker did not acknowledge a kill in time (unacknowledged_kill_timeout_s); removing it");
            if let Some(tx) = self.workers.get(&worker) {
                let _ = tx.try_send(Err(tonic::Status::unavailable(
                    "removed by the scheduler: a kill was not acknowledged in time",
                )));
            }
            let d = self.drop_worker(&worker);
            self.apply(d);
        }
    }

    /// Every `worker_match_logging_interval_s`, says why queued actions wait.
    fn log_matching(&mut self) {
        let (Some(at), Some(interval)) = (self.next_match_log, self.opts.match_log_interval) else {
            return;
        };
        let now = Instant::now();
        if now < at {
            return;
        }
        self.next_match_log = Some(now + interval);
        let queued = self.core.queue_length();
        if queued == 0 {
            return;
        }
        let (workers, slots, busy) = self.core.workers().fold((0, 0, 0), |(n, s, b), w| {
            (n + 1, s + w.total_slots, b + w.busy_slots)
        });
        tracing::info!(
            queued,
            executing = self.core.executing_count(),
            workers,
            slots,
            busy_slots = busy,
            "worker matching: actions wait for a worker (every worker busy, draining, or none offers their platform)"
        );
    }

    fn drop_worker(
        &mut self,
        worker_id: &str,
    ) -> Vec<Decision<ActionPayload, re::ExecuteResponse>> {
        self.workers.remove(worker_id);
        if let Some(r) = &mut self.run_to_end {
            r.gone(worker_id);
        }
        self.unacked_kills.retain(|(w, _), _| w != worker_id);
        let now = self.now();
        self.core
            .worker_disconnected(now, &WorkerId(worker_id.to_string()))
            .unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch, for queued timestamps.
/// Borrowed (name, value) pairs of a trace context.
fn pairs(v: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

pub fn unix_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
