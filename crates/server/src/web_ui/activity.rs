//! What each invocation asked of this process's action cache and schedulers, recorded as it
//! happens: Bazel sends its `RequestMetadata` (with `tool_invocation_id`) on every
//! GetActionResult and Execute, the services hand each one here ([`lookup`], [`cache_hit`],
//! [`queued`]), and the scheduler's driver hands over how each operation ended
//! ([`completed`]). An invocation's page then lists its remote actions, with cache hits and
//! misses, long after the scheduler forgot its completed operations
//! (`retain_completed_for_s`).
//!
//! Off until a web UI is configured ([`enable`]): the services pay one atomic load per call.
//! Bounded: at most the web UI's `max_invocations` invocations (the oldest is forgotten
//! first, like the invocation index), none older than its `max_invocation_age_s` (by their
//! last recorded call), [`MAX_ACTIONS_PER_INVOCATION`] actions each (the rest only counted)
//! and [`MAX_ACTIONS`] in all. Ids longer than the index takes are ignored. The record is kept
//! in a file across restarts by [`super::activity_file`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::longrunning::Operation;
use cairn_core::Digest;
use cairn_scheduler::Outcome;
use parking_lot::Mutex;

/// Actions remembered per invocation; more are counted, not listed.
pub const MAX_ACTIONS_PER_INVOCATION: usize = 20_000;
/// Actions remembered across all invocations; past it the oldest invocation is forgotten.
pub const MAX_ACTIONS: usize = 200_000;
/// Failed executions whose ExecuteResponse is kept (their results are not in the action
/// cache); the oldest is forgotten first.
pub const MAX_FAILED_RESULTS: usize = 10_000;
/// Largest ExecuteResponse kept whole; larger ones lose their inline stdout, stderr and
/// server logs (the digests stay).
const MAX_KEPT_RESPONSE_BYTES: usize = 64 << 10;
/// Longest invocation id recorded (as the invocation index).
const MAX_ID_BYTES: usize = 256;

/// How an Execute of the action went, as far as this process saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// Answered from the action cache by Execute itself.
    CacheHit,
    /// Queued as operation `op_id` and not (yet) seen to end.
    Queued { op_id: String },
    /// Ended: `result` is `success`, `failure`, `timeout` (as `execution_completed_count`).
    Done {
        op_id: String,
        result: &'static str,
        exit_code: Option<i32>,
        worker: String,
        /// The status message of a failed execution.
        message: String,
    },
}

/// One action of an invocation.
#[derive(Debug, Clone)]
pub struct ActionRecord {
    pub digest: Digest,
    pub instance: String,
    /// When the invocation first asked about it (Unix ms).
    pub first_ms: i64,
    /// The last GetActionResult: found in the action cache or not.
    pub lookup: Option<bool>,
    /// The last Execute.
    pub execution: Option<Execution>,
}

impl ActionRecord {
    /// A cache hit: found by GetActionResult or answered from the cache by Execute, and not
    /// executed since.
    pub fn is_cache_hit(&self) -> bool {
        match &self.execution {
            Some(Execution::CacheHit) => true,
            None => self.lookup == Some(true),
            _ => false,
        }
    }

    /// Executed and failed (non-zero exit, error, timeout).
    pub fn failed(&self) -> bool {
        matches!(&self.execution, Some(Execution::Done { result, .. }) if *result != "success")
    }
}

/// An invocation's counts and (some of) its actions.
#[derive(Debug, Clone, Default)]
pub struct InvocationActivity {
    /// Actions remembered (at most [`MAX_ACTIONS_PER_INVOCATION`]) and those only counted.
    pub actions: usize,
    pub not_listed: u64,
    pub cache_hits: usize,
    /// Looked up and not found, or executed.
    pub cache_misses: usize,
    pub failed: usize,
    /// Up to the asked number of actions, failed ones first, then in the order first seen.
    pub rows: Vec<ActionRecord>,
}

#[derive(Default)]
pub(super) struct Invocation {
    /// When its first and last call was recorded (Unix ms).
    pub(super) first_ms: i64,
    pub(super) last_ms: i64,
    pub(super) actions: Vec<ActionRecord>,
    by_digest: HashMap<Digest, usize>,
    pub(super) not_listed: u64,
    /// Kept as the records change, so that a list of invocations reads them in O(1).
    counts: Counts,
}

