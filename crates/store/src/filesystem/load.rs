//! The content directory and its index, and the start-up load of that index in the background.
//!
//! The store serves from the moment it opens. A background thread fills the index: from the
//! snapshot (`snapshot.rs`) when there is a whole one, then from the journal of the names added
//! and removed since (`journal.rs`), then by listing the directories changed otherwise
//! (`reconcile`: a name not in the index is stat-ed and added, an entry whose file the listing
//! does not show is dropped); without a usable snapshot, by listing and stat-ing every blob
//! (`walk`, oldest modification coldest). Until the load is done, a lookup of a digest the
//! index does not hold stats its path and indexes what it finds, so a blob on disk is never
//! NOT_FOUND; puts go on and are indexed as usual.
//!
//! Blobs of an older layout (a flat `content_path`, NativeLink's `d/`: see `layout.rs`) are moved
//! into their prefix directories by the same listing, after the prefix directories (phase
//! `migrate`); until every one is moved, a read or lookup that does not find a blob in place
//! looks in the older places and moves what it finds, and an eviction removes both names.
//!
//! After a reboot (the checkpoint is of another boot, see `checkpoint.rs`), a blob modified
//! between the checkpoint and this start may be torn: the walk hashes each such file, a lookup
//! that finds one on disk hashes it before indexing it, and a read of an entry the snapshot
//! listed but no one has checked yet hashes it before serving it. Files modified after this
//! start were written whole by this process and are never suspect.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_core::{Digest, Error};

mod evictor;

use super::checkpoint;
use super::index::{End, Index};
use super::journal::{self, Journal, Op};
use super::layout::{self, DirTimes, LegacyName, Moved};
use super::snapshot;

const PHASE_SNAPSHOT: u8 = 0;
const PHASE_WALK: u8 = 1;
const PHASE_RECONCILE: u8 = 2;
const PHASE_READY: u8 = 3;
const PHASE_MIGRATE: u8 = 4;

/// Files modified this long before the store opened may be from before a reboot; later ones
/// were written by this process (file-system timestamps lag the wall clock by a tick).
const OWN_WRITES_SLACK: Duration = Duration::from_millis(100);

/// A snapshot is written early once the journal holds this many records past the last one...
pub(super) const JOURNAL_RECORDS_MIN: u64 = 64 * 1024;
/// ...or a sixteenth of the index, up to this many: a restart after a crash reads at most
/// two generations of the journal.
const JOURNAL_RECORDS_MAX: u64 = 1 << 20;

/// The content directory and its index.
pub(crate) struct Blobs {
    pub content: PathBuf,
    pub index: Index,
    phase: AtomicU8,
    /// Entries the snapshot being read announced (0: none).
    expected: AtomicU64,
    /// Prefix directories the load listed (256 when it walked).
    dirs_listed: AtomicU64,
    /// Journal records the load applied as they said, and names it stat-ed instead.
    journal_applied: AtomicU64,
    journal_stat: AtomicU64,
    /// Files modified in `[from, to)` may be torn (after a reboot); `None`: none is.
    suspect: Option<(SystemTime, SystemTime)>,
    /// Set when the store is dropped: the loader and the evictor stop.
    stop: AtomicBool,
    /// Set to wake the evictor (with `evict_wake`).
    evict_wanted: parking_lot::Mutex<bool>,
    /// The evictor is working (from its wake-up until its files are deleted).
    evicting: AtomicBool,
    evict_wake: parking_lot::Condvar,
    /// Tests hold the evictor back to look at a backlog.
    #[cfg(test)]
    pub evictor_paused: AtomicBool,
    /// Blobs may still sit in an older layout (no `.cairn-layout` marker yet).
    migrating: AtomicBool,
    /// Changed since the last snapshot.
    dirty: AtomicBool,
    /// One snapshot writer at a time.
    snapshot_lock: parking_lot::Mutex<()>,
    /// True once the index is loaded.
    loaded: tokio::sync::watch::Sender<bool>,
    /// True once every file that may be torn was checked: the flusher may then write this
    /// run's checkpoints.
    checked: tokio::sync::watch::Sender<bool>,
    /// The names added and removed since the snapshot.
    journal: Journal,
    /// The prefix directories' modification times when the store opened.
    dir_times: DirTimes,
    /// Woken when the journal is long enough for a snapshot to be written early.
    pub snapshot_wanted: Arc<tokio::sync::Notify>,
}

