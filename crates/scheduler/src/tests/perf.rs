//! A large run: 50,000 queued actions over 1,000 workers. No timing assertion; it shows that
//! no step scans the queue (a quadratic core would not finish in a test's time).

use std::collections::VecDeque;

use super::*;
use crate::{Scheduler, WorkerId};

#[test]
fn fifty_thousand_actions_through_a_thousand_workers() {
    const ACTIONS: usize = 50_000;
    let mut s: Scheduler<u32, String> = Scheduler::new(opts());
    let now = secs(1);
    let platforms: [&[(&str, &str)]; 4] = [
        &[],
        &[("os", "linux")],
        &[("cpu_count", "2")],
        &[("pool", "a"), ("os", "linux")],
    ];
    for i in 0..ACTIONS {
        let request = ActionRequest {
            platform: props(platforms[i % 4]),
            priority: (i % 3) as i32,
            invocation_id: format!("build-{}", i % 50),
            ..req(&format!("action-{i}"))
        };
        let ds = s
            .add_operation(now, format!("op-{i}").into(), request)
            .unwrap();
        assert!(starts(&ds).is_empty());
    }
    assert_eq!(s.queue_length(), ACTIONS);

    let mut running: VecDeque<(WorkerId, AttemptId)> = VecDeque::new();
    let collect = |ds: Vec<D>, running: &mut VecDeque<(WorkerId, AttemptId)>| {
        for (w, a, _) in starts(&ds) {
            running.push_back((w.into(), a));
        }
    };
    for i in 0..1000 {
        let pool = if i % 2 == 0 { "a" } else { "b" };
        let properties = props(&[("os", "linux"), ("cpu_count", "4"), ("pool", pool)]);
        let ds = s
            .worker_connected(now, format!("worker-{i}").into(), properties, 2)
            .unwrap();
        collect(ds, &mut running);
    }
    assert_eq!(s.executing_count(), 2000);
    while let Some((w, a)) = running.pop_front() {
        let ds = s.action_completed(now, &w, a, Ok(String::new())).unwrap();
        collect(ds, &mut running);
    }
    assert_eq!(s.counters().actions_completed_with_result, ACTIONS as u64);
    assert_eq!((s.queue_length(), s.executing_count()), (0, 0));
    s.check_invariants();
}
