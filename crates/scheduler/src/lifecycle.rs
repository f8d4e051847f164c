//! How an action moves: queued -> running -> queued again (a retry) or finished, and what each
//! move tells the driver.
//!
//! Every move keeps the indexes in step: the shape queues, the workers' capacity, the timers,
//! the merge table and the counters. An operation reaches `Completed` only through
//! [`Scheduler::complete_op`], which is the one place that reports it, so each operation is
//! answered exactly once.

use crate::core::{ActionEnd, Scheduler};
use crate::state::{ActionState, OpState};
use crate::types::{
    after, ActionNo, Decision, ErrorCode, OperationId, OperationStatus, Outcome, SchedError,
    WorkerNo,
};

impl<A: Clone, R: Clone> Scheduler<A, R> {
    /// Drops a worker; each action it was running is re-queued with an UNAVAILABLE error
    /// ("worker W <what>").
    pub(crate) fn remove_worker(
        &mut self,
        wno: WorkerNo,
        what: &str,
        out: &mut Vec<Decision<A, R>>,
    ) {
        self.unlink_worker(wno);
        let Some(worker) = self.workers.remove(&wno) else {
            return;
        };
        self.worker_nos.remove(&worker.id);
        self.timers.worker.remove(&(worker.deadline, wno));
        for &a in worker.running.values() {
            self.unassign(a, false, out);
            let err = SchedError::new(
                ErrorCode::Unavailable,
                format!("worker {} {what} while running the action", worker.id),
            );
            self.retry_or_fail(a, err, out);
        }
    }

    pub(crate) fn add_watchers(&mut self, a: ActionNo, n: u32) {
        if n == 0 {
            return;
        }
        let Some(action) = self.actions.get_mut(&a) else {
            return;
        };
        action.watchers += n;
        if let Some(d) = action.unwatched_deadline.take() {
            self.timers.unwatched.remove(&(d, a));
        }
    }

    pub(crate) fn remove_watchers(&mut self, a: ActionNo, n: u32) {
        let Some(action) = self.actions.get_mut(&a) else {
            return;
        };
        action.watchers = action.watchers.saturating_sub(n);
        if action.watchers == 0 && action.unwatched_deadline.is_none() {
            let d = after(self.now, self.opts.client_action_timeout);
            action.unwatched_deadline = Some(d);
            self.timers.unwatched.insert((d, a));
        }
    }

    /// Queues a detached action (new, or retried with its old key) and tells its operations.
    pub(crate) fn enqueue(&mut self, a: ActionNo, out: &mut Vec<Decision<A, R>>) {
        let action = self.actions.get_mut(&a).expect("enqueue: live action");
        action.queued_at = self.now;
        for op in &action.ops {
            out.push(Decision::OperationUpdate {
                op_id: op.clone(),
                status: OperationStatus::Queued,
            });
        }
        self.queue_action(a);
    }

    /// Takes a running action off its worker (giving back the slot, if the worker is still
    /// registered) and leaves it detached; `kill` tells the worker to stop it.
    pub(crate) fn unassign(&mut self, a: ActionNo, kill: bool, out: &mut Vec<Decision<A, R>>) {
        let action = self.actions.get_mut(&a).expect("unassign: live action");
        let ActionState::Running(run) = action.state else {
            return;
        };
        action.state = ActionState::Detached;
        if let Some(d) = run.deadline {
            self.timers.executing.remove(&(d, a));
        }
        self.running -= 1;
        let strategy = self.opts.allocation_strategy;
        if let Some(worker) = self.workers.get_mut(&run.worker) {
            let shape = &self.shapes.entries[&action.shape].shape;
            worker.capacity.give_back(shape);
            worker.running.remove(&run.attempt);
            if kill {
                out.push(Decision::KillAction {
                    worker_id: worker.id.clone(),
                    attempt_id: run.attempt,
                });
            }
            let order = worker.order(strategy);
            self.reindex_worker(run.worker, order);
        }
    }

    /// After a failed attempt (the action is detached): queue it again, or, past
    /// `max_job_retries`, complete its operations with this last error.
    pub(crate) fn retry_or_fail(
        &mut self,
        a: ActionNo,
        err: SchedError,
        out: &mut Vec<Decision<A, R>>,
    ) {
        let max = self.opts.max_job_retries;
        let action = self
            .actions
            .get_mut(&a)
            .expect("retry_or_fail: live action");
        action.retries += 1;
        if action.retries > max {
            let attempts = action.retries;
            let err = SchedError::new(
                err.code,
                format!(
                    "{} (attempt {attempts}; giving up after {max} retries, max_job_retries)",
                    err.message
                ),
            );
            self.finish_action(a, Err(err), ActionEnd::RetriesExhausted, out);
            return;
        }
        action.last_error = Some(err);
        self.counters.retries_total += 1;
        self.fairness
            .requeued(action.queue_key, &action.invocation_id);
        self.enqueue(a, out);
    }

    /// Ends an action and completes every operation on it with `outcome`. A running action is
    /// killed on its worker.
    pub(crate) fn finish_action(
        &mut self,
        a: ActionNo,
        outcome: Outcome<R>,
        end: ActionEnd,
        out: &mut Vec<Decision<A, R>>,
    ) {
        let Some((ops, retries)) = self.drop_action(a, end, out) else {
            return;
        };
        for op in ops {
            self.complete_op(op, outcome.clone(), retries, out);
        }
    }

    /// Removes an action from every index (killing it if running) and returns its remaining
    /// operations, still live, for the caller to complete.
    pub(crate) fn drop_action(
        &mut self,
        a: ActionNo,
        end: ActionEnd,
        out: &mut Vec<Decision<A, R>>,
    ) -> Option<(Vec<OperationId>, u32)> {
        match self.actions.get(&a)?.state {
            ActionState::Queued => self.unqueue_action(a, false),
            ActionState::Running(_) => self.unassign(a, true, out),
            ActionState::Detached => {}
        }
        let action = self.actions.remove(&a)?;
        if action.cacheable && self.in_flight.get(&action.key) == Some(&a) {
            self.in_flight.remove(&action.key);
        }
        if let Some(d) = action.unwatched_deadline {
            self.timers.unwatched.remove(&(d, a));
        }
        self.release_shape(action.shape);
        let c = &mut self.counters;
        match end {
            ActionEnd::Result => c.actions_completed_with_result += 1,
            ActionEnd::RetriesExhausted => c.actions_failed_after_retries += 1,
            ActionEnd::Unschedulable => c.actions_unschedulable += 1,
            ActionEnd::Cancelled => c.actions_cancelled += 1,
            ActionEnd::ClientTimeout => c.actions_client_timed_out += 1,
        }
        Some((action.ops, action.retries))
    }

    /// Makes an operation terminal, reports it, and schedules it to be forgotten.
    pub(crate) fn complete_op(
        &mut self,
        op_id: OperationId,
        outcome: Outcome<R>,
        retries: u32,
        out: &mut Vec<Decision<A, R>>,
    ) {
        let now = self.now;
        let expires_at = after(now, self.opts.retain_completed_for);
        if let Some(op) = self.ops.get_mut(&op_id) {
            op.state = OpState::Done {
                outcome: outcome.clone(),
                retries,
                completed_at: now,
                expires_at,
            };
        }
        self.counters.operations_completed += 1;
        self.timers.expiry.push_back((expires_at, op_id.clone()));
        out.push(Decision::OperationUpdate {
            op_id,
            status: OperationStatus::Completed(outcome),
        });
    }
}
