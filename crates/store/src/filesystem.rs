//! `filesystem`: one file per blob under `content_path`, named `<function>-<hash>-<size>`, in
//! one of 256 directories by the first two hex digits of the hash (`layout.rs`; a flat
//! directory of an older Cairn, or NativeLink's, is moved into them in the background).
//!
//! Writes go to a uniquely named file in `temp_path` (on the same file system) and are renamed
//! into place: a blob is visible whole or not at all, also after the process is killed. The
//! disk is synced in the background, and a power loss can cost at most the puts of the last
//! moments but never serves a torn blob (`checkpoint`). At start-up the temp directory is
//! emptied (torn writes), the index is rebuilt from `content_path`, oldest modification first
//! so that LRU order survives restarts, and after a reboot the blobs written since the last
//! checkpoint are checked; files whose names are not blob names are ignored. Eviction unlinks
//! files; a reader that already opened a file keeps reading it (the inode lives while the
//! descriptor is open).

mod checkpoint;
mod index;
mod journal;
#[cfg(test)]
mod journal_tests;
mod layout;
mod load;
mod page_cache;
mod snapshot;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use cairn_config::stores::FilesystemStore as FilesystemConfig;
use cairn_core::{BlobStream, Digest, Error, CHUNK_SIZE};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::{check_range, Health, ReadCounter, Store, StoreInfo};
use index::Index;
pub use layout::blob_path;

/// The index and its snapshot without a store around them, for `cairn bench fs-index`.
#[doc(hidden)]
pub mod bench {
    use std::path::Path;

    use cairn_core::Error;

    pub use super::index::{End, Index};

    /// Writes `index` as the snapshot in `dir`; the entries written.
    pub fn write_snapshot(dir: &Path, index: &Index) -> Result<u64, Error> {
        super::snapshot::write(dir, index, 0)
    }

    /// Reads the snapshot in `dir` into `index`; the entries read.
    pub fn load_snapshot(dir: &Path, index: &Index) -> Result<u64, String> {
        let reader = super::snapshot::Reader::open(dir)
            .map_err(|t| t.0)?
            .ok_or("no snapshot")?;
        index.reserve(reader.expected().min(1 << 26) as usize);
        let mut n = 0;
        super::snapshot::read_overlapped(reader, |block| {
            for (key, len) in block {
                index.insert_at(key, *len, End::Cold, false);
            }
            n += block.len() as u64;
            true
        })
        .map_err(|t| t.0)?;
        Ok(n)
    }

    /// The snapshot's file name in a content directory.
    pub const SNAPSHOT_FILE: &str = super::snapshot::FILE_NAME;
}

/// Blobs up to this size are written by one blocking task (create, write, rename)
/// instead of one trip to the blocking pool per step: action-cache entries and most CAS blobs
/// are small, and a client waits on each of those writes (an Execute's answer waits on its
/// action-cache entry).
const SMALL_PUT: usize = 256 << 10;

/// The bound of a filesystem store configured without `max_bytes`: 90% of the size of the
/// file system that holds `content` (created if missing), so that the store evicts before the
/// disk is full.
async fn default_max_bytes(content: &Path) -> Result<u64, Error> {
    tokio::fs::create_dir_all(content)
        .await
        .map_err(|e| Error::io(format!("creating {}", content.display()), e))?;
    let path = std::ffi::CString::new(content.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::invalid_argument(format!("{}: a NUL in the path", content.display()))
    })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `st` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("statvfs {}", content.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let capacity = (st.f_blocks as u64).saturating_mul(st.f_frsize as u64);
    Ok((capacity / 10 * 9).max(1 << 20))
}

pub struct FilesystemStore {
    /// What errors call the store: its key path once [`FilesystemStore::named`], and its
    /// `content_path`.
    name: String,
    /// `max_concurrent_writes`: puts in progress at once.
    writes: Option<tokio::sync::Semaphore>,
    blobs: Arc<load::Blobs>,
    /// The index loader's and the evictor's threads, joined when the store is dropped.
    loader: Option<std::thread::JoinHandle<()>>,
    evictor: Option<std::thread::JoinHandle<()>>,
    temp: PathBuf,
    read_buffer: usize,
    flusher: checkpoint::Flusher,
    /// `evict_page_cache`.
    evict_page_cache: bool,
    /// Lookups and gets answered, for the web UI's cache page.
    reads: ReadCounter,
}

/// How often a loaded index that changed is written as a snapshot while the store runs (and
/// once more when the store is dropped).
const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

impl FilesystemStore {
    /// Creates the directories if needed, clears stale temp files and starts loading the
    /// index in the background: the store serves at once (see `load.rs`).
    pub async fn open(cfg: &FilesystemConfig) -> Result<FilesystemStore, Error> {
        Self::open_inner(cfg, false).await
    }

