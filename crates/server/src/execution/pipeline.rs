//! A scheduler as the config describes it: `simple` (a driven core), wrapped by
//! `cache_lookup` (answer from the action cache before queuing), `property_modifier` (add,
//! remove or rename platform properties before matching) and `historical_resource` (raise
//! CPU and memory minimums from hints).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cairn_config::schedulers::{
    PropertyModification, SchedulerBackend, SchedulerSpec, SimpleScheduler,
};
use cairn_core::Error;
use cairn_scheduler::{AllocationStrategy, PropertyType, SchedulerOptions};
use cairn_store::{StoreMap, StoreRef};

use super::historical::HistoricalHints;
use super::remote::RemoteScheduler;
use super::shared::{SharedOptions, SharedScheduler};
use super::SchedulerHandle;

/// What an Execute goes through.
#[derive(Clone)]
pub struct ExecutionPipeline {
    pub name: String,
    /// Where actions are scheduled: this process's core, or another scheduler.
    pub backend: Backend,
    /// The action cache consulted before queuing (`cache_lookup`).
    pub ac: Option<StoreRef>,
    /// What the wrappers do to an action's platform, outermost first.
    pub steps: Arc<Vec<PlatformStep>>,
}

impl ExecutionPipeline {
    /// The platform properties this scheduler matches on (GetCapabilities'
    /// `supported_node_properties`): a `simple` scheduler's `supported_platform_properties`,
    /// or what the scheduler a `grpc` one forwards to reports for `instance`.
    pub async fn node_properties(&self, instance: &str) -> Result<Vec<String>, tonic::Status> {
        match &self.backend {
            Backend::Local(h) => Ok(h.supported_properties()),
            Backend::Shared(s) => Ok(s.local().supported_properties()),
            Backend::Remote(r) => r.node_properties(instance).await,
        }
    }
}

/// The scheduler at the bottom of a pipeline.
#[derive(Clone)]
pub enum Backend {
    /// `simple`: a core driven in this process.
    Local(SchedulerHandle),
    /// `grpc`: another scheduler, reached over gRPC.
    Remote(Arc<RemoteScheduler>),
    /// `simple` with `experimental_backend: {redis: ...}`: operations and the queue in Redis,
    /// shared with other replicas; this process's workers connect to its local core.
    Shared(Arc<SharedScheduler>),
}

impl ExecutionPipeline {
    /// The local core (with shared state: the core of this replica's workers), or `None`
    /// for a `grpc` scheduler.
    pub fn local(&self) -> Option<&SchedulerHandle> {
        match &self.backend {
            Backend::Local(h) => Some(h),
            Backend::Shared(s) => Some(s.local()),
            Backend::Remote(_) => None,
        }
    }

    /// This replica's view of a scheduler whose state is shared in Redis.
    pub fn shared(&self) -> Option<&Arc<SharedScheduler>> {
        match &self.backend {
            Backend::Shared(s) => Some(s),
            _ => None,
        }
    }

    /// The remote scheduler of a `grpc` scheduler.
    pub fn remote(&self) -> Option<&Arc<RemoteScheduler>> {
        match &self.backend {
            Backend::Remote(r) => Some(r),
            _ => None,
        }
    }
}

/// One wrapper's change to an action's platform properties.
#[derive(Clone)]
pub enum PlatformStep {
    /// `property_modifier`.
    Modify(cairn_scheduler::PropertyModification),
    /// `historical_resource`.
    Hints(Arc<HistoricalHints>),
}

impl ExecutionPipeline {
    /// Applies the wrappers' changes, outermost first (`property_modifier`: `add` replaces
    /// every value of that name, `remove` drops them, `replace` renames; `historical_resource`:
    /// minimums for this `target_id` and `action_mnemonic`).
    pub fn modify(
        &self,
        mut props: Vec<(String, String)>,
        target_id: &str,
        action_mnemonic: &str,
    ) -> Vec<(String, String)> {
        for step in self.steps.iter() {
            match step {
                PlatformStep::Modify(m) => {
                    cairn_scheduler::modify_platform(&mut props, std::slice::from_ref(m))
                }
                PlatformStep::Hints(h) => h.apply(&mut props, target_id, action_mnemonic),
            }
        }
        props
    }
}

