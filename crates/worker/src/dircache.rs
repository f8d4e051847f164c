//! The directory cache (NativeLink's `directory_cache`): materialized input roots kept by
//! their root `Directory` digest, so that an action whose input root was seen before gets a
//! copy of the kept tree instead of walking its `Directory` messages, asking the stores about
//! every file and placing each one.
//!
//! - An entry is `<cache_root>/<hash>-<size>/`, the input root as the action saw it before it
//!   ran (files read-only, as materialized). It is made by copying a freshly materialized
//!   action directory into `<cache_root>/tmp-<uuid>/` and renaming that into place, so an
//!   entry is always whole; leftovers of a crash (`tmp-*`) are deleted at start.
//! - Copies in and out are reflinks where the file system has them (btrfs, XFS), else copies
//!   in the kernel: an action that writes to its inputs never changes the entry.
//! - Entries are evicted least recently used first once there are more than `max_entries` or
//!   they add up to more than `max_size_bytes`; an entry being copied out is never evicted.
//! - `max_concurrent_fetches` bounds the blob fetches of all materializations of the worker.
//!
//! Subtree caching (`experimental_subtree_caching`) and the GetTree prefetch
//! (`experimental_get_tree_prefetch`) are accepted and do nothing here: entries are whole
//! input roots, and `Directory` messages are read from the worker's own store, where a level
//! costs one round of concurrent local reads.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_core::{Digest, Error};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

/// `directory_cache` with its defaults applied.
#[derive(Debug, Clone)]
pub struct DirectoryCacheConfig {
    /// Where entries live (on the file system of the work directory, for reflinks).
    pub root: PathBuf,
    /// Entries kept at most.
    pub max_entries: usize,
    /// Bytes the entries' files may add up to; 0 means no limit.
    pub max_bytes: u64,
    /// Blob fetches of all materializations at once.
    pub max_concurrent_fetches: usize,
}

struct Entry {
    bytes: u64,
    /// Position in `State::order` (larger is more recent).
    tick: u64,
    /// Copies out in progress.
    users: usize,
}

#[derive(Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
}

pub(crate) struct DirCache {
    cfg: DirectoryCacheConfig,
    state: Mutex<State>,
    /// `max_concurrent_fetches`.
    pub fetches: Arc<Semaphore>,
}

/// An entry being copied out: it is not evicted until this is dropped.
pub(crate) struct Lease {
    cache: Arc<DirCache>,
    digest: Digest,
    pub path: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.cache.state.lock();
        if let Some(e) = st.entries.get_mut(&self.digest) {
            e.users = e.users.saturating_sub(1);
        }
    }
}

impl DirCache {
    /// Opens the cache: creates its root, deletes unfinished entries, and indexes the
    /// finished ones (oldest first, by modification time), evicting past the limits.
    pub async fn open(cfg: DirectoryCacheConfig) -> Result<Arc<DirCache>, Error> {
        let root = cfg.root.clone();
        let found = tokio::task::spawn_blocking(move || scan(&root))
            .await
            .map_err(|e| Error::internal(format!("directory cache scan failed: {e}")))??;
        let cache = Arc::new(DirCache {
            fetches: Arc::new(Semaphore::new(cfg.max_concurrent_fetches.max(1))),
            cfg,
            state: Mutex::new(State::default()),
        });
        {
            let mut st = cache.state.lock();
            for (digest, bytes) in found {
                st.tick += 1;
                let tick = st.tick;
                st.order.insert(tick, digest);
                st.bytes += bytes;
                st.entries.insert(
                    digest,
                    Entry {
                        bytes,
                        tick,
                        users: 0,
                    },
                );
            }
        }
        cache.evict();
        Ok(cache)
    }

    fn entry_path(&self, d: &Digest) -> PathBuf {
        self.cfg.root.join(d.file_name())
    }

    /// The entry of `root`, held until the lease is dropped; `None` when there is none.
    pub fn lease(self: &Arc<Self>, root: &Digest) -> Option<Lease> {
        let mut st = self.state.lock();
        st.tick += 1;
        let tick = st.tick;
        let e = st.entries.get_mut(root)?;
        let old = std::mem::replace(&mut e.tick, tick);
        e.users += 1;
        st.order.remove(&old);
        st.order.insert(tick, *root);
        Some(Lease {
            cache: self.clone(),
            digest: *root,
            path: self.entry_path(root),
        })
    }