    /// `open`, with the evictor held back from the start when `evictor_paused` (tests).
    async fn open_inner(
        cfg: &FilesystemConfig,
        evictor_paused: bool,
    ) -> Result<FilesystemStore, Error> {
        let opened = std::time::SystemTime::now();
        let content = PathBuf::from(&cfg.content_path);
        let temp = match &cfg.temp_path {
            Some(t) => PathBuf::from(t),
            None => PathBuf::from(format!("{}.tmp", cfg.content_path.trim_end_matches('/'))),
        };
        let mut policy = cfg.eviction_policy.clone().unwrap_or_default();
        if policy.max_bytes.0 == 0 {
            policy.max_bytes.0 = default_max_bytes(&content).await?;
            tracing::info!(
                path = %content.display(),
                max_bytes = policy.max_bytes.0,
                "filesystem store without eviction_policy.max_bytes: bounded at 90% of its file system"
            );
        }
        let read_buffer = cfg
            .read_buffer_size
            .map_or(CHUNK_SIZE, |s| (s.0 as usize).clamp(4096, 16 << 20));
        let (suspect_after, dir_times, journal) = {
            let (content, temp) = (content.clone(), temp.clone());
            tokio::task::spawn_blocking(move || prepare(&content, &temp))
                .await
                .map_err(|e| Error::internal(format!("filesystem start-up task failed: {e}")))??
        };
        let blobs = Arc::new(load::Blobs::new(
            content.clone(),
            Index::new(Some(&policy)),
            suspect_after,
            opened,
            dir_times,
            journal,
        ));
        // The checkpoint of the previous run is read (above) before this one replaces it.
        // After each flush (so at most FLUSH_DELAY after the last puts) the journal vouches
        // for what they announced.
        let weak = Arc::downgrade(&blobs);
        let after_flush = Arc::new(move || {
            if let Some(blobs) = weak.upgrade() {
                blobs.journal_mark_done();
            }
        });
        let flusher = checkpoint::Flusher::start(&content, blobs.checked(), after_flush).await?;
        #[cfg(test)]
        blobs
            .evictor_paused
            .store(evictor_paused, std::sync::atomic::Ordering::Relaxed);
        #[cfg(not(test))]
        let _ = evictor_paused;
        let (loader, evictor) = load::start(&blobs)?;
        let weak = Arc::downgrade(&blobs);
        let wanted = blobs.snapshot_wanted.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SNAPSHOT_EVERY);
            every.tick().await;
            loop {
                // Every SNAPSHOT_EVERY, or sooner when the journal grew long.
                let early = tokio::select! {
                    _ = every.tick() => false,
                    _ = wanted.notified() => true,
                };
                let Some(blobs) = weak.upgrade() else { return };
                if early && !blobs.snapshot_due() {
                    continue; // a wake-up from before the last snapshot
                }
                let written =
                    tokio::task::spawn_blocking(move || blobs.write_snapshot(false)).await;
                if let Ok(Err(e)) = written {
                    tracing::warn!(error = %e, "filesystem store: could not write the index snapshot");
                }
            }
        });
        Ok(FilesystemStore {
            name: format!("filesystem store at {}", content.display()),
            writes: cfg
                .max_concurrent_writes
                .filter(|&n| n > 0)
                .map(|n| tokio::sync::Semaphore::new(n.min(1 << 20) as usize)),
            blobs,
            loader: Some(loader),
            evictor: Some(evictor),
            temp,
            read_buffer,
            flusher,
            evict_page_cache: cfg.evict_page_cache,
            reads: ReadCounter::default(),
        })
    }

    /// Names the store by its key path in the config (`stores.CAS.filesystem`), for errors.
    pub fn named(mut self, path: &str) -> FilesystemStore {
        self.name = format!("{path} ({})", self.blobs.content.display());
        self
    }

    fn path_of(&self, key: &Digest) -> PathBuf {
        self.blobs.path_of(key)
    }

    /// Refuses a put while the store holds more than its hard limit (`max_bytes` plus a tenth),
    /// which only a backlog of evictions being worked off in the background leaves.
    fn check_hard_limit(&self, key: &Digest) -> Result<(), Error> {
        let Some(held) = self.blobs.index.over_hard_limit() else {
            return Ok(());
        };
        self.blobs.wake_evictor();
        let max = self.blobs.index.max_bytes();
        Err(Error::resource_exhausted(format!(
            "{}: refusing the write of {key}: the store holds {held} bytes, over its hard limit \
             of {} bytes (max_bytes {max} plus a tenth) while {} bytes over max_bytes are \
             evicted in the background; retry later",
            self.name,
            self.blobs.index.hard_limit(),
            held.saturating_sub(max),
        )))
    }

    /// Where the index load is.
    pub fn index_state(&self) -> crate::IndexState {
        self.blobs.state()
    }

    /// How many of the 256 prefix directories the finished start-up load listed (those not
    /// changed since the snapshot are not).
    #[doc(hidden)]
    pub fn dirs_listed(&self) -> u64 {
        self.blobs.dirs_listed()
    }

    /// Times the index's hash table grew since the store opened (each rehashes every entry
    /// under the index's lock).
    #[doc(hidden)]
    pub fn index_table_grows(&self) -> u64 {
        self.blobs.table_grows()
    }

    /// The journal records the finished start-up load applied as they said, and the names it
    /// stat-ed instead (no done mark vouched for them).
    #[doc(hidden)]
    pub fn journal_replayed(&self) -> (u64, u64) {
        self.blobs.journal_replayed()
    }

    /// Waits until the index holds everything on disk (the store serves before that).
    pub async fn wait_loaded(&self) {
        self.blobs.wait_loaded().await
    }

    /// Writes the index snapshot now if the index is loaded and changed since the last one;
    /// the number of entries written.
    pub async fn write_snapshot(&self) -> Result<Option<u64>, Error> {
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || blobs.write_snapshot(false))
            .await
            .map_err(|e| Error::internal(format!("index snapshot task failed: {e}")))?
    }

    /// The stored length of `key`: from the index, or while the index loads from the disk.
    async fn lookup(&self, key: &Digest) -> Result<Option<u64>, Error> {
        if let Some(len) = self.blobs.index.get(key) {
            self.blobs.changed();
            return Ok(Some(len));
        }
        if self.blobs.ready() {
            return Ok(None);
        }
        let (blobs, key) = (self.blobs.clone(), *key);
        tokio::task::spawn_blocking(move || blobs.probe_disk(&key))
            .await
            .map_err(|e| Error::internal(format!("filesystem lookup task failed: {e}")))
    }

    /// The file holding `key` when the index has it (and marks it recently used), so that a
    /// worker can hardlink it. The file may be evicted right after: a caller that links or
    /// opens it must treat NotFound as "absent". Never write through this path.
    pub fn path_of_blob(&self, key: &Digest) -> Option<PathBuf> {
        if self.blobs.index.get(key).is_some() {
            if !self.blobs.vouch(key) {
                return None;
            }
            let path = self.path_of(key);
            if self.blobs.migrating() && !path.exists() {
                self.blobs.migrate_one(key);
            }
            return Some(path);
        }
        // While the index loads: a stat (and a hash of a suspect file after a reboot).
        if self.blobs.ready() {
            return None;
        }
        self.blobs.probe_disk(key).map(|_| self.path_of(key))
    }

    async fn remove_evicted(&self, evicted: Vec<Digest>) {
        if evicted.is_empty() {
            return;
        }
        let blobs = self.blobs.clone();
        let _ = tokio::task::spawn_blocking(move || blobs.remove_files(&evicted)).await;
    }

    /// Writes `head`, then the rest of `body`, to `tmp`; returns the size.
    async fn write_temp(
        &self,
        tmp: &Path,
        head: Vec<Bytes>,
        mut body: BlobStream,
    ) -> Result<u64, Error> {
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let mut size = 0u64;
        let mut chunks = futures::stream::iter(head.into_iter().map(Ok)).chain(&mut body);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > self.blobs.index.max_bytes() {
                return Err(Error::resource_exhausted(format!(
                    "the blob is larger than this filesystem store's max_bytes ({} bytes)",
                    self.blobs.index.max_bytes()
                )));
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        Ok(size)
    }
}

