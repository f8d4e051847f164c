//! The filesystem store's index: which blobs the content directory holds, their stored length
//! and their LRU order, in about 70 bytes per entry.
//!
//! Entries live in one slab (chunks of 64-byte entries that never move) threaded by a doubly linked recency
//! list of `u32` slot numbers; a `hashbrown::HashTable<u32>` (4 bytes and a control byte per
//! bucket) finds a digest's slot. Nothing per entry is allocated on its own: no `String`,
//! `PathBuf`, `Box` or `Arc`. The first 32 bytes of a hash live in the entry; the rest of the
//! rare longer hashes (SHA-384, SHA-512) sits in a side map. Every operation is O(1).
//!
//! The policy is [`crate::eviction::Limits`], which [`crate::eviction::EvictionMap`] (the memory
//! store's) decides by too: `max_bytes` with `evict_bytes` hysteresis, `max_count`, `max_seconds`, and the entry just
//! inserted is never evicted when it alone is over the limit. An insert evicts at most
//! [`INLINE_EVICTIONS`] entries itself; a backlog beyond that (a lowered `max_bytes`, a walk's
//! unordered entries, a large `evict_bytes`) is left to [`Index::evict_batch`], which the
//! store's evictor thread calls in the background. The *hard limit*, `max_bytes` plus a tenth,
//! is what the store may hold while that backlog is worked off ([`Index::over_hard_limit`]).
//!
//! For start-up, entries can be added at the cold end (a snapshot is loaded hottest first) and
//! carry a *seen* mark: set when the file was seen on disk (or written) in this process, clear
//! for an entry that came from a snapshot only. [`Index::sweep_unseen`] drops the entries
//! whose files the reconciling walk did not find.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cairn_config::stores::EvictionPolicy;

use crate::eviction::Limits;
use cairn_core::{Digest, DigestFunction};
use hashbrown::HashTable;
use parking_lot::Mutex;

const NIL: u32 = u32::MAX;
/// `Entry::function` of a slot on the free list.
const FREE: u8 = u8::MAX;
const SEEN: u8 = 1;
/// Visited by the LRU walk of a snapshot when it equals `Inner::walked` (see [`Index::order`]).
const WALKED: u8 = 2;
/// The most entries one insert evicts (and whose files the put then deletes): a put never pays
/// for a backlog.
pub const INLINE_EVICTIONS: usize = 64;
/// The most entries [`Index::evict_batch`] evicts under one hold of the lock.
pub const EVICTION_BATCH: usize = 1024;
/// The slots [`Index::sweep_unseen`] visits, and [`Index::move_to_cold_end`] moves, under one
/// hold of the lock (moving ten million at once held every lookup for about a second).
#[cfg(not(test))]
const SLOT_CHUNK: usize = 64 * 1024;
#[cfg(test)]
const SLOT_CHUNK: usize = 16;
/// The links [`Index::order`] follows under one hold of the lock.
#[cfg(not(test))]
const WALK_CHUNK: usize = 64 * 1024;
#[cfg(test)]
const WALK_CHUNK: usize = 16;

#[derive(Clone, Copy)]
struct Entry {
    /// The hash's first 32 bytes (zero-padded for SHA-1).
    hash: [u8; 32],
    /// The size in the digest (the file's name).
    digest_size: u64,
    /// The stored length (an action-cache entry's differs from its digest's size).
    len: u64,
    /// Towards the hot end (`NIL` at the head).
    prev: u32,
    /// Towards the cold end (`NIL` at the tail); the next free slot on the free list.
    next: u32,
    /// Seconds since the index was made, at the last use.
    touched_s: u32,
    /// Position in `DigestFunction::ALL`, or `FREE`.
    function: u8,
    flags: u8,
}

fn function_code(f: DigestFunction) -> u8 {
    DigestFunction::ALL
        .iter()
        .position(|&g| g == f)
        .unwrap_or(0) as u8
}

/// Entries per chunk of the slab: 4 MiB.
const CHUNK: usize = 1 << 16;

/// The entries, in chunks of [`CHUNK`] that never move: growing never copies the slab nor
/// leaves a freed copy of it behind (a doubling `Vec` held 112 bytes per entry of RSS at ten
/// million entries, against 76 at one million).
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Entry]>>,
    len: usize,
}