/// The scheduler options of a `simple` config (defaults as the troubleshooting guide says).
/// What the driver does itself: NativeLink's defaults (a log line every 10 s, -1 for none;
/// kills acknowledged within 60 s; a matching pass at least every 5 s, 0 or less for none).
pub fn driver_options(s: &SimpleScheduler) -> super::driver::DriverOptions {
    let interval = s.worker_match_logging_interval_s.unwrap_or(10.0);
    super::driver::DriverOptions {
        kill_ack_timeout: Some(Duration::from_secs(
            s.unacknowledged_kill_timeout_s
                .filter(|&t| t > 0)
                .unwrap_or(60),
        )),
        match_log_interval: (interval > 0.0 && interval.is_finite())
            .then(|| Duration::from_secs_f64(interval.min(86_400.0))),
        fallback_match_interval: {
            let every = s.fallback_match_interval_s.unwrap_or(5.0);
            (every > 0.0 && every.is_finite()).then(|| Duration::from_secs_f64(every.min(86_400.0)))
        },
        claims_only: false,
    }
}

pub fn options(s: &SimpleScheduler) -> SchedulerOptions {
    let d = SchedulerOptions::default();
    SchedulerOptions {
        supported_platform_properties: s
            .supported_platform_properties
            .iter()
            .map(|(k, v)| {
                let t = match v {
                    cairn_config::schedulers::PropertyType::Exact => PropertyType::Exact,
                    cairn_config::schedulers::PropertyType::Minimum => PropertyType::Minimum,
                    cairn_config::schedulers::PropertyType::Priority => PropertyType::Priority,
                    cairn_config::schedulers::PropertyType::Ignore => PropertyType::Ignore,
                };
                (k.clone(), t)
            })
            .collect::<BTreeMap<_, _>>(),
        worker_timeout: s
            .worker_timeout_s
            .map_or(d.worker_timeout, Duration::from_secs),
        client_action_timeout: s
            .client_action_timeout_s
            .map_or(d.client_action_timeout, Duration::from_secs),
        max_action_executing_timeout: s.max_action_executing_timeout_s.map(Duration::from_secs),
        max_job_retries: s
            .max_job_retries
            .map_or(d.max_job_retries, |r| r.min(u32::MAX as u64) as u32),
        allocation_strategy: match s.allocation_strategy {
            cairn_config::schedulers::AllocationStrategy::LeastRecentlyUsed => {
                AllocationStrategy::LeastRecentlyUsed
            }
            cairn_config::schedulers::AllocationStrategy::MostRecentlyUsed => {
                AllocationStrategy::MostRecentlyUsed
            }
        },
        retain_completed_for: s
            .retain_completed_for_s
            .map_or(d.retain_completed_for, Duration::from_secs),
        unschedulable_grace_period: s
            .unschedulable_grace_period_s
            .map_or(d.unschedulable_grace_period, Duration::from_secs),
    }
}

type BuildFuture<'a> = Pin<Box<dyn Future<Output = Result<ExecutionPipeline, Error>> + Send + 'a>>;

