//! Cairn's scheduler core: a pure state machine. Events in, decisions out.
//!
//! The core does no I/O, reads no clock and spawns nothing. An I/O driver owns the client and
//! worker streams and the timers; it turns what happens into calls on [`Scheduler`] (each
//! with the current virtual time `now: Duration`, since any fixed epoch) and carries out the
//! [`Decision`]s each call returns, in order. Between events it sleeps until
//! [`Scheduler::next_deadline`] and then calls [`Scheduler::tick`]. The core is generic over
//! the action payload `A` (what a worker needs to run it) and the result payload `R` (the
//! driver's `ExecuteResponse`), so it needs no protobuf types.
//!
//! # Events and decisions
//!
//! | event (method) | what it means |
//! |---|---|
//! | [`add_operation`](Scheduler::add_operation) | a client's `Execute` after an AC miss; starts with one watcher |
//! | [`watcher_attached`](Scheduler::watcher_attached) / [`watcher_detached`](Scheduler::watcher_detached) | a client stream on the operation opened (`WaitExecution`) / closed |
//! | [`cancel_operation`](Scheduler::cancel_operation) | `CancelOperation` |
//! | [`delete_operation`](Scheduler::delete_operation) | `DeleteOperation` of a completed operation |
//! | [`worker_connected`](Scheduler::worker_connected) | a worker registered: properties and slots |
//! | [`worker_keepalive`](Scheduler::worker_keepalive) | a worker is alive |
//! | [`worker_disconnected`](Scheduler::worker_disconnected) | a worker's stream dropped |
//! | [`action_completed`](Scheduler::action_completed) | a worker's result (`Ok(R)`) or infrastructure failure (`Err`) of one attempt |
//! | [`tick`](Scheduler::tick) | time passed |
//!
//! Decisions: [`Decision::StartAction`] (slot already counted), [`Decision::KillAction`]
//! (slot already released), [`Decision::OperationUpdate`] (Queued / Executing /
//! Completed(outcome)), [`Decision::WorkerRemoved`] (close that worker's stream). Events the
//! core cannot apply (an unknown operation or worker, a duplicate id, an unusable worker
//! registration) return an [`EventError`] and change nothing.
//!
//! The `property_modifier` scheduler kind is the pure function [`modify_platform`], applied
//! by the driver before `add_operation`; `cache_lookup` is the driver's action-cache lookup
//! before it.
//!
//! Queries: [`Scheduler::operation`], [`Scheduler::operations`], [`Scheduler::queue_length`],
//! [`Scheduler::executing_count`], [`Scheduler::workers`], [`Scheduler::worker`],
//! [`Scheduler::counters`].
//!
//! # Rules
//!
//! - **Matching** ([`PropertyType`]): for each action property, `Exact` (also any name not
//!   configured) needs the worker to offer that (name, value); `Minimum` needs the worker's
//!   number to be at least the action's, and the amount is *consumed* while the action runs;
//!   `Priority` does not restrict but workers with the same value are chosen first; `Ignore`
//!   is not considered. A non-numeric `Minimum` value fails the operation at once with
//!   FAILED_PRECONDITION; on a worker, it refuses the registration. A worker also needs a free
//!   slot.
//! - **Order**: lower priority value first; within a priority, round-robin across
//!   `invocation_id`s; FIFO within one invocation; a retried action keeps its place. Among the
//!   workers that fit, the allocation strategy picks (least or most recently given work).
//! - **Merging**: a cacheable request whose key is queued or executing joins that action: one
//!   execution, every operation gets the result (a more urgent priority moves a queued action
//!   up). A completed action is not in flight: the same key later runs again.
//! - **No action waits forever**: when no registered worker (however busy) could ever run a
//!   queued action, and that has been true for `unschedulable_grace_period` (since it was
//!   queued, or since the last capable worker left), its operations complete with
//!   FAILED_PRECONDITION naming the property (name and value) no worker offers. A capable
//!   worker registering in time rescues it.
//! - **Retries**: an attempt that fails (`Err` result), whose worker disconnects or misses its
//!   keepalive, or that runs past `max_action_executing_timeout` (killed) re-queues the
//!   action and counts one retry (`retries_total`). One failure past `max_job_retries`
//!   completes the operations with the last error.
//! - **Cancel**: the operation completes CANCELLED; its action is dropped (killed if running)
//!   only when it was the last operation on it.
//! - **Client timeout**: an action none of whose operations has had a watcher for
//!   `client_action_timeout` is dropped (killed if running); its operations complete
//!   CANCELLED.
//! - **Retention**: a completed operation stays queryable for `retain_completed_for`, then
//!   [`Scheduler::operation`] returns `None` (NOT_FOUND).
//!
//! # Guarantees
//!
//! Every `StartAction` names a connected worker with a free slot and enough free `Minimum`
//! resources; one action never has two attempts at once; every operation that is not queued or
//! executing has received exactly one `Completed` update, and nothing after it. These hold
//! under any sequence of events; the randomized tests in `src/tests/` check them after every
//! step.
//!
//! # Cost
//!
//! Operations, actions and workers sit in hash maps and B-trees. Dispatching an action costs
//! a scan over the distinct platform *shapes* that have queued actions, plus O(log n) per shape
//! the chosen worker can run; a worker registering scans the shapes; a new shape scans the
//! workers once. Nothing scans the queue. See `placement.rs`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use cairn_scheduler::{ActionRequest, Decision, OperationStatus, Scheduler, SchedulerOptions};
//!
//! let mut s: Scheduler<&str, u32> = Scheduler::new(SchedulerOptions::default());
//! let t = Duration::from_secs(1);
//! s.worker_connected(t, "w1".into(), vec![("os".into(), "linux".into())], 1).unwrap();
//! let request = ActionRequest {
//!     key: "main/abc-12".into(),
//!     cacheable: true,
//!     priority: 0,
//!     platform: vec![("os".into(), "linux".into())],
//!     invocation_id: "build-1".into(),
//!     payload: "run me",
//! };
//! let decisions = s.add_operation(t, "op-1".into(), request).unwrap();
//! let Some(Decision::StartAction { worker_id, attempt_id, .. }) = decisions
//!     .iter()
//!     .find(|d| matches!(d, Decision::StartAction { .. }))
//!     .cloned()
//! else {
//!     panic!("an idle worker takes the action at once");
//! };
//! let done = s.action_completed(t, &worker_id, attempt_id, Ok(0)).unwrap();
//! assert!(done.contains(&Decision::OperationUpdate {
//!     op_id: "op-1".into(),
//!     status: OperationStatus::Completed(Ok(0)),
//! }));
//! ```

mod config;
mod core;
mod lifecycle;
mod matching;
mod modifier;
mod placement;
mod queue;
mod state;
mod timers;
mod types;
mod views;

#[cfg(test)]
mod invariants;
#[cfg(test)]
mod tests;

pub use crate::config::{AllocationStrategy, PropertyType, SchedulerOptions};
pub use crate::core::Scheduler;
pub use crate::matching::unschedulable;
pub use crate::modifier::{modify_platform, PropertyModification};
pub use crate::types::{
    ActionKey, ActionRequest, AttemptId, Decision, ErrorCode, EventError, OperationId,
    OperationStatus, Outcome, SchedError, Stage, WorkerId, WorkerRemovedReason,
};
pub use crate::views::{Counters, OperationView, WorkerView};