impl Slab {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, e: Entry) {
        if self.len == self.chunks.len() * CHUNK {
            self.chunks.push(vec![e; CHUNK].into_boxed_slice());
        }
        let i = self.len;
        self.len += 1;
        self[i] = e;
    }

    fn reserve(&mut self, n: usize) {
        self.chunks.reserve((self.len + n).div_ceil(CHUNK));
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = Entry;
    fn index(&self, i: usize) -> &Entry {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl std::ops::IndexMut<usize> for Slab {
    fn index_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

/// Four bytes of a digest's hash, to recognise a slot's key cheaply.
pub(crate) fn fingerprint(d: &Digest) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&d.hash()[..4]);
    u32::from_le_bytes(b)
}

fn fingerprint_of(head: &[u8; 32]) -> u32 {
    u32::from_le_bytes([head[0], head[1], head[2], head[3]])
}

/// The parts of a digest the index compares.
struct Key {
    function: u8,
    head: [u8; 32],
    tail: Option<[u8; 32]>,
    size: u64,
}

impl Key {
    fn of(d: &Digest) -> Key {
        let hash = d.hash();
        let mut head = [0u8; 32];
        let n = hash.len().min(32);
        head[..n].copy_from_slice(&hash[..n]);
        let tail = (hash.len() > 32).then(|| {
            let mut t = [0u8; 32];
            t[..hash.len() - 32].copy_from_slice(&hash[32..]);
            t
        });
        Key {
            function: function_code(d.function()),
            head,
            tail,
            size: d.size(),
        }
    }
}

struct Inner {
    slots: Slab,
    free: u32,
    table: HashTable<u32>,
    /// Bytes 32..64 of the hashes longer than 32 bytes, by slot.
    tails: HashMap<u32, [u8; 32]>,
    /// Hottest and coldest slot.
    head: u32,
    tail: u32,
    len: u64,
    total_bytes: u64,
    /// `max_bytes` was crossed and the evictions have not reached `max_bytes - evict_bytes`.
    draining: bool,
    /// No eviction while a walk's unordered entries sit at the cold end.
    held: bool,
    /// The value of an entry's `WALKED` bit that means "visited by the current (or last) LRU
    /// walk"; each walk flips it, so every entry starts unvisited.
    walked: u8,
    /// The LRU walk of a snapshot in progress.
    walk: Option<Walk>,
    /// Times the hash table was full at an insert and grew (each rehashes every entry under
    /// the lock).
    table_grows: u64,
}

/// An LRU walk in progress ([`Index::order`]), which releases the lock between chunks.
struct Walk {
    /// The next slot to visit (`NIL`: done). Kept on the list: an unlink of it moves it on.
    cursor: u32,
    /// Unvisited entries moved to the hot end meanwhile (behind the cursor), in that order.
    moved: Vec<u32>,
}

/// An LRU index from digest to stored length, bounded by an eviction policy.
pub struct Index {
    inner: Mutex<Inner>,
    /// Hashes (function, hash, size) with a per-process random seed (foldhash), so that chosen
    /// digests cannot pile up in one probe sequence; three times cheaper than std's SipHash,
    /// which was most of the time of loading a snapshot.
    hasher: hashbrown::DefaultHashBuilder,
    limits: Limits,
    start: Instant,
    evictions: AtomicU64,
}

impl Inner {
    fn entry_key(&self, slot: u32) -> Key {
        let e = &self.slots[slot as usize];
        Key {
            function: e.function,
            head: e.hash,
            tail: self.tails.get(&slot).copied(),
            size: e.digest_size,
        }
    }

    fn digest(&self, slot: u32) -> Digest {
        let e = &self.slots[slot as usize];
        let function = DigestFunction::ALL[e.function as usize];
        let mut hash = [0u8; 64];
        hash[..32].copy_from_slice(&e.hash);
        if let Some(t) = self.tails.get(&slot) {
            hash[32..].copy_from_slice(t);
        }
        Digest::new(function, &hash[..function.hash_len()], e.digest_size)
    }

    fn matches(&self, slot: u32, k: &Key) -> bool {
        let e = &self.slots[slot as usize];
        e.function == k.function
            && e.digest_size == k.size
            && e.hash == k.head
            && (k.tail.is_none() || self.tails.get(&slot) == k.tail.as_ref())
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let e = &self.slots[slot as usize];
            (e.prev, e.next)
        };
        if let Some(walk) = &mut self.walk {
            if walk.cursor == slot {
                walk.cursor = next;
            }
        }
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
    }

    fn push_head(&mut self, slot: u32) {
        let old = self.head;
        {
            let e = &mut self.slots[slot as usize];
            e.prev = NIL;
            e.next = old;
        }
        if old == NIL {
            self.tail = slot;
        } else {
            self.slots[old as usize].prev = slot;
        }
        self.head = slot;
        // An entry the walk has not reached jumps behind its cursor: the walk takes it now.
        if self.walk.is_some() && self.slots[slot as usize].flags & WALKED != self.walked {
            self.slots[slot as usize].flags ^= WALKED;
            if let Some(walk) = &mut self.walk {
                walk.moved.push(slot);
            }
        }
    }

    fn push_tail(&mut self, slot: u32) {
        let old = self.tail;
        {
            let e = &mut self.slots[slot as usize];
            e.next = NIL;
            e.prev = old;
        }
        if old == NIL {
            self.head = slot;
        } else {
            self.slots[old as usize].next = slot;
        }
        self.tail = slot;
    }
}

