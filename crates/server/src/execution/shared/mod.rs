//! Shared scheduler state (`simple.experimental_backend: {redis: {redis_store: NAME}}`):
//! operations, the queue, merged actions and leases live in Redis, so that any replica
//! answers for any operation and a replica that dies loses nothing.
//!
//! Each replica keeps its own pure core (`driver.rs`) for the workers connected to it, and
//! only for them: it claims queued operations from Redis that one of its workers can start now
//! (`Scheduler::could_start`, asked per platform-property set, each set having its own queue
//! beside the shared one, so that nothing runnable waits behind what nobody can run), hands
//! each to its core, holds a lease on it that it renews every
//! lease/3, and writes the result back ([`replica`]). Every replica re-queues the operations
//! whose lease expired (their replica died or lost Redis), within `max_job_retries`. A client
//! of any replica submits to Redis and follows the operation there: it reads the operation's
//! hash, then again on each pub/sub message naming it (one subscription per replica, fanned
//! out in memory) and, because pub/sub loses messages over a reconnect, every few seconds.
//! Every change is one Lua script ([`scripts`]), atomic in Redis.
//!
//! The lease is `worker_timeout_s` (default 5 s): a dead replica is noticed as soon as a dead
//! worker would be. A replica that cannot renew its leases for that long stops its running
//! actions (another replica re-runs them) and claims nothing until Redis answers again.

mod events;
mod replica;
mod scripts;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Code, Digest, Error};
use cairn_scheduler::{ActionRequest, ErrorCode, OperationStatus, SchedError};
use cairn_store::redis_store::{redis, Conn, Connector};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use super::driver::{ActionPayload, OpUpdate};
use super::SchedulerHandle;
use scripts::Scripts;

/// Fields of an operation's hash that a client reads.
const READ_FIELDS: [&str; 5] = ["state", "digest", "result", "err_code", "err_msg"];
/// Re-read of a followed operation when no message came (pub/sub's safety net).
const POLL: Duration = Duration::from_secs(2);

/// What the shared backend needs from the `simple` config.
pub struct SharedOptions {
    /// `schedulers.NAME`, for messages.
    pub path: String,
    /// The scheduler's name: its keys live under `cairn:scheduler:{name}:`.
    pub name: String,
    /// `worker_timeout_s`.
    pub lease: Duration,
    pub max_job_retries: u32,
    /// `retain_completed_for_s`.
    pub retain_completed_for: Duration,
    /// `fallback_match_interval_s` (a claiming pass at least this often).
    pub fallback_match_interval: Option<Duration>,
    /// `unschedulable_grace_period_s`: a queued operation that no worker of any replica could
    /// ever run fails after this long.
    pub unschedulable_grace: Duration,
    /// `client_action_timeout_s`: a live operation that no client follows this long is
    /// dropped (CANCELLED).
    pub client_timeout: Duration,
    /// The matching rules (`supported_platform_properties`), for that check.
    pub matching: cairn_scheduler::SchedulerOptions,
}

/// One replica's view of the shared scheduler.
pub struct SharedScheduler {
    opts: SharedOptions,
    /// `redis_store NAME`, for messages.
    store: String,
    prefix: String,
    conn: Arc<Connector>,
    scripts: Arc<Scripts>,
    /// This replica's id (owner of its claims).
    replica: String,
    /// The core of the workers connected to this replica.
    local: SchedulerHandle,
    /// The pub/sub channel's messages, fanned out.
    events: events::Events,
    /// False while this replica cannot renew its leases: it claims nothing.
    healthy: AtomicBool,
    /// Set at a stop signal: the replica drains and claims nothing more.
    stopping: AtomicBool,
    /// Operations this replica runs: id -> fence.
    owned: parking_lot::Mutex<std::collections::HashMap<String, u64>>,
    /// The platform sets (SHA) that a local worker could start at the last claiming pass.
    fitting: parking_lot::Mutex<Vec<String>>,
    /// Kicked when a local run ended (a slot may be free).
    kick: tokio::sync::Notify,
    /// `execution_completed_count`, counted here for what this replica's workers ran (one per
    /// operation's end, as one scheduler counts, not one per attempt).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// What a replica records about itself for the cluster views (`/status`, `/metrics`), every
/// third of a lease; gone three leases after its last record.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaSummary {
    /// Workers connected to it.
    pub workers: u64,
    /// Their action slots, and those running an action.
    pub slots: u64,
    pub busy: u64,
    /// Operations it holds a lease on (claimed and running on its workers).
    pub claims: u64,
}