/// What can be checked of a scheduler spec without building it: parts not built yet and the
/// stores it names inline. [`build`] calls it first, and so does `cairn check-config`.
pub fn check(spec: &SchedulerSpec, path: &str) -> Result<(), Error> {
    match spec {
        SchedulerSpec::Simple(s) => {
            if let Some(SchedulerBackend::Redis(r)) = &s.experimental_backend {
                if r.redis_store.trim().is_empty() {
                    return Err(Error::invalid_argument(format!(
                        "{path}.simple.experimental_backend.redis.redis_store: name the top-level redis_store that holds the shared state"
                    )));
                }
            }
            Ok(())
        }
        SchedulerSpec::CacheLookup(c) => {
            cairn_store::check_spec(&c.ac_store, &format!("{path}.cache_lookup.ac_store"))?;
            check(&c.scheduler, &format!("{path}.cache_lookup.scheduler"))
        }
        SchedulerSpec::PropertyModifier(p) => {
            check(&p.scheduler, &format!("{path}.property_modifier.scheduler"))
        }
        SchedulerSpec::HistoricalResource(h) => {
            if h.hints_file.trim().is_empty() {
                return Err(Error::invalid_argument(format!(
                    "{path}.historical_resource.hints_file: name the JSON file of resource hints"
                )));
            }
            check(
                &h.scheduler,
                &format!("{path}.historical_resource.scheduler"),
            )
        }
        SchedulerSpec::Grpc(g) => RemoteScheduler::check(g, path),
    }
}

/// A `simple` scheduler whose state is shared in the named `redis_store`.
fn build_shared(
    name: &str,
    s: &SimpleScheduler,
    store: &str,
    stores: &StoreMap,
    path: &str,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> Result<Arc<SharedScheduler>, Error> {
    let key = format!("{path}.simple.experimental_backend.redis.redis_store");
    let found = stores.get(store).ok_or_else(|| {
        Error::invalid_argument(format!("{key}: no top-level store is named {store:?}"))
    })?;
    let conn = found
        .as_any()
        .and_then(|a| a.downcast_ref::<cairn_store::redis_store::RedisStore>())
        .map(|r| r.connector())
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "{key}: store {store:?} is a {}, not a redis_store",
                found.info().kind
            ))
        })?;
    let core = options(s);
    let shared = SharedOptions {
        path: path.to_string(),
        name: name.to_string(),
        lease: core.worker_timeout.max(Duration::from_millis(300)),
        max_job_retries: core.max_job_retries,
        retain_completed_for: core.retain_completed_for,
        fallback_match_interval: driver_options(s).fallback_match_interval,
        unschedulable_grace: core.unschedulable_grace_period,
        client_timeout: core.client_action_timeout,
        matching: core.clone(),
    };
    // The local core runs only what this replica claimed: every failed attempt goes back to
    // the shared queue (where max_job_retries is counted), and its watcher is the replica
    // itself, which never goes away while the operation lives.
    let local = SchedulerOptions {
        max_job_retries: 0,
        client_action_timeout: Duration::MAX,
        ..core
    };
    let driver = super::driver::DriverOptions {
        claims_only: true,
        ..driver_options(s)
    };
    let handle = SchedulerHandle::spawn_with(local, driver, metrics.clone());
    SharedScheduler::start(shared, &format!("stores.{store}"), conn, handle, metrics)
}

/// A platform change above a `grpc` scheduler has no effect (the scheduler it forwards to
/// reads the platform from the Action): said at start.
fn warn_if_forwarded(p: &ExecutionPipeline, path: &str, kind: &str) {
    if p.remote().is_some() {
        tracing::warn!(
            "{path}.{kind}: above a grpc scheduler it changes nothing; the scheduler it forwards to reads the platform from the Action (configure it there)"
        );
    }
}