    /// Copies the freshly materialized input root at `src` into the cache as the entry of
    /// `root` (nothing happens when there is one already), then evicts past the limits.
    pub async fn insert(self: &Arc<Self>, root: Digest, src: PathBuf) -> Result<(), Error> {
        if self.state.lock().entries.contains_key(&root) {
            return Ok(());
        }
        let this = self.clone();
        let bytes = tokio::task::spawn_blocking(move || -> Result<Option<u64>, Error> {
            let tmp = this.cfg.root.join(format!("tmp-{}", uuid::Uuid::new_v4()));
            let copied = copy_tree(&src, &tmp);
            let bytes = match copied {
                Ok(b) => b,
                Err(e) => {
                    let _ = crate::workdir::remove_tree(&tmp);
                    return Err(Error::io(
                        format!("copying {} into the directory cache", src.display()),
                        e,
                    ));
                }
            };
            let dest = this.entry_path(&root);
            match std::fs::rename(&tmp, &dest) {
                Ok(()) => Ok(Some(bytes)),
                // Another run put it there meanwhile (renaming onto a non-empty directory).
                Err(_) if dest.exists() => {
                    let _ = crate::workdir::remove_tree(&tmp);
                    Ok(None)
                }
                Err(e) => {
                    let _ = crate::workdir::remove_tree(&tmp);
                    Err(Error::io(format!("renaming {}", tmp.display()), e))
                }
            }
        })
        .await
        .map_err(|e| Error::internal(format!("directory cache task failed: {e}")))??;
        if let Some(bytes) = bytes {
            let mut st = self.state.lock();
            if !st.entries.contains_key(&root) {
                st.tick += 1;
                let tick = st.tick;
                st.order.insert(tick, root);
                st.bytes += bytes;
                st.entries.insert(
                    root,
                    Entry {
                        bytes,
                        tick,
                        users: 0,
                    },
                );
            }
        }
        self.evict();
        Ok(())
    }

