//! What each replica does in the background: listen to the pub/sub channel, claim queued
//! operations its own workers can start, renew the leases of what it runs and re-queue what
//! other (dead) replicas held, and write each local run's end back to Redis.
//!
//! The tasks hold a `Weak` reference: when the scheduler is dropped they end.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cairn_core::{Digest, Error};
use cairn_scheduler::{ActionKey, ActionRequest, ErrorCode, OperationStatus, SchedError};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{error_response, SharedScheduler};
use crate::execution::driver::{ActionPayload, OpUpdate};

/// Queued operations looked at per claiming pass: the head of the shared queue and of each
/// platform's queue that a local worker could start.
const PEEK: usize = 128;
/// Platform sets looked at per pass (a random sample of them when there are more).
const PLATFORM_SETS: usize = 256;
/// Wait before re-subscribing after the pub/sub connection dropped (doubled after each
/// failure, up to `RESUBSCRIBE_MAX`).
const RESUBSCRIBE: Duration = Duration::from_millis(250);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);
/// Fields read of a claimed operation, to build the local request.
const CLAIM_FIELDS: [&str; 11] = [
    "digest",
    "instance",
    "platform",
    "priority",
    "invocation",
    "cacheable",
    "skip_cache_write",
    "timeout_ms",
    "queued_at_ms",
    "trace",
    "key",
];

pub(super) fn spawn(s: &Arc<SharedScheduler>) {
    tokio::spawn(subscribe(Arc::downgrade(s)));
    tokio::spawn(claim_loop(Arc::downgrade(s)));
    tokio::spawn(lease_loop(Arc::downgrade(s)));
}

/// One subscription per replica; every message is fanned out to followers and the claimer.
/// A dropped connection makes everyone re-read (`*`), then subscribes again, waiting longer
/// after each failure (up to [`RESUBSCRIBE_MAX`]); one warning per outage.
async fn subscribe(s: Weak<SharedScheduler>) {
    let mut wait = RESUBSCRIBE;
    let mut failing = false;
    loop {
        let Some(me) = s.upgrade() else { return };
        let channel = format!("{}events", me.prefix);
        let conn = me.conn.clone();
        let name = me.opts.name.clone();
        drop(me);
        let subscribed = match conn.pubsub().await {
            Ok(mut ps) => match ps.subscribe(&channel).await {
                Ok(()) => Ok(ps),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.message),
        };
        match subscribed {
            Ok(mut ps) => {
                if failing {
                    tracing::info!(scheduler = %name, "subscribed to the shared scheduler's events again");
                }
                failing = false;
                wait = RESUBSCRIBE;
                // Whatever happened while unsubscribed is read again.
                if let Some(me) = s.upgrade() {
                    me.events.everything();
                }
                let mut stream = ps.on_message();
                while let Some(msg) = stream.next().await {
                    let Some(me) = s.upgrade() else { return };
                    if let Ok(id) = std::str::from_utf8(msg.get_payload_bytes()) {
                        me.events.message(id);
                    }
                }
                tracing::warn!(scheduler = %name, "the shared scheduler's pub/sub connection closed; subscribing again");
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(scheduler = %name, error = %e, "subscribing to the shared scheduler's events failed; retrying");
            }
            Err(e) => {
                tracing::debug!(scheduler = %name, error = %e, "subscribing to the shared scheduler's events failed");
                wait = (wait * 2).min(RESUBSCRIBE_MAX);
            }
        }
        if let Some(me) = s.upgrade() {
            me.events.everything();
        }
        tokio::time::sleep(wait).await;
    }
}

/// Claims work when it may have become possible: something was queued, a local worker has
/// room, a local run ended, or the fallback interval passed.
async fn claim_loop(s: Weak<SharedScheduler>) {
    loop {
        let Some(me) = s.upgrade() else { return };
        if let Err(e) = claim_pass(&me).await {
            tracing::debug!(scheduler = %me.opts.name, error = %e, "claiming from the shared queue failed");
        }
        let fallback = me
            .opts
            .fallback_match_interval
            .unwrap_or(Duration::from_secs(5));
        let local = me.local.clone();
        drop(me);
        let Some(me) = s.upgrade() else { return };
        tokio::select! {
            _ = local.capacity_changed() => {}
            _ = me.kick.notified() => {}
            _ = me.events.queued.notified() => {}
            _ = tokio::time::sleep(fallback) => {}
        }
    }
}

