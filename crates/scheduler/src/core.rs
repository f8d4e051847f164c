//! The scheduler state machine: one method per event, each returning the decisions the driver
//! must carry out.
//!
//! Every event method takes `now` (virtual time since an arbitrary epoch; a `now` earlier than
//! one already seen is treated as the latest seen). After applying the event, each method runs
//! what time alone causes (timeouts, grace periods, expiry; see `timers.rs`) and then
//! dispatches queued actions to free workers, so one call returns everything that follows
//! from it. [`Scheduler::tick`] is the event "time passed"; call it at
//! [`Scheduler::next_deadline`].

use std::collections::HashMap;
use std::time::Duration;

use crate::config::SchedulerOptions;
use crate::matching::{Shape, WorkerCaps};
use crate::placement::ShapeIndex;
use crate::queue::FairClock;
use crate::state::{Action, ActionState, OpState, Operation, Worker};
use crate::timers::Timers;
use crate::types::{
    after, ActionKey, ActionNo, ActionRequest, AttemptId, Decision, ErrorCode, EventError,
    OperationId, OperationStatus, Outcome, SchedError, WorkerId, WorkerNo,
};
use crate::views::Counters;

/// The pure scheduler core. `A` is the driver's action payload (cloned into each
/// [`Decision::StartAction`]), `R` the result payload (cloned to every operation of a merged
/// action). See the crate documentation for the rules it implements.
pub struct Scheduler<A, R> {
    pub(crate) opts: SchedulerOptions,
    pub(crate) now: Duration,
    pub(crate) ops: HashMap<OperationId, Operation<R>>,
    pub(crate) actions: HashMap<ActionNo, Action<A>>,
    /// Live cacheable actions by key: where a new operation merges.
    pub(crate) in_flight: HashMap<ActionKey, ActionNo>,
    pub(crate) shapes: ShapeIndex,
    pub(crate) workers: HashMap<WorkerNo, Worker>,
    pub(crate) worker_nos: HashMap<WorkerId, WorkerNo>,
    pub(crate) fairness: FairClock,
    pub(crate) timers: Timers,
    pub(crate) counters: Counters,
    /// Actions queued / running.
    pub(crate) queued: usize,
    pub(crate) running: usize,
    pub(crate) next_action: u64,
    pub(crate) next_worker: u64,
    pub(crate) next_attempt: u64,
    pub(crate) next_stamp: u64,
}

/// How an action ended, for the counters.
#[derive(Clone, Copy)]
pub(crate) enum ActionEnd {
    Result,
    RetriesExhausted,
    Unschedulable,
    Cancelled,
    ClientTimeout,
}

impl<A: Clone, R: Clone> Scheduler<A, R> {
    pub fn new(opts: SchedulerOptions) -> Self {
        Scheduler {
            opts,
            now: Duration::ZERO,
            ops: HashMap::new(),
            actions: HashMap::new(),
            in_flight: HashMap::new(),
            shapes: ShapeIndex::default(),
            workers: HashMap::new(),
            worker_nos: HashMap::new(),
            fairness: FairClock::default(),
            timers: Timers::default(),
            counters: Counters::default(),
            queued: 0,
            running: 0,
            next_action: 0,
            next_worker: 0,
            next_attempt: 0,
            next_stamp: 0,
        }
    }

    /// A client's `Execute` (after the driver's action-cache lookup missed). The operation
    /// starts with one watcher (the `Execute` stream). A cacheable request whose key is queued
    /// or executing joins that action; otherwise a new action is queued. An action whose
    /// `minimum` property is not a number completes at once with FAILED_PRECONDITION.
    pub fn add_operation(
        &mut self,
        now: Duration,
        op_id: OperationId,
        request: ActionRequest<A>,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        if self.ops.contains_key(&op_id) {
            return Err(EventError::DuplicateOperation(op_id));
        }
        let mut out = Vec::new();
        self.counters.operations_added += 1;
        let merge_into = if request.cacheable {
            self.in_flight.get(&request.key).copied()
        } else {
            None
        };
        match merge_into {
            Some(a) => self.merge(op_id, request, a, &mut out),
            None => self.new_action(op_id, request, &mut out),
        }
        self.settle(&mut out);
        Ok(out)
    }

    fn merge(
        &mut self,
        op_id: OperationId,
        request: ActionRequest<A>,
        a: ActionNo,
        out: &mut Vec<Decision<A, R>>,
    ) {
        self.counters.operations_merged += 1;
        self.insert_op(&op_id, &request, a);
        self.add_watchers(a, 1);
        let action = self
            .actions
            .get_mut(&a)
            .expect("in_flight names a live action");
        action.ops.push(op_id.clone());
        let status = match action.state {
            ActionState::Running(_) => OperationStatus::Executing,
            _ => OperationStatus::Queued,
        };
        // A more urgent caller moves a queued action up to its priority.
        if matches!(action.state, ActionState::Queued)
            && request.priority < action.queue_key.priority
        {
            self.unqueue_action(a, false);
            let action = self.actions.get_mut(&a).expect("still live");
            action.queue_key = self
                .fairness
                .assign(request.priority, &action.invocation_id);
            self.queue_action(a);
        }
        out.push(Decision::OperationUpdate { op_id, status });
    }