impl Invocation {
    /// Adds `r` (an action not yet in it), keeping the counts; false (and nothing added)
    /// when the action is already in it.
    pub(super) fn push(&mut self, r: ActionRecord) -> bool {
        if self.by_digest.contains_key(&r.digest) {
            return false;
        }
        self.counts.actions += 1;
        self.counts.apply(&r, 1);
        self.by_digest.insert(r.digest, self.actions.len());
        self.actions.push(r);
        true
    }
}

/// An invocation's cache hits, misses and failed executions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub actions: usize,
    pub cache_hits: usize,
    pub cache_misses: usize,
    pub failed: usize,
}

impl Counts {
    /// Adds (`sign` 1) or takes away (-1) what `r` counts for.
    fn apply(&mut self, r: &ActionRecord, sign: isize) {
        let add = |n: &mut usize| *n = n.saturating_add_signed(sign);
        if r.is_cache_hit() {
            add(&mut self.cache_hits);
        } else if r.lookup.is_some() || r.execution.is_some() {
            add(&mut self.cache_misses);
        }
        if r.failed() {
            add(&mut self.failed);
        }
    }
}

#[derive(Default)]
pub(super) struct Inner {
    pub(super) invocations: HashMap<String, Invocation>,
    /// Invocation ids by first-seen sequence, oldest first.
    pub(super) order: BTreeMap<u64, String>,
    /// Operations not yet seen to end: op id -> (invocation, digest).
    pub(super) open_ops: HashMap<String, (String, Digest)>,
    pub(super) total: usize,
    next_seq: u64,
    /// The last failed execution of each action, oldest first in `failed_order`.
    pub(super) failed: HashMap<Digest, Arc<re::ExecuteResponse>>,
    pub(super) failed_order: std::collections::VecDeque<Digest>,
}

impl Inner {
    /// Adds a new invocation `id` as the newest.
    pub(super) fn insert(&mut self, id: &str, inv: Invocation) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id.to_string());
        self.total += inv.actions.len();
        for r in &inv.actions {
            if let Some(Execution::Queued { op_id }) = &r.execution {
                self.open_ops
                    .insert(op_id.clone(), (id.to_string(), r.digest));
            }
        }
        self.invocations.insert(id.to_string(), inv);
    }

    /// Forgets the oldest invocations while there are more than `keep`, more than
    /// [`MAX_ACTIONS`] actions, or the oldest's last call is before `cutoff_ms`; never
    /// `spare`.
    pub(super) fn prune(&mut self, keep: usize, cutoff_ms: i64, spare: &str) {
        loop {
            let Some((&seq, oldest)) = self.order.first_key_value() else {
                return;
            };
            if oldest == spare {
                // The invocation being recorded is not dropped for its own actions.
                return;
            }
            let too_many = self.invocations.len() > keep || self.total > MAX_ACTIONS;
            let too_old = self
                .invocations
                .get(oldest)
                .is_none_or(|i| i.last_ms < cutoff_ms);
            if !too_many && !too_old {
                return;
            }
            let Some(oldest) = self.order.remove(&seq) else {
                return;
            };
            if let Some(gone) = self.invocations.remove(&oldest) {
                self.total -= gone.actions.len();
                for r in &gone.actions {
                    if let Some(Execution::Queued { op_id }) = &r.execution {
                        self.open_ops.remove(op_id);
                    }
                }
            }
        }
    }
}

/// The process's activity record.
pub struct Activity {
    pub(super) inner: Mutex<Inner>,
    pub(super) max_invocations: AtomicUsize,
    /// Invocations whose last call is older than this are forgotten (ms; `u64::MAX`: never).
    pub(super) max_age_ms: AtomicU64,
    /// Set by every change, cleared by the writer of the file when it takes a copy.
    pub(super) dirty: AtomicBool,
    /// Woken by every change, for the writer of the file.
    pub(super) changed: tokio::sync::Notify,
}

static ACTIVITY: OnceLock<Activity> = OnceLock::new();

/// Turns recording on (a web UI is configured), remembering at least `max_invocations`,
/// each for at least `max_age` after its last call (`None`: no age limit). Several web UIs
/// share the one record: the largest retention wins.
pub fn enable(max_invocations: usize, max_age: Option<std::time::Duration>) -> &'static Activity {
    let a = ACTIVITY.get_or_init(Activity::new);
    a.max_invocations
        .fetch_max(max_invocations.max(1), Ordering::Relaxed);
    let age_ms = max_age.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128) as u64);
    a.max_age_ms.fetch_max(age_ms, Ordering::Relaxed);
    a
}

