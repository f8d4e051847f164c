//! One test per rule of the crate documentation, each a short scripted scenario.

use super::*;
use crate::{
    AllocationStrategy, ErrorCode, EventError, OperationId, SchedError, Scheduler, Stage, WorkerId,
    WorkerRemovedReason,
};

type S = Scheduler<u32, String>;

fn sched(o: SchedulerOptions) -> S {
    let s = S::new(o);
    s.check_invariants();
    s
}

fn op(s: &str) -> OperationId {
    s.into()
}

fn w(s: &str) -> WorkerId {
    s.into()
}

fn ok(s: &str) -> Outcome<String> {
    Ok(s.to_string())
}

fn infra(msg: &str) -> Outcome<String> {
    Err(SchedError::new(ErrorCode::Unavailable, msg))
}

fn err_of(o: Option<&Outcome<String>>) -> &SchedError {
    match o {
        Some(Err(e)) => e,
        other => panic!("expected an error outcome, got {other:?}"),
    }
}

// ---- matching ---------------------------------------------------------------------------

#[test]
fn exact_property_goes_only_to_a_worker_offering_it() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("mac"), props(&[("os", "mac")]), 4)
        .unwrap();
    s.worker_connected(secs(0), w("linux"), props(&[("os", "linux")]), 4)
        .unwrap();
    let ds = s
        .add_operation(secs(0), op("a"), req_on("a", &[("os", "linux")]))
        .unwrap();
    assert_eq!(starts(&ds)[0].0, "linux");
    // `arch` is not configured, so it is matched exactly too.
    let ds = s
        .add_operation(secs(0), op("b"), req_on("b", &[("arch", "arm64")]))
        .unwrap();
    assert!(starts(&ds).is_empty());
    assert_eq!(s.queue_length(), 1);
    s.check_invariants();
}

#[test]
fn minimum_resources_are_consumed_while_running() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[("cpu_count", "8")]), 10)
        .unwrap();
    let mut all = Vec::new();
    for k in ["a", "b", "c"] {
        all.extend(
            s.add_operation(secs(0), op(k), req_on(k, &[("cpu_count", "4")]))
                .unwrap(),
        );
    }
    let started = starts(&all);
    assert_eq!(
        started.len(),
        2,
        "8 cpus run two actions needing 4, not three"
    );
    assert_eq!(s.queue_length(), 1);
    let ds = s
        .action_completed(secs(1), &w("w"), started[0].1, ok("r"))
        .unwrap();
    assert_eq!(starts(&ds).len(), 1, "the freed cpus start the third");
    // A worker with too few cpus in total can never run it.
    let ds = s
        .add_operation(secs(1), op("big"), req_on("big", &[("cpu_count", "16")]))
        .unwrap();
    assert!(starts(&ds).is_empty());
    s.check_invariants();
}

#[test]
fn priority_property_prefers_matching_workers_without_restricting() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("slow"), props(&[("pool", "slow")]), 1)
        .unwrap();
    s.worker_connected(secs(0), w("fast"), props(&[("pool", "fast")]), 1)
        .unwrap();
    let ds = s
        .add_operation(secs(0), op("a"), req_on("a", &[("pool", "fast")]))
        .unwrap();
    assert_eq!(starts(&ds)[0].0, "fast", "the matching worker is preferred");
    let ds = s
        .add_operation(secs(0), op("b"), req_on("b", &[("pool", "fast")]))
        .unwrap();
    assert_eq!(starts(&ds)[0].0, "slow", "but any worker may run it");
    s.check_invariants();
}

#[test]
fn ignore_property_is_not_considered() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let ds = s
        .add_operation(secs(0), op("a"), req_on("a", &[("label", "x")]))
        .unwrap();
    assert_eq!(starts(&ds).len(), 1);
}

#[test]
fn non_numeric_minimum_fails_the_operation_at_once() {
    let mut s = sched(opts());
    let ds = s
        .add_operation(secs(0), op("a"), req_on("a", &[("cpu_count", "many")]))
        .unwrap();
    let e = err_of(completion(&ds, "a"));
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(
        e.message.contains("cpu_count") && e.message.contains("many"),
        "{e}"
    );
    assert_eq!(s.operation(&op("a")).unwrap().stage, Stage::Completed);
    assert_eq!(s.counters().actions_invalid_platform, 1);
    s.check_invariants();
}