/// Writes a whole small blob: create `tmp`, write, rename to `key`'s place, all on the
/// calling (blocking) thread; the journal's announcement, to drop once the blob is indexed.
/// On failure `tmp` is removed and the place untouched.
fn write_small(
    blobs: &load::Blobs,
    key: &Digest,
    tmp: &Path,
    chunks: &[Bytes],
) -> Result<journal::Pending, Error> {
    let written = (|| {
        let mut file = std::fs::File::create(tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        let mut len = 0;
        for chunk in chunks {
            file.write_all(chunk)
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            len += chunk.len() as u64;
        }
        rename_into_place(blobs, key, tmp, len)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Renames the whole temp file `tmp` of `len` bytes to `key`'s place, announced in the journal
/// first (and its failure after); the announcement, to drop once the blob is indexed.
/// Blocking.
fn rename_into_place(
    blobs: &load::Blobs,
    key: &Digest,
    tmp: &Path,
    len: u64,
) -> Result<journal::Pending, Error> {
    let dest = blobs.path_of(key);
    let announced = blobs.journal_added(key, len);
    match std::fs::rename(tmp, &dest) {
        Ok(()) => Ok(announced),
        Err(e) => {
            let _undone = blobs.journal_removed(std::slice::from_ref(key));
            Err(Error::io(
                format!("renaming {} to {}", tmp.display(), dest.display()),
                e,
            ))
        }
    }
}

/// What the start-up found: since when files may be torn, the prefix directories'
/// modification times, and this run's journal.
type Prepared = (
    Option<std::time::SystemTime>,
    layout::DirTimes,
    journal::Journal,
);

/// Creates the directories and empties the temp directory (torn writes); returns since when
/// files may be torn (after a reboot, from the checkpoint the previous run left), the prefix
/// directories' modification times before this run changes them, and this run's journal.
fn prepare(content: &Path, temp: &Path) -> Result<Prepared, Error> {
    let suspect_after = checkpoint::suspect_after(
        checkpoint::Checkpoint::read(content).as_ref(),
        &checkpoint::boot_id(),
    );
    for dir in [content, temp] {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let dir_times = layout::make_prefix_dirs(content)?;
    // NativeLink's temp directory has `d/` and `s/` subdirectories: their files are torn too.
    for dir in [temp.to_path_buf(), temp.join("d"), temp.join("s")] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != temp => continue,
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok((suspect_after, dir_times, journal::Journal::start(content)))
}

impl Drop for FilesystemStore {
    /// Stops the loader and writes a last snapshot of a loaded index (blocking: the index of a
    /// cleanly stopped store is read back at the next start instead of walking the directory).
    fn drop(&mut self) {
        self.blobs.stop();
        // The loader stops at its next entry or block, or ends the snapshot it is writing.
        if let Some(loader) = self.loader.take() {
            let _ = loader.join();
        }
        // The evictor stops after its batch: then nothing changes the store, and the last
        // snapshot makes every journal file before it unneeded.
        if let Some(evictor) = self.evictor.take() {
            let _ = evictor.join();
        }
        if let Err(e) = self.blobs.write_snapshot(true) {
            tracing::warn!(error = %e, "filesystem store: could not write the index snapshot");
        }
    }
}

impl FilesystemStore {
    /// `has_many` without the read counting.
    async fn lookup_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let mut sizes: Vec<Option<u64>> = keys.iter().map(|k| self.blobs.index.get(k)).collect();
        if sizes.iter().any(Option::is_some) {
            self.blobs.changed();
        }
        if self.blobs.checks_pending() {
            // After a reboot, while the load checks files: an entry only the snapshot listed
            // is checked (stat, and a hash when it may be torn) before it is vouched for.
            let hits: Vec<(usize, Digest)> = sizes
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_some())
                .map(|(i, _)| (i, keys[i]))
                .collect();
            let blobs = self.blobs.clone();
            let refused = tokio::task::spawn_blocking(move || {
                hits.into_iter()
                    .filter(|(_, k)| !blobs.vouch(k))
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Error::internal(format!("filesystem lookup task failed: {e}")))?;
            for i in refused {
                sizes[i] = None;
            }
        }
        if self.blobs.ready() || sizes.iter().all(Option::is_some) {
            return Ok(sizes);
        }
        // While the index loads, the digests it lacks are looked up on disk, in one task.
        let missing: Vec<(usize, Digest)> = sizes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_none())
            .map(|(i, _)| (i, keys[i]))
            .collect();
        let blobs = self.blobs.clone();
        let found = tokio::task::spawn_blocking(move || {
            missing
                .into_iter()
                .map(|(i, k)| (i, blobs.probe_disk(&k)))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::internal(format!("filesystem lookup task failed: {e}")))?;
        for (i, size) in found {
            sizes[i] = size;
        }
        Ok(sizes)
    }

    /// `get` without the read counting.
    async fn read(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let not_found = || Error::not_found(format!("{key} is not in the filesystem store"));
        let Some(indexed_len) = self.lookup(key).await? else {
            return Err(not_found());
        };
        let path = self.path_of(key);
        let mut opened = tokio::fs::File::open(&path).await;
        if matches!(&opened, Err(e) if e.kind() == std::io::ErrorKind::NotFound)
            && self.blobs.migrating()
        {
            // Indexed (from a snapshot) but not moved into place yet.
            let (blobs, k) = (self.blobs.clone(), *key);
            if tokio::task::spawn_blocking(move || blobs.migrate_one(&k))
                .await
                .map_err(|e| Error::internal(format!("filesystem move task failed: {e}")))?
            {
                opened = tokio::fs::File::open(&path).await;
            }
        }
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.blobs.index.remove(key);
                self.blobs.changed();
                return Err(not_found());
            }
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let meta = file
            .metadata()
            .await
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let size = meta.len();
        if size != indexed_len {
            // An entry rewritten since the snapshot that listed it.
            self.blobs.index.set_len(key, size);
        }
        if !self.blobs.ready() {
            let (blobs, k, mtime) = (self.blobs.clone(), *key, meta.modified().ok());
            let whole = tokio::task::spawn_blocking(move || blobs.check_before_serving(&k, mtime))
                .await
                .map_err(|e| Error::internal(format!("filesystem check task failed: {e}")))?;
            if !whole {
                return Err(not_found());
            }
        }
        let (start, len) = check_range(key, size, offset, length)?;
        if start > 0 {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(|e| Error::io(format!("seeking {}", path.display()), e))?;
        }
        // With `evict_page_cache`, what the read brought into the page cache is dropped when
        // the stream ends or is dropped.
        let dropper = if self.evict_page_cache {
            match file.try_clone().await {
                Ok(f) => Some(page_cache::DropOnClose::new(f.into_std().await, start, len)),
                Err(e) => return Err(Error::io(format!("duplicating {}", path.display()), e)),
            }
        } else {
            None
        };
        let reader = file.take(len);
        let stream =
            tokio_util::io::ReaderStream::with_capacity(reader, self.read_buffer).map(move |r| {
                let _ = &dropper;
                r.map_err(|e| Error::io(format!("reading {}", path.display()), e))
            });
        Ok(stream.boxed())
    }
}

#[async_trait]
impl Store for FilesystemStore {
    async fn has_many(&self, keys: &[Digest]) -> Result<Vec<Option<u64>>, Error> {
        let sizes = self.lookup_many(keys).await?;
        self.reads.count_lookup(&sizes);
        Ok(sizes)
    }

    async fn get(
        &self,
        key: &Digest,
        offset: u64,
        length: Option<u64>,
    ) -> Result<BlobStream, Error> {
        let r = self.read(key, offset, length).await;
        self.reads.count_get(&r);
        r
    }

    async fn put(&self, key: &Digest, mut body: BlobStream) -> Result<(), Error> {
        let _turn = match &self.writes {
            Some(s) => Some(
                s.acquire()
                    .await
                    .map_err(|_| Error::internal("write limit closed"))?,
            ),
            None => None,
        };
        self.check_hard_limit(key)?;
        let tmp = self
            .temp
            .join(format!("{}.{}", key.file_name(), uuid::Uuid::new_v4()));
        let dest = self.path_of(key);
        // The start of the body, up to SMALL_PUT bytes: a blob that ends there is written by
        // one blocking task; a longer one streams on. A body that fails here wrote nothing.
        let mut head = Vec::new();
        let mut head_len = 0;
        let mut longer = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            head_len += chunk.len();
            head.push(chunk);
            if head_len > SMALL_PUT {
                longer = true;
                break;
            }
        }
        if head_len as u64 > self.blobs.index.max_bytes() {
            return Err(Error::resource_exhausted(format!(
                "{key}: the blob is larger than this filesystem store's max_bytes ({} bytes)",
                self.blobs.index.max_bytes()
            )));
        }
        // `announced`: the journal's record of the rename, finished once the blob is indexed.
        let (size, announced) = if longer {
            let size = match self.write_temp(&tmp, head, body).await {
                Ok(size) => size,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            };
            let (blobs, k, t) = (self.blobs.clone(), *key, tmp.clone());
            let renamed =
                tokio::task::spawn_blocking(move || rename_into_place(&blobs, &k, &t, size))
                    .await
                    .map_err(|e| Error::internal(format!("filesystem rename task failed: {e}")))?;
            match renamed {
                Ok(announced) => (size, announced),
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            }
        } else {
            let (blobs, k) = (self.blobs.clone(), *key);
            let announced =
                tokio::task::spawn_blocking(move || write_small(&blobs, &k, &tmp, &head))
                    .await
                    .map_err(|e| Error::internal(format!("filesystem write task failed: {e}")))??;
            (head_len as u64, announced)
        };
        if self.evict_page_cache {
            let d = dest.clone();
            tokio::task::spawn_blocking(move || page_cache::write_back_and_drop(&d))
                .await
                .map_err(|e| {
                    Error::internal(format!("filesystem write-back task failed: {e}"))
                })??;
        }
        self.flusher.wrote();
        let evicted = self.blobs.index.insert(key, size);
        self.blobs.changed();
        drop(announced);
        self.remove_evicted(evicted).await;
        if self.blobs.index.over_limit() {
            // More than this put's own evictions (`index::INLINE_EVICTIONS`) are due.
            self.blobs.wake_evictor();
        }
        Ok(())
    }

    fn info(&self) -> StoreInfo {
        StoreInfo {
            kind: "filesystem",
            size_bytes: Some(self.blobs.index.total_bytes()),
            entries: Some(self.blobs.index.len()),
            evictions: Some(self.blobs.index.evictions()),
            reads: Some(self.reads.snapshot()),
            detail: None,
            index: Some(self.blobs.state()),
            children: vec![],
        }
    }

    async fn health(&self) -> Health {
        let content = &self.blobs.content;
        match tokio::fs::metadata(content).await {
            Ok(m) if m.is_dir() => Health::Ok,
            Ok(_) => Health::Failed(format!("{} is not a directory", content.display())),
            Err(e) => Health::Failed(format!("{}: {e}", content.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testutil, StoreExt};
    use cairn_config::stores::EvictionPolicy;
    use cairn_config::ByteSize;
    use cairn_core::DigestFunction;

    fn cfg(dir: &Path, max_bytes: u64) -> FilesystemConfig {
        FilesystemConfig {
            content_path: dir.join("cas").display().to_string(),
            temp_path: Some(dir.join("tmp").display().to_string()),
            eviction_policy: Some(EvictionPolicy {
                max_bytes: ByteSize(max_bytes),
                ..Default::default()
            }),
            read_buffer_size: None,
            block_size: None,
            max_concurrent_writes: None,
            evict_page_cache: false,
        }
    }

    #[tokio::test]
    async fn a_store_without_max_bytes_is_bounded_and_refuses_larger_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        let bound = store.blobs.index.max_bytes();
        assert!(bound > 0 && bound < u64::MAX, "{bound}");

        let store = FilesystemStore::open(&cfg(dir.path(), 1000)).await.unwrap();
        for size in [1001usize, 300 << 10] {
            let big = Bytes::from(vec![5u8; size]);
            let key = DigestFunction::Sha256.compute(&big);
            let e = store.put_bytes(&key, big).await.unwrap_err();
            assert_eq!(e.code, cairn_core::Code::ResourceExhausted, "{size}: {e}");
            assert!(store.has(&key).await.unwrap().is_none());
        }
        // Nothing is left in the temp directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn filesystem_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        testutil::check_store_contract(&store).await;
        // Nothing is left in the temp directory, not even from the aborted put.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn small_and_large_puts_store_whole_blobs_and_failed_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        let function = DigestFunction::Sha256;
        // Both sides of SMALL_PUT (one blocking task, then streaming), in uneven chunks.
        for len in [0, 1, SMALL_PUT, SMALL_PUT + 1, 3 * SMALL_PUT + 7] {
            let data: Bytes = (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
            let d = function.compute(&data);
            let body = cairn_core::stream::once_chunked(data.clone(), 100_003);
            store.put(&d, body).await.unwrap();
            assert_eq!(store.has(&d).await.unwrap(), Some(len as u64));
            assert_eq!(store.get_all(&d, usize::MAX).await.unwrap(), data);
        }
        // A body that fails before or after SMALL_PUT bytes: no blob, no temp file.
        for good in [10, SMALL_PUT + 10] {
            let d = function.compute(b"never stored");
            let chunks: Vec<Result<Bytes, Error>> = vec![
                Ok(Bytes::from(vec![1u8; good])),
                Err(Error::invalid_argument("client went away")),
            ];
            let e = store
                .put(&d, futures::stream::iter(chunks).boxed())
                .await
                .unwrap_err();
            assert!(e.to_string().contains("client went away"), "{e}");
            assert_eq!(store.has(&d).await.unwrap(), None);
            assert_eq!(
                std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
                0
            );
        }
    }

    #[tokio::test]
    async fn index_is_rebuilt_and_torn_temp_files_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = DigestFunction::Sha256.compute(b"persist me");
        {
            let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
            store.put_bytes(&d, "persist me".into()).await.unwrap();
        }
        std::fs::write(dir.path().join("tmp/torn"), b"half").unwrap();
        std::fs::write(dir.path().join("cas/not-a-blob"), b"x").unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        assert_eq!(store.has(&d).await.unwrap(), Some(10));
        assert_eq!(store.get_all(&d, 100).await.unwrap(), "persist me");
        assert!(!dir.path().join("tmp/torn").exists());
    }

    #[tokio::test]
    async fn puts_are_flushed_and_checkpointed_after_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        let mut checkpoints = store.flusher.checkpoints();
        let opened = *checkpoints.borrow_and_update();
        let first = checkpoint::Checkpoint::read(&store.blobs.content).unwrap();
        assert_eq!(first.time, opened);
        assert_eq!(first.boot_id, checkpoint::boot_id());
        let before_put = std::time::SystemTime::now();
        let d = DigestFunction::Sha256.compute(b"flush me");
        store.put_bytes(&d, "flush me".into()).await.unwrap();
        checkpoints.changed().await.unwrap();
        let flushed = *checkpoints.borrow();
        assert!(flushed >= before_put);
        assert_eq!(
            checkpoint::Checkpoint::read(&store.blobs.content)
                .unwrap()
                .time,
            flushed
        );
    }

    /// Drops `store` and waits until its flusher has written its last checkpoint.
    async fn close(store: FilesystemStore) {
        let mut checkpoints = store.flusher.checkpoints();
        drop(store);
        while checkpoints.changed().await.is_ok() {}
    }

    /// Plays a power loss: blobs whose names reached the disk after the last checkpoint, some
    /// whole and some torn, found by a store opened in another boot.
    #[tokio::test]
    async fn after_a_reboot_blobs_written_since_the_checkpoint_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let whole = DigestFunction::Sha256.compute(b"whole blob");
        let torn = DigestFunction::Sha256.compute(b"torn blob!");
        let ac_entry = DigestFunction::Sha256.compute(b"an action");
        let old = DigestFunction::Sha256.compute(b"old blob");
        let content = dir.path().join("cas");
        {
            let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
            store.put_bytes(&old, "old blob".into()).await.unwrap();
            store.put_bytes(&whole, "whole blob".into()).await.unwrap();
            store
                .put_bytes(&ac_entry, "an action result".into())
                .await
                .unwrap();
            close(store).await;
        }
        // The torn one: its name made it to disk, its bytes did not (ext4 leaves zeros).
        std::fs::write(blob_path(&content, &torn), [0u8; 10]).unwrap();
        let checkpoint_time = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        // All but `old` were written after the checkpoint, before the machine went down.
        for d in [&whole, &torn, &ac_entry] {
            std::fs::File::options()
                .write(true)
                .open(blob_path(&content, d))
                .unwrap()
                .set_modified(checkpoint_time + std::time::Duration::from_secs(30))
                .unwrap();
        }
        let old_file = std::fs::File::options()
            .write(true)
            .open(blob_path(&content, &old))
            .unwrap();
        old_file
            .set_modified(checkpoint_time - std::time::Duration::from_secs(60))
            .unwrap();
        let forge = |boot_id: &str| {
            checkpoint::forge(
                &content,
                &checkpoint::Checkpoint {
                    boot_id: boot_id.into(),
                    time: checkpoint_time,
                },
            )
        };

        // The same boot (the process was killed): nothing is checked, everything is kept.
        forge(&checkpoint::boot_id());
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        for d in [&old, &whole, &torn, &ac_entry] {
            assert!(store.has(d).await.unwrap().is_some(), "{d}");
        }
        close(store).await;

        // Another boot: what hashes to its name is kept, the rest is deleted.
        forge("an earlier boot");
        let store = FilesystemStore::open(&cfg(dir.path(), 0)).await.unwrap();
        // Whether or not the load got to them yet (the snapshot lists them all), a lookup
        // never vouches for a torn blob.
        assert_eq!(store.has(&torn).await.unwrap(), None);
        assert_eq!(
            store.has_many(&[ac_entry, whole]).await.unwrap(),
            [None, Some(10)]
        );
        assert!(store.path_of_blob(&torn).is_none());
        store.wait_loaded().await;
        assert_eq!(store.get_all(&whole, 100).await.unwrap(), "whole blob");
        assert_eq!(store.get_all(&old, 100).await.unwrap(), "old blob");
        for d in [&torn, &ac_entry] {
            assert_eq!(store.has(d).await.unwrap(), None, "{d}");
            assert!(!blob_path(&content, d).exists(), "{d}");
        }
        // And the store wrote a checkpoint of this boot, once it had checked them.
        store
            .flusher
            .checkpoints()
            .wait_for(|t| *t > std::time::UNIX_EPOCH)
            .await
            .unwrap();
        assert_eq!(
            checkpoint::Checkpoint::read(&content).unwrap().boot_id,
            checkpoint::boot_id()
        );
    }

    /// `max_bytes` lowered below what the directory holds: the backlog is evicted by the
    /// loader, oldest first, while the store serves; with a snapshot, in its LRU order.
    #[tokio::test]
    async fn a_backlog_over_a_lowered_max_bytes_is_evicted_oldest_first_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("cas");
        std::fs::create_dir_all(&content).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let blobs: Vec<(Digest, Bytes)> = (0..50u32)
            .map(|i| {
                let data = testutil::data(1000, i as u8);
                (DigestFunction::Sha256.compute(&data), data)
            })
            .collect();
        for (i, (d, data)) in blobs.iter().enumerate() {
            let path = content.join(d.file_name()); // flat: an older Cairn's layout
            std::fs::write(&path, data).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        let store = FilesystemStore::open(&cfg(dir.path(), 20_000))
            .await
            .unwrap();
        // Served at once, whatever the load has done so far.
        let (newest, data) = &blobs[49];
        assert_eq!(store.get_all(newest, 2000).await.unwrap(), *data);
        store.wait_loaded().await;
        evicted_to_the_limit(&store).await;
        assert!(store.blobs.index.total_bytes() <= 20_000);
        for (i, (d, _)) in blobs.iter().enumerate() {
            let kept = store.has(d).await.unwrap().is_some();
            assert_eq!(kept, i >= 30, "blob {i}");
            assert_eq!(blob_path(&content, d).exists(), kept, "blob {i}");
        }
        // Blob 31 used last: the coldest after the restart is 30, then 32...
        store.has(&blobs[31].0).await.unwrap();
        drop(store);
        let store = FilesystemStore::open(&cfg(dir.path(), 15_000))
            .await
            .unwrap();
        store.wait_loaded().await;
        evicted_to_the_limit(&store).await;
        let kept: Vec<usize> = (0..50)
            .filter(|&i| blob_path(&content, &blobs[i].0).exists())
            .collect();
        assert_eq!(
            kept,
            [31, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
        );
    }

    #[tokio::test]
    async fn eviction_deletes_files_but_not_under_an_open_reader() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilesystemStore::open(&cfg(dir.path(), 250_000))
            .await
            .unwrap();
        // (While a walk indexes the directory, nothing is evicted.)
        store.wait_loaded().await;
        let a = testutil::data(200_000, 1);
        let b = testutil::data(200_000, 2);
        let (da, db) = (
            DigestFunction::Sha256.compute(&a),
            DigestFunction::Sha256.compute(&b),
        );
        store.put_bytes(&da, a.clone()).await.unwrap();
        let reader = store.get(&da, 0, None).await.unwrap();
        store.put_bytes(&db, b).await.unwrap(); // evicts a
        assert_eq!(store.has(&da).await.unwrap(), None);
        assert!(!store.path_of(&da).exists());
        let got = cairn_core::stream::collect(reader, usize::MAX)
            .await
            .unwrap();
        assert_eq!(got, a);
    }

    /// Waits until the evictor has brought the store within its limits.
    async fn evicted_to_the_limit(store: &FilesystemStore) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while store.blobs.index.over_limit() || !store.blobs.evictor_idle() {
            assert!(std::time::Instant::now() < deadline, "the backlog stays");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A backlog of evictions (a `max_bytes` lowered below what the directory holds) is worked
    /// off by the evictor thread: puts go on meanwhile, each evicting at most
    /// `INLINE_EVICTIONS` entries itself, and are refused with RESOURCE_EXHAUSTED only while
    /// the store holds more than its hard limit (`max_bytes` plus a tenth), storing nothing.
    #[tokio::test]
    async fn writes_go_on_during_a_backlog_and_are_refused_only_past_the_hard_limit() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("cas");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let blob = |i: u32| {
            let data = Bytes::from(format!("blob {i:011}")); // 16 bytes
            (DigestFunction::Sha256.compute(&data), data)
        };
        let n = 2000u32;
        for i in 0..n {
            let (d, data) = blob(i);
            let path = blob_path(&content, &d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &data).unwrap();
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(old + std::time::Duration::from_secs(i as u64))
                .unwrap();
        }
        let held = 16 * n as u64;

        // 1. max_bytes 30,000 (hard limit 33,000) under 32,000 bytes held: a backlog of 125
        // entries, the evictor held back. A put is taken, evicts 64 entries itself, and leaves
        // the rest of the backlog to the evictor.
        let store = FilesystemStore::open_inner(&cfg(dir.path(), 30_000), true)
            .await
            .unwrap();
        store.wait_loaded().await;
        assert_eq!(store.blobs.index.total_bytes(), held);
        assert_eq!(store.blobs.index.hard_limit(), 33_000);
        let (new, data) = blob(n);
        store.put_bytes(&new, data.clone()).await.unwrap();
        assert_eq!(store.get_all(&new, 100).await.unwrap(), data);
        assert_eq!(
            store.blobs.index.evictions(),
            index::INLINE_EVICTIONS as u64
        );
        assert!(store.blobs.index.total_bytes() > 30_000);
        assert!(!blob_path(&content, &blob(0).0).exists());
        assert!(blob_path(&content, &blob(64).0).exists());
        store
            .blobs
            .evictor_paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
        evicted_to_the_limit(&store).await;
        assert!(store.blobs.index.total_bytes() <= 30_000);
        assert!(!blob_path(&content, &blob(64).0).exists());
        drop(store);

        // 2. max_bytes 20,000 (hard limit 22,000) under ~30,000 bytes, walked (no snapshot):
        // puts are refused, with the store's name, the limit and the bytes, and nothing stored;
        // reads go on; once the evictor is let go, puts are taken again.
        std::fs::remove_file(content.join(".cairn-index")).unwrap();
        let store = FilesystemStore::open_inner(&cfg(dir.path(), 20_000), true)
            .await
            .unwrap()
            .named("stores.CAS.filesystem");
        store.wait_loaded().await;
        let before = store.blobs.index.total_bytes();
        assert!(before > 22_000, "{before}");
        let (refused, data) = blob(n + 1);
        for _ in 0..3 {
            let e = store.put_bytes(&refused, data.clone()).await.unwrap_err();
            assert_eq!(e.code, cairn_core::Code::ResourceExhausted, "{e}");
            for says in [
                "stores.CAS.filesystem",
                &content.display().to_string(),
                "hard limit of 22000 bytes",
                &format!("holds {before} bytes"),
                "max_bytes 20000",
            ] {
                assert!(e.message.contains(says), "{says}: {e}");
            }
        }
        assert_eq!(store.has(&refused).await.unwrap(), None);
        assert!(!blob_path(&content, &refused).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        let (kept, kept_data) = blob(n - 1);
        assert_eq!(store.get_all(&kept, 100).await.unwrap(), kept_data);
        store
            .blobs
            .evictor_paused
            .store(false, std::sync::atomic::Ordering::Relaxed);
        evicted_to_the_limit(&store).await;
        store.put_bytes(&refused, data.clone()).await.unwrap();
        assert_eq!(store.get_all(&refused, 100).await.unwrap(), data);
        assert!(store.blobs.index.total_bytes() <= 20_000);
        // The oldest went, the newest stayed.
        assert!(!blob_path(&content, &blob(500).0).exists());
        assert!(blob_path(&content, &kept).exists());
    }
}