/// Where an entry goes when inserted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Just used: a put, a blob found on disk by a request.
    Hot,
    /// Older than everything indexed: a snapshot's entries (hottest first).
    Cold,
    /// At the cold end without evicting: a walk's entries, whose order is known only when the
    /// walk is over ([`Index::move_to_cold_end`], then [`Index::evict_batch`]).
    Unordered,
}

impl Index {
    pub fn new(policy: Option<&EvictionPolicy>) -> Index {
        Index {
            inner: Mutex::new(Inner {
                slots: Slab::default(),
                free: NIL,
                table: HashTable::new(),
                tails: HashMap::new(),
                head: NIL,
                tail: NIL,
                len: 0,
                total_bytes: 0,
                draining: false,
                held: false,
                walked: 0,
                walk: None,
                table_grows: 0,
            }),
            hasher: Default::default(),
            limits: Limits::new(policy),
            start: Instant::now(),
            evictions: AtomicU64::new(0),
        }
    }

    /// The byte bound (`u64::MAX` when there is none).
    pub fn max_bytes(&self) -> u64 {
        self.limits.max_bytes()
    }

    /// The bytes the store may hold while a backlog of evictions is worked off: `max_bytes`
    /// plus a tenth (`u64::MAX` when there is no `max_bytes`).
    pub fn hard_limit(&self) -> u64 {
        self.limits.hard_bytes()
    }

    /// The bytes held, when they are over the hard limit (never while evictions are held:
    /// the index is then being filled by a walk).
    pub fn over_hard_limit(&self) -> Option<u64> {
        let inner = self.inner.lock();
        (!inner.held && inner.total_bytes > self.limits.hard_bytes()).then_some(inner.total_bytes)
    }

    /// Holds every eviction back (a walk adds its entries in no order) or lets them go again.
    pub fn hold_evictions(&self, held: bool) {
        self.inner.lock().held = held;
    }

    /// Whether a limit is crossed (what [`Index::evict_batch`] would evict).
    pub fn over_limit(&self) -> bool {
        let inner = self.inner.lock();
        !inner.held
            && self
                .limits
                .over(inner.draining, inner.total_bytes, inner.len)
    }

    fn now_s(&self) -> u32 {
        self.start.elapsed().as_secs().min(u32::MAX as u64) as u32
    }

    fn hash_key(&self, k: &Key) -> u64 {
        self.hasher.hash_one((k.function, &k.head, k.size))
    }

    fn find(&self, inner: &Inner, k: &Key) -> Option<u32> {
        let h = self.hash_key(k);
        inner.table.find(h, |&slot| inner.matches(slot, k)).copied()
    }

    fn expired(&self, e: &Entry, now: u32) -> bool {
        self.limits.expired(e.touched_s as u64, now as u64)
    }

    /// Reserves room for `n` more entries (a snapshot says how many it holds; a walk estimates
    /// it from its first prefix directory).
    pub fn reserve(&self, n: usize) {
        let mut inner = self.inner.lock();
        inner.slots.reserve(n);
        let Inner { table, slots, .. } = &mut *inner;
        let hasher = &self.hasher;
        table.reserve(n, |&s| {
            let e = &slots[s as usize];
            hasher.hash_one((e.function, &e.hash, e.digest_size))
        });
    }

