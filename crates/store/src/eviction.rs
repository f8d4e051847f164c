//! The LRU-by-bytes index shared by the memory, filesystem and existence-cache stores.
//!
//! O(1) per operation (a hash map threaded by a recency list, from the `lru` crate). Limits:
//! `max_bytes` (evict least recently used until the total is at most `max_bytes - evict_bytes`),
//! `max_count`, `max_seconds` (entries not touched for that long). Evicted values are returned
//! to the caller, which deletes what they stand for outside the lock. A value that is still in
//! use (a `Bytes` held by a reader, an open file) stays valid after eviction: the memory store's
//! buffers are reference counted, and a filesystem reader holds an open descriptor, which keeps
//! the inode alive after the name is unlinked.
//!
//! [`Limits`] is the policy itself, without a data structure: when the coldest entry must go.
//! This map and the filesystem store's compact index (`filesystem/index.rs`) both decide by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cairn_config::stores::EvictionPolicy;
use cairn_core::Digest;
use lru::LruCache;
use parking_lot::Mutex;

/// The eviction policy of `eviction_policy`: `max_bytes` with `evict_bytes` hysteresis,
/// `max_count`, `max_seconds`, and the hard limit of a store that evicts a backlog in the
/// background. Pure: the caller keeps the entries, their total and their order.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// 0: no bound.
    max_bytes: u64,
    /// `max_bytes - evict_bytes`: where evicting stops once `max_bytes` was crossed.
    evict_to: u64,
    /// 0: no bound.
    max_count: u64,
    /// 0: no bound.
    max_seconds: u64,
}

impl Limits {
    pub fn new(policy: Option<&EvictionPolicy>) -> Limits {
        let p = policy.cloned().unwrap_or_default();
        Limits {
            max_bytes: p.max_bytes.0,
            evict_to: p.max_bytes.0.saturating_sub(p.evict_bytes.0),
            max_count: p.max_count,
            max_seconds: p.max_seconds,
        }
    }

    /// The byte bound (`u64::MAX` when there is none).
    pub fn max_bytes(&self) -> u64 {
        if self.max_bytes == 0 {
            u64::MAX
        } else {
            self.max_bytes
        }
    }

    /// What a store that evicts a backlog in the background may hold meanwhile: `max_bytes`
    /// plus a tenth (`u64::MAX` when there is no bound).
    pub fn hard_bytes(&self) -> u64 {
        if self.max_bytes == 0 {
            u64::MAX
        } else {
            self.max_bytes.saturating_add(self.max_bytes / 10)
        }
    }

    /// Whether `total` bytes cross `max_bytes`: evicting starts, and goes on (see
    /// [`Limits::must_evict`]'s `draining`) until the total is down to `max_bytes - evict_bytes`.
    pub fn crosses_bytes(&self, total: u64) -> bool {
        self.max_bytes != 0 && total > self.max_bytes
    }

    /// Whether draining is over at `total` bytes.
    pub fn drained(&self, total: u64) -> bool {
        total <= self.evict_to
    }

    /// Whether an entry last used at `touched_s` is too old at `now_s` (seconds on one clock).
    pub fn expired(&self, touched_s: u64, now_s: u64) -> bool {
        self.max_seconds != 0 && now_s.saturating_sub(touched_s) > self.max_seconds
    }

    /// Whether the coldest entry (last used at `coldest_touched_s`) must be evicted from `len`
    /// entries of `total` bytes; `draining`: `max_bytes` was crossed and not drained since.
    pub fn must_evict(
        &self,
        draining: bool,
        total: u64,
        len: u64,
        coldest_touched_s: u64,
        now_s: u64,
    ) -> bool {
        (draining && self.max_bytes != 0 && !self.drained(total))
            || (self.max_count != 0 && len > self.max_count)
            || self.expired(coldest_touched_s, now_s)
    }

    /// Whether there is eviction work at `len` entries of `total` bytes (ages aside).
    pub fn over(&self, draining: bool, total: u64, len: u64) -> bool {
        self.crosses_bytes(total)
            || (draining && self.max_bytes != 0 && !self.drained(total))
            || (self.max_count != 0 && len > self.max_count)
    }
}

struct Slot<V> {
    value: V,
    size: u64,
    touched_s: u64,
}

struct Inner<V> {
    lru: LruCache<Digest, Slot<V>>,
    total_bytes: u64,
}

/// An LRU index from digest to `V`, bounded by the policy.
pub struct EvictionMap<V> {
    inner: Mutex<Inner<V>>,
    limits: Limits,
    start: Instant,
    evictions: AtomicU64,
}