/// The record, when a web UI turned it on.
pub fn get() -> Option<&'static Activity> {
    ACTIVITY.get()
}

fn wanted(invocation: &str) -> Option<&'static Activity> {
    if invocation.is_empty() || invocation.len() > MAX_ID_BYTES {
        return None;
    }
    get()
}

/// GetActionResult of `digest` for `invocation`: `found` in the action cache or not.
pub fn lookup(invocation: &str, instance: &str, digest: Digest, found: bool) {
    if let Some(a) = wanted(invocation) {
        a.update(invocation, instance, digest, |r| r.lookup = Some(found));
    }
}

/// Execute of `digest` for `invocation` answered from the action cache.
pub fn cache_hit(invocation: &str, instance: &str, digest: Digest) {
    if let Some(a) = wanted(invocation) {
        a.update(invocation, instance, digest, |r| {
            r.execution = Some(Execution::CacheHit)
        });
    }
}

/// Execute of `digest` for `invocation` queued as `op_id`.
pub fn queued(invocation: &str, instance: &str, digest: Digest, op_id: &str) {
    let Some(a) = wanted(invocation) else { return };
    if a.update(invocation, instance, digest, |r| {
        r.execution = Some(Execution::Queued {
            op_id: op_id.to_string(),
        })
    }) {
        a.inner
            .lock()
            .open_ops
            .insert(op_id.to_string(), (invocation.to_string(), digest));
    }
}

/// Operation `op_id` ended with `outcome` (from the scheduler's driver).
pub fn completed(op_id: &str, outcome: &Outcome<re::ExecuteResponse>) {
    let Some(a) = get() else { return };
    let result = crate::execution::driver::result_kind(outcome);
    if result == "cache_hit" {
        // Answered from an action cache after it was queued (a forwarding scheduler's
        // backend found it).
        a.end(op_id, Execution::CacheHit);
        return;
    }
    if let (Ok(resp), "failure" | "timeout") = (outcome, result) {
        a.keep_failed(op_id, resp);
    }
    let (exit_code, worker, message) = match outcome {
        Ok(resp) => (
            resp.result.as_ref().map(|r| r.exit_code),
            resp.result
                .as_ref()
                .and_then(|r| r.execution_metadata.as_ref())
                .map(|m| m.worker.clone())
                .unwrap_or_default(),
            resp.status
                .as_ref()
                .filter(|s| s.code != 0)
                .map(|s| s.message.clone())
                .unwrap_or_default(),
        ),
        Err(e) => (None, String::new(), e.message.clone()),
    };
    a.end(
        op_id,
        Execution::Done {
            op_id: op_id.to_string(),
            result,
            exit_code,
            worker,
            message,
        },
    );
}

/// Operation `op_id` was recorded as queued but the scheduler refused it (`message`).
pub fn refused(op_id: &str, message: &str) {
    if let Some(a) = get() {
        a.end(
            op_id,
            Execution::Done {
                op_id: op_id.to_string(),
                result: "failure",
                exit_code: None,
                worker: String::new(),
                message: message.to_string(),
            },
        );
    }
}

/// Records an operation stream that another scheduler answers (a `grpc` scheduler forwards
/// Execute there): `execute` is the call's (invocation, instance, action) when the stream
/// is an Execute's, `None` for a WaitExecution's (which only ends an operation already
/// recorded). The operation is recorded as queued under the other scheduler's operation name
/// at its first message, and ended by its last; the stream passes through unchanged.
pub fn forwarded<E: Send + 'static>(
    execute: Option<(String, String, Digest)>,
    stream: futures::stream::BoxStream<'static, Result<Operation, E>>,
) -> futures::stream::BoxStream<'static, Result<Operation, E>> {
    use futures::StreamExt;
    if get().is_none()
        || execute
            .as_ref()
            .is_some_and(|(inv, _, _)| wanted(inv).is_none())
    {
        return stream;
    }
    let mut execute = execute;
    let mut recorded = false;
    stream
        .map(move |item| {
            if let Ok(op) = &item {
                forwarded_update(&mut execute, &mut recorded, op);
            }
            item
        })
        .boxed()
}

