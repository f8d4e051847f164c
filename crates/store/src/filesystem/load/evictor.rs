//! The filesystem store's evictor: a thread that works off a backlog of evictions (a lowered
//! `max_bytes`, a large `evict_bytes`, what a walk indexed, more than a put's own
//! `index::INLINE_EVICTIONS`) in batches, the index locked for one batch at a time and the
//! files deleted outside the lock, while the store serves. Puts are refused meanwhile only past
//! the hard limit (`FilesystemStore::check_hard_limit`).

use std::sync::atomic::Ordering;
#[cfg(test)]
use std::time::Duration;

use super::Blobs;

impl Blobs {
    /// Asks the evictor thread to work off what is over the limit.
    pub fn wake_evictor(&self) {
        let mut wanted = self.evict_wanted.lock();
        if !*wanted {
            *wanted = true;
            self.evict_wake.notify_one();
        }
    }

    /// The evictor thread: evicts in batches (the index locked for one batch at a time) and
    /// deletes their files, whenever woken, until the limits hold again. Ends when stopped.
    pub(super) fn evict_loop(&self) {
        loop {
            {
                let mut wanted = self.evict_wanted.lock();
                while !*wanted && !self.stop.load(Ordering::Relaxed) {
                    self.evict_wake.wait(&mut wanted);
                }
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                *wanted = false;
                self.evicting.store(true, Ordering::Release);
            }
            self.evict_backlog();
            self.evicting.store(false, Ordering::Release);
        }
    }

    /// Whether the evictor has nothing to do and is not doing anything.
    #[cfg(test)]
    pub fn evictor_idle(&self) -> bool {
        let wanted = self.evict_wanted.lock();
        !*wanted && !self.evicting.load(Ordering::Acquire)
    }

    /// Evicts what is over the limit, batch by batch, and deletes the files.
    fn evict_backlog(&self) {
        // A backlog is evicted once the index is loaded (the load wakes it then): before
        // that, the cold end may not be the oldest.
        if !self.ready() {
            return;
        }
        #[cfg(test)]
        while self.evictor_paused.load(Ordering::Relaxed) {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut evicted = 0usize;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let batch = self
                .index
                .evict_batch(crate::filesystem::index::EVICTION_BATCH);
            if batch.is_empty() {
                break;
            }
            evicted += batch.len();
            self.changed();
            self.remove_files(&batch);
        }
        if evicted > 0 {
            tracing::info!(
                evicted,
                entries = self.index.len(),
                bytes = self.index.total_bytes(),
                path = %self.content.display(),
                "filesystem store: backlog of evictions worked off"
            );
        }
    }
}