/// Claims what this replica's workers can start now, until nothing more fits.
async fn claim_pass(me: &Arc<SharedScheduler>) -> Result<(), Error> {
    loop {
        if !me.healthy.load(Ordering::Relaxed) || me.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        // The platforms with queued work that a local worker could start now, each asked on
        // its own, so that an operation deep in the shared queue is found as soon as one at
        // its head. The sets that fitted last time are read with the queue's head in one
        // call; a second call only when another set fits now and the queue is longer than
        // its head.
        let mut shas = me.fitting.lock().clone();
        let mut reads = 0;
        let (ids, platforms) = loop {
            reads += 1;
            let per_set = (PEEK / shas.len().max(1)).max(16);
            let mut args = vec![
                per_set.to_string().into_bytes(),
                PLATFORM_SETS.to_string().into_bytes(),
            ];
            args.extend(shas.iter().map(|s| s.clone().into_bytes()));
            let flat: Vec<Vec<u8>> = me.script("reading the queue", |s| &s.peek, args).await?;
            let (queued, sets, candidates) = parse_peek(&flat);
            let mut fitting = Vec::new();
            for (sha, platform) in sets {
                if me.local.could_start(vec![platform]).await?.first() == Some(&true) {
                    fitting.push(sha);
                }
            }
            let new_fit = fitting.iter().any(|f| !shas.contains(f));
            *me.fitting.lock() = fitting.clone();
            // When the shared queue's head was all of it, every queued operation is a
            // candidate already.
            if new_fit && queued > per_set && reads < 2 {
                shas = fitting;
                continue;
            }
            break candidates;
        };
        if ids.is_empty() {
            return Ok(());
        }
        let fits = me.local.could_start(platforms).await?;
        let mut claimed = 0;
        for (id, fit) in ids.iter().zip(fits) {
            if !fit {
                continue;
            }
            let lease = me.opts.lease.as_millis().to_string();
            let mut args = vec![
                id.as_bytes().to_vec(),
                me.replica.as_bytes().to_vec(),
                lease.into_bytes(),
            ];
            args.extend(CLAIM_FIELDS.iter().map(|f| f.as_bytes().to_vec()));
            // The new fence and the operation's fields, or nothing when another replica took
            // it first (or it ended).
            let claim: Vec<Option<String>> = me
                .script("claiming an operation", |s| &s.claim, args)
                .await?;
            let Some(fence) = claim
                .first()
                .cloned()
                .flatten()
                .and_then(|f| f.parse::<u64>().ok())
            else {
                continue;
            };
            claimed += 1;
            me.owned.lock().insert(id.clone(), fence);
            if let Err(e) = run_locally(me, id, fence, &claim[1..]).await {
                tracing::warn!(operation = %id, error = %e, "a claimed operation could not start here; handing it back");
                me.owned.lock().remove(id);
                let _ = hand_back(me, id, fence, &e.message).await;
            }
        }
        if claimed == 0 {
            return Ok(());
        }
    }
}

/// What the peek script returned: the shared queue's length, the queued platform sets (SHA,
/// properties), and the candidates' ids and properties in the shared queue's order.
type Peeked = (
    usize,
    Vec<(String, Vec<(String, String)>)>,
    (Vec<String>, Vec<Vec<(String, String)>>),
);