/// Builds (and starts) one configured scheduler.
pub fn build<'a>(
    name: &'a str,
    spec: &'a SchedulerSpec,
    stores: &'a StoreMap,
    path: String,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> BuildFuture<'a> {
    Box::pin(async move {
        check(spec, &path)?;
        match spec {
            SchedulerSpec::Simple(s) => {
                let backend = match &s.experimental_backend {
                    None | Some(SchedulerBackend::Memory) => Backend::Local(
                        SchedulerHandle::spawn_with(options(s), driver_options(s), metrics),
                    ),
                    Some(SchedulerBackend::Redis(r)) => Backend::Shared(build_shared(
                        name,
                        s,
                        &r.redis_store,
                        stores,
                        &path,
                        metrics,
                    )?),
                };
                Ok(ExecutionPipeline {
                    name: name.to_string(),
                    backend,
                    ac: None,
                    steps: Arc::new(vec![]),
                })
            }
            SchedulerSpec::CacheLookup(c) => {
                let ac = cairn_store::build_spec(
                    &c.ac_store,
                    stores,
                    &format!("{path}.cache_lookup.ac_store"),
                )
                .await?;
                let mut inner = build(
                    name,
                    &c.scheduler,
                    stores,
                    format!("{path}.cache_lookup.scheduler"),
                    metrics,
                )
                .await?;
                inner.ac = Some(ac);
                Ok(inner)
            }
            SchedulerSpec::PropertyModifier(p) => {
                let mut inner = build(
                    name,
                    &p.scheduler,
                    stores,
                    format!("{path}.property_modifier.scheduler"),
                    metrics,
                )
                .await?;
                let mut steps: Vec<PlatformStep> = p
                    .modifications
                    .iter()
                    .map(|m| match m {
                        PropertyModification::Add(kv) => {
                            cairn_scheduler::PropertyModification::Add {
                                name: kv.name.clone(),
                                value: kv.value.clone(),
                            }
                        }
                        PropertyModification::Remove(name) => {
                            cairn_scheduler::PropertyModification::Remove(name.clone())
                        }
                        PropertyModification::Replace(r) => {
                            cairn_scheduler::PropertyModification::Replace {
                                name: r.name.clone(),
                                value: r.value.clone(),
                                new_name: r.new_name.clone(),
                                new_value: r.new_value.clone(),
                            }
                        }
                    })
                    .map(PlatformStep::Modify)
                    .collect();
                steps.extend(inner.steps.iter().cloned());
                inner.steps = Arc::new(steps);
                warn_if_forwarded(&inner, &path, "property_modifier");
                Ok(inner)
            }
            SchedulerSpec::HistoricalResource(h) => {
                let mut inner = build(
                    name,
                    &h.scheduler,
                    stores,
                    format!("{path}.historical_resource.scheduler"),
                    metrics,
                )
                .await?;
                let hints = HistoricalHints::start(
                    std::path::PathBuf::from(&h.hints_file),
                    Some(h.refresh_interval_s.unwrap_or(30))
                        .filter(|s| *s > 0)
                        .map(Duration::from_secs),
                    h.cpu_property_name
                        .clone()
                        .unwrap_or_else(|| "cpu_count".into()),
                    h.memory_property_name
                        .clone()
                        .unwrap_or_else(|| "memory_kb".into()),
                )
                .await;
                let mut steps = vec![PlatformStep::Hints(hints)];
                steps.extend(inner.steps.iter().cloned());
                inner.steps = Arc::new(steps);
                warn_if_forwarded(&inner, &path, "historical_resource");
                Ok(inner)
            }
            SchedulerSpec::Grpc(g) => Ok(ExecutionPipeline {
                name: name.to_string(),
                backend: Backend::Remote(Arc::new(RemoteScheduler::new(name, g, &path)?)),
                ac: None,
                steps: Arc::new(vec![]),
            }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(text: &str) -> SimpleScheduler {
        json5::from_str(text).unwrap()
    }

    #[test]
    fn driver_options_follow_nativelinks_defaults_and_durations() {
        let d = driver_options(&simple("{}"));
        assert_eq!(d.match_log_interval, Some(Duration::from_secs(10)));
        assert_eq!(d.fallback_match_interval, Some(Duration::from_secs(5)));
        assert_eq!(d.kill_ack_timeout, Some(Duration::from_secs(60)));

        let d = driver_options(&simple(
            r#"{ worker_match_logging_interval_s: -1, fallback_match_interval_s: "1m",
                 unacknowledged_kill_timeout_s: "2m" }"#,
        ));
        assert_eq!(d.match_log_interval, None);
        assert_eq!(d.fallback_match_interval, Some(Duration::from_secs(60)));
        assert_eq!(d.kill_ack_timeout, Some(Duration::from_secs(120)));

        let d = driver_options(&simple("{ fallback_match_interval_s: 0 }"));
        assert_eq!(d.fallback_match_interval, None);
    }
}