#[test]
fn unusable_worker_registrations_are_refused() {
    let mut s = sched(opts());
    let e = s
        .worker_connected(secs(0), w("a"), props(&[("cpu_count", "x")]), 1)
        .unwrap_err();
    assert!(matches!(e, EventError::InvalidWorker { .. }), "{e}");
    let e = s
        .worker_connected(secs(0), w("a"), props(&[]), 0)
        .unwrap_err();
    assert!(matches!(e, EventError::InvalidWorker { .. }), "{e}");
    s.worker_connected(secs(0), w("a"), props(&[]), 1).unwrap();
    let e = s
        .worker_connected(secs(0), w("a"), props(&[]), 1)
        .unwrap_err();
    assert_eq!(e, EventError::DuplicateWorker(w("a")));
    assert_eq!(s.workers().count(), 1);
}

// ---- dispatch order ---------------------------------------------------------------------

#[test]
fn lower_priority_value_runs_first() {
    let mut s = sched(opts());
    for (k, p) in [("late", 10), ("soon", -5), ("mid", 0)] {
        s.add_operation(
            secs(0),
            op(k),
            ActionRequest {
                priority: p,
                ..req(k)
            },
        )
        .unwrap();
    }
    let mut order = Vec::new();
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    for _ in 0..3 {
        let run = s.worker(&w("w")).unwrap().running[0];
        let key = s
            .operations()
            .find(|o| o.attempt_id == Some(run))
            .unwrap()
            .action_key
            .clone();
        order.push(key.to_string());
        s.action_completed(secs(1), &w("w"), run, ok("r")).unwrap();
    }
    assert_eq!(order, ["soon", "mid", "late"]);
}

/// Runs every queued action on one single-slot worker; returns the keys in start order.
fn drain_one_by_one(s: &mut S) -> Vec<String> {
    let mut order = Vec::new();
    let mut ds = s.worker_connected(secs(1), w("w"), props(&[]), 1).unwrap();
    while let Some((_, attempt, key)) = starts(&ds).into_iter().next() {
        order.push(key);
        ds = s
            .action_completed(secs(1), &w("w"), attempt, ok("r"))
            .unwrap();
    }
    order
}

#[test]
fn invocations_take_turns_within_a_priority() {
    let mut s = sched(opts());
    for i in 0..6 {
        let k = format!("big{i}");
        let r = ActionRequest {
            invocation_id: "big".into(),
            ..req(&k)
        };
        s.add_operation(secs(0), op(&k), r).unwrap();
    }
    for i in 0..2 {
        let k = format!("small{i}");
        let r = ActionRequest {
            invocation_id: "small".into(),
            ..req(&k)
        };
        s.add_operation(secs(0), op(&k), r).unwrap();
    }
    let order = drain_one_by_one(&mut s);
    assert_eq!(
        order,
        ["big0", "small0", "big1", "small1", "big2", "big3", "big4", "big5"]
    );
}

#[test]
fn fifo_within_an_invocation() {
    let mut s = sched(opts());
    for k in ["a", "b", "c", "d"] {
        s.add_operation(secs(0), op(k), req(k)).unwrap();
    }
    assert_eq!(drain_one_by_one(&mut s), ["a", "b", "c", "d"]);
}

#[test]
fn least_recently_used_spreads_and_most_recently_used_concentrates() {
    for (strategy, expect_same) in [
        (AllocationStrategy::LeastRecentlyUsed, false),
        (AllocationStrategy::MostRecentlyUsed, true),
    ] {
        let mut s = sched(SchedulerOptions {
            allocation_strategy: strategy,
            ..opts()
        });
        s.worker_connected(secs(0), w("w1"), props(&[]), 4).unwrap();
        s.worker_connected(secs(0), w("w2"), props(&[]), 4).unwrap();
        let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
        s.action_completed(secs(1), &w(&a.0), a.1, ok("r")).unwrap();
        let b = starts(&s.add_operation(secs(2), op("b"), req("b")).unwrap())[0].clone();
        assert_eq!(
            a.0 == b.0,
            expect_same,
            "{strategy:?}: {} then {}",
            a.0,
            b.0
        );
    }
}

