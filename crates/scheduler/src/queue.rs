//! Dispatch order: lower priority value first; within one priority, round-robin across
//! invocations (`tool_invocation_id`); FIFO within an invocation.
//!
//! Every queued action carries a [`QueueKey`] `(priority, round, seq)`, fixed when it is first
//! queued, and the whole queue (across shapes) is ordered by it. The `round` makes the
//! round-robin: an invocation's next action gets round `max(its previous round + 1, the
//! priority's current round)`, where the current round is the highest round dispatched so far
//! at that priority. So a huge build that queued 10,000 actions holds rounds 0..9,999, and a
//! small build arriving while round 40 is being dispatched gets rounds 40, 41, ...: the two
//! alternate from there on. `seq` (global arrival order) breaks ties, which gives FIFO within an
//! invocation. A re-queued (retried) action keeps its key, so it goes before newer work.
//!
//! Keys are assigned and retired in O(1) (hash maps); the per-shape queues are B-trees, so
//! queueing, dequeueing and finding the next action are O(log n).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use crate::types::ActionNo;

/// The position of a queued action; smaller runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct QueueKey {
    pub priority: i32,
    pub round: u64,
    pub seq: u64,
}

/// Hands out [`QueueKey`]s and keeps the round-robin state of each priority.
#[derive(Debug, Default)]
pub(crate) struct FairClock {
    /// Kept for every priority ever seen: a handful in practice, 16 bytes + a map each.
    priorities: HashMap<i32, PriorityRounds>,
    next_seq: u64,
}

#[derive(Debug, Default)]
struct PriorityRounds {
    /// Highest round dispatched at this priority.
    current: u64,
    /// Invocations with queued actions at this priority (dropped when they have none).
    invocations: HashMap<String, InvocationRounds>,
}

#[derive(Debug)]
struct InvocationRounds {
    last: u64,
    queued: usize,
}

impl FairClock {
    /// The key of an action queued for the first time.
    pub fn assign(&mut self, priority: i32, invocation: &str) -> QueueKey {
        let p = self.priorities.entry(priority).or_default();
        let round = match p.invocations.get_mut(invocation) {
            Some(inv) => {
                let round = inv.last.saturating_add(1).max(p.current);
                inv.last = round;
                inv.queued += 1;
                round
            }
            None => {
                p.invocations.insert(
                    invocation.to_string(),
                    InvocationRounds {
                        last: p.current,
                        queued: 1,
                    },
                );
                p.current
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        QueueKey {
            priority,
            round,
            seq,
        }
    }

    /// An action is queued again with the key it had before (a retry).
    pub fn requeued(&mut self, key: QueueKey, invocation: &str) {
        let p = self.priorities.entry(key.priority).or_default();
        let inv = p
            .invocations
            .entry(invocation.to_string())
            .or_insert(InvocationRounds {
                last: key.round,
                queued: 0,
            });
        inv.last = inv.last.max(key.round);
        inv.queued += 1;
    }

    /// An action left the queue: dispatched to a worker, or dropped (cancelled, failed).
    pub fn left(&mut self, key: QueueKey, invocation: &str, dispatched: bool) {
        let Some(p) = self.priorities.get_mut(&key.priority) else {
            return;
        };
        if dispatched {
            p.current = p.current.max(key.round);
        }
        if let Some(inv) = p.invocations.get_mut(invocation) {
            inv.queued = inv.queued.saturating_sub(1);
            if inv.queued == 0 {
                p.invocations.remove(invocation);
            }
        }
    }
}

/// The queued actions of one shape, by dispatch order and by the time they were queued (the
/// latter for the unschedulable grace period).
#[derive(Debug, Default)]
pub(crate) struct ShapeQueue {
    by_order: BTreeMap<QueueKey, ActionNo>,
    by_queued_at: BTreeSet<(Duration, ActionNo)>,
}

impl ShapeQueue {
    pub fn push(&mut self, key: QueueKey, queued_at: Duration, action: ActionNo) {
        self.by_order.insert(key, action);
        self.by_queued_at.insert((queued_at, action));
    }

    pub fn remove(&mut self, key: QueueKey, queued_at: Duration, action: ActionNo) {
        self.by_order.remove(&key);
        self.by_queued_at.remove(&(queued_at, action));
    }

    /// The next action to dispatch.
    pub fn first(&self) -> Option<(QueueKey, ActionNo)> {
        self.by_order.first_key_value().map(|(k, a)| (*k, *a))
    }

    /// The action queued longest ago.
    pub fn oldest(&self) -> Option<(Duration, ActionNo)> {
        self.by_queued_at.first().copied()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_order.is_empty()
    }

    #[cfg(test)]
    pub fn get(&self, key: &QueueKey) -> Option<ActionNo> {
        self.by_order.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues `n` actions per invocation (in the given arrival order) and dispatches all,
    /// returning the invocation of each dispatch in order.
    fn dispatch_order(arrivals: &[(i32, &str)], dispatch_between: usize) -> Vec<String> {
        let mut clock = FairClock::default();
        let mut queue: BTreeMap<QueueKey, String> = BTreeMap::new();
        let mut order = Vec::new();
        for (i, (prio, inv)) in arrivals.iter().enumerate() {
            if i == dispatch_between {
                // Dispatch a few before the rest arrive.
                for _ in 0..3 {
                    let (k, inv) = queue.pop_first().unwrap();
                    clock.left(k, &inv, true);
                    order.push(inv);
                }
            }
            queue.insert(clock.assign(*prio, inv), inv.to_string());
        }
        while let Some((k, inv)) = queue.pop_first() {
            clock.left(k, &inv, true);
            order.push(inv);
        }
        order
    }

    #[test]
    fn lower_priority_value_first() {
        let order = dispatch_order(&[(5, "a"), (0, "b"), (-3, "c"), (0, "d")], usize::MAX);
        assert_eq!(order, ["c", "b", "d", "a"]);
    }

    #[test]
    fn fifo_within_an_invocation() {
        let mut clock = FairClock::default();
        let keys: Vec<QueueKey> = (0..5).map(|_| clock.assign(0, "a")).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn invocations_alternate_so_a_big_build_cannot_starve_a_small_one() {
        let mut arrivals: Vec<(i32, &str)> = vec![(0, "big"); 100];
        arrivals.extend([(0, "small"); 3]);
        let order = dispatch_order(&arrivals, 100);
        // Three of "big" went before "small" arrived; then they alternate.
        assert_eq!(
            &order[..9],
            ["big", "big", "big", "small", "big", "small", "big", "small", "big"]
        );
        assert_eq!(order.len(), 103);
    }

    #[test]
    fn requeued_action_keeps_its_place() {
        let mut clock = FairClock::default();
        let first = clock.assign(0, "a");
        clock.left(first, "a", true);
        let later = clock.assign(0, "b");
        clock.requeued(first, "a");
        assert!(first < later);
    }

    #[test]
    fn shape_queue_orders_by_key_and_by_age() {
        let mut clock = FairClock::default();
        let mut q = ShapeQueue::default();
        let k1 = clock.assign(5, "a");
        let k2 = clock.assign(1, "a");
        q.push(k1, Duration::from_secs(1), ActionNo(1));
        q.push(k2, Duration::from_secs(2), ActionNo(2));
        assert_eq!(q.first(), Some((k2, ActionNo(2))));
        assert_eq!(q.oldest(), Some((Duration::from_secs(1), ActionNo(1))));
        q.remove(k2, Duration::from_secs(2), ActionNo(2));
        assert_eq!(q.first(), Some((k1, ActionNo(1))));
        assert_eq!(q.len(), 1);
    }
}
