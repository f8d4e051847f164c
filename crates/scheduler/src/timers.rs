//! Everything that happens because time passed: worker keepalive timeouts, executing
//! timeouts, client (watcher) timeouts, the unschedulable grace period, and forgetting
//! completed operations.
//!
//! Each kind of deadline sits in an ordered set (or, for completed operations, a FIFO: their
//! deadlines only grow), so finding what is due costs O(log n) per due item, and
//! [`Scheduler::next_deadline`] is a look at the first of each. The grace period is per shape:
//! a shape no registered worker can run records since when; its queued actions fail, oldest
//! first, once both that time and their own queueing time are a grace period old.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::core::{ActionEnd, Scheduler};
use crate::matching::{explain_unsatisfiable, WorkerCaps};
use crate::state::{ActionState, OpState};
use crate::types::{
    after, ActionNo, Decision, ErrorCode, OperationId, SchedError, ShapeNo, WorkerNo,
    WorkerRemovedReason,
};

#[derive(Default)]
pub(crate) struct Timers {
    /// (last message + worker_timeout, worker)
    pub worker: BTreeSet<(Duration, WorkerNo)>,
    /// (start + max_action_executing_timeout, action)
    pub executing: BTreeSet<(Duration, ActionNo)>,
    /// (last watcher gone + client_action_timeout, action)
    pub unwatched: BTreeSet<(Duration, ActionNo)>,
    /// (completion + retain_completed_for, operation), in deadline order.
    pub expiry: VecDeque<(Duration, OperationId)>,
}

impl<A: Clone, R: Clone> Scheduler<A, R> {
    /// The earliest time at which [`Scheduler::tick`] would change something, if any. The
    /// driver sleeps until then (or until the next event).
    pub fn next_deadline(&self) -> Option<Duration> {
        let t = &self.timers;
        let mut next = [
            t.worker.first().map(|d| d.0),
            t.executing.first().map(|d| d.0),
            t.unwatched.first().map(|d| d.0),
            t.expiry.front().map(|d| d.0),
        ]
        .into_iter()
        .flatten()
        .min();
        for sno in self.unschedulable_queued_shapes() {
            if let Some(d) = self.unschedulable_deadline(sno) {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        next
    }

    fn unschedulable_queued_shapes(&self) -> Vec<ShapeNo> {
        self.shapes
            .incapable
            .intersection(&self.shapes.queued)
            .copied()
            .collect()
    }

    /// When the oldest queued action of an unschedulable shape fails.
    fn unschedulable_deadline(&self, sno: ShapeNo) -> Option<Duration> {
        let entry = self.shapes.entries.get(&sno)?;
        let since = entry.unschedulable_since?;
        let (queued_at, _) = entry.queue.oldest()?;
        Some(after(
            since.max(queued_at),
            self.opts.unschedulable_grace_period,
        ))
    }

    /// Applies every deadline that is due at `self.now`.
    pub(crate) fn run_timers(&mut self, out: &mut Vec<Decision<A, R>>) {
        let now = self.now;

        while let Some(&(d, wno)) = self.timers.worker.first() {
            if d > now {
                break;
            }
            self.timers.worker.pop_first();
            let Some(worker) = self.workers.get(&wno) else {
                continue;
            };
            self.counters.workers_timed_out += 1;
            out.push(Decision::WorkerRemoved {
                worker_id: worker.id.clone(),
                reason: WorkerRemovedReason::KeepaliveTimeout,
            });
            let what = format!(
                "sent no keepalive for {:?} (worker_timeout)",
                self.opts.worker_timeout
            );
            self.remove_worker(wno, &what, out);
        }

        while let Some(&(d, a)) = self.timers.executing.first() {
            if d > now {
                break;
            }
            self.timers.executing.pop_first();
            let worker_id = match self.actions.get(&a).map(|x| &x.state) {
                Some(ActionState::Running(run)) => self
                    .workers
                    .get(&run.worker)
                    .map(|w| w.id.to_string())
                    .unwrap_or_default(),
                _ => continue,
            };
            self.counters.executing_timeouts += 1;
            self.unassign(a, true, out);
            let timeout = self.opts.max_action_executing_timeout.unwrap_or_default();
            let err = SchedError::new(
                ErrorCode::DeadlineExceeded,
                format!(
                    "the action ran longer than {timeout:?} (max_action_executing_timeout) \
                     on worker {worker_id}"
                ),
            );
            self.retry_or_fail(a, err, out);
        }

        while let Some(&(d, a)) = self.timers.unwatched.first() {
            if d > now {
                break;
            }
            self.timers.unwatched.pop_first();
            if !self.actions.contains_key(&a) {
                continue;
            }
            let err = SchedError::new(
                ErrorCode::Cancelled,
                format!(
                    "no client watched the operation for {:?} (client_action_timeout); \
                     the action was dropped",
                    self.opts.client_action_timeout
                ),
            );
            self.finish_action(a, Err(err), ActionEnd::ClientTimeout, out);
        }

        for sno in self.unschedulable_queued_shapes() {
            self.fail_unschedulable(sno, out);
        }

        while let Some(&(d, _)) = self.timers.expiry.front() {
            if d > now {
                break;
            }
            let Some((d, op_id)) = self.timers.expiry.pop_front() else {
                break;
            };
            let expired = matches!(
                self.ops.get(&op_id),
                Some(op) if matches!(op.state, OpState::Done { expires_at, .. } if expires_at == d)
            );
            if expired {
                self.ops.remove(&op_id);
            }
        }
    }

    /// Fails the queued actions of an unschedulable shape whose grace period is over.
    fn fail_unschedulable(&mut self, sno: ShapeNo, out: &mut Vec<Decision<A, R>>) {
        let grace = self.opts.unschedulable_grace_period;
        let mut reason: Option<String> = None;
        loop {
            let Some(entry) = self.shapes.entries.get(&sno) else {
                return;
            };
            let (Some(since), Some((queued_at, a))) =
                (entry.unschedulable_since, entry.queue.oldest())
            else {
                return;
            };
            if after(since.max(queued_at), grace) > self.now {
                return;
            }
            let reason = reason
                .get_or_insert_with(|| {
                    let caps: Vec<&WorkerCaps> = self.workers.values().map(|w| &w.caps).collect();
                    explain_unsatisfiable(&entry.shape, &caps)
                })
                .clone();
            let key = self.actions.get(&a).map(|x| x.key.to_string());
            let err = SchedError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "action {} cannot be scheduled: {reason}; waited {grace:?} \
                     (unschedulable_grace_period) for such a worker",
                    key.unwrap_or_default()
                ),
            );
            self.finish_action(a, Err(err), ActionEnd::Unschedulable, out);
        }
    }
}
