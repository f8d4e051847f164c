//! Placement: which queued action goes to which worker, and when.
//!
//! Queued actions are grouped by [`Shape`]. For each shape the index keeps its queue (in
//! dispatch order), the registered workers that could ever run it, and the workers that could
//! run one of its actions *right now*, ordered by (preferred properties missing, allocation
//! strategy, registration). Dispatching one action therefore costs a scan over the shapes that
//! have queued actions plus O(log n) B-tree work per shape the chosen worker can run; it never
//! scans the queue or the worker list. A worker connecting scans the shapes; a new shape scans
//! the workers once.
//!
//! A shape no action refers to is kept for [`SHAPE_IDLE_TTL`] (so that a steady trickle of
//! one kind of action does not rebuild its index each time), then forgotten.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::core::Scheduler;
use crate::matching::Shape;
use crate::queue::{QueueKey, ShapeQueue};
use crate::state::{ActionState, Running};
use crate::types::{after, ActionNo, AttemptId, Decision, OperationStatus, ShapeNo, WorkerNo};

/// How long an unused shape's index is kept.
pub(crate) const SHAPE_IDLE_TTL: Duration = Duration::from_secs(300);

pub(crate) struct ShapeEntry {
    pub shape: Shape,
    pub queue: ShapeQueue,
    /// Registered workers that could ever run this shape.
    pub capable: BTreeSet<WorkerNo>,
    /// Workers that fit one more action of this shape now: (mismatches, order, worker).
    pub available: BTreeSet<(u32, u64, WorkerNo)>,
    /// Live actions of this shape.
    pub refs: usize,
    /// Since when no registered worker could run it (`Some` iff `capable` is empty).
    pub unschedulable_since: Option<Duration>,
    /// Since when no action refers to it (`Some` iff `refs == 0`).
    pub idle_since: Option<Duration>,
}

#[derive(Default)]
pub(crate) struct ShapeIndex {
    pub by_shape: HashMap<Shape, ShapeNo>,
    pub entries: HashMap<ShapeNo, ShapeEntry>,
    /// Shapes with at least one queued action.
    pub queued: BTreeSet<ShapeNo>,
    /// Shapes no registered worker can run.
    pub incapable: BTreeSet<ShapeNo>,
    /// Unused shapes, by the time they became unused.
    pub idle: BTreeSet<(Duration, ShapeNo)>,
    next: u64,
}

impl<A: Clone, R: Clone> Scheduler<A, R> {
    /// The shape's number, creating its index entry if needed, counted as used by one more
    /// action.
    pub(crate) fn acquire_shape(&mut self, shape: Shape) -> ShapeNo {
        let sno = match self.shapes.by_shape.get(&shape) {
            Some(&sno) => sno,
            None => self.create_shape(shape),
        };
        let entry = self
            .shapes
            .entries
            .get_mut(&sno)
            .expect("shape just found or created");
        if entry.refs == 0 {
            if let Some(since) = entry.idle_since.take() {
                self.shapes.idle.remove(&(since, sno));
            }
        }
        entry.refs += 1;
        sno
    }

    fn create_shape(&mut self, shape: Shape) -> ShapeNo {
        let sno = ShapeNo(self.shapes.next);
        self.shapes.next += 1;
        let strategy = self.opts.allocation_strategy;
        let mut entry = ShapeEntry {
            shape: shape.clone(),
            queue: ShapeQueue::default(),
            capable: BTreeSet::new(),
            available: BTreeSet::new(),
            refs: 0,
            unschedulable_since: None,
            idle_since: Some(self.now),
        };
        for (&wno, worker) in self.workers.iter_mut() {
            if worker.caps.can_run(&shape) {
                let mm = worker.caps.mismatches(&shape);
                worker.capable_shapes.insert(sno, mm);
                entry.capable.insert(wno);
                if !worker.draining && worker.capacity.fits(&shape) {
                    entry.available.insert((mm, worker.order(strategy), wno));
                }
            }
        }
        if entry.capable.is_empty() {
            entry.unschedulable_since = Some(self.now);
            self.shapes.incapable.insert(sno);
        }
        self.shapes.idle.insert((self.now, sno));
        self.shapes.by_shape.insert(shape, sno);
        self.shapes.entries.insert(sno, entry);
        sno
    }

    /// One action fewer uses the shape.
    pub(crate) fn release_shape(&mut self, sno: ShapeNo) {
        let now = self.now;
        if let Some(entry) = self.shapes.entries.get_mut(&sno) {
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs == 0 {
                entry.idle_since = Some(now);
                self.shapes.idle.insert((now, sno));
            }
        }
    }

    /// Forgets shapes unused for [`SHAPE_IDLE_TTL`].
    pub(crate) fn collect_idle_shapes(&mut self) {
        while let Some(&(since, sno)) = self.shapes.idle.first() {
            if after(since, SHAPE_IDLE_TTL) > self.now {
                break;
            }
            self.shapes.idle.pop_first();
            if let Some(entry) = self.shapes.entries.remove(&sno) {
                for wno in &entry.capable {
                    if let Some(w) = self.workers.get_mut(wno) {
                        w.capable_shapes.remove(&sno);
                    }
                }
                self.shapes.by_shape.remove(&entry.shape);
                self.shapes.incapable.remove(&sno);
                self.shapes.queued.remove(&sno);
            }
        }
    }

