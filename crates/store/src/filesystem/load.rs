//! The content directory and its index, and the start-up load of that index in the background.
//!
//! The store serves from the moment it opens. A background thread fills the index: from the
//! snapshot (`snapshot.rs`) when there is a whole one, then by listing the directory against it
//! (`reconcile`: a name not in the index is stat-ed and added, an entry whose file the listing
//! does not show is dropped); without a usable snapshot, by listing and stat-ing every blob
//! (`walk`, oldest modification coldest). Until the load is done, a lookup of a digest the
//! index does not hold stats its path and indexes what it finds, so a blob on disk is never
//! NOT_FOUND; puts go on and are indexed as usual.
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

use super::checkpoint;
use super::index::{End, Index};
use super::snapshot;

const PHASE_SNAPSHOT: u8 = 0;
const PHASE_WALK: u8 = 1;
const PHASE_RECONCILE: u8 = 2;
const PHASE_READY: u8 = 3;

/// Files modified this long before the store opened may be from before a reboot; later ones
/// were written by this process (file-system timestamps lag the wall clock by a tick).
const OWN_WRITES_SLACK: Duration = Duration::from_millis(100);

/// The content directory and its index.
pub(crate) struct Blobs {
    pub content: PathBuf,
    pub index: Index,
    phase: AtomicU8,
    /// Entries the snapshot being read announced (0: none).
    expected: AtomicU64,
    /// Files modified in `[from, to)` may be torn (after a reboot); `None`: none is.
    suspect: Option<(SystemTime, SystemTime)>,
    /// Set when the store is dropped: the loader stops.
    stop: AtomicBool,
    /// Changed since the last snapshot.
    dirty: AtomicBool,
    /// One snapshot writer at a time.
    snapshot_lock: parking_lot::Mutex<()>,
    /// True once the index is loaded.
    loaded: tokio::sync::watch::Sender<bool>,
    /// True once every file that may be torn was checked: the flusher may then write this
    /// run's checkpoints.
    checked: tokio::sync::watch::Sender<bool>,
}

impl Blobs {
    /// `suspect_after` comes from the checkpoint found at start-up; `opened` is when the store
    /// started to open.
    pub fn new(
        content: PathBuf,
        index: Index,
        suspect_after: Option<SystemTime>,
        opened: SystemTime,
    ) -> Blobs {
        let own = opened.checked_sub(OWN_WRITES_SLACK).unwrap_or(UNIX_EPOCH);
        Blobs {
            content,
            index,
            phase: AtomicU8::new(PHASE_SNAPSHOT),
            expected: AtomicU64::new(0),
            suspect: suspect_after.map(|after| (after, own)),
            stop: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            snapshot_lock: parking_lot::Mutex::new(()),
            loaded: tokio::sync::watch::Sender::new(false),
            checked: tokio::sync::watch::Sender::new(suspect_after.is_none()),
        }
    }