    fn new_action(
        &mut self,
        op_id: OperationId,
        request: ActionRequest<A>,
        out: &mut Vec<Decision<A, R>>,
    ) {
        let shape = match Shape::from_platform(&request.platform, &self.opts) {
            Ok(shape) => shape,
            Err(reason) => {
                // Recorded as live for an instant, then completed like any other.
                self.insert_op(&op_id, &request, ActionNo(u64::MAX));
                self.counters.actions_invalid_platform += 1;
                let err = SchedError::new(
                    ErrorCode::FailedPrecondition,
                    format!("action {}: {reason}", request.key),
                );
                self.complete_op(op_id, Err(err), 0, out);
                return;
            }
        };
        let a = ActionNo(self.next_action);
        self.next_action += 1;
        let sno = self.acquire_shape(shape);
        let queue_key = self
            .fairness
            .assign(request.priority, &request.invocation_id);
        self.insert_op(&op_id, &request, a);
        if request.cacheable {
            self.in_flight.insert(request.key.clone(), a);
        }
        self.actions.insert(
            a,
            Action {
                key: request.key,
                cacheable: request.cacheable,
                payload: request.payload,
                shape: sno,
                ops: vec![op_id],
                watchers: 1,
                invocation_id: request.invocation_id,
                queue_key,
                retries: 0,
                last_error: None,
                state: ActionState::Detached,
                queued_at: self.now,
                unwatched_deadline: None,
            },
        );
        self.enqueue(a, out);
    }

    fn insert_op(&mut self, op_id: &OperationId, request: &ActionRequest<A>, a: ActionNo) {
        self.ops.insert(
            op_id.clone(),
            Operation {
                action_key: request.key.clone(),
                priority: request.priority,
                invocation_id: request.invocation_id.clone(),
                watchers: 1,
                created_at: self.now,
                state: OpState::Live(a),
            },
        );
    }

    /// One more client streams the operation (`WaitExecution`, or a reconnect).
    pub fn watcher_attached(
        &mut self,
        now: Duration,
        op_id: &OperationId,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let op = self
            .ops
            .get_mut(op_id)
            .ok_or_else(|| EventError::UnknownOperation(op_id.clone()))?;
        op.watchers += 1;
        if let OpState::Live(a) = op.state {
            self.add_watchers(a, 1);
        }
        let mut out = Vec::new();
        self.settle(&mut out);
        Ok(out)
    }

    /// A client stopped streaming the operation. When no operation of an action has a
    /// watcher left, the action is dropped after `client_action_timeout` unless one returns.
    pub fn watcher_detached(
        &mut self,
        now: Duration,
        op_id: &OperationId,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let op = self
            .ops
            .get_mut(op_id)
            .ok_or_else(|| EventError::UnknownOperation(op_id.clone()))?;
        if op.watchers > 0 {
            op.watchers -= 1;
            if let OpState::Live(a) = op.state {
                self.remove_watchers(a, 1);
            }
        }
        let mut out = Vec::new();
        self.settle(&mut out);
        Ok(out)
    }

    /// `CancelOperation`: the operation completes CANCELLED. Its action is dropped (killed if
    /// running) only when no other operation remains on it. Cancelling a completed operation
    /// changes nothing.
    pub fn cancel_operation(
        &mut self,
        now: Duration,
        op_id: &OperationId,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let op = self
            .ops
            .get(op_id)
            .ok_or_else(|| EventError::UnknownOperation(op_id.clone()))?;
        let mut out = Vec::new();
        if let OpState::Live(a) = op.state {
            let watchers = op.watchers;
            self.counters.operations_cancelled += 1;
            let action = self.actions.get_mut(&a).expect("live op has a live action");
            action.ops.retain(|o| o != op_id);
            let retries = action.retries;
            let last_op = action.ops.is_empty();
            let err = SchedError::new(
                ErrorCode::Cancelled,
                format!("operation {op_id} was cancelled"),
            );
            self.complete_op(op_id.clone(), Err(err), retries, &mut out);
            if last_op {
                self.drop_action(a, ActionEnd::Cancelled, &mut out);
            } else {
                self.remove_watchers(a, watchers);
            }
        }
        self.settle(&mut out);
        Ok(out)
    }

    /// `DeleteOperation` of a completed operation: forget it now rather than after
    /// `retain_completed_for`. A live operation is refused (it is not cancelled).
    pub fn delete_operation(&mut self, op_id: &OperationId) -> Result<(), EventError> {
        match self.ops.get(op_id) {
            None => Err(EventError::UnknownOperation(op_id.clone())),
            Some(Operation {
                state: OpState::Live(_),
                ..
            }) => Err(EventError::OperationNotDone(op_id.clone())),
            Some(_) => {
                self.ops.remove(op_id);
                Ok(())
            }
        }
    }