#[test]
fn slots_limit_concurrent_actions() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 2).unwrap();
    let mut started = 0;
    for k in ["a", "b", "c", "d"] {
        started += starts(&s.add_operation(secs(0), op(k), req(k)).unwrap()).len();
    }
    assert_eq!(started, 2);
    assert_eq!((s.executing_count(), s.queue_length()), (2, 2));
    let view = s.worker(&w("w")).unwrap();
    assert_eq!((view.busy_slots, view.total_slots), (2, 2));
}

// ---- no action waits forever ------------------------------------------------------------

fn grace_opts() -> SchedulerOptions {
    SchedulerOptions {
        unschedulable_grace_period: secs(30),
        worker_timeout: secs(1000),
        ..opts()
    }
}

#[test]
fn unschedulable_action_fails_after_the_grace_period_naming_the_property() {
    let mut s = sched(grace_opts());
    s.worker_connected(secs(0), w("linux"), props(&[("os", "linux")]), 1)
        .unwrap();
    s.add_operation(secs(10), op("a"), req_on("a", &[("os", "windows")]))
        .unwrap();
    assert_eq!(s.next_deadline(), Some(secs(40)));
    assert!(s.tick(secs(39)).is_empty());
    let ds = s.tick(secs(40));
    let e = err_of(completion(&ds, "a"));
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.contains("\"os\"=\"windows\""), "{e}");
    assert_eq!(s.counters().actions_unschedulable, 1);
    s.check_invariants();
}

#[test]
fn unschedulable_with_no_worker_at_all_names_the_property() {
    let mut s = sched(grace_opts());
    s.add_operation(secs(0), op("a"), req_on("a", &[("cpu_count", "4")]))
        .unwrap();
    let e = err_of(completion(&s.tick(secs(30)), "a")).clone();
    assert!(e.message.contains("\"cpu_count\" >= 4"), "{e}");
}

#[test]
fn a_capable_worker_within_the_grace_period_rescues_the_action() {
    let mut s = sched(grace_opts());
    s.add_operation(secs(0), op("a"), req_on("a", &[("os", "windows")]))
        .unwrap();
    let ds = s
        .worker_connected(secs(29), w("win"), props(&[("os", "windows")]), 1)
        .unwrap();
    assert_eq!(starts(&ds).len(), 1);
    assert!(completion(&s.tick(secs(100)), "a").is_none());
}

#[test]
fn a_busy_capable_worker_means_the_action_is_schedulable() {
    let mut s = sched(grace_opts());
    s.worker_connected(secs(0), w("win"), props(&[("os", "windows")]), 1)
        .unwrap();
    s.add_operation(secs(0), op("a"), req_on("a", &[("os", "windows")]))
        .unwrap();
    s.add_operation(secs(0), op("b"), req_on("b", &[("os", "windows")]))
        .unwrap();
    let ds = s.tick(secs(100));
    assert!(
        completion(&ds, "b").is_none(),
        "b waits for the busy worker"
    );
    assert_eq!(s.queue_length(), 1);
}

#[test]
fn grace_period_starts_when_the_last_capable_worker_leaves() {
    let mut s = sched(grace_opts());
    s.worker_connected(secs(0), w("win"), props(&[("os", "windows")]), 1)
        .unwrap();
    s.add_operation(secs(0), op("a"), req_on("a", &[("os", "windows")]))
        .unwrap();
    s.add_operation(secs(0), op("b"), req_on("b", &[("os", "windows")]))
        .unwrap();
    // At 100 s the only capable worker leaves; a (re-queued) and b wait 30 s from then.
    s.worker_disconnected(secs(100), &w("win")).unwrap();
    assert!(s.tick(secs(129)).is_empty());
    let ds = s.tick(secs(130));
    assert!(completion(&ds, "a").is_some() && completion(&ds, "b").is_some());
    s.check_invariants();
}

// ---- retries ----------------------------------------------------------------------------

