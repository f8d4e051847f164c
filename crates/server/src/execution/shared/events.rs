//! The replica's fan-out of the pub/sub channel: a message naming an operation wakes only the
//! clients following that operation (one `Notify` per followed operation, shared by its
//! followers); `queue` wakes the claimer; a lost subscription wakes everyone, who then read
//! again. A follower arms its wake-up before it reads, so a message between its read and its
//! wait is not lost.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Events {
    followed: parking_lot::Mutex<HashMap<String, Weak<Notify>>>,
    /// Something was queued (or may have been: after a lost subscription).
    pub queued: Notify,
}

/// A follower's registration; unregisters on drop.
pub struct Follow<'a> {
    events: &'a Events,
    id: String,
    pub notify: Arc<Notify>,
}

impl Events {
    /// Registers a follower of `id`.
    pub fn follow(&self, id: &str) -> Follow<'_> {
        let mut map = self.followed.lock();
        let notify = match map.get(id).and_then(Weak::upgrade) {
            Some(n) => n,
            None => {
                let n = Arc::new(Notify::new());
                map.insert(id.to_string(), Arc::downgrade(&n));
                n
            }
        };
        Follow {
            events: self,
            id: id.to_string(),
            notify,
        }
    }

    /// A message from the channel: an operation id, or `queue`.
    pub fn message(&self, payload: &str) {
        if payload == "queue" {
            self.queued.notify_one();
            return;
        }
        let n = self.followed.lock().get(payload).and_then(Weak::upgrade);
        if let Some(n) = n {
            n.notify_waiters();
        }
    }

    /// Messages may have been lost: everyone reads again.
    pub fn everything(&self) {
        self.queued.notify_one();
        let all: Vec<Arc<Notify>> = self
            .followed
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for n in all {
            n.notify_waiters();
        }
    }

    /// Operations followed now (for tests).
    #[cfg(test)]
    fn followed(&self) -> usize {
        self.followed.lock().len()
    }
}

impl Drop for Follow<'_> {
    fn drop(&mut self) {
        let mut map = self.events.followed.lock();
        // The map holds a weak reference: ours is the last strong one when no other follower
        // of the operation is left.
        if Arc::strong_count(&self.notify) == 1 {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_message_wakes_only_its_followers_and_nothing_leaks() {
        let e = Events::default();
        let a1 = e.follow("a");
        let a2 = e.follow("a");
        let b = e.follow("b");
        assert_eq!(e.followed(), 2);
        let short = Duration::from_millis(50);
        {
            let wa1 = a1.notify.notified();
            let wa2 = a2.notify.notified();
            let wb = b.notify.notified();
            tokio::pin!(wa1, wa2, wb);
            wa1.as_mut().enable();
            wa2.as_mut().enable();
            wb.as_mut().enable();
            e.message("a");

            assert!(tokio::time::timeout(short, wa1).await.is_ok());
            assert!(tokio::time::timeout(short, wa2).await.is_ok());
            assert!(tokio::time::timeout(short, wb.as_mut()).await.is_err());
            e.everything();
            assert!(tokio::time::timeout(short, wb).await.is_ok());
        }
        // `queue` leaves a permit for the claimer even when it is not waiting.
        e.message("queue");
        assert!(tokio::time::timeout(short, e.queued.notified())
            .await
            .is_ok());
        drop(a1);
        assert_eq!(e.followed(), 2, "a is still followed by a2");
        drop(a2);
        drop(b);
        assert_eq!(e.followed(), 0);
        e.message("a"); // nobody: nothing happens
    }
}