fn parse_peek(flat: &[Vec<u8>]) -> Peeked {
    let number = |i: usize| {
        flat.get(i)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| t.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let queued = number(0);
    let n_sets = number(1).min(flat.len().saturating_sub(2));
    let (sets, rest) = flat.get(2..).unwrap_or_default().split_at(n_sets);
    let sets = sets
        .chunks(2)
        .filter_map(|pair| {
            let [sha, platform] = pair else { return None };
            Some((
                String::from_utf8_lossy(sha).into_owned(),
                serde_json::from_slice(platform).unwrap_or_default(),
            ))
        })
        .collect();
    let mut candidates = Vec::new();
    for triple in rest.chunks(3) {
        let [id, platform, score] = triple else {
            continue;
        };
        let platform: Vec<(String, String)> = serde_json::from_slice(platform).unwrap_or_default();
        let score: f64 = std::str::from_utf8(score)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        candidates.push((score, String::from_utf8_lossy(id).into_owned(), platform));
    }
    // In the shared queue's order, whichever queue each came from.
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
    (
        queued,
        sets,
        candidates.into_iter().map(|(_, id, p)| (id, p)).unzip(),
    )
}

/// The platform sets that have queued operations (a sample of [`PLATFORM_SETS`] when there
/// are more): SHA and properties.
async fn queued_platforms(
    me: &Arc<SharedScheduler>,
) -> Result<Vec<(String, Vec<(String, String)>)>, Error> {
    let flat: Vec<Vec<u8>> = me
        .script(
            "reading the queued platforms",
            |s| &s.platforms,
            vec![PLATFORM_SETS.to_string().into_bytes()],
        )
        .await?;
    Ok(flat
        .chunks(2)
        .filter_map(|pair| {
            let [sha, platform] = pair else { return None };
            Some((
                String::from_utf8_lossy(sha).into_owned(),
                serde_json::from_slice(platform).unwrap_or_default(),
            ))
        })
        .collect())
}

/// Hands a claimed operation (its [`CLAIM_FIELDS`], in order) to this replica's core; a task
/// follows the local run and writes its end to Redis.
async fn run_locally(
    me: &Arc<SharedScheduler>,
    id: &str,
    fence: u64,
    v: &[Option<String>],
) -> Result<(), Error> {
    let field = |i: usize| v.get(i).cloned().flatten().unwrap_or_default();
    let digest = Digest::from_file_name(&field(0)).ok_or_else(|| {
        Error::data_loss(format!(
            "operation {id:?}: stored digest {:?} does not parse",
            field(0)
        ))
    })?;
    let platform: Vec<(String, String)> = serde_json::from_str(&field(2)).unwrap_or_default();
    let timeout_ms: u64 = field(7).parse().unwrap_or(0);
    let request = ActionRequest {
        key: ActionKey(field(10)),
        cacheable: field(5) == "1",
        priority: field(3).parse().unwrap_or(0),
        platform: platform.clone(),
        invocation_id: field(4),
        payload: ActionPayload {
            instance: field(1),
            digest,
            skip_cache_write: field(6) == "1",
            timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms)),
            queued_at_unix_ms: field(8).parse().unwrap_or(0),
            platform,
            trace_context: serde_json::from_str(&field(9)).unwrap_or_default(),
        },
    };
    let (tx, rx) = mpsc::channel(16);
    // One local operation per claim: the core still holds an earlier claim's ended one.
    me.local
        .add(local_id(id, fence), digest, request, tx)
        .await?;
    tokio::spawn(follow_local(Arc::downgrade(me), id.to_string(), fence, rx));
    Ok(())
}

/// Waits for the local run's end and writes it to Redis: a result completes the operation;
/// a failed attempt (worker lost, timed out, errored) goes back to the shared queue, counted
/// against `max_job_retries`; a local cancel (this replica lost the lease, or the client
/// cancelled) writes nothing.
async fn follow_local(
    s: Weak<SharedScheduler>,
    id: String,
    fence: u64,
    mut rx: mpsc::Receiver<OpUpdate>,
) {
    let outcome = loop {
        match rx.recv().await {
            Some(OpUpdate {
                status: OperationStatus::Completed(o),
                ..
            }) => break o,
            Some(_) => continue,
            None => return,
        }
    };
    let Some(me) = s.upgrade() else { return };
    {
        let mut owned = me.owned.lock();
        if owned.get(&id) == Some(&fence) {
            owned.remove(&id);
        }
    }
    me.kick.notify_one();
    // Counted once per run that produced a result, as one scheduler counts its completions.
    if let (Some(m), true) = (&me.metrics, outcome.is_ok()) {
        m.execution_completed(crate::execution::driver::result_kind(&outcome));
    }
    let written = match outcome {
        Ok(response) => me
            .complete_with(&id, Some(fence), response)
            .await
            .map(|_| ()),
        Err(e) if e.code == ErrorCode::Cancelled => Ok(()),
        // The scheduler's own verdicts on the request are final.
        Err(e)
            if matches!(
                e.code,
                ErrorCode::FailedPrecondition | ErrorCode::InvalidArgument
            ) =>
        {
            me.complete_with(&id, Some(fence), error_response(&e))
                .await
                .map(|_| ())
        }
        Err(e) => {
            // The local core gives up at once (its max_job_retries is 0); the count that
            // matters is the shared one.
            let reason = e
                .message
                .rsplit_once(" (attempt ")
                .map_or(e.message.as_str(), |(m, _)| m)
                .to_string();
            hand_back(&me, &id, fence, &reason).await
        }
    };
    if let Err(e) = written {
        // The lease runs out and another replica runs it again: slower, not lost.
        tracing::warn!(operation = %id, error = %e, "could not write the end of an operation to Redis; its lease will expire and it will run again");
    }
}

