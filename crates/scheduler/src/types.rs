//! The vocabulary of the scheduler core: identifiers, the request an operation carries, the
//! decisions the core emits, and the errors it reports.
//!
//! Everything here is plain data. Identifiers chosen by the driver (`OperationId`, `ActionKey`,
//! `WorkerId`) are opaque strings; `AttemptId` is chosen by the core, one per dispatch of an
//! action to a worker, and is never reused for the core's lifetime.

use std::fmt;
use std::time::Duration;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// The name of one client-visible operation (one `Execute` call). Chosen by the driver,
    /// unique among the operations the core still knows.
    OperationId
);
string_id!(
    /// Identity of an action for merging: instance name + action digest. Two cacheable
    /// operations with the same key share one execution while it is in flight.
    ActionKey
);
string_id!(
    /// A connected worker (one worker stream). Chosen by the driver, unique among connected
    /// workers; a reconnecting worker should use a fresh id or disconnect the old one first.
    WorkerId
);

/// One dispatch of an action to a worker. A retry gets a new id, so a late result of an
/// abandoned attempt is recognised and ignored. The worker echoes it in its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptId(pub u64);

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt-{}", self.0)
    }
}

/// What a client's `Execute` asks the scheduler to run. `A` is the driver's opaque action
/// payload, handed back unchanged in [`Decision::StartAction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRequest<A> {
    pub key: ActionKey,
    /// False for `do_not_cache`: such an action is never merged with another operation.
    pub cacheable: bool,
    /// REAPI `execution_policy.priority`: a lower value runs sooner.
    pub priority: i32,
    /// Platform properties as (name, value); a name may repeat.
    pub platform: Vec<(String, String)>,
    /// `RequestMetadata.tool_invocation_id`; actions of different invocations at one priority
    /// are dispatched round-robin.
    pub invocation_id: String,
    pub payload: A,
}

/// The gRPC status codes the core can report (the same set as `cairn_core::Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    OutOfRange,
    Unavailable,
    Internal,
    Unimplemented,
    Cancelled,
    DeadlineExceeded,
    Aborted,
    PermissionDenied,
    DataLoss,
}

/// A failed attempt or a failed operation: a status code and a message saying what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedError {
    pub code: ErrorCode,
    pub message: String,
}

impl SchedError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SchedError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for SchedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for SchedError {}

/// The end of an operation: the worker's result (`R`, even if the command itself failed), or
/// an error from the scheduler (cancelled, unschedulable, retries exhausted, ...).
pub type Outcome<R> = Result<R, SchedError>;

/// The REAPI execution stage of an operation (CACHE_CHECK belongs to the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Queued,
    Executing,
    Completed,
}

/// The state reported in an [`Decision::OperationUpdate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperationStatus<R> {
    Queued,
    Executing,
    /// Terminal: sent exactly once per operation, and nothing follows it.
    Completed(Outcome<R>),
}

impl<R> OperationStatus<R> {
    pub fn stage(&self) -> Stage {
        match self {
            OperationStatus::Queued => Stage::Queued,
            OperationStatus::Executing => Stage::Executing,
            OperationStatus::Completed(_) => Stage::Completed,
        }
    }
}

/// Why the core removed a worker on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerRemovedReason {
    /// No keepalive (or other message) for `worker_timeout`.
    KeepaliveTimeout,
}

/// What the driver must do. Decisions are returned in the order they must be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<A, R> {
    /// Send the action to the worker. The core has already counted the slot (and any
    /// `minimum` resources) as used.
    StartAction {
        worker_id: WorkerId,
        attempt_id: AttemptId,
        action_key: ActionKey,
        payload: A,
    },
    /// Stop the attempt on the worker. The core has already released its slot and will
    /// ignore a result that still arrives for it.
    KillAction {
        worker_id: WorkerId,
        attempt_id: AttemptId,
    },
    /// Tell the operation's watchers (if any) about a new stage.
    OperationUpdate {
        op_id: OperationId,
        status: OperationStatus<R>,
    },
    /// The core dropped the worker (its running actions are already re-queued): close its
    /// stream. Not emitted for [`crate::Scheduler::worker_disconnected`], which the driver
    /// initiated itself.
    WorkerRemoved {
        worker_id: WorkerId,
        reason: WorkerRemovedReason,
    },
}

/// An event the core refused. Nothing changed, except that time advanced to the event's
/// `now` (and the decisions that time alone causes are then produced by the next event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The operation is not known (never added, or completed and forgotten): NOT_FOUND.
    UnknownOperation(OperationId),
    /// `add_operation` with a name still in use.
    DuplicateOperation(OperationId),
    /// `delete_operation` on an operation that is still queued or executing.
    OperationNotDone(OperationId),
    /// The worker is not connected (never was, disconnected, or removed for a missed
    /// keepalive): the driver should close its stream so it registers again.
    UnknownWorker(WorkerId),
    /// `worker_connected` with an id that is still connected.
    DuplicateWorker(WorkerId),
    /// The worker's registration cannot be used (zero slots, a `minimum` property that is not
    /// a number, ...).
    InvalidWorker { worker_id: WorkerId, reason: String },
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::UnknownOperation(op) => write!(f, "operation {op} not found"),
            EventError::DuplicateOperation(op) => write!(f, "operation {op} already exists"),
            EventError::OperationNotDone(op) => write!(f, "operation {op} has not completed"),
            EventError::UnknownWorker(w) => write!(f, "worker {w} is not connected"),
            EventError::DuplicateWorker(w) => write!(f, "worker {w} is already connected"),
            EventError::InvalidWorker { worker_id, reason } => {
                write!(f, "worker {worker_id} rejected: {reason}")
            }
        }
    }
}

impl std::error::Error for EventError {}

/// Internal handle of a live action (queued or running); never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ActionNo(pub u64);

/// Internal handle of one worker registration; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WorkerNo(pub u64);

/// Internal handle of a distinct platform shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ShapeNo(pub u64);

/// Saturating `now + d`, so that `Duration::MAX` options mean "never".
pub(crate) fn after(now: Duration, d: Duration) -> Duration {
    now.saturating_add(d)
}