    /// Drops least recently used entries (never one being copied out) until the cache is
    /// within its limits; their directories are deleted in the background.
    fn evict(&self) {
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            let over = |st: &State| {
                st.entries.len() > self.cfg.max_entries
                    || (self.cfg.max_bytes > 0 && st.bytes > self.cfg.max_bytes)
            };
            let mut ticks: Vec<u64> = st.order.keys().copied().collect();
            ticks.reverse();
            while over(&st) {
                let Some(tick) = ticks.pop() else { break };
                let Some(d) = st.order.get(&tick).copied() else {
                    continue;
                };
                if st.entries.get(&d).is_some_and(|e| e.users > 0) {
                    continue;
                }
                st.order.remove(&tick);
                if let Some(e) = st.entries.remove(&d) {
                    st.bytes -= e.bytes;
                }
                gone.push(self.entry_path(&d));
            }
        }
        if gone.is_empty() {
            return;
        }
        let root = self.cfg.root.clone();
        std::thread::spawn(move || {
            for path in gone {
                // Renamed away first, so that a new entry of the same digest never meets a
                // half-deleted one.
                let trash = root.join(format!("tmp-{}", uuid::Uuid::new_v4()));
                let target = if std::fs::rename(&path, &trash).is_ok() {
                    trash
                } else {
                    path
                };
                if let Err(e) = crate::workdir::remove_tree(&target) {
                    tracing::warn!(dir = %target.display(), error = %e, "could not delete an evicted directory cache entry");
                }
            }
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().entries.len()
    }
}

/// The finished entries under `root` (creating it), with their sizes, oldest first; deletes
/// unfinished ones.
fn scan(root: &Path) -> Result<Vec<(Digest, u64)>, Error> {
    std::fs::create_dir_all(root).map_err(|e| {
        Error::io(
            format!("creating the directory cache {}", root.display()),
            e,
        )
    })?;
    let mut found = Vec::new();
    let entries =
        std::fs::read_dir(root).map_err(|e| Error::io(format!("reading {}", root.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        match Digest::from_file_name(&name) {
            Some(d) if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                let mtime = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                let bytes = tree_bytes(&path).unwrap_or(0);
                found.push((mtime, d, bytes));
            }
            _ => {
                let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    crate::workdir::remove_tree(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
    }
    found.sort_by_key(|(t, _, _)| *t);
    Ok(found.into_iter().map(|(_, d, b)| (d, b)).collect())
}

fn tree_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if t.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

/// Copies the tree at `src` to `dst` (which must not exist): directories, files (a reflink
/// where possible, keeping their mode) and symlinks (their targets as they are). Returns the
/// bytes of the files.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> io::Result<u64> {
    std::fs::create_dir(dst)?;
    let total = copy_contents(src, dst)?;
    // The directory's own mode (a tree may hold read-only directories): set last, once its
    // entries are in.
    let mode = std::fs::metadata(src)?.permissions().mode() & 0o7777;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    Ok(total)
}

/// Copies what the directory `src` holds into the existing directory `dst`.
pub(crate) fn copy_contents(src: &Path, dst: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let t = entry.file_type()?;
        if t.is_dir() {
            total += copy_tree(&from, &to)?;
        } else if t.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if t.is_file() {
            total += copy_file(&from, &to)?;
        }
    }
    Ok(total)
}

fn copy_file(from: &Path, to: &Path) -> io::Result<u64> {
    let mut input = std::fs::File::open(from)?;
    let meta = input.metadata()?;
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    // SAFETY: ioctl(2) FICLONE takes the source descriptor as its integer argument; both
    // descriptors are open for the whole call.
    let cloned = unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) } == 0;
    if !cloned {
        std::io::copy(&mut input, &mut output)?;
    }
    output.set_permissions(std::fs::Permissions::from_mode(
        meta.permissions().mode() & 0o7777,
    ))?;
    Ok(meta.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_core::DigestFunction;

    fn digest(s: &str) -> Digest {
        DigestFunction::Sha256.compute(s.as_bytes())
    }

    fn tree(dir: &Path, content: &str) {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/file"), content).unwrap();
        std::fs::set_permissions(dir.join("sub/file"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        std::os::unix::fs::symlink("sub/file", dir.join("link")).unwrap();
    }

    #[tokio::test]
    async fn entries_are_whole_copies_evicted_least_recently_used_and_found_again_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = DirectoryCacheConfig {
            root: tmp.path().join("cache"),
            max_entries: 2,
            max_bytes: 0,
            max_concurrent_fetches: 4,
        };
        let cache = DirCache::open(cfg.clone()).await.unwrap();
        let (a, b, c) = (digest("a"), digest("b"), digest("c"));
        for (d, text) in [(a, "aaa"), (b, "bbbb")] {
            let src = tmp.path().join(format!("src-{}", d.hash_hex()));
            tree(&src, text);
            cache.insert(d, src).await.unwrap();
        }
        // A copy out is the tree, modes and links included; writing to it changes no entry.
        let lease = cache.lease(&a).unwrap();
        let out = tmp.path().join("out");
        assert_eq!(copy_tree(&lease.path, &out).unwrap(), 3);
        assert_eq!(std::fs::read_to_string(out.join("link")).unwrap(), "aaa");
        let mode = std::fs::metadata(out.join("sub/file"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
        std::fs::set_permissions(out.join("sub/file"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        std::fs::write(out.join("sub/file"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(lease.path.join("sub/file")).unwrap(),
            "aaa"
        );
        // `a` was used last and is leased: adding `c` evicts `b`.
        let src = tmp.path().join("src-c");
        tree(&src, "cc");
        cache.insert(c, src).await.unwrap();
        assert!(cache.lease(&b).is_none());
        assert_eq!(cache.len(), 2);
        drop(lease);

        // A crash leftover is deleted; finished entries are found again.
        std::fs::create_dir_all(cfg.root.join("tmp-123/x")).unwrap();
        drop(cache);
        let again = DirCache::open(cfg.clone()).await.unwrap();
        assert!(again.lease(&a).is_some() && again.lease(&c).is_some());
        assert!(!cfg.root.join("tmp-123").exists());
    }

    #[tokio::test]
    async fn the_byte_limit_evicts_too() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DirCache::open(DirectoryCacheConfig {
            root: tmp.path().join("cache"),
            max_entries: 100,
            max_bytes: 10,
            max_concurrent_fetches: 1,
        })
        .await
        .unwrap();
        let (a, b) = (digest("a"), digest("b"));
        for (d, text) in [(a, "123456"), (b, "abcdef")] {
            let src = tmp.path().join(format!("src-{}", d.hash_hex()));
            tree(&src, text);
            cache.insert(d, src).await.unwrap();
        }
        assert!(
            cache.lease(&a).is_none(),
            "12 bytes kept under a 10-byte limit"
        );
        assert!(cache.lease(&b).is_some());
    }
}
