//! The records the core keeps: operations, live actions and workers.
//!
//! An *operation* is one client's `Execute`; an *action* is one execution, shared by every
//! operation merged onto it. An action exists only while it is queued or running; when it
//! ends, its operations become completed records that are kept for `retain_completed_for`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::AllocationStrategy;
use crate::matching::{Capacity, WorkerCaps};
use crate::queue::QueueKey;
use crate::types::{
    ActionKey, ActionNo, AttemptId, OperationId, Outcome, SchedError, ShapeNo, WorkerId,
};

pub(crate) struct Operation<R> {
    pub action_key: ActionKey,
    pub priority: i32,
    pub invocation_id: String,
    /// Clients streaming this operation (the `Execute` call counts as the first).
    pub watchers: u32,
    pub created_at: Duration,
    pub state: OpState<R>,
}

pub(crate) enum OpState<R> {
    /// Attached to a live action.
    Live(ActionNo),
    /// Terminal; forgotten at `expires_at`.
    Done {
        outcome: Outcome<R>,
        retries: u32,
        completed_at: Duration,
        expires_at: Duration,
    },
}

pub(crate) struct Action<A> {
    pub key: ActionKey,
    pub cacheable: bool,
    pub payload: A,
    pub shape: ShapeNo,
    /// Operations sharing this execution, in arrival order; never empty while the action
    /// lives.
    pub ops: Vec<OperationId>,
    /// Sum of the watchers of `ops`.
    pub watchers: u32,
    /// Invocation the action is queued under (its first operation's).
    pub invocation_id: String,
    /// Its place in the queue; kept across retries.
    pub queue_key: QueueKey,
    /// Re-queues so far.
    pub retries: u32,
    pub last_error: Option<SchedError>,
    pub state: ActionState,
    /// When it was (last) queued.
    pub queued_at: Duration,
    /// Set while no operation has a watcher: when the action is dropped.
    pub unwatched_deadline: Option<Duration>,
}

pub(crate) enum ActionState {
    Queued,
    Running(Running),
    /// Neither queued nor running: only inside one event handler, between leaving one state
    /// and entering the next.
    Detached,
}

#[derive(Clone, Copy)]
pub(crate) struct Running {
    pub worker: crate::types::WorkerNo,
    pub attempt: AttemptId,
    pub started_at: Duration,
    /// When `max_action_executing_timeout` kills it.
    pub deadline: Option<Duration>,
}

pub(crate) struct Worker {
    pub id: WorkerId,
    pub properties: Vec<(String, String)>,
    pub caps: WorkerCaps,
    pub slots: u32,
    pub capacity: Capacity,
    pub running: BTreeMap<AttemptId, ActionNo>,
    pub connected_at: Duration,
    pub last_seen: Duration,
    /// `last_seen + worker_timeout`.
    pub deadline: Duration,
    /// Bumped each time the worker is given an action (0: never); orders workers for the
    /// allocation strategy.
    pub stamp: u64,
    /// Shapes this worker can ever run -> how many of their preferred properties it lacks.
    pub capable_shapes: BTreeMap<ShapeNo, u32>,
    /// Draining (the admin API): it finishes what it runs and is given nothing new, but it
    /// still counts as able to run its shapes (they are not unschedulable).
    pub draining: bool,
}

impl Worker {
    /// The worker's position among workers that fit a shape (after the mismatch count):
    /// smaller is chosen first.
    pub fn order(&self, strategy: AllocationStrategy) -> u64 {
        match strategy {
            AllocationStrategy::LeastRecentlyUsed => self.stamp,
            AllocationStrategy::MostRecentlyUsed => u64::MAX - self.stamp,
        }
    }
}
