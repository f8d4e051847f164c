//! Randomized event sequences with virtual time, checked after every step.
//!
//! A model driver plays clients and workers: it adds operations (merging ones included),
//! attaches and detaches watchers, cancels, connects workers of several kinds, lets some miss
//! their keepalives, disconnects others, reports results (ok, infrastructure errors, stale
//! results of killed attempts) and advances time. It carries out every decision as a real
//! driver would and checks, after every step:
//!
//! - the core's own indexes agree with its records (`check_invariants`);
//! - every `StartAction` names a connected worker with a free slot and enough `cpu_count`, and
//!   no action key ever has two attempts running at once;
//! - no action is lost: every operation without a terminal update is queued or executing
//!   (and, if executing, on an attempt the model's worker really runs);
//! - every operation gets at most one terminal update and nothing after it;
//! - finally, with healthy workers of every kind connected and time running on, every
//!   operation gets its terminal update.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::*;
use crate::{
    AllocationStrategy, ErrorCode, EventError, OperationId, OperationStatus, SchedError, Scheduler,
    Stage, WorkerId,
};

/// Platforms of actions: index `i % len` for cacheable key `k{i}`, random for uncacheable.
const PLATFORMS: &[&[(&str, &str)]] = &[
    &[],
    &[("os", "linux")],
    &[("os", "linux"), ("cpu_count", "2")],
    &[("cpu_count", "4")],
    &[("os", "mac")],
    &[("pool", "a"), ("label", "x")],
    &[("os", "windows")],     // no worker kind offers it: unschedulable
    &[("cpu_count", "lots")], // invalid
];

const WORKER_KINDS: &[&[(&str, &str)]] = &[
    &[("os", "linux"), ("cpu_count", "8"), ("pool", "a")],
    &[("os", "linux"), ("cpu_count", "2")],
    &[("os", "mac")],
    &[("os", "linux"), ("pool", "b"), ("cpu_count", "4")],
];

const CACHEABLE_KEYS: usize = 12;