/// The name of a claim's operation in this replica's core.
fn local_id(id: &str, fence: u64) -> String {
    format!("{id}#{fence}")
}

async fn hand_back(me: &SharedScheduler, id: &str, fence: u64, reason: &str) -> Result<(), Error> {
    let retain = me.opts.retain_completed_for.as_millis().max(1) as u64;
    let r: i64 = me
        .script(
            "re-queuing an operation",
            |s| &s.requeue,
            vec![
                id.as_bytes().to_vec(),
                fence.to_string().into_bytes(),
                reason.as_bytes().to_vec(),
                me.opts.max_job_retries.to_string().into_bytes(),
                retain.to_string().into_bytes(),
            ],
        )
        .await?;
    tracing::info!(operation = %id, reason, requeued = r == 1, failed = r == 2, "attempt failed");
    Ok(())
}

/// Every lease/3: renew this replica's leases (stopping what it no longer holds), re-queue
/// what expired elsewhere. After a whole lease without Redis, stop everything held here.
async fn lease_loop(s: Weak<SharedScheduler>) {
    let mut last_ok = Instant::now();
    loop {
        let Some(me) = s.upgrade() else { return };
        let every = (me.opts.lease / 3).max(Duration::from_millis(100));
        match renew_and_reap(&me).await {
            Ok(()) => {
                last_ok = Instant::now();
                if let Err(e) = fail_unschedulable(&me).await {
                    tracing::debug!(scheduler = %me.opts.name, error = %e, "checking for unschedulable operations failed");
                }
                if !me.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(scheduler = %me.opts.name, "Redis answers again: claiming work");
                    me.kick.notify_one();
                }
            }
            Err(e) => {
                if last_ok.elapsed() >= me.opts.lease && me.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(scheduler = %me.opts.name, error = %e, lease = ?me.opts.lease, "leases could not be renewed: stopping the actions run here (other replicas re-run them) and claiming nothing until Redis answers");
                }
                if !me.healthy.load(Ordering::Relaxed) {
                    let held: Vec<(String, u64)> = me.owned.lock().drain().collect();
                    for (id, fence) in held {
                        let _ = me.local.cancel(local_id(&id, fence)).await;
                    }
                }
            }
        }
        drop(me);
        tokio::time::sleep(every).await;
    }
}

/// Records this replica's workers, then fails the queued operations that have waited the
/// grace period while no worker of any live replica could ever run them (FAILED_PRECONDITION
/// naming the property, as the in-memory scheduler does).
async fn fail_unschedulable(me: &Arc<SharedScheduler>) -> Result<(), Error> {
    let mine: Vec<Vec<(String, String)>> = me
        .local
        .overview()
        .await?
        .workers
        .into_iter()
        .map(|w| w.properties)
        .collect();
    let stats = me.local.stats().await?;
    let summary = super::ReplicaSummary {
        workers: stats.workers as u64,
        slots: stats.total_slots,
        busy: stats.busy_slots,
        claims: me.owned.lock().len() as u64,
    };
    let ttl = (me.opts.lease * 3).as_millis().to_string();
    let records: Vec<String> = me
        .script(
            "recording this replica's workers",
            |s| &s.workers,
            vec![
                me.replica.as_bytes().to_vec(),
                ttl.into_bytes(),
                serde_json::to_vec(&mine).unwrap_or_default(),
                serde_json::to_vec(&summary).unwrap_or_default(),
            ],
        )
        .await?;
    let workers: Vec<Vec<(String, String)>> = records
        .iter()
        .filter_map(|r| serde_json::from_str::<Vec<Vec<(String, String)>>>(r).ok())
        .flatten()
        .collect();
    let grace = me
        .opts
        .unschedulable_grace
        .as_millis()
        .min(i64::MAX as u128);
    // The head of the shared queue (what an older replica queued without a platform's
    // queue), then each platform that no worker of any replica could run.
    let mut queues = vec![String::new()];
    for (sha, platform) in queued_platforms(me).await? {
        if cairn_scheduler::unschedulable(&platform, &workers, &me.opts.matching).is_some() {
            queues.push(sha);
        }
    }
    // One script for all of them.
    let mut args = vec![
        grace.to_string().into_bytes(),
        PEEK.to_string().into_bytes(),
    ];
    args.extend(queues.into_iter().map(String::into_bytes));
    let flat: Vec<Vec<u8>> = me
        .script("reading waiting operations", |s| &s.waiting, args)
        .await?;
    for pair in flat.chunks(2) {
        let [id, platform] = pair else { continue };
        let id = String::from_utf8_lossy(id);
        let platform: Vec<(String, String)> = serde_json::from_slice(platform).unwrap_or_default();
        let Some(why) = cairn_scheduler::unschedulable(&platform, &workers, &me.opts.matching)
        else {
            continue;
        };
        let message = format!(
            "{why}; waited {:?} (unschedulable_grace_period_s) on every scheduler replica",
            me.opts.unschedulable_grace
        );
        let failed = me
            .fail_queued(
                &id,
                &SchedError::new(ErrorCode::FailedPrecondition, message),
            )
            .await?;
        if failed {
            tracing::warn!(operation = %id, reason = %why, "no worker of any replica can run a queued operation: failed it");
        }
    }
    Ok(())
}