impl Blobs {
    /// `suspect_after` comes from the checkpoint found at start-up; `opened` is when the store
    /// started to open.
    /// `dir_times` and `journal` come from the start-up (before anything was written).
    pub fn new(
        content: PathBuf,
        index: Index,
        suspect_after: Option<SystemTime>,
        opened: SystemTime,
        dir_times: DirTimes,
        journal: Journal,
    ) -> Blobs {
        let own = opened.checked_sub(OWN_WRITES_SLACK).unwrap_or(UNIX_EPOCH);
        let migrating = !layout::is_current(&content);
        Blobs {
            content,
            index,
            phase: AtomicU8::new(PHASE_SNAPSHOT),
            expected: AtomicU64::new(0),
            dirs_listed: AtomicU64::new(0),
            journal_applied: AtomicU64::new(0),
            journal_stat: AtomicU64::new(0),
            suspect: suspect_after.map(|after| (after, own)),
            stop: AtomicBool::new(false),
            evict_wanted: parking_lot::Mutex::new(false),
            evicting: AtomicBool::new(false),
            evict_wake: parking_lot::Condvar::new(),
            #[cfg(test)]
            evictor_paused: AtomicBool::new(false),
            migrating: AtomicBool::new(migrating),
            dirty: AtomicBool::new(false),
            snapshot_lock: parking_lot::Mutex::new(()),
            loaded: tokio::sync::watch::Sender::new(false),
            checked: tokio::sync::watch::Sender::new(suspect_after.is_none()),
            journal,
            dir_times,
            snapshot_wanted: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Announces in the journal that `key` is about to be renamed into place with `len` bytes
    /// (see `journal.rs`: before the rename, and [`Blobs::journal_removed`] when it fails);
    /// drop what it returns once the blob is indexed, or the rename failed. Blocking (one
    /// write).
    pub fn journal_added(&self, key: &Digest, len: u64) -> journal::Pending {
        let pending = self.journal.record(Op::Add(len), std::slice::from_ref(key));
        self.note_records(pending.records);
        pending
    }

    /// Announces in the journal that `keys` are about to be unlinked; drop what it returns
    /// once they are. Blocking (one write).
    pub fn journal_removed(&self, keys: &[Digest]) -> journal::Pending {
        let pending = self.journal.record(Op::Remove, keys);
        self.note_records(pending.records);
        pending
    }

    /// Vouches in the journal for every operation announced so far, if all are finished
    /// (after each flush of the disk). Blocking (one write at most).
    pub fn journal_mark_done(&self) {
        self.journal.mark_done();
    }

    /// Asks for a snapshot when the journal holds enough records to be worth one.
    fn note_records(&self, records: u64) {
        if records >= JOURNAL_RECORDS_MIN && self.snapshot_due() {
            self.snapshot_wanted.notify_one();
        }
    }

    /// Whether the journal holds enough records since the last snapshot for a snapshot to be
    /// written early (the index loaded).
    pub fn snapshot_due(&self) -> bool {
        let due = (self.index.len() / 16).clamp(JOURNAL_RECORDS_MIN, JOURNAL_RECORDS_MAX);
        self.journal.records() >= due && self.ready()
    }

    pub fn path_of(&self, key: &Digest) -> PathBuf {
        layout::blob_path(&self.content, key)
    }

    /// Whether blobs may still sit in an older layout.
    pub fn migrating(&self) -> bool {
        self.migrating.load(Ordering::Acquire)
    }

    /// Moves `key`'s file from an older layout into place, if it is there: true when the file
    /// is now in place. Blocking.
    pub fn migrate_one(&self, key: &Digest) -> bool {
        if !self.migrating() {
            return false;
        }
        for old in layout::legacy_paths(&self.content, key) {
            match layout::move_into_place(&self.content, &old, key) {
                Ok(Moved::Now | Moved::AlreadyThere) => return true,
                Ok(Moved::Gone) => {}
                Err(e) => {
                    tracing::warn!(error = %e, digest = %key, "filesystem store: could not move a blob of an older layout into place");
                }
            }
        }
        false
    }

    /// The index holds everything on disk.
    pub fn ready(&self) -> bool {
        self.phase.load(Ordering::Acquire) == PHASE_READY
    }

    pub fn state(&self) -> crate::IndexState {
        let phase = self.phase.load(Ordering::Acquire);
        let expected = self.expected.load(Ordering::Relaxed);
        crate::IndexState {
            loading: phase != PHASE_READY,
            phase: match phase {
                PHASE_SNAPSHOT => "snapshot",
                PHASE_WALK => "walk",
                PHASE_RECONCILE => "reconcile",
                PHASE_MIGRATE => "migrate",
                _ => "ready",
            },
            entries: self.index.len(),
            expected: (expected > 0).then_some(expected),
        }
    }

    /// How many prefix directories the finished load listed.
    pub fn dirs_listed(&self) -> u64 {
        self.dirs_listed.load(Ordering::Relaxed)
    }

    /// Times the index's hash table grew (each a rehash of every entry under its lock).
    pub fn table_grows(&self) -> u64 {
        self.index.table_grows()
    }

    /// The journal records the finished load applied as they said, and the names it stat-ed
    /// instead (no done mark vouched for them).
    pub fn journal_replayed(&self) -> (u64, u64) {
        (
            self.journal_applied.load(Ordering::Relaxed),
            self.journal_stat.load(Ordering::Relaxed),
        )
    }

    /// Waits until the index is loaded (forever if the load failed: see the logs).
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|&l| l).await;
    }