fn forwarded_update(
    execute: &mut Option<(String, String, Digest)>,
    recorded: &mut bool,
    op: &Operation,
) {
    use cairn_core::proto::google::longrunning::operation::Result as OpResult;
    let queue = |execute: &Option<(String, String, Digest)>| {
        if let Some((inv, instance, digest)) = execute {
            queued(inv, instance, *digest, &op.name);
        }
    };
    if !op.done {
        if !*recorded {
            queue(execute);
            *recorded = true;
        }
        return;
    }
    match &op.result {
        Some(OpResult::Response(any)) => {
            let Ok(resp) = <re::ExecuteResponse as prost::Message>::decode(any.value.as_slice())
            else {
                return;
            };
            match execute.take() {
                Some((inv, instance, digest)) if resp.cached_result && !*recorded => {
                    cache_hit(&inv, &instance, digest);
                }
                e => {
                    if !*recorded {
                        queue(&e);
                    }
                    completed(&op.name, &Ok(resp));
                }
            }
        }
        Some(OpResult::Error(status)) => {
            if !*recorded {
                queue(execute);
            }
            refused(&op.name, &status.message);
        }
        None => {}
    }
    *recorded = true;
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            inner: Mutex::new(Inner::default()),
            max_invocations: AtomicUsize::new(1),
            max_age_ms: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Most invocations kept, and the oldest last call (Unix ms) an invocation may have at
    /// `now_ms` to be kept.
    pub(super) fn retention(&self, now_ms: i64) -> (usize, i64) {
        let age = self.max_age_ms.load(Ordering::Relaxed);
        let cutoff = if age == u64::MAX {
            i64::MIN
        } else {
            now_ms.saturating_sub(age.min(i64::MAX as u64) as i64)
        };
        (self.max_invocations.load(Ordering::Relaxed), cutoff)
    }

    /// Tells the writer of the file that the record changed.
    fn touch(&self) {
        self.dirty.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Keeps the failed `resp` of the action of `op_id` (a recorded operation).
    fn keep_failed(&self, op_id: &str, resp: &re::ExecuteResponse) {
        let mut resp = resp.clone();
        if prost::Message::encoded_len(&resp) > MAX_KEPT_RESPONSE_BYTES {
            if let Some(r) = resp.result.as_mut() {
                r.stdout_raw.clear();
                r.stderr_raw.clear();
            }
            resp.server_logs.clear();
            resp.message.truncate(4096);
        }
        let mut g = self.inner.lock();
        let Some(&(_, digest)) = g.open_ops.get(op_id) else {
            return;
        };
        if g.failed.insert(digest, Arc::new(resp)).is_none() {
            g.failed_order.push_back(digest);
        }
        while g.failed_order.len() > MAX_FAILED_RESULTS {
            if let Some(old) = g.failed_order.pop_front() {
                g.failed.remove(&old);
            }
        }
        drop(g);
        self.touch();
    }

    /// The last failed execution of the action `digest` this process recorded.
    pub fn failed_result(&self, digest: &Digest) -> Option<Arc<re::ExecuteResponse>> {
        self.inner.lock().failed.get(digest).cloned()
    }

    fn end(&self, op_id: &str, execution: Execution) {
        let mut g = self.inner.lock();
        let Some((invocation, digest)) = g.open_ops.remove(op_id) else {
            return;
        };
        let Some(inv) = g.invocations.get_mut(&invocation) else {
            return;
        };
        if let Some(&i) = inv.by_digest.get(&digest) {
            inv.counts.apply(&inv.actions[i], -1);
            inv.actions[i].execution = Some(execution);
            inv.counts.apply(&inv.actions[i], 1);
        }
        drop(g);
        self.touch();
    }

    /// Applies `f` to the record of `digest` in `invocation` (made if new); false when the
    /// invocation is past its cap and the action is only counted.
    pub(super) fn update(
        &self,
        invocation: &str,
        instance: &str,
        digest: Digest,
        f: impl FnOnce(&mut ActionRecord),
    ) -> bool {
        let now = crate::execution::driver::unix_ms_now();
        let mut g = self.inner.lock();
        let g = &mut *g;
        if !g.invocations.contains_key(invocation) {
            g.insert(
                invocation,
                Invocation {
                    first_ms: now,
                    ..Default::default()
                },
            );
        }
        let inv = g
            .invocations
            .get_mut(invocation)
            .expect("inserted just above");
        inv.last_ms = now;
        let i = match inv.by_digest.get(&digest) {
            Some(&i) => i,
            None if inv.actions.len() >= MAX_ACTIONS_PER_INVOCATION => {
                inv.not_listed += 1;
                return false;
            }
            None => {
                inv.push(ActionRecord {
                    digest,
                    instance: instance.to_string(),
                    first_ms: now,
                    lookup: None,
                    execution: None,
                });
                g.total += 1;
                inv.actions.len() - 1
            }
        };
        inv.counts.apply(&inv.actions[i], -1);
        f(&mut inv.actions[i]);
        inv.counts.apply(&inv.actions[i], 1);
        let (keep, cutoff) = self.retention(now);
        g.prune(keep, cutoff, invocation);
        self.touch();
        true
    }

    /// The counts of `invocation` and up to `max_rows` of its actions (failed first), if
    /// anything of it was recorded.
    pub fn snapshot(&self, invocation: &str, max_rows: usize) -> Option<InvocationActivity> {
        let g = self.inner.lock();
        let inv = g.invocations.get(invocation)?;
        let mut out = InvocationActivity {
            actions: inv.actions.len(),
            not_listed: inv.not_listed,
            cache_hits: inv.counts.cache_hits,
            cache_misses: inv.counts.cache_misses,
            failed: inv.counts.failed,
            ..Default::default()
        };
        for r in inv.actions.iter().filter(|r| r.failed()) {
            if out.rows.len() >= max_rows {
                break;
            }
            out.rows.push(r.clone());
        }
        for r in inv.actions.iter().filter(|r| !r.failed()) {
            if out.rows.len() >= max_rows {
                break;
            }
            out.rows.push(r.clone());
        }
        Some(out)
    }

    /// The counts of `invocation`, if anything of it was recorded (O(1), for lists).
    pub fn counts(&self, invocation: &str) -> Option<Counts> {
        self.inner
            .lock()
            .invocations
            .get(invocation)
            .map(|i| i.counts)
    }

    /// Invocations recorded (for tests and the bench).
    pub fn invocations(&self) -> usize {
        self.inner.lock().invocations.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act() -> Activity {
        let a = Activity::new();
        a.max_invocations.store(2, Ordering::Relaxed);
        a.max_age_ms.store(u64::MAX, Ordering::Relaxed);
        a
    }

    fn d(i: u8) -> Digest {
        cairn_core::DigestFunction::Sha256.compute(&[i])
    }

    #[test]
    fn counts_hits_misses_and_failures() {
        let a = act();
        a.update("inv", "", d(1), |r| r.lookup = Some(true));
        a.update("inv", "", d(2), |r| r.lookup = Some(false));
        a.update("inv", "", d(2), |r| {
            r.execution = Some(Execution::Done {
                op_id: "op".into(),
                result: "failure",
                exit_code: Some(1),
                worker: "w".into(),
                message: String::new(),
            })
        });
        a.update("inv", "", d(3), |r| r.execution = Some(Execution::CacheHit));
        let s = a.snapshot("inv", 10).unwrap();
        assert_eq!(
            (s.actions, s.cache_hits, s.cache_misses, s.failed),
            (3, 2, 1, 1)
        );
        assert_eq!(s.rows[0].digest, d(2), "failed first");
        assert_eq!(a.snapshot("inv", 1).unwrap().rows.len(), 1);
        assert_eq!(
            a.counts("inv"),
            Some(Counts {
                actions: 3,
                cache_hits: 2,
                cache_misses: 1,
                failed: 1
            })
        );
        assert!(a.snapshot("other", 10).is_none());
    }

    #[test]
    fn oldest_invocation_is_forgotten_first() {
        let a = act();
        for inv in ["a", "b", "c"] {
            a.update(inv, "", d(1), |r| r.lookup = Some(true));
        }
        assert_eq!(a.invocations(), 2);
        assert!(a.snapshot("a", 1).is_none());
        assert!(a.snapshot("c", 1).is_some());
    }

    #[test]
    fn one_invocation_is_capped_in_actions() {
        let a = act();
        for i in 0..(MAX_ACTIONS_PER_INVOCATION + 5) {
            let digest = cairn_core::DigestFunction::Sha256.compute(&i.to_le_bytes());
            a.update("big", "", digest, |r| r.lookup = Some(false));
        }
        let s = a.snapshot("big", 5).unwrap();
        assert_eq!((s.actions, s.not_listed), (MAX_ACTIONS_PER_INVOCATION, 5));
        assert_eq!(s.rows.len(), 5);
    }
}