#[test]
fn infrastructure_error_requeues_and_counts_a_retry() {
    let mut s = sched(opts());
    let ds = s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    assert!(ds.is_empty());
    let first = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    let ds = s
        .action_completed(secs(1), &w("w"), first.1, infra("disk full"))
        .unwrap();
    assert_eq!(stages(&ds, "a"), [Stage::Queued, Stage::Executing]);
    let second = starts(&ds)[0].clone();
    assert_ne!(first.1, second.1, "a retry is a new attempt");
    assert_eq!(s.counters().retries_total, 1);
    assert_eq!(s.operation(&op("a")).unwrap().retries, 1);
    let ds = s
        .action_completed(secs(2), &w("w"), second.1, ok("r"))
        .unwrap();
    assert_eq!(completion(&ds, "a"), Some(&ok("r")));
}

#[test]
fn past_max_job_retries_the_last_error_is_returned() {
    let mut s = sched(SchedulerOptions {
        max_job_retries: 2,
        ..opts()
    });
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let mut ds = s.add_operation(secs(0), op("a"), req("a")).unwrap();
    let mut attempts = 0;
    let last = loop {
        let Some((_, attempt, _)) = starts(&ds).into_iter().next() else {
            break ds;
        };
        attempts += 1;
        ds = s
            .action_completed(
                secs(1),
                &w("w"),
                attempt,
                infra(&format!("boom {attempts}")),
            )
            .unwrap();
    };
    assert_eq!(attempts, 3, "one attempt and two retries");
    let e = err_of(completion(&last, "a"));
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.starts_with("boom 3"), "{e}");
    assert_eq!(s.counters().retries_total, 2);
    assert_eq!(s.counters().actions_failed_after_retries, 1);
    s.check_invariants();
}

#[test]
fn a_disconnected_worker_has_its_actions_requeued() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w1"), props(&[]), 1).unwrap();
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    s.worker_connected(secs(0), w("w2"), props(&[]), 1).unwrap();
    let ds = s.worker_disconnected(secs(1), &w("w1")).unwrap();
    assert_eq!(starts(&ds)[0].0, "w2");
    assert!(kills(&ds).is_empty(), "nothing to kill on a gone worker");
    assert_eq!(s.counters().retries_total, 1);
    assert_eq!(
        s.worker_keepalive(secs(1), &w("w1")).unwrap_err(),
        EventError::UnknownWorker(w("w1"))
    );
    s.check_invariants();
}

#[test]
fn a_worker_missing_keepalives_is_removed_and_its_actions_requeued() {
    let mut s = sched(opts()); // worker_timeout 5 s
    s.worker_connected(secs(0), w("dead"), props(&[]), 1)
        .unwrap();
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    s.worker_connected(secs(0), w("live"), props(&[]), 1)
        .unwrap();
    s.worker_keepalive(secs(4), &w("live")).unwrap();
    let ds = s.tick(secs(5));
    assert!(ds.contains(&Decision::WorkerRemoved {
        worker_id: w("dead"),
        reason: WorkerRemovedReason::KeepaliveTimeout
    }));
    assert_eq!(starts(&ds)[0].0, "live");
    assert_eq!(s.counters().retries_total, 1);
    assert_eq!(s.counters().workers_timed_out, 1);
    assert!(s.worker(&w("live")).is_some());
    s.check_invariants();
}

#[test]
fn keepalives_and_results_keep_a_worker() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    s.worker_keepalive(secs(4), &w("w")).unwrap();
    s.action_completed(secs(8), &w("w"), a.1, ok("r")).unwrap();
    assert!(s.tick(secs(12)).is_empty());
    assert!(s.worker(&w("w")).is_some());
    assert_eq!(s.next_deadline(), Some(secs(13)));
}