    pub fn path_of(&self, key: &Digest) -> PathBuf {
        self.content.join(key.file_name())
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
                _ => "ready",
            },
            entries: self.index.len(),
            expected: (expected > 0).then_some(expected),
        }
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
        if self.suspect(mtime) && !checkpoint::holds(&self.path_of(key), key) {
            self.drop_torn(key);
            return false;
        }
        self.index.mark_seen(key);
        true
    }

    fn drop_torn(&self, key: &Digest) {
        tracing::warn!(
            digest = %key,
            path = %self.path_of(key).display(),
            "filesystem store: dropping a blob written just before the machine restarted, whose bytes do not match its name"
        );
        self.index.remove(key);
        let _ = std::fs::remove_file(self.path_of(key));
    }

    /// Looks for `key` on disk while the index loads, and indexes it when found: its stored
    /// length, or `None`. Blocking (a stat, and a hash of a suspect file after a reboot).
    pub fn probe_disk(&self, key: &Digest) -> Option<u64> {
        let path = self.path_of(key);
        let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
        if self.suspect(meta.modified().ok()) && !checkpoint::holds(&path, key) {
            self.drop_torn(key);
            return None;
        }
        let (_, evicted) = self.index.insert_at(key, meta.len(), End::Hot, true);
        self.changed();
        self.remove_files(&evicted);
        Some(meta.len())
    }

    /// Deletes the files of evicted entries. Blocking.
    pub fn remove_files(&self, evicted: &[Digest]) {
        for key in evicted {
            if let Err(e) = std::fs::remove_file(self.path_of(key)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(digest = %key, error = %e, "filesystem store: could not delete evicted blob");
                }
            }
        }
    }

    /// Writes the snapshot if the index is loaded and changed since the last one. Blocking.
    pub fn write_snapshot(&self) -> Result<Option<u64>, Error> {
        let _one = self.snapshot_lock.lock();
        if !self.ready() || !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(None);
        }
        match snapshot::write(&self.content, &self.index) {
            Ok(n) => Ok(Some(n)),
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
        let from_snapshot = self.load_snapshot();
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
        let outcome = self.list(from_snapshot);
        let (added, checked) = match outcome {
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
        let dropped = self.index.sweep_unseen();
        self.phase.store(PHASE_READY, Ordering::Release);
        self.loaded.send_replace(true);
        tracing::info!(
            path = %self.content.display(),
            entries = self.index.len(),
            from_snapshot,
            snapshot_ms = snapshot_took.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            added,
            checked,
            dropped,
            "filesystem store: index loaded"
        );
        if !from_snapshot || added > 0 || dropped > 0 {
            self.changed();
            if let Err(e) = self.write_snapshot() {
                tracing::warn!(error = %e, "filesystem store: could not write the index snapshot");
            }
        }
    }

    /// Reads the snapshot into the index, hottest first at the cold end (so what requests and
    /// puts indexed meanwhile stays hotter). True when the whole snapshot was read.
    fn load_snapshot(&self) -> bool {
        let mut reader = match snapshot::Reader::open(&self.content) {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(snapshot::Torn(why)) => {
                tracing::warn!(path = %self.content.display(), why, "filesystem store: the index snapshot cannot be used; walking the directory");
                return false;
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
        let mut block = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            match reader.next_block(&mut block) {
                Ok(true) => {
                    for (key, len) in &block {
                        let (_, evicted) = self.index.insert_at(key, *len, End::Cold, false);
                        self.remove_files(&evicted);
                    }
                }
                Ok(false) => return true,
                Err(snapshot::Torn(why)) => {
                    // What was read is checked by the walk like any other entry.
                    tracing::warn!(path = %self.content.display(), why, "filesystem store: the index snapshot is torn; walking the directory");
                    self.expected.store(0, Ordering::Relaxed);
                    return false;
                }
            }
        }
    }

    /// Lists the content directory: marks what the index holds as seen, stats and indexes the
    /// rest, and after a reboot hashes suspect files. Without a whole snapshot, every file is
    /// stat-ed and the LRU order follows modification times. Returns (added, hashed), or
    /// `None` when stopped.
    fn list(&self, from_snapshot: bool) -> Result<Option<(u64, u64)>, Error> {
        let dir = std::fs::read_dir(&self.content)
            .map_err(|e| Error::io(format!("reading {}", self.content.display()), e))?;
        let mut added = 0u64;
        let mut checked = 0u64;
        // (modification time, slot, key) of what the walk added at the cold end, to order
        // them by age at the end; 16 bytes per entry (the key as 4 bytes of its hash).
        let mut ages: Vec<(u64, u32, u32)> = Vec::new();
        for entry in dir {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let entry =
                entry.map_err(|e| Error::io(format!("reading {}", self.content.display()), e))?;
            let Some(key) = entry.file_name().to_str().and_then(Digest::from_file_name) else {
                continue;
            };
            // Known and no reboot: the listing is all the proof needed.
            if self.suspect.is_none() && self.index.mark_seen(&key) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified().ok();
            if self.suspect(mtime) && !self.index.is_seen(&key) {
                checked += 1;
                if !checkpoint::holds(&entry.path(), &key) {
                    self.drop_torn(&key);
                    continue;
                }
            }
            if self.index.mark_seen(&key) {
                continue;
            }
            let end = if from_snapshot {
                End::Hot
            } else {
                End::Unordered
            };
            let (slot, evicted) = self.index.insert_at(&key, meta.len(), end, true);
            self.remove_files(&evicted);
            added += 1;
            if let (Some(slot), false) = (slot, from_snapshot) {
                let age = mtime
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos() as u64);
                ages.push((age, slot, super::index::fingerprint(&key)));
            }
        }
        if !ages.is_empty() {
            ages.sort_unstable_by_key(|a| std::cmp::Reverse(a.0));
            let order: Vec<(u32, u32)> = ages.into_iter().map(|(_, s, f)| (s, f)).collect();
            self.index.move_to_cold_end(&order);
        }
        // What is over the limit now (a lowered `max_bytes`, or a walk's unordered entries)
        // goes, oldest first, while the store serves.
        let evicted = self.index.evict_over_limit();
        if !evicted.is_empty() {
            tracing::info!(
                entries = evicted.len(),
                "filesystem store: evicting what is over the limit after the load"
            );
        }
        self.remove_files(&evicted);
        Ok(Some((added, checked)))
    }
}

/// Starts the loader thread.
pub(crate) fn start(blobs: &Arc<Blobs>) -> Result<(), Error> {
    let b = blobs.clone();
    std::thread::Builder::new()
        .name("cairn-fs-index".into())
        .spawn(move || b.load())
        .map(|_| ())
        .map_err(|e| Error::internal(format!("starting the index loader: {e}")))
}
