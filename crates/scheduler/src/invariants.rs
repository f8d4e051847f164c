//! Test-only: checks that every index of the core agrees with the records it indexes.
//!
//! Called after every step of the randomized tests. It is O(size of the state), so it is
//! never compiled into the library.

use std::collections::BTreeMap;

use crate::core::Scheduler;
use crate::state::{ActionState, OpState};
use crate::types::ShapeNo;

impl<A: Clone, R: Clone> Scheduler<A, R> {
    /// Panics with a description of the first inconsistency found.
    pub(crate) fn check_invariants(&self) {
        let strategy = self.opts.allocation_strategy;

        // Operations <-> actions.
        for (op_id, op) in &self.ops {
            if let OpState::Live(a) = op.state {
                let action = self
                    .actions
                    .get(&a)
                    .unwrap_or_else(|| panic!("live op {op_id} names a dead action"));
                assert!(action.ops.contains(op_id), "op {op_id} not on its action");
            }
        }
        let mut queued = 0;
        let mut running = 0;
        let mut shape_refs: BTreeMap<ShapeNo, usize> = BTreeMap::new();
        for (&a, action) in &self.actions {
            assert!(!action.ops.is_empty(), "action {a:?} without operations");
            let mut watchers = 0;
            for op_id in &action.ops {
                let op = &self.ops[op_id];
                assert!(
                    matches!(op.state, OpState::Live(x) if x == a),
                    "op {op_id} on action {a:?} is not live on it"
                );
                watchers += op.watchers;
            }
            assert_eq!(watchers, action.watchers, "watchers of {a:?}");
            match action.unwatched_deadline {
                Some(d) => {
                    assert_eq!(watchers, 0);
                    assert!(self.timers.unwatched.contains(&(d, a)));
                }
                None => assert!(watchers > 0, "unwatched action {a:?} without deadline"),
            }
            if action.cacheable {
                assert_eq!(
                    self.in_flight.get(&action.key),
                    Some(&a),
                    "in_flight of {a:?}"
                );
            }
            *shape_refs.entry(action.shape).or_default() += 1;
            let entry = &self.shapes.entries[&action.shape];
            match &action.state {
                ActionState::Queued => {
                    queued += 1;
                    assert_eq!(
                        entry.queue.get(&action.queue_key),
                        Some(a),
                        "queued {a:?} not in its shape queue"
                    );
                }
                ActionState::Running(run) => {
                    running += 1;
                    let w = self
                        .workers
                        .get(&run.worker)
                        .unwrap_or_else(|| panic!("{a:?} runs on a removed worker"));
                    assert_eq!(w.running.get(&run.attempt), Some(&a));
                    if let Some(d) = run.deadline {
                        assert!(self.timers.executing.contains(&(d, a)));
                    }
                }
                ActionState::Detached => panic!("action {a:?} detached between events"),
            }
        }
        for (key, a) in &self.in_flight {
            let action = &self.actions[a];
            assert!(action.cacheable && &action.key == key);
        }
        assert_eq!(queued, self.queued, "queued count");
        assert_eq!(running, self.running, "running count");
        let in_queues: usize = self.shapes.entries.values().map(|e| e.queue.len()).sum();
        assert_eq!(
            in_queues, self.queued,
            "shape queues hold every queued action"
        );
        assert_eq!(
            self.timers.executing.len(),
            self.actions
                .values()
                .filter(|x| matches!(&x.state, ActionState::Running(r) if r.deadline.is_some()))
                .count()
        );

        // Workers: capacity and indexes.
        assert_eq!(self.worker_nos.len(), self.workers.len());
        assert_eq!(self.timers.worker.len(), self.workers.len());
        for (&wno, w) in &self.workers {
            assert_eq!(self.worker_nos.get(&w.id), Some(&wno));
            assert!(self.timers.worker.contains(&(w.deadline, wno)));
            assert_eq!(
                w.capacity.free_slots as usize + w.running.len(),
                w.slots as usize,
                "slots of {}",
                w.id
            );
            let mut used: BTreeMap<&str, u64> = BTreeMap::new();
            for a in w.running.values() {
                let action = &self.actions[a];
                assert!(
                    matches!(&action.state, ActionState::Running(r) if r.worker == wno),
                    "worker {} runs {a:?} which is not running there",
                    w.id
                );
                for (name, need) in &self.shapes.entries[&action.shape].shape.minimum {
                    *used.entry(name).or_default() += need;
                }
            }
            for (name, total) in w.caps.totals() {
                let u = used.get(name.as_str()).copied().unwrap_or(0);
                assert!(u <= *total, "worker {} over-committed on {name}", w.id);
                assert_eq!(w.capacity.free[name], total - u, "free {name} of {}", w.id);
            }
        }

        // Shapes, and which registered worker can run which, recomputed pair by pair.
        let mut capable_pairs = 0;
        for (&sno, e) in &self.shapes.entries {
            assert_eq!(self.shapes.by_shape.get(&e.shape), Some(&sno));
            let mut fitting = 0;
            for (&wno, w) in &self.workers {
                let can = w.caps.can_run(&e.shape);
                assert_eq!(e.capable.contains(&wno), can, "{sno:?} capable of {}", w.id);
                assert_eq!(
                    w.capable_shapes.contains_key(&sno),
                    can,
                    "{} on {sno:?}",
                    w.id
                );
                if !can {
                    continue;
                }
                capable_pairs += 1;
                let mm = w.caps.mismatches(&e.shape);
                assert_eq!(w.capable_shapes[&sno], mm);
                let fits = !w.draining && w.capacity.fits(&e.shape);
                let key = (mm, w.order(strategy), wno);
                assert_eq!(
                    e.available.contains(&key),
                    fits,
                    "{} available for {sno:?}",
                    w.id
                );
                fitting += usize::from(fits);
            }
            assert_eq!(e.available.len(), fitting, "available workers of {sno:?}");
            let incapable = e.capable.is_empty();
            assert_eq!(e.unschedulable_since.is_some(), incapable);
            assert_eq!(self.shapes.incapable.contains(&sno), incapable);
            assert_eq!(self.shapes.queued.contains(&sno), !e.queue.is_empty());
            let refs = shape_refs.get(&sno).copied().unwrap_or(0);
            assert_eq!(e.refs, refs, "refs of {sno:?}");
            match e.idle_since {
                Some(t) => {
                    assert_eq!(refs, 0);
                    assert!(self.shapes.idle.contains(&(t, sno)));
                }
                None => assert!(refs > 0),
            }
            // Dispatch left nothing startable behind.
            assert!(
                e.queue.is_empty() || e.available.is_empty(),
                "shape {sno:?} has a queued action and a free worker after an event"
            );
        }
        let indexed: usize = self.workers.values().map(|w| w.capable_shapes.len()).sum();
        assert_eq!(
            indexed, capable_pairs,
            "workers index no shape that is gone"
        );
        assert_eq!(
            self.shapes.idle.len(),
            self.shapes.entries.values().filter(|e| e.refs == 0).count()
        );
    }
}