#[test]
fn an_attempt_past_the_executing_timeout_is_killed_and_requeued() {
    let o = SchedulerOptions {
        max_action_executing_timeout: Some(secs(10)),
        worker_timeout: secs(1000),
        ..opts()
    };
    let mut s = sched(o);
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let first = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    let ds = s.tick(secs(10));
    assert_eq!(kills(&ds), [("w".to_string(), first.1)]);
    let second = starts(&ds)[0].clone();
    assert_ne!(first.1, second.1);
    assert_eq!(s.counters().executing_timeouts, 1);
    assert_eq!(s.counters().retries_total, 1);
    // The killed attempt's late result is ignored.
    let ds = s
        .action_completed(secs(11), &w("w"), first.1, ok("stale"))
        .unwrap();
    assert!(ds.is_empty());
    assert_eq!(s.operation(&op("a")).unwrap().stage, Stage::Executing);
    let ds = s
        .action_completed(secs(12), &w("w"), second.1, ok("fresh"))
        .unwrap();
    assert_eq!(completion(&ds, "a"), Some(&ok("fresh")));
}

#[test]
fn executing_timeouts_exhaust_retries_with_deadline_exceeded() {
    let o = SchedulerOptions {
        max_action_executing_timeout: Some(secs(10)),
        max_job_retries: 0,
        worker_timeout: secs(1000),
        ..opts()
    };
    let mut s = sched(o);
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    let ds = s.tick(secs(10));
    assert_eq!(kills(&ds).len(), 1);
    assert_eq!(
        err_of(completion(&ds, "a")).code,
        ErrorCode::DeadlineExceeded
    );
}

// ---- merging ----------------------------------------------------------------------------

#[test]
fn identical_cacheable_actions_run_once_and_all_get_the_result() {
    let mut s = sched(opts());
    s.add_operation(secs(0), op("a1"), req("same")).unwrap();
    s.add_operation(secs(0), op("a2"), req("same")).unwrap();
    let ds = s.worker_connected(secs(0), w("w"), props(&[]), 4).unwrap();
    assert_eq!(starts(&ds).len(), 1);
    assert_eq!(stages(&ds, "a1"), [Stage::Executing]);
    assert_eq!(stages(&ds, "a2"), [Stage::Executing]);
    let ds3 = s.add_operation(secs(1), op("a3"), req("same")).unwrap();
    assert_eq!(
        stages(&ds3, "a3"),
        [Stage::Executing],
        "joins the running execution"
    );
    assert!(starts(&ds3).is_empty());
    assert_eq!(s.operation(&op("a3")).unwrap().sharing, 3);
    let attempt = starts(&ds)[0].1;
    let ds = s
        .action_completed(secs(2), &w("w"), attempt, ok("r"))
        .unwrap();
    for o in ["a1", "a2", "a3"] {
        assert_eq!(completion(&ds, o), Some(&ok("r")), "{o}");
    }
    assert_eq!(s.counters().operations_merged, 2);
    assert_eq!(s.counters().actions_completed_with_result, 1);
}

#[test]
fn do_not_cache_actions_are_never_merged() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 4).unwrap();
    let nc = || ActionRequest {
        cacheable: false,
        ..req("same")
    };
    let mut ds = s.add_operation(secs(0), op("a"), nc()).unwrap();
    ds.extend(s.add_operation(secs(0), op("b"), nc()).unwrap());
    // A cacheable request does not join an uncacheable execution either.
    ds.extend(s.add_operation(secs(0), op("c"), req("same")).unwrap());
    assert_eq!(starts(&ds).len(), 3);
}

#[test]
fn a_completed_action_is_not_in_flight() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a1"), req("k")).unwrap())[0].clone();
    s.action_completed(secs(1), &w("w"), a.1, ok("r")).unwrap();
    let ds = s.add_operation(secs(2), op("a2"), req("k")).unwrap();
    assert_eq!(starts(&ds).len(), 1, "runs again");
}

#[test]
fn a_more_urgent_caller_moves_a_merged_action_up() {
    let mut s = sched(opts());
    s.add_operation(
        secs(0),
        op("x"),
        ActionRequest {
            priority: 5,
            ..req("x")
        },
    )
    .unwrap();
    s.add_operation(
        secs(0),
        op("y1"),
        ActionRequest {
            priority: 9,
            ..req("y")
        },
    )
    .unwrap();
    s.add_operation(
        secs(0),
        op("y2"),
        ActionRequest {
            priority: 1,
            ..req("y")
        },
    )
    .unwrap();
    assert_eq!(drain_one_by_one(&mut s), ["y", "x"]);
}

