//! Options of the scheduler core, with the defaults of the troubleshooting guide.
//!
//! These mirror `schedulers.*.simple` of the config file (the `_s` keys as [`Duration`]s); the
//! driver converts one into the other. `SchedulerOptions::default()` is the documented default
//! of every key.

use std::collections::BTreeMap;
use std::time::Duration;

/// How an action's platform property is matched against a worker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyType {
    /// The worker must offer exactly this (name, value). Also the rule for any property name
    /// absent from [`SchedulerOptions::supported_platform_properties`].
    Exact,
    /// Both values are unsigned integers and the worker's is at least the action's. The
    /// amount is consumed while the action runs (a worker with `cpu_count=8` runs two actions
    /// needing 4 at once, not three).
    Minimum,
    /// Does not restrict matching; workers offering the same value are preferred.
    Priority,
    /// Not considered at all.
    Ignore,
}

/// Which of the eligible workers with a free slot gets the next action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AllocationStrategy {
    /// The worker given work longest ago (never-used workers first): spreads load.
    #[default]
    LeastRecentlyUsed,
    /// The worker given work most recently: keeps a few workers' caches warm.
    MostRecentlyUsed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerOptions {
    /// Property name -> how it matches. Default: empty (every property is `Exact`).
    pub supported_platform_properties: BTreeMap<String, PropertyType>,
    /// A worker without a keepalive (or any other message) this long is removed and its
    /// running actions re-queued. Default 5 s (`worker_timeout_s`).
    pub worker_timeout: Duration,
    /// An action none of whose operations has had a watcher for this long is dropped (killed
    /// if running); its operations end CANCELLED. Default 60 s (`client_action_timeout_s`).
    pub client_action_timeout: Duration,
    /// An attempt running longer than this is killed and the action re-queued (a retry).
    /// Default: none (`max_action_executing_timeout_s`).
    pub max_action_executing_timeout: Option<Duration>,
    /// Re-queues allowed per action; one more failure completes its operations with the last
    /// error. Default 3 (`max_job_retries`).
    pub max_job_retries: u32,
    /// Default least recently used (`allocation_strategy`).
    pub allocation_strategy: AllocationStrategy,
    /// How long a completed operation stays queryable (GetOperation, WaitExecution) before it
    /// is forgotten. Default 60 s (`retain_completed_for_s`).
    pub retain_completed_for: Duration,
    /// How long a queued action may wait while no registered worker could ever run it (since
    /// it was queued, or since the last capable worker left) before it fails with
    /// FAILED_PRECONDITION. Default 30 s (`unschedulable_grace_period_s`).
    pub unschedulable_grace_period: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            supported_platform_properties: BTreeMap::new(),
            worker_timeout: Duration::from_secs(5),
            client_action_timeout: Duration::from_secs(60),
            max_action_executing_timeout: None,
            max_job_retries: 3,
            allocation_strategy: AllocationStrategy::LeastRecentlyUsed,
            retain_completed_for: Duration::from_secs(60),
            unschedulable_grace_period: Duration::from_secs(30),
        }
    }
}

impl SchedulerOptions {
    /// The matching rule of a property name (`Exact` when not configured).
    pub fn property_type(&self, name: &str) -> PropertyType {
        self.supported_platform_properties
            .get(name)
            .copied()
            .unwrap_or(PropertyType::Exact)
    }
}
