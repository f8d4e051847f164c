//! Read-only queries: operations (GetOperation, ListOperations, WaitExecution), queue and
//! worker figures for `/status` and metrics, and the event counters.
//!
//! Views borrow from the scheduler; they cost nothing to build and are valid until the next
//! event.

use std::time::Duration;

use crate::config::SchedulerOptions;
use crate::core::Scheduler;
use crate::state::{ActionState, OpState, Operation, Worker};
use crate::types::{ActionKey, AttemptId, OperationId, Outcome, Stage, WorkerId};

/// Monotonic counters since the scheduler was created (for metrics such as
/// `nativelink_execution_retry_count_total`). Actions are counted once per execution, however
/// many operations share it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub operations_added: u64,
    /// Operations that joined an in-flight action instead of queueing a new one.
    pub operations_merged: u64,
    /// Operations that reached their terminal update.
    pub operations_completed: u64,
    /// Operations ended by `cancel_operation`.
    pub operations_cancelled: u64,
    /// Attempts dispatched (`StartAction` decisions).
    pub attempts_started: u64,
    /// Re-queues after a failed attempt (error, lost worker, executing timeout).
    pub retries_total: u64,
    /// Attempts killed for running past `max_action_executing_timeout`.
    pub executing_timeouts: u64,
    /// Workers removed for a missed keepalive.
    pub workers_timed_out: u64,
    /// Actions ended by a worker's result (`Ok(R)`).
    pub actions_completed_with_result: u64,
    /// Actions that failed more than `max_job_retries` times.
    pub actions_failed_after_retries: u64,
    /// Actions that no registered worker could run within the grace period.
    pub actions_unschedulable: u64,
    /// Requests refused for a non-numeric `minimum` property (no action was created).
    pub actions_invalid_platform: u64,
    /// Actions dropped because their last operation was cancelled.
    pub actions_cancelled: u64,
    /// Actions dropped because no client watched them for `client_action_timeout`.
    pub actions_client_timed_out: u64,
}

/// One operation as the core knows it.
#[derive(Debug)]
pub struct OperationView<'a, R> {
    pub op_id: &'a OperationId,
    pub action_key: &'a ActionKey,
    pub stage: Stage,
    /// `Some` iff `stage` is `Completed`.
    pub outcome: Option<&'a Outcome<R>>,
    pub priority: i32,
    pub invocation_id: &'a str,
    pub watchers: u32,
    /// Re-queues of its action so far (final, once completed).
    pub retries: u32,
    /// While executing: where, which attempt, and since when.
    pub worker_id: Option<&'a WorkerId>,
    pub attempt_id: Option<AttemptId>,
    pub started_at: Option<Duration>,
    /// While queued or executing: when the action was (last) queued.
    pub queued_at: Option<Duration>,
    /// Operations sharing the execution (this one included); 0 once completed.
    pub sharing: usize,
    pub created_at: Duration,
    pub completed_at: Option<Duration>,
    /// When a completed operation will be forgotten.
    pub expires_at: Option<Duration>,
}

/// One connected worker.
#[derive(Debug, Clone)]
pub struct WorkerView<'a> {
    pub worker_id: &'a WorkerId,
    pub properties: &'a [(String, String)],
    pub total_slots: u32,
    pub busy_slots: u32,
    pub running: Vec<AttemptId>,
    pub connected_at: Duration,
    pub last_seen: Duration,
    pub draining: bool,
}

fn worker_view(w: &Worker) -> WorkerView<'_> {
    WorkerView {
        worker_id: &w.id,
        properties: &w.properties,
        total_slots: w.slots,
        busy_slots: w.slots - w.capacity.free_slots,
        running: w.running.keys().copied().collect(),
        connected_at: w.connected_at,
        last_seen: w.last_seen,
        draining: w.draining,
    }
}