/// The whole shared scheduler as Redis sees it, read in one script of bounded cost (no
/// operation is read).
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Operations queued (every replica's clients').
    pub queued: u64,
    /// Operations executing (under a lease).
    pub executing: u64,
    /// Each live replica (its id and summary), in id order.
    pub replicas: Vec<(String, ReplicaSummary)>,
}

/// A stream of a followed operation's updates, ending after the completed one.
pub type UpdateStream = BoxStream<'static, Result<OpUpdate, tonic::Status>>;

impl SharedScheduler {
    /// Checks what can be checked of the store (a `redis_store`, not a cluster) and starts the
    /// replica's tasks.
    pub fn start(
        opts: SharedOptions,
        store: &str,
        conn: Arc<Connector>,
        local: SchedulerHandle,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Arc<SharedScheduler>, Error> {
        if conn.is_cluster() {
            return Err(Error::invalid_argument(format!(
                "{}.simple.experimental_backend.redis.redis_store: {store:?} is a cluster; shared \
                 scheduler state needs a standalone or sentinel Redis (its pub/sub and scripts \
                 span several keys)",
                opts.path
            )));
        }
        let prefix = format!("cairn:scheduler:{}:", opts.name);
        let s = Arc::new(SharedScheduler {
            opts,
            store: store.to_string(),
            prefix,
            conn,
            scripts: Arc::new(Scripts::new()),
            replica: format!(
                "{}-{}",
                hostname(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            local,
            events: Default::default(),
            healthy: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            owned: parking_lot::Mutex::new(Default::default()),
            fitting: parking_lot::Mutex::new(Vec::new()),
            kick: tokio::sync::Notify::new(),
            metrics,
        });
        replica::spawn(&s);
        tracing::info!(scheduler = %s.opts.name, replica = %s.replica, store = %s.store, "shared scheduler state in Redis");
        Ok(s)
    }

    /// A stop signal: claim nothing more (what runs here finishes, or its lease runs out and
    /// another replica runs it), so that a draining replica's workers are not handed work
    /// they would refuse.
    pub fn stop_claiming(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The core that this replica's workers connect to.
    pub fn local(&self) -> &SchedulerHandle {
        &self.local
    }

    /// This replica's id (in logs and in the operations it owns).
    pub fn replica_id(&self) -> &str {
        &self.replica
    }

    /// Whether this replica renews its leases and claims work (false while Redis has not
    /// answered for a lease, and after a stop signal).
    pub fn claiming(&self) -> bool {
        self.healthy.load(std::sync::atomic::Ordering::Relaxed)
            && !self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cluster-wide queue, executing count and replicas (UNAVAILABLE without Redis). A
    /// replica's summary that does not parse (written by something else) is left out.
    pub async fn cluster(&self) -> Result<ClusterView, Error> {
        let flat: Vec<Vec<u8>> = self
            .script("reading the cluster view", |s| &s.cluster, vec![])
            .await
            .map_err(|e| self.unavailable(e))?;
        let count = |i: usize| {
            flat.get(i)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|t| t.parse().ok())
                .unwrap_or(0)
        };
        let mut view = ClusterView {
            queued: count(0),
            executing: count(1),
            replicas: Vec::new(),
        };
        for pair in flat.get(2..).unwrap_or_default().chunks(2) {
            let [id, summary] = pair else { continue };
            if let Ok(summary) = serde_json::from_slice(summary) {
                view.replicas
                    .push((String::from_utf8_lossy(id).into_owned(), summary));
            }
        }
        Ok(view)
    }

    /// UNAVAILABLE naming the scheduler and the store, whatever Redis said.
    fn unavailable(&self, e: Error) -> Error {
        Error::new(
            Code::Unavailable,
            format!(
                "scheduler {:?}: its shared state in Redis ({}) cannot be reached: {}",
                self.opts.name, self.store, e.message
            ),
        )
    }

    /// Runs one script with the prefix as its first argument.
    async fn script<T>(
        &self,
        what: &'static str,
        pick: fn(&Scripts) -> &scripts::Lua,
        args: Vec<Vec<u8>>,
    ) -> Result<T, Error>
    where
        T: redis::FromRedisValue + Send + 'static,
    {
        let mut all = vec![self.prefix.clone().into_bytes()];
        all.extend(args);
        let all = Arc::new(all);
        let scripts = self.scripts.clone();
        self.conn
            .run("scheduler", what, move |mut conn: Conn| {
                let all = all.clone();
                let scripts = scripts.clone();
                let f: BoxFuture<'static, Result<T, redis::RedisError>> =
                    Box::pin(async move { pick(&scripts).run(&mut conn, &all).await });
                f
            })
            .await
    }

    /// Queues an operation, or follows the live one of the same cacheable action. Returns the
    /// id the client follows.
    pub async fn submit(
        &self,
        op_id: String,
        request: &ActionRequest<ActionPayload>,
    ) -> Result<String, Error> {
        let p = &request.payload;
        let score = queue_score(request.priority, p.queued_at_unix_ms);
        let platform = serde_json::to_string(&request.platform).unwrap_or_default();
        let trace = serde_json::to_string(&p.trace_context).unwrap_or_default();
        let mut args: Vec<Vec<u8>> = vec![
            op_id.into_bytes(),
            request.key.0.clone().into_bytes(),
            if request.cacheable {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
            score.to_string().into_bytes(),
            self.watch_ms().to_string().into_bytes(),
        ];
        for (k, v) in [
            ("digest", p.digest.file_name()),
            ("instance", p.instance.clone()),
            ("platform", platform),
            ("priority", request.priority.to_string()),
            ("invocation", request.invocation_id.clone()),
            ("cacheable", u8::from(request.cacheable).to_string()),
            ("skip_cache_write", u8::from(p.skip_cache_write).to_string()),
            (
                "timeout_ms",
                p.timeout.map_or(0, |t| t.as_millis() as u64).to_string(),
            ),
            ("queued_at_ms", p.queued_at_unix_ms.to_string()),
            ("trace", trace),
        ] {
            args.push(k.as_bytes().to_vec());
            args.push(v.into_bytes());
        }
        self.script("submit", |s| &s.submit, args)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// How long a live operation stays without a follower: `client_action_timeout_s`.
    fn watch_ms(&self) -> u64 {
        self.opts.client_timeout.as_millis().clamp(1, 1u128 << 50) as u64
    }

    /// How often a follower reads again at the least: [`POLL`], and often enough to keep its
    /// operation watched.
    fn poll(&self) -> Duration {
        POLL.min(self.opts.client_timeout / 3)
            .max(Duration::from_millis(50))
    }

    /// A follower's read: as [`SharedScheduler::get`], and the operation stays watched.
    async fn read_watched(&self, op_id: &str) -> Result<Option<OpUpdate>, Error> {
        let mut args = vec![
            op_id.as_bytes().to_vec(),
            self.watch_ms().to_string().into_bytes(),
        ];
        args.extend(READ_FIELDS.iter().map(|f| f.as_bytes().to_vec()));
        let v: Vec<Option<Vec<u8>>> = self
            .script("reading an operation", |s| &s.watch, args)
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(decode(op_id, &v))
    }

    /// The operation now, `None` when it does not exist (or has expired).
    pub async fn get(&self, op_id: &str) -> Result<Option<OpUpdate>, Error> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(format!("{}op:{op_id}", self.prefix))
            .arg(&READ_FIELDS[..]);
        let v: Vec<Option<Vec<u8>>> = self
            .conn
            .run(
                "scheduler",
                "reading an operation",
                cairn_store::redis_store::query(cmd),
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        Ok(decode(op_id, &v))
    }

    /// Follows an operation from its current stage to its end. NOT_FOUND when it does not
    /// exist. A Redis that stops answering ends the stream with UNAVAILABLE (the client
    /// follows again with WaitExecution).
    pub async fn follow(self: &Arc<Self>, op_id: String) -> Result<UpdateStream, Error> {
        let first = self
            .read_watched(&op_id)
            .await?
            .ok_or_else(|| not_found(&op_id))?;
        let (tx, rx) = mpsc::channel(4);
        let me = self.clone();
        tokio::spawn(async move {
            let follow = me.events.follow(&op_id);
            let mut last = first.status.stage();
            let done = matches!(first.status, OperationStatus::Completed(_));
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            // The first read came before this follower was registered: read once more.
            let mut woken = true;
            loop {
                // Armed before the read: a message between the read and the wait counts.
                let notified = follow.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if woken {
                    match me.read_watched(&op_id).await {
                        Ok(Some(u)) => {
                            let stage = u.status.stage();
                            let done = matches!(u.status, OperationStatus::Completed(_));
                            if stage != last || done {
                                last = stage;
                                if tx.send(Ok(u)).await.is_err() || done {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Err(not_found(&op_id).into())).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                woken = tokio::select! {
                    _ = &mut notified => true,
                    _ = tokio::time::sleep(me.poll()) => true,
                    _ = tx.closed() => return,
                };
            }
        });
        Ok(
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|u| (u, rx)) })
                .boxed(),
        )
    }

    /// Operations in name order after `after`, at most `n`.
    pub async fn list(&self, after: &str, n: usize) -> Result<Vec<OpUpdate>, Error> {
        let ids: Vec<String> = self
            .script(
                "listing operations",
                |s| &s.list,
                vec![after.as_bytes().to_vec(), n.to_string().into_bytes()],
            )
            .await
            .map_err(|e| self.unavailable(e))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(u) = self.get(&id).await? {
                out.push(u);
            }
        }
        Ok(out)
    }

    /// Ends a live operation CANCELLED (the replica running it stops it at its next lease
    /// renewal). A completed one is left as it is. NOT_FOUND when it does not exist.
    pub async fn cancel(&self, op_id: &str) -> Result<(), Error> {
        let response = error_response(&SchedError::new(
            ErrorCode::Cancelled,
            "the operation was cancelled (CancelOperation)",
        ));
        let r: i64 = self
            .complete_with(op_id, None, response)
            .await
            .map_err(|e| self.unavailable(e))?;
        if r < 0 {
            return Err(not_found(op_id));
        }
        Ok(())
    }

    /// Fails an operation that is still queued; false when it no longer is.
    async fn fail_queued(&self, op_id: &str, e: &SchedError) -> Result<bool, Error> {
        let retain = self.opts.retain_completed_for.as_millis().max(1) as u64;
        let r: i64 = self
            .script(
                "failing an operation",
                |s| &s.complete,
                vec![
                    op_id.as_bytes().to_vec(),
                    b"queued".to_vec(),
                    retain.to_string().into_bytes(),
                    b"result".to_vec(),
                    error_response(e).encode_to_vec(),
                ],
            )
            .await?;
        Ok(r == 1)
    }

    /// Forgets a completed operation; FAILED_PRECONDITION for a live one.
    pub async fn delete(&self, op_id: &str) -> Result<(), Error> {
        match self.get(op_id).await? {
            None => Err(not_found(op_id)),
            Some(u) if !matches!(u.status, OperationStatus::Completed(_)) => {
                Err(Error::failed_precondition(format!(
                    "operation {op_id:?} has not completed; cancel it first"
                )))
            }
            Some(_) => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(format!("{}op:{op_id}", self.prefix));
                let _: i64 = self
                    .conn
                    .run(
                        "scheduler",
                        "deleting an operation",
                        cairn_store::redis_store::query(cmd),
                    )
                    .await
                    .map_err(|e| self.unavailable(e))?;
                Ok(())
            }
        }
    }

    /// Writes the end of an operation: for this replica's attempt `fence`, or (`None`) for
    /// whatever attempt is live. 1 ended it, 0 it was not this attempt's or had ended, -1 it
    /// does not exist.
    async fn complete_with(
        &self,
        op_id: &str,
        fence: Option<u64>,
        response: re::ExecuteResponse,
    ) -> Result<i64, Error> {
        let retain = self.opts.retain_completed_for.as_millis().max(1) as u64;
        self.script(
            "completing an operation",
            |s| &s.complete,
            vec![
                op_id.as_bytes().to_vec(),
                fence
                    .map(|f| f.to_string())
                    .unwrap_or_default()
                    .into_bytes(),
                retain.to_string().into_bytes(),
                b"result".to_vec(),
                response.encode_to_vec(),
            ],
        )
        .await
    }
}

fn not_found(op_id: &str) -> Error {
    Error::not_found(format!(
        "operation {op_id:?} does not exist (or has expired)"
    ))
}

/// An `ExecuteResponse` carrying a scheduler error as its status.
pub(super) fn error_response(e: &SchedError) -> re::ExecuteResponse {
    re::ExecuteResponse {
        status: Some(cairn_core::proto::google::rpc::Status {
            code: Error::new(super::service::code_of(e.code), String::new())
                .code
                .rpc_code(),
            message: e.message.clone(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// The queue's order: lower priority value first, then earlier. Priorities are clamped to
/// ±2000 so the score stays exact in a double (4001 x 2^41 < 2^53).
fn queue_score(priority: i32, queued_at_ms: i64) -> i64 {
    let p = i64::from(priority.clamp(-2000, 2000)) + 2000;
    p * (1i64 << 41) + queued_at_ms.clamp(0, (1i64 << 41) - 1)
}

/// An operation from its hash fields ([`READ_FIELDS`]).
fn decode(op_id: &str, v: &[Option<Vec<u8>>]) -> Option<OpUpdate> {
    let text = |i: usize| {
        v.get(i)
            .and_then(|x| x.as_deref())
            .and_then(|b| std::str::from_utf8(b).ok())
    };
    let digest = Digest::from_file_name(text(1)?)?;
    let status = match text(0)? {
        "queued" => OperationStatus::Queued,
        "executing" => OperationStatus::Executing,
        "completed" => match v.get(2).and_then(|x| x.as_deref()) {
            Some(result) => {
                OperationStatus::Completed(re::ExecuteResponse::decode(result).map_err(|e| {
                    SchedError::new(
                        ErrorCode::DataLoss,
                        format!("the stored result of {op_id:?} does not decode: {e}"),
                    )
                }))
            }
            // Failed by a script (retries exhausted): a gRPC code and a message.
            None => OperationStatus::Completed(Ok(re::ExecuteResponse {
                status: Some(cairn_core::proto::google::rpc::Status {
                    code: text(3).and_then(|c| c.parse().ok()).unwrap_or(2),
                    message: text(4).unwrap_or("the operation failed").to_string(),
                    details: vec![],
                }),
                ..Default::default()
            })),
        },
        _ => return None,
    };
    Some(OpUpdate {
        op_id: op_id.to_string(),
        action_digest: digest,
        status,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_score_orders_priority_then_time() {
        let now = 1_765_000_000_000;
        assert!(queue_score(0, now) < queue_score(0, now + 1));
        assert!(queue_score(-1, now + 10_000) < queue_score(0, now));
        assert!(queue_score(1, now) > queue_score(0, now + 1_000_000));
        assert!(queue_score(i32::MAX, i64::MAX) < (1i64 << 53));
        assert!(queue_score(i32::MIN, i64::MIN) >= 0);
    }

    #[test]
    fn decode_refuses_what_it_cannot_read() {
        let d = cairn_core::DigestFunction::Sha256.digest_of(b"x");
        let f = |s: &str| Some(s.as_bytes().to_vec());
        let q = decode("op", &[f("queued"), f(&d.file_name()), None, None, None]).unwrap();
        assert_eq!(q.status, OperationStatus::Queued);
        assert!(decode("op", &[f("queued"), f("garbage"), None, None, None]).is_none());
        assert!(decode("op", &[f("weird"), f(&d.file_name()), None, None, None]).is_none());
        assert!(decode("op", &[None, None, None, None, None]).is_none());
        let bad = decode(
            "op",
            &[
                f("completed"),
                f(&d.file_name()),
                f("\u{ff}garbage"),
                None,
                None,
            ],
        )
        .unwrap();
        assert!(matches!(bad.status, OperationStatus::Completed(Err(_))));
        let failed = decode(
            "op",
            &[f("completed"), f(&d.file_name()), None, f("14"), f("lost")],
        )
        .unwrap();
        let OperationStatus::Completed(Ok(r)) = failed.status else {
            panic!("a failure is an ExecuteResponse with a status");
        };
        assert_eq!(r.status.unwrap().code, 14);
    }
}