async fn renew_and_reap(me: &Arc<SharedScheduler>) -> Result<(), Error> {
    let held: Vec<(String, u64)> = me
        .owned
        .lock()
        .iter()
        .map(|(id, f)| (id.clone(), *f))
        .collect();
    if !held.is_empty() {
        let mut args = vec![
            me.replica.as_bytes().to_vec(),
            me.opts.lease.as_millis().to_string().into_bytes(),
        ];
        for (id, fence) in &held {
            args.push(id.as_bytes().to_vec());
            args.push(fence.to_string().into_bytes());
        }
        let lost: Vec<String> = me.script("renewing leases", |s| &s.renew, args).await?;
        for id in lost {
            // Cancelled by a client, or re-queued after this replica was cut off: stop it.
            let fence = me.owned.lock().remove(&id);
            if let Some(fence) = fence {
                tracing::info!(operation = %id, "no longer held here (cancelled, or re-queued after a lost lease): stopping it");
                let _ = me.local.cancel(local_id(&id, fence)).await;
            }
        }
    }
    let retain = me.opts.retain_completed_for.as_millis().max(1) as u64;
    let reaped: i64 = me
        .script(
            "re-queuing expired leases",
            |s| &s.reap,
            vec![
                me.opts.max_job_retries.to_string().into_bytes(),
                retain.to_string().into_bytes(),
                me.opts.lease.as_millis().to_string().into_bytes(),
                me.watch_ms().to_string().into_bytes(),
            ],
        )
        .await?;
    if reaped > 0 {
        tracing::warn!(scheduler = %me.opts.name, operations = reaped, "re-queued operations whose replica stopped renewing its lease");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    #[test]
    fn peek_answers_are_read_in_queue_order() {
        let flat = vec![
            b("300"),
            b("2"),
            b("sha-a"),
            b(r#"[["OSFamily","linux"]]"#),
            b("op-late"),
            b(r#"[["OSFamily","linux"]]"#),
            b("20"),
            b("op-early"),
            b("[]"),
            b("10"),
        ];
        let (queued, sets, (ids, platforms)) = parse_peek(&flat);
        assert_eq!(queued, 300);
        assert_eq!(
            sets,
            vec![(
                "sha-a".to_string(),
                vec![("OSFamily".into(), "linux".into())]
            )]
        );
        assert_eq!(ids, vec!["op-early", "op-late"]);
        assert_eq!(platforms[0], vec![]);
    }

    #[test]
    fn peek_answers_that_do_not_parse_yield_what_they_can() {
        // Counts that are not numbers, a set count past the end, platforms that are not
        // JSON, a triple cut short: nothing panics.
        for flat in [
            vec![],
            vec![b("x")],
            vec![b("1"), b("99"), b("sha")],
            vec![b("1"), b("0"), b("op"), b("{not json"), b("nan?")],
            vec![b("1"), b("0"), b("op"), b("[]")],
            vec![b("1"), b("1"), b("sha"), b("op"), b("[]"), b("5")],
        ] {
            let (_, _, (ids, platforms)) = parse_peek(&flat);
            assert_eq!(ids.len(), platforms.len());
        }
        let (_, _, (ids, platforms)) =
            parse_peek(&[b("1"), b("0"), b("op"), b("{not json"), b("x")]);
        assert_eq!(ids, vec!["op"]);
        assert!(platforms[0].is_empty());
    }
}