fn cpu_of(platform: &[(String, String)]) -> u64 {
    platform
        .iter()
        .filter(|(n, _)| n == "cpu_count")
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

struct MWorker {
    slots: u32,
    cpu: u64,
    healthy: bool,
    running: BTreeMap<AttemptId, String>,
}

struct MOp {
    terminal: bool,
}

struct Model {
    rng: StdRng,
    s: Scheduler<u32, String>,
    now: Duration,
    workers: BTreeMap<String, MWorker>,
    ops: BTreeMap<String, MOp>,
    platform_of: HashMap<String, Vec<(String, String)>>,
    killed: Vec<(String, AttemptId)>,
    /// Some operations the core has forgotten, to probe NOT_FOUND.
    forgotten: Vec<String>,
    next_op: u64,
    next_worker: u64,
    next_nc: u64,
    step: usize,
}

impl Model {
    fn new(seed: u64) -> Model {
        let mut rng = StdRng::seed_from_u64(seed);
        let o = SchedulerOptions {
            worker_timeout: secs(5),
            client_action_timeout: secs(rng.gen_range(5..30)),
            max_action_executing_timeout: rng.gen_bool(0.5).then(|| secs(rng.gen_range(3..15))),
            max_job_retries: rng.gen_range(0..=3),
            allocation_strategy: if rng.gen_bool(0.5) {
                AllocationStrategy::LeastRecentlyUsed
            } else {
                AllocationStrategy::MostRecentlyUsed
            },
            retain_completed_for: secs(rng.gen_range(0..20)),
            unschedulable_grace_period: secs(rng.gen_range(0..20)),
            ..opts()
        };
        Model {
            rng,
            s: Scheduler::new(o),
            now: Duration::ZERO,
            workers: BTreeMap::new(),
            ops: BTreeMap::new(),
            platform_of: HashMap::new(),
            killed: Vec::new(),
            forgotten: Vec::new(),
            next_op: 0,
            next_worker: 0,
            next_nc: 0,
            step: 0,
        }
    }

    /// Carries out decisions as a driver would, checking each against the model.
    fn apply(&mut self, ds: Vec<D>) {
        for d in ds {
            match d {
                Decision::StartAction {
                    worker_id,
                    attempt_id,
                    action_key,
                    ..
                } => {
                    let key = action_key.to_string();
                    let already = self
                        .workers
                        .values()
                        .flat_map(|w| w.running.values())
                        .filter(|k| **k == key)
                        .count();
                    assert_eq!(already, 0, "{key} started while already running");
                    let need = cpu_of(&self.platform_of[&key]);
                    let platform_of = &self.platform_of;
                    let w = self
                        .workers
                        .get_mut(worker_id.as_str())
                        .unwrap_or_else(|| panic!("StartAction on unknown worker {worker_id}"));
                    assert!(w.running.len() < w.slots as usize, "slots over-committed");
                    let used: u64 = w.running.values().map(|k| cpu_of(&platform_of[k])).sum();
                    assert!(used + need <= w.cpu || need == 0, "cpu over-committed");
                    w.running.insert(attempt_id, key);
                }
                Decision::KillAction {
                    worker_id,
                    attempt_id,
                } => {
                    let w = self
                        .workers
                        .get_mut(worker_id.as_str())
                        .unwrap_or_else(|| panic!("KillAction on unknown worker {worker_id}"));
                    assert!(
                        w.running.remove(&attempt_id).is_some(),
                        "kill of idle attempt"
                    );
                    self.killed.push((worker_id.to_string(), attempt_id));
                }
                Decision::OperationUpdate { op_id, status } => {
                    let op = self
                        .ops
                        .get_mut(op_id.as_str())
                        .unwrap_or_else(|| panic!("update for unknown op {op_id}"));
                    assert!(
                        !op.terminal,
                        "update {status:?} after the terminal one of {op_id}"
                    );
                    if let OperationStatus::Completed(_) = status {
                        op.terminal = true;
                    }
                }
                Decision::WorkerRemoved { worker_id, .. } => {
                    assert!(
                        self.workers.remove(worker_id.as_str()).is_some(),
                        "removed unknown worker {worker_id}"
                    );
                }
            }
        }
    }

    /// Checks the model against the core, then drops operations the core has forgotten
    /// (they can only be NOT_FOUND from now on).
    fn check(&mut self) {
        let mut forgotten = Vec::new();
        self.s.check_invariants();
        assert_eq!(
            self.s.workers().count(),
            self.workers.len(),
            "connected workers"
        );
        for (id, w) in &self.workers {
            let view = self
                .s
                .worker(&WorkerId::from(id.as_str()))
                .unwrap_or_else(|| panic!("worker {id} unknown to the core"));
            assert!(view.running.iter().eq(w.running.keys()), "attempts of {id}");
        }
        for (id, op) in &self.ops {
            match self.s.operation(&OperationId::from(id.as_str())) {
                None => {
                    assert!(op.terminal, "op {id} lost without a terminal update");
                    forgotten.push(id.clone());
                }
                Some(v) if op.terminal => assert_eq!(v.stage, Stage::Completed, "op {id}"),
                Some(v) => {
                    assert_ne!(v.stage, Stage::Completed, "op {id} completed silently");
                    if v.stage == Stage::Executing {
                        let w =
                            &self.workers[v.worker_id.expect("executing op has a worker").as_str()];
                        let attempt = v.attempt_id.expect("executing op has an attempt");
                        assert_eq!(w.running.get(&attempt), Some(&v.action_key.to_string()));
                    }
                }
            }
        }
        for id in forgotten {
            self.ops.remove(&id);
            if self.forgotten.len() < 16 {
                self.forgotten.push(id);
            }
        }
    }

    fn random_op(&mut self) -> Option<String> {
        if !self.forgotten.is_empty() && self.rng.gen_bool(0.05) {
            return self.forgotten.choose(&mut self.rng).cloned();
        }
        let n = self.ops.len();
        if n == 0 {
            return None;
        }
        // Mostly recent operations: older ones are mostly finished.
        let i = n - 1 - self.rng.gen_range(0..n.min(20));
        self.ops.keys().nth(i).cloned()
    }

    fn random_worker(&mut self) -> Option<String> {
        let ids: Vec<&String> = self.workers.keys().collect();
        ids.choose(&mut self.rng).map(|s| s.to_string())
    }

    fn add_op(&mut self) {
        let (key, cacheable) = if self.rng.gen_bool(0.7) {
            let i = self.rng.gen_range(0..CACHEABLE_KEYS);
            (format!("k{i}"), true)
        } else {
            self.next_nc += 1;
            (format!("nc{}", self.next_nc), false)
        };
        let platform = if cacheable {
            let i: usize = key[1..].parse().expect("k<number>");
            PLATFORMS[i % PLATFORMS.len()]
        } else {
            PLATFORMS[self.rng.gen_range(0..PLATFORMS.len())]
        };
        let platform = props(platform);
        self.platform_of.insert(key.clone(), platform.clone());
        self.next_op += 1;
        let op_id = format!("op{}", self.next_op);
        let request = ActionRequest {
            key: key.as_str().into(),
            cacheable,
            priority: self.rng.gen_range(-1..=1),
            platform,
            invocation_id: format!("i{}", self.rng.gen_range(0..3)),
            payload: 0,
        };
        self.ops.insert(op_id.clone(), MOp { terminal: false });
        let ds = self
            .s
            .add_operation(self.now, op_id.as_str().into(), request)
            .expect("fresh op id");
        self.apply(ds);
    }

    /// Applies an event on an operation that the core may have forgotten.
    fn op_event(&mut self, kind: u32) {
        let Some(id) = self.random_op() else {
            return;
        };
        let op_id = OperationId::from(id.as_str());
        let known = self.s.operation(&op_id).is_some();
        let now = self.now;
        let r = match kind {
            0 => self.s.watcher_attached(now, &op_id),
            1 => self.s.watcher_detached(now, &op_id),
            2 => self.s.cancel_operation(now, &op_id),
            _ => self.s.delete_operation(&op_id).map(|()| Vec::new()),
        };
        match r {
            Ok(ds) => {
                assert!(known);
                self.apply(ds);
            }
            Err(EventError::UnknownOperation(_)) => {
                assert!(!known && self.ops.get(&id).is_none_or(|o| o.terminal))
            }
            Err(EventError::OperationNotDone(_)) => assert!(!self.ops[&id].terminal),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    fn connect_worker(&mut self, kind: usize, healthy: bool) {
        self.next_worker += 1;
        let id = format!("w{}", self.next_worker);
        let properties = props(WORKER_KINDS[kind]);
        let cpu = cpu_of(&properties);
        let slots = self.rng.gen_range(1..=3);
        self.workers.insert(
            id.clone(),
            MWorker {
                slots,
                cpu,
                healthy,
                running: BTreeMap::new(),
            },
        );
        let ds = self
            .s
            .worker_connected(self.now, id.as_str().into(), properties, slots)
            .expect("valid worker");
        self.apply(ds);
    }

    fn report_result(&mut self) {
        let running: Vec<(String, AttemptId)> = self
            .workers
            .iter()
            .flat_map(|(id, w)| w.running.keys().map(move |a| (id.clone(), *a)))
            .collect();
        let Some((worker, attempt)) = running.choose(&mut self.rng).cloned() else {
            return;
        };
        let outcome = if self.rng.gen_bool(0.65) {
            Ok(format!("result of {attempt}"))
        } else {
            Err(SchedError::new(
                ErrorCode::Internal,
                format!("{attempt} failed"),
            ))
        };
        self.workers
            .get_mut(&worker)
            .unwrap()
            .running
            .remove(&attempt);
        let ds = self
            .s
            .action_completed(self.now, &worker.as_str().into(), attempt, outcome)
            .expect("connected worker");
        self.apply(ds);
    }

    fn stale_result(&mut self) {
        let Some((worker, attempt)) = self.killed.choose(&mut self.rng).cloned() else {
            return;
        };
        let connected = self.workers.contains_key(&worker);
        match self.s.action_completed(
            self.now,
            &worker.as_str().into(),
            attempt,
            Ok("stale".into()),
        ) {
            Ok(ds) => {
                assert!(connected);
                assert!(
                    !ds.iter().any(|d| matches!(d, Decision::OperationUpdate { status: OperationStatus::Completed(Ok(r)), .. } if r == "stale")),
                    "a stale result completed an operation"
                );
                self.apply(ds);
            }
            Err(EventError::UnknownWorker(_)) => assert!(!connected),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    fn advance(&mut self, by: Duration) {
        let healthy: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.healthy)
            .map(|(id, _)| id.clone())
            .collect();
        for id in healthy {
            // A keepalive may race with a removal at the same instant.
            if let Ok(ds) = self.s.worker_keepalive(self.now, &id.as_str().into()) {
                self.apply(ds);
            }
        }
        self.now += by;
        let ds = self.s.tick(self.now);
        self.apply(ds);
    }

    fn random_step(&mut self) {
        self.step += 1;
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=24 => self.add_op(),
            25..=32 => self.op_event(0),
            33..=42 => self.op_event(1),
            43..=47 => self.op_event(2),
            48..=49 => self.op_event(3),
            50..=55 => {
                let kind = self.rng.gen_range(0..WORKER_KINDS.len());
                let healthy = self.rng.gen_bool(0.8);
                self.connect_worker(kind, healthy);
            }
            56 => {
                let r = self.s.worker_connected(
                    self.now,
                    "bad".into(),
                    props(&[("cpu_count", "x")]),
                    1,
                );
                assert!(matches!(r, Err(EventError::InvalidWorker { .. })));
            }
            57..=59 => {
                if let Some(id) = self.random_worker() {
                    self.workers.remove(&id);
                    let ds = self
                        .s
                        .worker_disconnected(self.now, &id.as_str().into())
                        .unwrap();
                    self.apply(ds);
                }
            }
            60..=61 => {
                if let Some(id) = self.random_worker() {
                    let w = self.workers.get_mut(&id).unwrap();
                    w.healthy = !w.healthy;
                }
            }
            62 => {
                if let Some(id) = self.random_worker() {
                    let drain = self.rng.gen_bool(0.5);
                    let ds = self
                        .s
                        .set_worker_draining(self.now, &id.as_str().into(), drain)
                        .unwrap();
                    self.apply(ds);
                }
            }
            63..=82 => self.report_result(),
            83..=85 => self.stale_result(),
            _ => {
                let by = ms(self.rng.gen_range(0..4000));
                self.advance(by);
            }
        }
    }

    /// Healthy workers of every kind, results all ok, time running on: everything ends.
    fn run_to_completion(&mut self) {
        for w in self.workers.values_mut() {
            w.healthy = true;
        }
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        for id in ids {
            if let Ok(ds) = self
                .s
                .set_worker_draining(self.now, &id.as_str().into(), false)
            {
                self.apply(ds);
            }
        }
        for kind in 0..WORKER_KINDS.len() {
            self.connect_worker(kind, true);
        }
        self.check();
        for _ in 0..1000 {
            if self.ops.values().all(|o| o.terminal) {
                return;
            }
            let running: Vec<(String, AttemptId)> = self
                .workers
                .iter()
                .flat_map(|(id, w)| w.running.keys().map(move |a| (id.clone(), *a)))
                .collect();
            for (worker, attempt) in running {
                self.workers
                    .get_mut(&worker)
                    .unwrap()
                    .running
                    .remove(&attempt);
                let ds = self
                    .s
                    .action_completed(
                        self.now,
                        &worker.as_str().into(),
                        attempt,
                        Ok("done".into()),
                    )
                    .unwrap();
                self.apply(ds);
            }
            self.advance(secs(2));
            self.check();
        }
        let open: Vec<&String> = self
            .ops
            .iter()
            .filter(|(_, o)| !o.terminal)
            .map(|(k, _)| k)
            .collect();
        panic!("operations never terminated: {open:?}");
    }
}

fn run_sequence(seed: u64, steps: usize) {
    let mut m = Model::new(seed);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..steps {
            m.random_step();
            m.check();
        }
        m.run_to_completion();
    }));
    if let Err(e) = result {
        eprintln!("randomized sequence failed: seed {seed}, step {}", m.step);
        std::panic::resume_unwind(e);
    }
}

/// 2,000 sequences of 100 random steps each (two tests, so that they run in parallel).
#[test]
fn random_event_sequences_keep_the_invariants() {
    for seed in 0..1000 {
        run_sequence(seed, 100);
    }
}

#[test]
fn more_random_event_sequences_keep_the_invariants() {
    for seed in 1000..2000 {
        run_sequence(seed, 100);
    }
}

/// Fewer, longer sequences reach states short ones do not (many workers, long queues).
#[test]
fn long_random_sequences_keep_the_invariants() {
    for seed in 10_000..10_010 {
        run_sequence(seed, 2000);
    }
}