// ---- cancel -----------------------------------------------------------------------------

#[test]
fn cancelling_the_only_operation_kills_the_running_action() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    s.add_operation(secs(0), op("b"), req("b")).unwrap();
    let ds = s.cancel_operation(secs(1), &op("a")).unwrap();
    assert_eq!(err_of(completion(&ds, "a")).code, ErrorCode::Cancelled);
    assert_eq!(kills(&ds), [("w".to_string(), a.1)]);
    assert_eq!(starts(&ds)[0].2, "b", "the freed slot runs the next action");
    assert_eq!(s.counters().actions_cancelled, 1);
    s.check_invariants();
}

#[test]
fn cancelling_one_merged_operation_leaves_the_others_running() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a1"), req("k")).unwrap())[0].clone();
    s.add_operation(secs(0), op("a2"), req("k")).unwrap();
    let ds = s.cancel_operation(secs(1), &op("a1")).unwrap();
    assert!(kills(&ds).is_empty());
    assert_eq!(err_of(completion(&ds, "a1")).code, ErrorCode::Cancelled);
    assert!(completion(&ds, "a2").is_none());
    let ds = s.action_completed(secs(2), &w("w"), a.1, ok("r")).unwrap();
    assert_eq!(completion(&ds, "a2"), Some(&ok("r")));
    assert!(completion(&ds, "a1").is_none(), "answered once, already");
}

#[test]
fn cancelling_a_queued_action_removes_it_from_the_queue() {
    let mut s = sched(opts());
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    s.cancel_operation(secs(1), &op("a")).unwrap();
    assert_eq!(s.queue_length(), 0);
    let ds = s.worker_connected(secs(2), w("w"), props(&[]), 1).unwrap();
    assert!(starts(&ds).is_empty());
}

#[test]
fn cancel_of_unknown_or_completed_operations() {
    let mut s = sched(opts());
    assert_eq!(
        s.cancel_operation(secs(0), &op("nope")).unwrap_err(),
        EventError::UnknownOperation(op("nope"))
    );
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    s.cancel_operation(secs(0), &op("a")).unwrap();
    assert!(s.cancel_operation(secs(0), &op("a")).unwrap().is_empty());
}

// ---- client timeout ---------------------------------------------------------------------

#[test]
fn an_action_nobody_watches_is_dropped_after_the_client_timeout() {
    let o = SchedulerOptions {
        client_action_timeout: secs(60),
        worker_timeout: secs(1000),
        ..opts()
    };
    let mut s = sched(o);
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    s.watcher_detached(secs(10), &op("a")).unwrap();
    assert_eq!(s.next_deadline(), Some(secs(70)));
    assert!(s.tick(secs(69)).is_empty());
    let ds = s.tick(secs(70));
    assert_eq!(kills(&ds), [("w".to_string(), a.1)]);
    assert_eq!(err_of(completion(&ds, "a")).code, ErrorCode::Cancelled);
    assert_eq!(s.counters().actions_client_timed_out, 1);
}

#[test]
fn a_returning_watcher_keeps_the_action() {
    let o = SchedulerOptions {
        client_action_timeout: secs(60),
        unschedulable_grace_period: secs(10_000),
        ..opts()
    };
    let mut s = sched(o);
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    s.watcher_detached(secs(10), &op("a")).unwrap();
    s.watcher_attached(secs(50), &op("a")).unwrap(); // WaitExecution
    assert!(completion(&s.tick(secs(200)), "a").is_none());
}

#[test]
fn one_watched_operation_keeps_a_merged_action() {
    let o = SchedulerOptions {
        client_action_timeout: secs(60),
        unschedulable_grace_period: secs(10_000),
        ..opts()
    };
    let mut s = sched(o);
    s.add_operation(secs(0), op("a1"), req("k")).unwrap();
    s.add_operation(secs(0), op("a2"), req("k")).unwrap();
    s.watcher_detached(secs(0), &op("a1")).unwrap();
    assert!(s.tick(secs(200)).is_empty());
    // When the watched one is cancelled, the unwatched one's clock starts.
    s.cancel_operation(secs(200), &op("a2")).unwrap();
    let ds = s.tick(secs(260));
    assert_eq!(err_of(completion(&ds, "a1")).code, ErrorCode::Cancelled);
}