    /// A worker registered with its platform properties and number of slots. The id must not
    /// be connected already.
    pub fn worker_connected(
        &mut self,
        now: Duration,
        worker_id: WorkerId,
        properties: Vec<(String, String)>,
        slots: u32,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        if self.worker_nos.contains_key(&worker_id) {
            return Err(EventError::DuplicateWorker(worker_id));
        }
        if slots == 0 {
            return Err(EventError::InvalidWorker {
                worker_id,
                reason: "a worker needs at least one slot".to_string(),
            });
        }
        let caps = match WorkerCaps::parse(&properties, &self.opts) {
            Ok(caps) => caps,
            Err(reason) => return Err(EventError::InvalidWorker { worker_id, reason }),
        };
        let wno = WorkerNo(self.next_worker);
        self.next_worker += 1;
        let deadline = after(self.now, self.opts.worker_timeout);
        self.workers.insert(
            wno,
            Worker {
                id: worker_id.clone(),
                properties,
                capacity: crate::matching::Capacity::new(slots, &caps),
                caps,
                slots,
                running: Default::default(),
                connected_at: self.now,
                last_seen: self.now,
                deadline,
                stamp: 0,
                capable_shapes: Default::default(),
                draining: false,
            },
        );
        self.worker_nos.insert(worker_id, wno);
        self.timers.worker.insert((deadline, wno));
        self.link_worker(wno);
        let mut out = Vec::new();
        self.settle(&mut out);
        Ok(out)
    }

    /// The worker is alive (any message from it counts; results call this themselves).
    pub fn worker_keepalive(
        &mut self,
        now: Duration,
        worker_id: &WorkerId,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let wno = self.worker_no(worker_id)?;
        self.touch_worker(wno);
        let mut out = Vec::new();
        self.settle(&mut out);
        Ok(out)
    }

    /// Drains a worker (`draining`: it runs what it has and is given nothing new) or takes it
    /// back into service.
    pub fn set_worker_draining(
        &mut self,
        now: Duration,
        worker_id: &WorkerId,
        draining: bool,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let wno = self.worker_no(worker_id)?;
        let strategy = self.opts.allocation_strategy;
        if let Some(w) = self.workers.get_mut(&wno) {
            let order = w.order(strategy);
            w.draining = draining;
            self.reindex_worker(wno, order);
        }
        let mut out = Vec::new();
        self.settle(&mut out);
        Ok(out)
    }

    /// The worker's stream is gone: its running actions are re-queued (one retry each).
    pub fn worker_disconnected(
        &mut self,
        now: Duration,
        worker_id: &WorkerId,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let wno = self.worker_no(worker_id)?;
        let mut out = Vec::new();
        self.remove_worker(wno, "disconnected", &mut out);
        self.settle(&mut out);
        Ok(out)
    }

    /// A worker reports the end of an attempt. `Ok(r)` is the action's result (even if the
    /// command failed) and completes every operation on it; `Err` is an infrastructure
    /// failure of the attempt and re-queues the action (one retry). A result for an attempt
    /// the worker no longer runs (killed, timed out) is ignored.
    pub fn action_completed(
        &mut self,
        now: Duration,
        worker_id: &WorkerId,
        attempt_id: AttemptId,
        outcome: Outcome<R>,
    ) -> Result<Vec<Decision<A, R>>, EventError> {
        self.advance(now);
        let wno = self.worker_no(worker_id)?;
        self.touch_worker(wno);
        let mut out = Vec::new();
        let running = self.workers[&wno].running.get(&attempt_id).copied();
        if let Some(a) = running {
            self.unassign(a, false, &mut out);
            match outcome {
                Ok(result) => self.finish_action(a, Ok(result), ActionEnd::Result, &mut out),
                Err(err) => self.retry_or_fail(a, err, &mut out),
            }
        }
        self.settle(&mut out);
        Ok(out)
    }

    /// Time passed: runs whatever is due at `now`.
    pub fn tick(&mut self, now: Duration) -> Vec<Decision<A, R>> {
        self.advance(now);
        let mut out = Vec::new();
        self.settle(&mut out);
        out
    }

    fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    /// What follows any event: due timers, then dispatch, then housekeeping.
    fn settle(&mut self, out: &mut Vec<Decision<A, R>>) {
        self.run_timers(out);
        self.dispatch(out);
        self.collect_idle_shapes();
    }

    fn worker_no(&self, worker_id: &WorkerId) -> Result<WorkerNo, EventError> {
        self.worker_nos
            .get(worker_id)
            .copied()
            .ok_or_else(|| EventError::UnknownWorker(worker_id.clone()))
    }

    fn touch_worker(&mut self, wno: WorkerNo) {
        let now = self.now;
        let deadline = after(now, self.opts.worker_timeout);
        if let Some(w) = self.workers.get_mut(&wno) {
            self.timers.worker.remove(&(w.deadline, wno));
            w.last_seen = now;
            w.deadline = deadline;
            self.timers.worker.insert((deadline, wno));
        }
    }
}