impl<V: Clone> EvictionMap<V> {
    pub fn new(policy: Option<&EvictionPolicy>) -> EvictionMap<V> {
        EvictionMap {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                total_bytes: 0,
            }),
            limits: Limits::new(policy),
            start: Instant::now(),
            evictions: AtomicU64::new(0),
        }
    }

    /// The byte bound (`u64::MAX` when there is none).
    pub fn max_bytes(&self) -> u64 {
        self.limits.max_bytes()
    }

    fn now_s(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    fn expired(&self, slot: &Slot<V>, now: u64) -> bool {
        self.limits.expired(slot.touched_s, now)
    }

    /// The value and size, marking it recently used; `None` when absent or expired.
    pub fn get(&self, key: &Digest) -> Option<(V, u64)> {
        let now = self.now_s();
        let mut inner = self.inner.lock();
        let expired = match inner.lru.get_mut(key) {
            None => return None,
            Some(slot) if !self.expired(slot, now) => {
                slot.touched_s = now;
                return Some((slot.value.clone(), slot.size));
            }
            Some(_) => true,
        };
        if expired {
            if let Some(slot) = inner.lru.pop(key) {
                inner.total_bytes -= slot.size;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// Size of an entry, marking it used.
    pub fn size_of(&self, key: &Digest) -> Option<u64> {
        self.get(key).map(|(_, s)| s)
    }

    /// Inserts (or replaces) an entry; returns what was evicted to make room, including a
    /// replaced value.
    pub fn insert(&self, key: Digest, value: V, size: u64) -> Vec<(Digest, V)> {
        let now = self.now_s();
        let mut evicted = Vec::new();
        let mut inner = self.inner.lock();
        if let Some(old) = inner.lru.push(
            key,
            Slot {
                value,
                size,
                touched_s: now,
            },
        ) {
            // `push` returns the replaced entry for the same key, or nothing (unbounded cache).
            inner.total_bytes -= old.1.size;
            if old.0 == key {
                evicted.push((old.0, old.1.value));
            }
        }
        inner.total_bytes += size;
        self.evict_locked(&mut inner, now, &mut evicted);
        evicted
    }

    fn evict_locked(&self, inner: &mut Inner<V>, now: u64, out: &mut Vec<(Digest, V)>) {
        let draining = self.limits.crosses_bytes(inner.total_bytes);
        while let Some((_, oldest)) = inner.lru.peek_lru() {
            let must = self.limits.must_evict(
                draining,
                inner.total_bytes,
                inner.lru.len() as u64,
                oldest.touched_s,
                now,
            );
            if !must {
                break;
            }
            // Never evict the entry just inserted when it alone exceeds the limit: the caller
            // gets to serve it once; it goes at the next insert.
            if inner.lru.len() == 1 {
                break;
            }
            let (k, slot) = inner.lru.pop_lru().expect("peeked above");
            inner.total_bytes -= slot.size;
            self.evictions.fetch_add(1, Ordering::Relaxed);
            out.push((k, slot.value));
        }
    }

    pub fn remove(&self, key: &Digest) -> Option<V> {
        let mut inner = self.inner.lock();
        let slot = inner.lru.pop(key)?;
        inner.total_bytes -= slot.size;
        Some(slot.value)
    }

    pub fn contains(&self, key: &Digest) -> bool {
        self.get(key).is_some()
    }

    pub fn len(&self) -> u64 {
        self.inner.lock().lru.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn total_bytes(&self) -> u64 {
        self.inner.lock().total_bytes
    }

    /// Entries evicted so far (size, count or age).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_config::ByteSize;
    use cairn_core::DigestFunction;

    fn d(i: u32) -> Digest {
        DigestFunction::Sha256.compute(&i.to_le_bytes())
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let policy = EvictionPolicy {
            max_bytes: ByteSize(100),
            ..Default::default()
        };
        let m = EvictionMap::new(Some(&policy));
        assert!(m.insert(d(1), 1, 40).is_empty());
        assert!(m.insert(d(2), 2, 40).is_empty());
        assert!(m.get(&d(1)).is_some()); // 1 is now more recent than 2
        let ev = m.insert(d(3), 3, 40);
        assert_eq!(ev.iter().map(|e| e.1).collect::<Vec<_>>(), vec![2]);
        assert_eq!(m.total_bytes(), 80);
        assert!(m.get(&d(2)).is_none());
    }

    #[test]
    fn evict_bytes_gives_hysteresis_and_count_limits() {
        let policy = EvictionPolicy {
            max_bytes: ByteSize(100),
            evict_bytes: ByteSize(50),
            ..Default::default()
        };
        let m = EvictionMap::new(Some(&policy));
        for i in 0..5 {
            m.insert(d(i), i, 20);
        }
        let ev = m.insert(d(9), 9, 20); // 120 > 100: evict down to <= 50
        assert_eq!(ev.len(), 4);
        assert_eq!(m.total_bytes(), 40);

        let policy = EvictionPolicy {
            max_count: 2,
            ..Default::default()
        };
        let m = EvictionMap::new(Some(&policy));
        m.insert(d(1), 1, 1);
        m.insert(d(2), 2, 1);
        m.insert(d(3), 3, 1);
        assert_eq!(m.len(), 2);
        assert!(!m.contains(&d(1)));
    }

    #[test]
    fn limits_are_the_policy_both_indexes_follow() {
        let l = Limits::new(Some(&EvictionPolicy {
            max_bytes: ByteSize(100),
            evict_bytes: ByteSize(30),
            max_count: 5,
            max_seconds: 10,
        }));
        assert_eq!((l.max_bytes(), l.hard_bytes()), (100, 110));
        assert!(!l.crosses_bytes(100) && l.crosses_bytes(101));
        // Once crossed, down to 70; not before.
        assert!(!l.must_evict(false, 90, 1, 0, 0));
        assert!(l.must_evict(true, 90, 1, 0, 0));
        assert!(!l.must_evict(true, 70, 1, 0, 0));
        assert!(l.must_evict(false, 0, 6, 0, 0));
        assert!(l.must_evict(false, 0, 1, 0, 11) && !l.must_evict(false, 0, 1, 1, 11));
        assert!(l.over(false, 101, 1) && l.over(true, 80, 1) && !l.over(false, 80, 1));
        let none = Limits::new(None);
        assert_eq!((none.max_bytes(), none.hard_bytes()), (u64::MAX, u64::MAX));
        assert!(!none.must_evict(true, u64::MAX, u64::MAX, 0, u64::MAX));
    }

    #[test]
    fn replacing_returns_old_value() {
        let m = EvictionMap::new(None);
        m.insert(d(1), 1, 10);
        let ev = m.insert(d(1), 2, 20);
        assert_eq!(ev, vec![(d(1), 1)]);
        assert_eq!(m.total_bytes(), 20);
    }
}