    /// The stored length, marking the entry used; `None` when absent or expired (an expired
    /// entry is dropped and returned in `expired` for its file to be deleted).
    pub fn get(&self, key: &Digest) -> Option<u64> {
        let k = Key::of(key);
        let now = self.now_s();
        let mut inner = self.inner.lock();
        let slot = self.find(&inner, &k)?;
        if self.expired(&inner.slots[slot as usize], now) {
            // Counted as an eviction; its file goes with the next eviction of the caller or
            // stays until the walk of the next start finds it unindexed (then re-indexed).
            self.remove_slot(&mut inner, slot, &k);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        inner.slots[slot as usize].touched_s = now;
        inner.unlink(slot);
        inner.push_head(slot);
        Some(inner.slots[slot as usize].len)
    }

    /// Whether the entry is present and was seen on disk (or written) by this process.
    pub fn is_seen(&self, key: &Digest) -> bool {
        let k = Key::of(key);
        let inner = self.inner.lock();
        self.find(&inner, &k)
            .is_some_and(|s| inner.slots[s as usize].flags & SEEN != 0)
    }

    /// Marks a present entry seen; false when absent.
    pub fn mark_seen(&self, key: &Digest) -> bool {
        let k = Key::of(key);
        let mut inner = self.inner.lock();
        match self.find(&inner, &k) {
            Some(s) => {
                inner.slots[s as usize].flags |= SEEN;
                true
            }
            None => false,
        }
    }

    /// Corrects the stored length of a present entry (a read found another length on disk).
    pub fn set_len(&self, key: &Digest, len: u64) {
        let k = Key::of(key);
        let mut inner = self.inner.lock();
        if let Some(s) = self.find(&inner, &k) {
            let old = inner.slots[s as usize].len;
            inner.slots[s as usize].len = len;
            inner.total_bytes = inner.total_bytes - old + len;
        }
    }

    /// Inserts or replaces an entry at the hot end, marked seen; returns what was evicted to
    /// make room (never `key` itself).
    pub fn insert(&self, key: &Digest, len: u64) -> Vec<Digest> {
        self.insert_at(key, len, End::Hot, true).1
    }

    /// Inserts an entry unless present (then nothing changes: what a request or a put did in
    /// the meantime is newer). Returns the slot when inserted, and what was evicted.
    pub fn insert_at(
        &self,
        key: &Digest,
        len: u64,
        end: End,
        seen: bool,
    ) -> (Option<u32>, Vec<Digest>) {
        let k = Key::of(key);
        let now = self.now_s();
        let mut evicted = Vec::new();
        let mut inner = self.inner.lock();
        if let Some(slot) = self.find(&inner, &k) {
            if end != End::Hot {
                if seen {
                    inner.slots[slot as usize].flags |= SEEN;
                }
                return (None, evicted);
            }
            let e = &mut inner.slots[slot as usize];
            let old = e.len;
            e.len = len;
            e.touched_s = now;
            e.flags |= SEEN;
            inner.total_bytes = inner.total_bytes - old + len;
            inner.unlink(slot);
            inner.push_head(slot);
            self.evict_locked(&mut inner, now, slot, &mut evicted, INLINE_EVICTIONS);
            return (None, evicted);
        }
        let entry = Entry {
            hash: k.head,
            digest_size: k.size,
            len,
            prev: NIL,
            next: NIL,
            touched_s: now,
            function: k.function,
            // Visited, for a walk in progress (what it misses is in the journal's new
            // generation) as for the last one (the next walk flips the meaning).
            flags: if seen { SEEN } else { 0 } | inner.walked,
        };
        let slot = if inner.free != NIL {
            let s = inner.free;
            inner.free = inner.slots[s as usize].next;
            inner.slots[s as usize] = entry;
            s
        } else {
            if inner.slots.len() >= NIL as usize {
                // 4 billion entries: more than any disk holds files; refuse to index more.
                return (None, evicted);
            }
            inner.slots.push(entry);
            (inner.slots.len() - 1) as u32
        };
        if let Some(t) = k.tail {
            inner.tails.insert(slot, t);
        }
        let h = self.hash_key(&k);
        if inner.table.len() == inner.table.capacity() {
            inner.table_grows += 1;
        }
        {
            let Inner { table, slots, .. } = &mut *inner;
            let hasher = &self.hasher;
            table.insert_unique(h, slot, |&s| {
                let e = &slots[s as usize];
                hasher.hash_one((e.function, &e.hash, e.digest_size))
            });
        }
        match end {
            End::Hot => inner.push_head(slot),
            End::Cold | End::Unordered => inner.push_tail(slot),
        }
        inner.len += 1;
        inner.total_bytes += len;
        if end != End::Unordered {
            self.evict_locked(&mut inner, now, slot, &mut evicted, INLINE_EVICTIONS);
        }
        let kept = inner.slots[slot as usize].function != FREE;
        (kept.then_some(slot), evicted)
    }

    fn remove_slot(&self, inner: &mut Inner, slot: u32, k: &Key) {
        let h = self.hash_key(k);
        if let Ok(found) = inner.table.find_entry(h, |&s| s == slot) {
            found.remove();
        }
        inner.unlink(slot);
        inner.tails.remove(&slot);
        let len = inner.slots[slot as usize].len;
        inner.total_bytes -= len;
        inner.len -= 1;
        let free = inner.free;
        let e = &mut inner.slots[slot as usize];
        e.function = FREE;
        e.flags = 0;
        e.next = free;
        e.prev = NIL;
        inner.free = slot;
    }

    /// Evicts from the cold end while a limit is crossed, at most `budget` entries; `just` (the
    /// entry just inserted) is evicted only when it is not the last one.
    fn evict_locked(
        &self,
        inner: &mut Inner,
        now: u32,
        just: u32,
        out: &mut Vec<Digest>,
        budget: usize,
    ) {
        if inner.held {
            return;
        }
        if self.limits.crosses_bytes(inner.total_bytes) {
            // Down to `max_bytes - evict_bytes`, over as many calls as the budgets take.
            inner.draining = true;
        }
        let mut left = budget;
        while inner.tail != NIL && left > 0 {
            left -= 1;
            let oldest = inner.tail;
            let must = self.limits.must_evict(
                inner.draining,
                inner.total_bytes,
                inner.len,
                inner.slots[oldest as usize].touched_s as u64,
                now as u64,
            );
            if !must || inner.len == 1 {
                break;
            }
            // A cold insert that does not fit goes itself, not a hotter entry.
            let victim = oldest;
            let k = inner.entry_key(victim);
            out.push(inner.digest(victim));
            self.remove_slot(inner, victim, &k);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            if victim == just {
                break;
            }
        }
        if self.limits.drained(inner.total_bytes) {
            inner.draining = false;
        }
    }

    /// Evicts from the cold end while a limit is crossed (a backlog left by unordered inserts,
    /// by a lowered `max_bytes` or by inserts' bounded evictions), at most `max` entries, down
    /// to `max_bytes - evict_bytes` once `max_bytes` was crossed; returns what was evicted.
    pub fn evict_batch(&self, max: usize) -> Vec<Digest> {
        let now = self.now_s();
        let mut evicted = Vec::new();
        let mut inner = self.inner.lock();
        self.evict_locked(&mut inner, now, NIL, &mut evicted, max);
        evicted
    }

    /// Drops an entry; false when absent.
    pub fn remove(&self, key: &Digest) -> bool {
        let k = Key::of(key);
        let mut inner = self.inner.lock();
        match self.find(&inner, &k) {
            Some(s) => {
                self.remove_slot(&mut inner, s, &k);
                true
            }
            None => false,
        }
    }

    /// Drops every entry not seen on disk, but for those whose hash begins with a byte `keep`
    /// marks (their directory was not listed); returns how many.
    ///
    /// Nothing to do when every directory was kept (a restart from the snapshot of a clean
    /// stop). Otherwise the slots are visited in memory order, not LRU order (a sequential
    /// pass instead of a chase through ten million links), [`SWEEP_CHUNK`] at a time under
    /// the lock: ten million at once held every lookup for half a second.
    pub fn sweep_unseen(&self, keep: &[bool; 256]) -> u64 {
        if keep.iter().all(|&k| k) {
            return 0;
        }
        let mut dropped = 0;
        let mut from = 0usize;
        loop {
            let mut inner = self.inner.lock();
            let end = inner.slots.len().min(from + SLOT_CHUNK);
            if from >= end {
                return dropped;
            }
            for slot in from as u32..end as u32 {
                let e = &inner.slots[slot as usize];
                if e.function != FREE && e.flags & SEEN == 0 && !keep[e.hash[0] as usize] {
                    let k = inner.entry_key(slot);
                    self.remove_slot(&mut inner, slot, &k);
                    dropped += 1;
                }
            }
            from = end;
        }
    }

    /// Moves `slots` (each with the [`fingerprint`] of the key it held when listed) to the
    /// cold end in the given order, hottest first; slots that changed hands since are (but
    /// for a fingerprint collision) left alone.
    ///
    /// The lock is let go every [`SLOT_CHUNK`] slots: a lookup in between moves its entry to
    /// the hot end as usual (if its slot comes later here, it goes to the cold end after all,
    /// as it would have with the lock held throughout).
    pub fn move_to_cold_end(&self, slots: &[(u32, u32)]) {
        for chunk in slots.chunks(SLOT_CHUNK) {
            let mut inner = self.inner.lock();
            for (slot, fp) in chunk {
                let s = *slot as usize;
                if s >= inner.slots.len()
                    || inner.slots[s].function == FREE
                    || fingerprint_of(&inner.slots[s].hash) != *fp
                {
                    continue;
                }
                inner.unlink(*slot);
                inner.push_tail(*slot);
            }
        }
    }

    /// The slots from hottest to coldest (4 bytes each), for a snapshot: every entry present
    /// when it begins and not removed meanwhile, once.
    ///
    /// The lock is held for [`WALK_CHUNK`] links at a time (following ten million links at
    /// once held every lookup for 0.4 s). Between chunks the list changes: an unlink of the
    /// cursor's slot moves the cursor on, and an entry not visited yet that is moved to the
    /// hot end (behind the cursor) is taken then, and put first.
    pub fn order(&self) -> Vec<u32> {
        let mut out = {
            let mut inner = self.inner.lock();
            inner.walked ^= WALKED;
            let head = inner.head;
            inner.walk = Some(Walk {
                cursor: head,
                moved: Vec::new(),
            });
            Vec::with_capacity(inner.len as usize)
        };
        loop {
            let mut inner = self.inner.lock();
            let inner = &mut *inner;
            let walked = inner.walked;
            let Some(walk) = inner.walk.as_mut() else {
                return out;
            };
            for _ in 0..WALK_CHUNK {
                let slot = walk.cursor;
                if slot == NIL || out.len() > inner.slots.len() {
                    let mut moved = std::mem::take(&mut walk.moved);
                    inner.walk = None;
                    moved.reverse();
                    out.splice(0..0, moved);
                    return out;
                }
                let e = &mut inner.slots[slot as usize];
                e.flags = e.flags & !WALKED | walked;
                walk.cursor = e.next;
                out.push(slot);
            }
        }
    }

    /// The digest and stored length held by each of `slots` now (free ones skipped).
    pub fn read_slots(&self, slots: &[u32], out: &mut Vec<(Digest, u64)>) {
        let inner = self.inner.lock();
        for &s in slots {
            if (s as usize) < inner.slots.len() && inner.slots[s as usize].function != FREE {
                out.push((inner.digest(s), inner.slots[s as usize].len));
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.inner.lock().len
    }

    /// Times the hash table grew at an insert (see [`Index::reserve`]).
    pub fn table_grows(&self) -> u64 {
        self.inner.lock().table_grows
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

    fn d(i: u32) -> Digest {
        DigestFunction::Sha256.compute(&i.to_le_bytes())
    }

    fn policy(max_bytes: u64, evict_bytes: u64, max_count: u64) -> EvictionPolicy {
        EvictionPolicy {
            max_bytes: ByteSize(max_bytes),
            evict_bytes: ByteSize(evict_bytes),
            max_count,
            ..Default::default()
        }
    }

    #[test]
    fn evicts_least_recently_used_by_bytes_like_the_eviction_map() {
        let m = Index::new(Some(&policy(100, 0, 0)));
        assert!(m.insert(&d(1), 40).is_empty());
        assert!(m.insert(&d(2), 40).is_empty());
        assert_eq!(m.get(&d(1)), Some(40)); // 1 is now more recent than 2
        assert_eq!(m.insert(&d(3), 40), vec![d(2)]);
        assert_eq!(m.total_bytes(), 80);
        assert_eq!(m.get(&d(2)), None);

        let m = Index::new(Some(&policy(100, 50, 0)));
        for i in 0..5 {
            m.insert(&d(i), 20);
        }
        assert_eq!(m.insert(&d(9), 20).len(), 4); // 120 > 100: down to <= 50
        assert_eq!(m.total_bytes(), 40);

        let m = Index::new(Some(&policy(0, 0, 2)));
        for i in 1..=3 {
            m.insert(&d(i), 1);
        }
        assert_eq!((m.len(), m.get(&d(1))), (2, None));

        // One entry over the limit stays until the next insert.
        let m = Index::new(Some(&policy(10, 0, 0)));
        assert!(m.insert(&d(1), 50).is_empty());
        assert_eq!(m.insert(&d(2), 5), vec![d(1)]);
    }

    #[test]
    fn replacing_keeps_one_entry_and_counts_the_new_length() {
        let m = Index::new(None);
        m.insert(&d(1), 10);
        assert!(m.insert(&d(1), 20).is_empty());
        assert_eq!((m.len(), m.total_bytes(), m.get(&d(1))), (1, 20, Some(20)));
        assert!(m.remove(&d(1)));
        assert!(!m.remove(&d(1)));
        assert_eq!((m.len(), m.total_bytes()), (0, 0));
    }

    #[test]
    fn every_function_and_size_is_its_own_key_and_slots_are_reused() {
        let m = Index::new(None);
        let data = b"same bytes";
        let keys: Vec<Digest> = DigestFunction::ALL
            .iter()
            .flat_map(|f| {
                let k = f.compute(data);
                [k, k.with_size(k.size() + 1)]
            })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            m.insert(k, i as u64);
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(m.get(k), Some(i as u64), "{k}");
        }
        // A SHA-512 digest differing only past byte 32 is another key.
        let long = DigestFunction::Sha512.compute(data);
        let mut hash = long.hash().to_vec();
        hash[60] ^= 1;
        let other = Digest::new(DigestFunction::Sha512, &hash, long.size());
        assert_eq!(m.get(&other), None);
        let order = m.order();
        let mut back = Vec::new();
        m.read_slots(&order, &mut back);
        assert_eq!(back.len(), keys.len());
        assert!(back.iter().all(|(k, _)| keys.contains(k)));
        for k in &keys {
            assert!(m.remove(k));
        }
        let before = m.inner.lock().slots.len();
        for k in &keys {
            m.insert(k, 1);
        }
        assert_eq!(m.inner.lock().slots.len(), before);
    }

    #[test]
    fn cold_inserts_keep_order_and_never_replace_and_unseen_entries_are_swept() {
        let m = Index::new(Some(&policy(100, 0, 0)));
        m.insert(&d(0), 10); // used during the load: stays hottest
        for i in 1..=3 {
            m.insert_at(&d(i), 10, End::Cold, false);
        }
        m.insert_at(&d(0), 99, End::Cold, false);
        assert_eq!(m.get(&d(0)), Some(10));
        let mut back = Vec::new();
        m.read_slots(&m.order(), &mut back);
        let order: Vec<Digest> = back.iter().map(|(k, _)| *k).collect();
        assert_eq!(order, vec![d(0), d(1), d(2), d(3)]);
        // A cold insert over the limit goes itself.
        let (slot, evicted) = m.insert_at(&d(4), 80, End::Cold, false);
        assert_eq!((slot, evicted), (None, vec![d(4)]));
        assert!(m.mark_seen(&d(2)));
        assert!(m.is_seen(&d(0)) && m.is_seen(&d(2)) && !m.is_seen(&d(1)));
        // Every directory kept (none listed): nothing goes.
        assert_eq!(m.sweep_unseen(&[true; 256]), 0);
        assert_eq!(m.len(), 4);
        // d(1) and d(3) unseen: kept only while their directory is.
        let mut keep = [false; 256];
        keep[d(1).hash()[0] as usize] = true;
        let kept_too = usize::from(d(3).hash()[0] == d(1).hash()[0]);
        assert_eq!(m.sweep_unseen(&keep) as usize, 1 - kept_too);
        assert_eq!(m.sweep_unseen(&[false; 256]) as usize, 1 + kept_too);
        assert_eq!(m.len(), 2);
        assert_eq!(m.total_bytes(), 20);

        // Unordered inserts overshoot until the walk is ordered, then the oldest go.
        let m = Index::new(Some(&policy(100, 0, 0)));
        let mut listed = Vec::new();
        for i in 0..5 {
            let (slot, evicted) = m.insert_at(&d(i), 40, End::Unordered, true);
            assert!(evicted.is_empty());
            listed.push((slot.unwrap(), fingerprint(&d(i))));
        }
        assert_eq!(m.total_bytes(), 200);
        listed.reverse(); // d(4) newest ... d(0) oldest
        m.move_to_cold_end(&listed);
        assert_eq!(m.evict_batch(2), vec![d(0), d(1)]);
        assert_eq!(m.evict_batch(usize::MAX), vec![d(2)]);
        assert_eq!(m.total_bytes(), 80);

        // Over many chunks (16 slots in tests), with an entry removed between the listing and
        // the move: the order is the one given, the removed entry's slot is skipped.
        let m = Index::new(Some(&policy(0, 0, 1)));
        let mut listed = Vec::new();
        for i in 0..100 {
            let (slot, _) = m.insert_at(&d(i), 1, End::Unordered, true);
            listed.push((slot.unwrap(), fingerprint(&d(i))));
        }
        listed.reverse();
        assert!(m.remove(&d(50)));
        m.move_to_cold_end(&listed);
        // Down to the one entry allowed: the newest stays.
        let expected: Vec<Digest> = (0..99).filter(|&i| i != 50).map(d).collect();
        assert_eq!(m.evict_batch(usize::MAX), expected);

        // The sweep over many chunks drops exactly the unseen entries of listed directories.
        let m = Index::new(Some(&policy(0, 0, 1_000)));
        for i in 0..100 {
            m.insert_at(&d(i), 1, End::Unordered, i % 3 == 0);
        }
        let unseen = (0..100).filter(|i| i % 3 != 0).count() as u64;
        assert_eq!(m.sweep_unseen(&[false; 256]), unseen);
        assert_eq!(m.len(), 100 - unseen);
    }

    /// The snapshot's LRU walk lets go of the lock between chunks (16 links in tests) while
    /// lookups move entries to the hot end, inserts add and evictions remove: it still lists
    /// every entry that was there before it began and is still there after, exactly once.
    #[test]
    fn the_lru_walk_lists_every_entry_once_while_the_index_changes() {
        let index = Index::new(Some(&policy(0, 0, 30_000)));
        let n = 20_000u32;
        for i in 0..n {
            index.insert(&d(i), 1);
        }
        for round in 0..3u32 {
            let before: std::collections::HashSet<Digest> = {
                let mut all = Vec::new();
                let order = index.order();
                index.read_slots(&order, &mut all);
                all.into_iter().map(|(k, _)| k).collect()
            };
            let order = std::thread::scope(|s| {
                let walk = s.spawn(|| index.order());
                let mut i = 0u32;
                while !walk.is_finished() {
                    // Lookups (to the hot end), removals, and inserts that evict the coldest.
                    index.get(&d((i * 7_919 + round) % n));
                    if i.is_multiple_of(5) {
                        index.remove(&d((i * 104_729 + round) % n));
                    }
                    if i.is_multiple_of(3) {
                        index.insert(&d(n * (round + 2) + i), 1);
                    }
                    i += 1;
                }
                walk.join().unwrap()
            });
            let mut listed = Vec::new();
            index.read_slots(&order, &mut listed);
            let mut seen = std::collections::HashSet::new();
            for (k, _) in &listed {
                assert!(seen.insert(*k), "round {round}: {k} listed twice");
            }
            let mut now = Vec::new();
            index.read_slots(&index.order(), &mut now);
            for (k, _) in now {
                if before.contains(&k) {
                    assert!(seen.contains(&k), "round {round}: {k} was missed");
                }
            }
        }
    }

    #[test]
    fn entries_are_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }
}