// ---- retention --------------------------------------------------------------------------

#[test]
fn completed_operations_are_kept_then_forgotten() {
    let o = SchedulerOptions {
        retain_completed_for: secs(60),
        worker_timeout: secs(1000),
        ..opts()
    };
    let mut s = sched(o);
    s.worker_connected(secs(0), w("w"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    s.action_completed(secs(5), &w("w"), a.1, ok("r")).unwrap();
    let view = s.operation(&op("a")).unwrap();
    assert_eq!(
        (view.stage, view.outcome),
        (Stage::Completed, Some(&ok("r")))
    );
    assert_eq!(view.expires_at, Some(secs(65)));
    s.watcher_attached(secs(30), &op("a")).unwrap(); // WaitExecution on a completed op
    s.tick(secs(64));
    assert!(s.operation(&op("a")).is_some());
    s.tick(secs(65));
    assert!(s.operation(&op("a")).is_none());
    assert_eq!(
        s.watcher_attached(secs(66), &op("a")).unwrap_err(),
        EventError::UnknownOperation(op("a"))
    );
}

#[test]
fn delete_operation_forgets_only_completed_operations() {
    let mut s = sched(SchedulerOptions {
        unschedulable_grace_period: secs(10_000),
        ..opts()
    });
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    assert_eq!(
        s.delete_operation(&op("a")).unwrap_err(),
        EventError::OperationNotDone(op("a"))
    );
    s.cancel_operation(secs(0), &op("a")).unwrap();
    s.delete_operation(&op("a")).unwrap();
    assert!(s.operation(&op("a")).is_none());
    // Its pending expiry does not touch a new operation of the same name.
    s.add_operation(secs(1), op("a"), req("a")).unwrap();
    s.tick(secs(1000));
    assert!(s.operation(&op("a")).is_some());
}

// ---- events and queries -----------------------------------------------------------------

#[test]
fn duplicate_operation_ids_are_refused() {
    let mut s = sched(opts());
    s.add_operation(secs(0), op("a"), req("a")).unwrap();
    assert_eq!(
        s.add_operation(secs(0), op("a"), req("b")).unwrap_err(),
        EventError::DuplicateOperation(op("a"))
    );
    assert_eq!(s.queue_length(), 1);
}

#[test]
fn time_never_runs_backwards() {
    let mut s = sched(opts());
    s.tick(secs(100));
    s.worker_connected(secs(3), w("w"), props(&[]), 1).unwrap();
    assert_eq!(s.now(), secs(100));
    assert_eq!(s.worker(&w("w")).unwrap().connected_at, secs(100));
    assert_eq!(s.next_deadline(), Some(secs(105)));
}

#[test]
fn a_stale_result_for_another_workers_attempt_is_ignored() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("w1"), props(&[]), 1).unwrap();
    s.worker_connected(secs(0), w("w2"), props(&[]), 1).unwrap();
    let a = starts(&s.add_operation(secs(0), op("a"), req("a")).unwrap())[0].clone();
    let other = if a.0 == "w1" { "w2" } else { "w1" };
    assert!(s
        .action_completed(secs(1), &w(other), a.1, ok("x"))
        .unwrap()
        .is_empty());
    assert_eq!(s.operation(&op("a")).unwrap().stage, Stage::Executing);
}

#[test]
fn views_report_stages_workers_and_counters() {
    let mut s = sched(opts());
    s.add_operation(ms(10), op("a"), req("a")).unwrap();
    let v = s.operation(&op("a")).unwrap();
    assert_eq!((v.stage, v.watchers, v.worker_id), (Stage::Queued, 1, None));
    s.worker_connected(ms(20), w("w"), props(&[("os", "linux")]), 3)
        .unwrap();
    let v = s.operation(&op("a")).unwrap();
    assert_eq!(v.stage, Stage::Executing);
    assert_eq!(v.worker_id, Some(&w("w")));
    assert_eq!(v.started_at, Some(ms(20)));
    let wv = s.worker(&w("w")).unwrap();
    assert_eq!(
        (wv.busy_slots, wv.total_slots, wv.properties.len()),
        (1, 3, 1)
    );
    assert_eq!(s.operations().count(), 1);
    assert_eq!(s.counters().attempts_started, 1);
    assert_eq!(s.counters().operations_added, 1);
}