    /// Becomes true once the files that may be torn were checked.
    pub fn checked(&self) -> tokio::sync::watch::Receiver<bool> {
        self.checked.subscribe()
    }

    /// Notes a change of the index (an entry added, removed or used: the LRU order is part of
    /// the snapshot). A load first, so that lookups do not all write one cache line.
    pub fn changed(&self) {
        if !self.dirty.load(Ordering::Relaxed) {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let _wanted = self.evict_wanted.lock();
        self.evict_wake.notify_all();
    }

    /// Whether a file of this modification time may be torn.
    fn suspect(&self, mtime: Option<SystemTime>) -> bool {
        match (self.suspect, mtime) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some((from, to)), Some(t)) => t >= from && t < to,
        }
    }

    /// Whether a read may serve `key`'s file as it is: false when the file may be torn, was not
    /// checked yet and does not hash to its name (it is then deleted and unindexed). Blocking.
    pub fn check_before_serving(&self, key: &Digest, mtime: Option<SystemTime>) -> bool {
        if self.suspect.is_none() || self.ready() || self.index.is_seen(key) {
            return true;
        }
        let path = self.path_of(key);
        if self.suspect(mtime) && !checkpoint::holds(&path, key) {
            self.drop_torn(key, &path);
            return false;
        }
        self.index.mark_seen(key);
        true
    }

    /// Unindexes `key` and deletes its file at `path` (in place or in an older layout).
    /// Whether lookups must check an indexed entry before vouching for it: after a reboot,
    /// until the load has checked every file that may be torn.
    pub fn checks_pending(&self) -> bool {
        self.suspect.is_some() && !self.ready()
    }

    /// Whether a lookup may vouch for the indexed `key`: true unless the files may be torn
    /// (see [`Blobs::checks_pending`]), no one checked this one yet, and it is gone or does
    /// not hash to its name (then it is unindexed, and deleted). Blocking.
    pub fn vouch(&self, key: &Digest) -> bool {
        if !self.checks_pending() || self.index.is_seen(key) {
            return true;
        }
        let path = self.path_of(key);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) if self.migrate_one(key) => match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => {
                    self.index.remove(key);
                    return false;
                }
            },
            Err(_) => {
                self.index.remove(key);
                return false;
            }
        };
        self.check_before_serving(key, meta.modified().ok())
    }

    fn drop_torn(&self, key: &Digest, path: &std::path::Path) {
        tracing::warn!(
            digest = %key,
            path = %path.display(),
            "filesystem store: dropping a blob written just before the machine restarted, whose bytes do not match its name"
        );
        self.index.remove(key);
        let _announced = self.journal_removed(std::slice::from_ref(key));
        let _ = std::fs::remove_file(path);
    }

    /// Looks for `key` on disk while the index loads, and indexes it when found: its stored
    /// length, or `None`. Blocking (a stat, and a hash of a suspect file after a reboot).
    pub fn probe_disk(&self, key: &Digest) -> Option<u64> {
        let path = self.path_of(key);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) if self.migrate_one(key) => std::fs::metadata(&path).ok()?,
            Err(_) => return None,
        };
        if !meta.is_file() {
            return None;
        }
        if self.suspect(meta.modified().ok()) && !checkpoint::holds(&path, key) {
            self.drop_torn(key, &path);
            return None;
        }
        let (_, evicted) = self.index.insert_at(key, meta.len(), End::Hot, true);
        self.changed();
        self.remove_files(&evicted);
        if self.index.over_limit() {
            self.wake_evictor();
        }
        Some(meta.len())
    }

    /// Deletes the files of evicted entries (announced in the journal first). Blocking.
    pub fn remove_files(&self, evicted: &[Digest]) {
        if evicted.is_empty() {
            return;
        }
        let _announced = self.journal_removed(evicted);
        let remove = |key: &Digest, path: PathBuf| {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(digest = %key, path = %path.display(), error = %e, "filesystem store: could not delete evicted blob");
                }
            }
        };
        let migrating = self.migrating();
        for key in evicted {
            remove(key, self.path_of(key));
            if migrating {
                for old in layout::legacy_paths(&self.content, key) {
                    remove(key, old);
                }
            }
        }
    }

    /// Writes the snapshot if the index is loaded and changed since the last one. Blocking.
    ///
    /// A new journal generation begins first, and the snapshot names it; the index is read
    /// once the operations announced in the previous generation are finished (indexed), so
    /// that the older journal files can go. Should that wait time out, the previous file stays
    /// (a restart reads it too). `quiescent` when nothing else changes the store any more (it
    /// is being dropped): nothing is waited for.
    pub fn write_snapshot(&self, quiescent: bool) -> Result<Option<u64>, Error> {
        let _one = self.snapshot_lock.lock();
        if !self.ready() || !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(None);
        }
        let generation = self.journal.rotate();
        let drained = quiescent || (generation > 0 && self.journal.drain(generation - 1));
        // While blobs may still be moved from an older layout (moves are not journaled), a
        // restart must list the directories.
        let named = if self.migrating() { 0 } else { generation };
        match snapshot::write(&self.content, &self.index, named) {
            Ok(n) => {
                if generation > 0 {
                    self.journal
                        .remove_before(if drained { generation } else { generation - 1 });
                }
                Ok(Some(n))
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Loads the index (run on a thread of its own). Never fails: what cannot be read is
    /// logged, and the directory walk stands in for a snapshot that cannot be used.
    pub fn load(self: &Arc<Self>) {
        let began = Instant::now();
        let snapshot = self.load_snapshot();
        let from_snapshot = snapshot.is_some();
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let snapshot_took = began.elapsed();
        self.phase.store(
            if from_snapshot {
                PHASE_RECONCILE
            } else {
                PHASE_WALK
            },
            Ordering::Release,
        );
        // After a crash (not a reboot: then the journal's last writes may be lost while the
        // renames they announced were not), the journal says what changed since the snapshot.
        let replayed = match snapshot {
            Some((_, generation))
                if generation > 0 && self.suspect.is_none() && !self.migrating() =>
            {
                self.replay(generation)
            }
            _ => None,
        };
        if self.stop.load(Ordering::Relaxed) {
            return;
        }
        let journal_end = replayed.as_ref().map(|r| r.end);
        if let Some(r) = &replayed {
            self.journal_applied.store(r.applied, Ordering::Relaxed);
            self.journal_stat.store(r.stat, Ordering::Relaxed);
        }
        let outcome = self.list(snapshot.map(|(at, _)| at), journal_end);
        let (added, checked, unchanged) = match outcome {
            Ok(Some(counts)) => counts,
            Ok(None) => return, // stopped
            Err(e) => {
                // The index may lack blobs that are on disk: stay in the loading state, in
                // which lookups of unindexed digests check the disk.
                tracing::error!(error = %e, path = %self.content.display(), "filesystem store: listing the content directory failed; unindexed blobs are looked up on disk");
                return;
            }
        };
        self.checked.send_replace(true);
        let dropped = self.index.sweep_unseen(&unchanged);
        let dirs_listed = unchanged.iter().filter(|&&u| !u).count();
        self.dirs_listed
            .store(dirs_listed as u64, Ordering::Relaxed);
        self.phase.store(PHASE_READY, Ordering::Release);
        self.loaded.send_replace(true);
        // What is over the limit now (a lowered `max_bytes`, or a walk's entries) goes, oldest
        // first, while the store serves.
        if self.index.over_limit() {
            tracing::info!(
                entries = self.index.len(),
                bytes = self.index.total_bytes(),
                "filesystem store: over the limit after the load; evicting in the background"
            );
            self.wake_evictor();
        }
        tracing::info!(
            path = %self.content.display(),
            entries = self.index.len(),
            from_snapshot,
            dirs_listed,
            snapshot_ms = snapshot_took.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            journal_records = replayed.as_ref().map_or(0, |r| r.applied),
            journal_stat = replayed.as_ref().map_or(0, |r| r.stat),
            added,
            checked,
            dropped,
            table_grows = self.index.table_grows(),
            "filesystem store: index loaded"
        );
        // A snapshot now, unless the index is the snapshot's: the journal files read (or not
        // used: after a reboot, or torn) are then no longer needed.
        let journal_records = replayed.as_ref().map_or(1, |r| r.applied + r.stat);
        if !from_snapshot || added > 0 || dropped > 0 || journal_records > 0 {
            self.changed();
            if let Err(e) = self.write_snapshot(false) {
                tracing::warn!(error = %e, "filesystem store: could not write the index snapshot");
            }
        }
        // What the walk or listing and the snapshot's writing freed (tens of bytes per entry)
        // goes back to the kernel now rather than staying in the RSS.
        cairn_core::memory::release_freed();
    }

    /// Reads the snapshot into the index, hottest first at the cold end (so what requests and
    /// puts indexed meanwhile stays hotter). When the whole snapshot was read, the time its
    /// writing began and the journal generation it names.
    fn load_snapshot(&self) -> Option<(SystemTime, u32)> {
        let reader = match snapshot::Reader::open(&self.content) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(snapshot::Torn(why)) => {
                tracing::warn!(path = %self.content.display(), why, "filesystem store: the index snapshot cannot be used; walking the directory");
                return None;
            }
        };
        self.expected.store(reader.expected(), Ordering::Relaxed);
        tracing::info!(
            path = %self.content.display(),
            entries = reader.expected(),
            age_s = reader.written_at().elapsed().map_or(0, |d| d.as_secs()),
            "filesystem store: reading the index snapshot"
        );
        // A lying header costs at most a reservation for 64 Mi entries.
        self.index.reserve(reader.expected().min(1 << 26) as usize);
        let written_at = reader.written_at();
        let generation = reader.generation();
        let read = snapshot::read_overlapped(reader, |block| {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            for (key, len) in block {
                let (_, evicted) = self.index.insert_at(key, *len, End::Cold, false);
                self.remove_files(&evicted);
            }
            true
        });
        match read {
            Ok(true) => Some((written_at, generation)),
            Ok(false) => None, // stopped
            Err(snapshot::Torn(why)) => {
                // What was read is checked by the walk like any other entry.
                tracing::warn!(path = %self.content.display(), why, "filesystem store: the index snapshot is torn; walking the directory");
                self.expected.store(0, Ordering::Relaxed);
                None
            }
        }
    }

    /// Applies the journals written since the snapshot that named `generation` (the one before
    /// it, that one, and those of runs that stopped before writing a snapshot; not this run's):
    /// each record in order, but for recent ones (whose operation may not have happened), whose
    /// names are stat-ed at the end. `None` when the journal cannot be used (the directories
    /// changed since the snapshot are then listed).
    ///
    /// Nothing is evicted meanwhile: the journal's own removals say what the run that wrote it
    /// evicted (with an LRU order that reads changed since the snapshot), and what is over the
    /// limit after the load is evicted then.
    fn replay(&self, generation: u32) -> Option<Replayed> {
        self.index.hold_evictions(true);
        let replayed = self.replay_held(generation);
        self.index.hold_evictions(false);
        replayed
    }

    fn replay_held(&self, generation: u32) -> Option<Replayed> {
        let files: Vec<(u32, PathBuf)> = journal::files(&self.content)
            .into_iter()
            .filter(|(g, _)| g.saturating_add(1) >= generation && *g < self.journal.first())
            .collect();
        if !files.iter().any(|(g, _)| *g == generation) {
            tracing::warn!(path = %self.content.display(), generation, "filesystem store: the journal the snapshot names is missing; listing the directories changed since the snapshot");
            return None;
        }
        let mut replayed = Replayed {
            end: UNIX_EPOCH,
            applied: 0,
            stat: 0,
        };
        let mut recent = Vec::new();
        for (_, path) in &files {
            match std::fs::metadata(path).and_then(|m| m.modified()) {
                Ok(t) => replayed.end = replayed.end.max(t),
                Err(_) => return None,
            }
            let read = journal::read(path, |op, key, is_recent| {
                if is_recent {
                    recent.push(*key);
                    return;
                }
                match op {
                    Op::Add(len) => {
                        let (_, evicted) = self.index.insert_at(key, len, End::Hot, false);
                        self.remove_files(&evicted);
                    }
                    Op::Remove => {
                        self.index.remove(key);
                    }
                }
                replayed.applied += 1;
            });
            if let Err(journal::Unusable(why)) = read {
                tracing::warn!(path = %self.content.display(), why, "filesystem store: the journal cannot be used; listing the directories changed since the snapshot");
                return None;
            }
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
        }
        recent.sort_unstable();
        recent.dedup();
        for key in recent {
            match std::fs::metadata(self.path_of(&key)) {
                Ok(m) if m.is_file() => {
                    let (_, evicted) = self.index.insert_at(&key, m.len(), End::Hot, true);
                    self.remove_files(&evicted);
                }
                _ => {
                    self.index.remove(&key);
                }
            }
            replayed.stat += 1;
        }
        Some(replayed)
    }

    /// Lists the content directory's prefix directories, then (phase `migrate`) the places of
    /// older layouts: marks what the index holds as seen, stats and indexes the rest, moves
    /// what an older layout holds into place, and after a reboot hashes suspect files. Without
    /// a whole snapshot, every file is stat-ed and the LRU order follows modification times.
    ///
    /// With a whole snapshot written at `snapshot_at`, a prefix directory whose modification
    /// time when the store opened was older than that (less [`checkpoint::MTIME_SLACK`]), and
    /// older than the time after which files may be torn, is not listed: no name was added to
    /// it or removed from it since the snapshot began (a create, rename or unlink in a
    /// directory sets its modification time), so the snapshot's entries of that prefix are its
    /// contents. Puts rename before they index and evictions unindex before they unlink, so a
    /// change that the snapshot missed left a later time on its directory. What this process
    /// changes is in the index already.
    ///
    /// With the journal replayed up to `journal_end` (its last write), only the directories
    /// changed after that are listed: a change before it is in the journal (its record is
    /// written first). Both times come from the file system's clock. Those listed are the
    /// few that operations in flight at a crash changed, and those changed behind the
    /// store's back since.
    ///
    /// Returns (added, hashed, the prefixes not listed), or `None` when stopped.
    fn list(
        &self,
        snapshot_at: Option<SystemTime>,
        journal_end: Option<SystemTime>,
    ) -> Result<Option<Listed>, Error> {
        let from_snapshot = snapshot_at.is_some();
        let unchanged_before = snapshot_at.map(|at| {
            if let Some(end) = journal_end {
                return end + Duration::from_nanos(1);
            }
            let since = at
                .checked_sub(checkpoint::MTIME_SLACK)
                .unwrap_or(UNIX_EPOCH);
            match self.suspect {
                Some((from, _)) => since.min(from),
                None => since,
            }
        });
        let mut listing = Listing {
            from_snapshot,
            unchanged_before,
            unchanged: Box::new([false; 256]),
            added: 0,
            checked: 0,
            move_failures: 0,
            ages: Vec::new(),
        };
        // A walk adds entries in no order: nothing is evicted until they are ordered.
        self.index.hold_evictions(!from_snapshot);
        let listed = self.list_all(&mut listing);
        let Listing {
            added,
            checked,
            move_failures,
            mut ages,
            unchanged,
            ..
        } = listing;
        if !ages.is_empty() {
            ages.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
            let order: Vec<(u32, u32)> = ages.into_iter().map(|(_, s, f)| (s, f)).collect();
            self.index.move_to_cold_end(&order);
        }
        self.index.hold_evictions(false);
        let Some(migrating) = listed? else {
            return Ok(None);
        };
        if migrating {
            if move_failures > 0 {
                tracing::warn!(
                    move_failures,
                    path = %self.content.display(),
                    "filesystem store: some blobs of an older layout could not be moved; they are still looked up there, and moved at the next start"
                );
            } else {
                // Empty once every blob moved (and NativeLink's `s/` is left alone).
                let _ = std::fs::remove_dir(self.content.join(layout::NATIVELINK_DIGESTS));
                layout::mark_current(&self.content)?;
                self.migrating.store(false, Ordering::Release);
                tracing::info!(path = %self.content.display(), "filesystem store: every blob is in its prefix directory");
            }
        }
        Ok(Some((added, checked, unchanged)))
    }

    /// Lists the prefix directories, then the places of older layouts while blobs may be left
    /// there: whether it did those (`None` when stopped).
    fn list_all(&self, listing: &mut Listing) -> Result<Option<bool>, Error> {
        for (i, p) in layout::prefixes().enumerate() {
            let dir = self.content.join(&p);
            if let Some(before) = listing.unchanged_before {
                let changed = self.dir_times[i].is_none_or(|t| t >= before);
                if !changed {
                    listing.unchanged[i] = true;
                    continue;
                }
            }
            if !self.list_dir(&dir, Some(p.as_bytes()), listing)? {
                return Ok(None);
            }
            if i == 0 && !listing.from_snapshot {
                self.reserve_for_walk(listing);
            }
        }
        let migrating = self.migrating();
        if migrating {
            self.phase.store(PHASE_MIGRATE, Ordering::Release);
            let nativelink = self.content.join(layout::NATIVELINK_DIGESTS);
            for dir in [&self.content, &nativelink] {
                if !self.list_dir(dir, None, listing)? {
                    return Ok(None);
                }
            }
        }
        Ok(Some(migrating))
    }

    /// A walk knows the store's size once it listed the first prefix directory, which holds
    /// a 256th of the blobs (by hash): room for them all (and 1 % more), so that the index's
    /// table does not double midway, rehashing every entry under the lock (0.7 s at 7.3
    /// million entries), nor the walk's list of ages.
    fn reserve_for_walk(&self, listing: &mut Listing) {
        let expected = (listing.added * 256 * 101 / 100).min(1 << 26) as usize;
        self.index
            .reserve(expected.saturating_sub(self.index.len() as usize));
        listing
            .ages
            .reserve(expected.saturating_sub(listing.ages.len()));
    }

    /// Lists one directory (see [`Blobs::list`]): a prefix directory (`prefix` its name), or
    /// a place of an older layout. False when stopped.
    fn list_dir(
        &self,
        dir: &std::path::Path,
        prefix: Option<&[u8]>,
        listing: &mut Listing,
    ) -> Result<bool, Error> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            // A prefix directory removed by hand, or no NativeLink directory.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        for entry in entries {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (key, nativelink) = match prefix {
                Some(_) => (Digest::from_file_name(name), false),
                None => match layout::legacy_name(name) {
                    Some(LegacyName::Cairn(d)) => (Some(d), false),
                    Some(LegacyName::NativeLink(d)) => (Some(d), true),
                    None => (None, false),
                },
            };
            let Some(mut key) = key else { continue };
            // A blob in the wrong prefix directory is moved like one of an older layout.
            let in_place = prefix.is_some_and(|p| p == layout::prefix(&key));
            // Known and no reboot: the listing is all the proof needed.
            if in_place && self.suspect.is_none() && self.index.mark_seen(&key) {
                continue;
            }
            let Ok(mut meta) = entry.metadata() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let path = entry.path();
            if nativelink {
                // Its name does not say the function: its bytes do.
                key = layout::nativelink_key(&path, &key);
            }
            let mtime = meta.modified().ok();
            if self.suspect(mtime) && !self.index.is_seen(&key) {
                listing.checked += 1;
                if !checkpoint::holds(&path, &key) {
                    self.drop_torn(&key, &path);
                    continue;
                }
            }
            if !in_place {
                match layout::move_into_place(&self.content, &path, &key) {
                    Ok(Moved::Now) => {}
                    // The file in place is the one indexed (stat-ed again: it may be newer).
                    Ok(Moved::AlreadyThere) => match std::fs::metadata(self.path_of(&key)) {
                        Ok(m) => meta = m,
                        Err(_) => continue,
                    },
                    Ok(Moved::Gone) => continue,
                    Err(e) => {
                        listing.move_failures += 1;
                        tracing::warn!(error = %e, "filesystem store: could not move a blob of an older layout into place");
                        continue;
                    }
                }
            }
            if self.index.mark_seen(&key) {
                continue;
            }
            let end = if listing.from_snapshot {
                End::Hot
            } else {
                End::Unordered
            };
            let (slot, evicted) = self.index.insert_at(&key, meta.len(), end, true);
            self.remove_files(&evicted);
            listing.added += 1;
            if let (Some(slot), false) = (slot, listing.from_snapshot) {
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as u64);
                listing
                    .ages
                    .push((age, slot, super::index::fingerprint(&key)));
            }
        }
        Ok(true)
    }
}

