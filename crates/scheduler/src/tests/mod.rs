//! Tests of the whole core through its public API, with virtual time: one test per rule
//! (`rules.rs`), randomized event sequences checked after every step (`randomized.rs`), and a
//! large run (`perf.rs`).

mod perf;
mod randomized;
mod rules;

use std::time::Duration;

use crate::{
    ActionRequest, AttemptId, Decision, OperationStatus, Outcome, PropertyType, SchedulerOptions,
};

pub(crate) type D = Decision<u32, String>;

pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

pub(crate) fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

/// `cpu_count` minimum, `pool` priority, `label` ignore, `os` exact; other options default.
pub(crate) fn opts() -> SchedulerOptions {
    let mut o = SchedulerOptions::default();
    let p = &mut o.supported_platform_properties;
    p.insert("cpu_count".into(), PropertyType::Minimum);
    p.insert("pool".into(), PropertyType::Priority);
    p.insert("label".into(), PropertyType::Ignore);
    p.insert("os".into(), PropertyType::Exact);
    o
}

pub(crate) fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// A cacheable request at priority 0, invocation "inv", no platform.
pub(crate) fn req(key: &str) -> ActionRequest<u32> {
    ActionRequest {
        key: key.into(),
        cacheable: true,
        priority: 0,
        platform: Vec::new(),
        invocation_id: "inv".into(),
        payload: 0,
    }
}

pub(crate) fn req_on(key: &str, platform: &[(&str, &str)]) -> ActionRequest<u32> {
    ActionRequest {
        platform: props(platform),
        ..req(key)
    }
}

/// (worker, attempt, action key) of each StartAction.
pub(crate) fn starts(ds: &[D]) -> Vec<(String, AttemptId, String)> {
    ds.iter()
        .filter_map(|d| match d {
            Decision::StartAction {
                worker_id,
                attempt_id,
                action_key,
                ..
            } => Some((worker_id.to_string(), *attempt_id, action_key.to_string())),
            _ => None,
        })
        .collect()
}

pub(crate) fn kills(ds: &[D]) -> Vec<(String, AttemptId)> {
    ds.iter()
        .filter_map(|d| match d {
            Decision::KillAction {
                worker_id,
                attempt_id,
            } => Some((worker_id.to_string(), *attempt_id)),
            _ => None,
        })
        .collect()
}

/// The terminal outcome reported for `op` in `ds`, if any.
pub(crate) fn completion<'a>(ds: &'a [D], op: &str) -> Option<&'a Outcome<String>> {
    ds.iter().find_map(|d| match d {
        Decision::OperationUpdate {
            op_id,
            status: OperationStatus::Completed(outcome),
        } if op_id.as_str() == op => Some(outcome),
        _ => None,
    })
}

/// Non-terminal updates reported for `op` in `ds`.
pub(crate) fn stages(ds: &[D], op: &str) -> Vec<crate::Stage> {
    ds.iter()
        .filter_map(|d| match d {
            Decision::OperationUpdate { op_id, status } if op_id.as_str() == op => {
                Some(status.stage())
            }
            _ => None,
        })
        .collect()
}