// ---- draining ---------------------------------------------------------------------------

#[test]
fn a_draining_worker_finishes_its_work_and_gets_nothing_new_until_undrained() {
    let mut s = sched(opts());
    s.worker_connected(secs(0), w("a"), props(&[("os", "linux")]), 1)
        .unwrap();
    let ds = s
        .add_operation(secs(0), op("first"), req_on("first", &[("os", "linux")]))
        .unwrap();
    assert_eq!(starts(&ds)[0].0, "a");
    let ds = s.set_worker_draining(secs(1), &w("a"), true).unwrap();
    assert!(starts(&ds).is_empty(), "draining kills nothing");
    s.check_invariants();
    // Its running action completes; the next one waits although the slot is free...
    let attempt = s.worker(&w("a")).unwrap().running[0];
    s.action_completed(secs(2), &w("a"), attempt, ok("done"))
        .unwrap();
    let ds = s
        .add_operation(secs(3), op("second"), req_on("second", &[("os", "linux")]))
        .unwrap();
    assert!(starts(&ds).is_empty());
    assert_eq!(s.queue_length(), 1);
    assert!(s.worker(&w("a")).unwrap().draining);
    s.check_invariants();
    // ... and is not unschedulable: the draining worker still could run it (past the grace
    // period, with the worker alive).
    let mut ds = Vec::new();
    for t in (4..=40).step_by(4) {
        ds.extend(s.worker_keepalive(secs(t), &w("a")).unwrap());
    }
    ds.extend(s.tick(secs(41)));
    assert!(ds.iter().all(|d| !matches!(
        d,
        crate::Decision::OperationUpdate {
            status: crate::OperationStatus::Completed(_),
            ..
        }
    )));
    // Back in service, it gets the waiting action at once.
    let ds = s.set_worker_draining(secs(42), &w("a"), false).unwrap();
    assert_eq!(starts(&ds)[0].0, "a");
    assert!(s.set_worker_draining(secs(43), &w("nobody"), true).is_err());
    s.check_invariants();
}

// ---- could_start (a driver claiming from a shared queue) ----------------------------------

#[test]
fn could_start_counts_free_slots_and_minimums_without_changing_anything() {
    let mut s = sched(opts());
    let t = secs(1);
    let linux = props(&[("os", "linux"), ("cpu_count", "2")]);
    let mac = props(&[("os", "mac")]);
    assert_eq!(
        s.could_start(std::slice::from_ref(&linux)),
        vec![false],
        "no worker"
    );
    s.worker_connected(t, w("w1"), props(&[("os", "linux"), ("cpu_count", "4")]), 3)
        .unwrap();
    // Two fit by cpu_count (4 = 2 + 2) although the worker has three slots; mac never fits.
    assert_eq!(
        s.could_start(&[linux.clone(), mac, linux.clone(), linux.clone()]),
        vec![true, false, true, false]
    );
    // A minimum that is not a number is refused at once by add_operation: let it be added.
    assert_eq!(s.could_start(&[props(&[("cpu_count", "x")])]), vec![true]);
    s.set_worker_draining(t, &w("w1"), true).unwrap();
    assert_eq!(
        s.could_start(std::slice::from_ref(&linux)),
        vec![false],
        "draining"
    );
    s.set_worker_draining(t, &w("w1"), false).unwrap();
    // While something waits in the queue, nothing new would start before it.
    s.add_operation(
        t,
        op("a"),
        req_on("a", &[("os", "linux"), ("cpu_count", "4")]),
    )
    .unwrap();
    s.add_operation(
        t,
        op("b"),
        req_on("b", &[("os", "linux"), ("cpu_count", "4")]),
    )
    .unwrap();
    assert_eq!(s.queue_length(), 1);
    assert_eq!(s.could_start(&[props(&[("os", "linux")])]), vec![false]);
    s.check_invariants();
}