impl<A: Clone, R: Clone> Scheduler<A, R> {
    /// The operation, or `None` if it was never added or was forgotten (NOT_FOUND).
    pub fn operation(&self, op_id: &OperationId) -> Option<OperationView<'_, R>> {
        let (id, op) = self.ops.get_key_value(op_id)?;
        Some(self.view(id, op))
    }

    /// The payload of a queued or executing operation's action (`None` once completed).
    pub fn operation_payload(&self, op_id: &OperationId) -> Option<&A> {
        match &self.ops.get(op_id)?.state {
            OpState::Live(a) => self.actions.get(a).map(|a| &a.payload),
            OpState::Done { .. } => None,
        }
    }

    /// Every known operation (live and retained completed), in no particular order.
    pub fn operations(&self) -> impl Iterator<Item = OperationView<'_, R>> + '_ {
        self.ops.iter().map(|(id, op)| self.view(id, op))
    }

    fn view<'a>(&'a self, op_id: &'a OperationId, op: &'a Operation<R>) -> OperationView<'a, R> {
        let mut v = OperationView {
            op_id,
            action_key: &op.action_key,
            stage: Stage::Queued,
            outcome: None,
            priority: op.priority,
            invocation_id: &op.invocation_id,
            watchers: op.watchers,
            retries: 0,
            worker_id: None,
            attempt_id: None,
            started_at: None,
            queued_at: None,
            sharing: 0,
            created_at: op.created_at,
            completed_at: None,
            expires_at: None,
        };
        match &op.state {
            OpState::Live(a) => {
                if let Some(action) = self.actions.get(a) {
                    v.retries = action.retries;
                    v.sharing = action.ops.len();
                    v.queued_at = Some(action.queued_at);
                    if let ActionState::Running(run) = &action.state {
                        v.stage = Stage::Executing;
                        v.worker_id = self.workers.get(&run.worker).map(|w| &w.id);
                        v.attempt_id = Some(run.attempt);
                        v.started_at = Some(run.started_at);
                    }
                }
            }
            OpState::Done {
                outcome,
                retries,
                completed_at,
                expires_at,
            } => {
                v.stage = Stage::Completed;
                v.outcome = Some(outcome);
                v.retries = *retries;
                v.completed_at = Some(*completed_at);
                v.expires_at = Some(*expires_at);
            }
        }
        v
    }

    /// Actions waiting for a worker (merged operations count once).
    pub fn queue_length(&self) -> usize {
        self.queued
    }

    /// Actions running on a worker.
    pub fn executing_count(&self) -> usize {
        self.running
    }

    /// Connected workers, in no particular order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerView<'_>> + '_ {
        self.workers.values().map(worker_view)
    }

    pub fn worker(&self, worker_id: &WorkerId) -> Option<WorkerView<'_>> {
        let wno = self.worker_nos.get(worker_id)?;
        self.workers.get(wno).map(worker_view)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn options(&self) -> &SchedulerOptions {
        &self.opts
    }

    /// The latest `now` seen.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Which of these platforms would start at once if added now, in order, each taking a
    /// slot (and its `minimum` amounts) of a connected, non-draining worker from what the ones
    /// before it left. Nothing changes. While actions wait in the queue nothing would start
    /// before them, so every answer is `false`. A platform the core would refuse at once (a
    /// `minimum` value that is not a number) answers `true`: adding it ends it with
    /// FAILED_PRECONDITION. A driver that takes work from a queue outside the core (shared
    /// scheduler state) asks this before it claims.
    pub fn could_start(&self, platforms: &[Vec<(String, String)>]) -> Vec<bool> {
        if self.queued > 0 {
            return vec![false; platforms.len()];
        }
        let mut free: Vec<(&crate::matching::WorkerCaps, crate::matching::Capacity)> = self
            .workers
            .values()
            .filter(|w| !w.draining)
            .map(|w| (&w.caps, w.capacity.clone()))
            .collect();
        platforms
            .iter()
            .map(|p| {
                let Ok(shape) = crate::matching::Shape::from_platform(p, &self.opts) else {
                    return true;
                };
                match free
                    .iter_mut()
                    .find(|(caps, cap)| caps.can_run(&shape) && cap.fits(&shape))
                {
                    Some((_, cap)) => {
                        cap.take(&shape);
                        true
                    }
                    None => false,
                }
            })
            .collect()
    }
}
