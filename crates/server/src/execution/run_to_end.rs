//! `worker_api.disable_kill_revoked_operations` (NativeLink's key): an action the scheduler
//! drops while it runs (it was cancelled, or every client went away) is not killed; it runs
//! to its end on its worker, which still writes its result to the action cache.
//!
//! The core releases a dropped action's slot at once, so the driver keeps the count the worker
//! lives by: the attempts each worker runs (dropped ones included, until their `ActionDone`),
//! and the starts that would take a worker past its slots wait here, in order, until one ends.
//! A start that waits and is then dropped itself is forgotten (it never ran).

use std::collections::{HashMap, HashSet, VecDeque};

use cairn_proto::worker::v1 as wapi;

#[derive(Default)]
pub(super) struct RunToEnd {
    slots: HashMap<String, u32>,
    running: HashMap<String, HashSet<u64>>,
    waiting: HashMap<String, VecDeque<(u64, wapi::SchedulerMessage)>>,
}

impl RunToEnd {
    pub(super) fn connected(&mut self, worker: &str, slots: u32) {
        self.slots.insert(worker.to_string(), slots.max(1));
    }

    pub(super) fn gone(&mut self, worker: &str) {
        self.slots.remove(worker);
        self.running.remove(worker);
        self.waiting.remove(worker);
    }

    /// A start decided by the core: the message to send now, or `None` when it waits.
    pub(super) fn start(
        &mut self,
        worker: &str,
        attempt: u64,
        msg: wapi::SchedulerMessage,
    ) -> Option<wapi::SchedulerMessage> {
        let Some(&slots) = self.slots.get(worker) else {
            return Some(msg);
        };
        let running = self.running.entry(worker.to_string()).or_default();
        let waiting = self.waiting.entry(worker.to_string()).or_default();
        if running.len() < slots as usize && waiting.is_empty() {
            running.insert(attempt);
            Some(msg)
        } else {
            waiting.push_back((attempt, msg));
            None
        }
    }

    /// A kill decided by the core: a running attempt runs on; a waiting one is forgotten.
    pub(super) fn kill(&mut self, worker: &str, attempt: u64) {
        if let Some(w) = self.waiting.get_mut(worker) {
            w.retain(|(a, _)| *a != attempt);
        }
    }

    /// An attempt ended on `worker`: the waiting starts that now fit, to send in order.
    pub(super) fn done(&mut self, worker: &str, attempt: u64) -> Vec<wapi::SchedulerMessage> {
        let Some(&slots) = self.slots.get(worker) else {
            return vec![];
        };
        let running = self.running.entry(worker.to_string()).or_default();
        running.remove(&attempt);
        let mut out = Vec::new();
        if let Some(waiting) = self.waiting.get_mut(worker) {
            while running.len() < slots as usize {
                let Some((a, msg)) = waiting.pop_front() else {
                    break;
                };
                running.insert(a);
                out.push(msg);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u64) -> wapi::SchedulerMessage {
        wapi::SchedulerMessage {
            message: Some(wapi::scheduler_message::Message::KillAction(
                wapi::KillAction {
                    action_id: n.to_string(),
                },
            )),
        }
    }

    #[test]
    fn a_dropped_attempt_keeps_its_slot_until_it_ends() {
        let mut r = RunToEnd::default();
        r.connected("w", 1);
        assert!(r.start("w", 1, msg(1)).is_some());
        r.kill("w", 1);
        // The core gave the slot to attempt 2; it waits for attempt 1 to end.
        assert!(r.start("w", 2, msg(2)).is_none());
        assert!(r.start("w", 3, msg(3)).is_none());
        r.kill("w", 3);
        assert_eq!(r.done("w", 1), vec![msg(2)]);
        assert!(r.done("w", 2).is_empty());
        assert!(r.start("w", 4, msg(4)).is_some());
        // Unknown workers are not held back.
        assert!(r.start("other", 5, msg(5)).is_some());
    }
}