/// What [`Blobs::list`] found: (added, hashed, the prefixes not listed).
type Listed = (u64, u64, Box<[bool; 256]>);

/// What [`Blobs::replay`] did.
struct Replayed {
    /// The latest modification time of the journal files read.
    end: SystemTime,
    /// Records applied as they say.
    applied: u64,
    /// Recent names stat-ed instead.
    stat: u64,
}

/// What a listing gathered so far.
struct Listing {
    from_snapshot: bool,
    /// With a snapshot: prefix directories not modified since this time are not listed.
    unchanged_before: Option<SystemTime>,
    /// The prefixes (by the hash's first byte) not listed.
    unchanged: Box<[bool; 256]>,
    added: u64,
    checked: u64,
    /// Blobs of an older layout that could not be moved.
    move_failures: u64,
    /// (modification time, slot, key) of what the walk added at the cold end, to order them by
    /// age at the end; 16 bytes per entry (the key as 4 bytes of its hash).
    ages: Vec<(u64, u32, u32)>,
}

/// Starts the loader and the evictor threads; their handles (loader, evictor).
pub(crate) fn start(
    blobs: &Arc<Blobs>,
) -> Result<(std::thread::JoinHandle<()>, std::thread::JoinHandle<()>), Error> {
    let b = blobs.clone();
    let evictor = std::thread::Builder::new()
        .name("cairn-fs-evict".into())
        .spawn(move || b.evict_loop())
        .map_err(|e| Error::internal(format!("starting the evictor: {e}")))?;
    let b = blobs.clone();
    let loader = std::thread::Builder::new()
        .name("cairn-fs-index".into())
        .spawn(move || b.load())
        .map_err(|e| Error::internal(format!("starting the index loader: {e}")))?;
    Ok((loader, evictor))
}