    /// Adds a newly registered worker to the index of every shape it can run.
    pub(crate) fn link_worker(&mut self, wno: WorkerNo) {
        let strategy = self.opts.allocation_strategy;
        let Some(worker) = self.workers.get_mut(&wno) else {
            return;
        };
        for (&sno, entry) in self.shapes.entries.iter_mut() {
            if !worker.caps.can_run(&entry.shape) {
                continue;
            }
            let mm = worker.caps.mismatches(&entry.shape);
            worker.capable_shapes.insert(sno, mm);
            entry.capable.insert(wno);
            if entry.unschedulable_since.take().is_some() {
                self.shapes.incapable.remove(&sno);
            }
            if !worker.draining && worker.capacity.fits(&entry.shape) {
                entry.available.insert((mm, worker.order(strategy), wno));
            }
        }
    }

    /// Removes a worker (still in `self.workers`) from every shape's index.
    pub(crate) fn unlink_worker(&mut self, wno: WorkerNo) {
        let Some(worker) = self.workers.get(&wno) else {
            return;
        };
        let order = worker.order(self.opts.allocation_strategy);
        for (&sno, &mm) in &worker.capable_shapes {
            let Some(entry) = self.shapes.entries.get_mut(&sno) else {
                continue;
            };
            entry.capable.remove(&wno);
            entry.available.remove(&(mm, order, wno));
            if entry.capable.is_empty() {
                entry.unschedulable_since = Some(self.now);
                self.shapes.incapable.insert(sno);
            }
        }
    }

    /// Re-files a worker whose capacity or order changed (`old_order`: its order before).
    pub(crate) fn reindex_worker(&mut self, wno: WorkerNo, old_order: u64) {
        let Some(worker) = self.workers.get(&wno) else {
            return;
        };
        let order = worker.order(self.opts.allocation_strategy);
        for (&sno, &mm) in &worker.capable_shapes {
            let Some(entry) = self.shapes.entries.get_mut(&sno) else {
                continue;
            };
            entry.available.remove(&(mm, old_order, wno));
            if !worker.draining && worker.capacity.fits(&entry.shape) {
                entry.available.insert((mm, order, wno));
            }
        }
    }

    /// Puts a (detached) action into its shape's queue.
    pub(crate) fn queue_action(&mut self, a: ActionNo) {
        let action = self.actions.get_mut(&a).expect("queue_action: live action");
        action.state = ActionState::Queued;
        if let Some(entry) = self.shapes.entries.get_mut(&action.shape) {
            entry.queue.push(action.queue_key, action.queued_at, a);
            self.shapes.queued.insert(action.shape);
        }
        self.queued += 1;
    }

    /// Takes a queued action out of its shape's queue (it is then detached).
    pub(crate) fn unqueue_action(&mut self, a: ActionNo, dispatched: bool) {
        let action = self
            .actions
            .get_mut(&a)
            .expect("unqueue_action: live action");
        action.state = ActionState::Detached;
        if let Some(entry) = self.shapes.entries.get_mut(&action.shape) {
            entry.queue.remove(action.queue_key, action.queued_at, a);
            if entry.queue.is_empty() {
                self.shapes.queued.remove(&action.shape);
            }
        }
        self.fairness
            .left(action.queue_key, &action.invocation_id, dispatched);
        self.queued -= 1;
    }

    /// Starts queued actions while some shape has both a queued action and a worker that fits
    /// it, always taking the action first in dispatch order among those.
    pub(crate) fn dispatch(&mut self, out: &mut Vec<Decision<A, R>>) {
        loop {
            let mut best: Option<(QueueKey, ActionNo, WorkerNo)> = None;
            for sno in &self.shapes.queued {
                let Some(entry) = self.shapes.entries.get(sno) else {
                    continue;
                };
                let (Some((key, a)), Some(&(_, _, wno))) =
                    (entry.queue.first(), entry.available.first())
                else {
                    continue;
                };
                if best.is_none_or(|(k, _, _)| key < k) {
                    best = Some((key, a, wno));
                }
            }
            let Some((_, a, wno)) = best else {
                return;
            };
            self.start_attempt(a, wno, out);
        }
    }

    fn start_attempt(&mut self, a: ActionNo, wno: WorkerNo, out: &mut Vec<Decision<A, R>>) {
        self.unqueue_action(a, true);
        let attempt = AttemptId(self.next_attempt);
        self.next_attempt += 1;
        let now = self.now;
        let deadline = self
            .opts
            .max_action_executing_timeout
            .map(|t| after(now, t));
        let strategy = self.opts.allocation_strategy;

        let action = self
            .actions
            .get_mut(&a)
            .expect("start_attempt: live action");
        let shape = &self.shapes.entries[&action.shape].shape;
        let worker = self
            .workers
            .get_mut(&wno)
            .expect("start_attempt: available worker");
        let old_order = worker.order(strategy);
        worker.capacity.take(shape);
        worker.running.insert(attempt, a);
        self.next_stamp += 1;
        worker.stamp = self.next_stamp;
        action.state = ActionState::Running(Running {
            worker: wno,
            attempt,
            started_at: now,
            deadline,
        });
        if let Some(d) = deadline {
            self.timers.executing.insert((d, a));
        }
        out.push(Decision::StartAction {
            worker_id: worker.id.clone(),
            attempt_id: attempt,
            action_key: action.key.clone(),
            payload: action.payload.clone(),
        });
        for op in &action.ops {
            out.push(Decision::OperationUpdate {
                op_id: op.clone(),
                status: OperationStatus::Executing,
            });
        }
        self.running += 1;
        self.counters.attempts_started += 1;
        self.reindex_worker(wno, old_order);
    }
}
