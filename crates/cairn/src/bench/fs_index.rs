//! `cairn bench fs-index`: the filesystem store's index at scale, in this process.
//!
//! 1. The index alone at `--requests` entries and at ten times that: resident memory per
//!    entry (RSS before and after, `/proc/self/statm`), insert rate, and its snapshot: write
//!    time, size, load time with the file in the page cache and after it was dropped from it
//!    (`posix_fadvise(DONTNEED)`; the directory's inodes stay cached, dropping those takes
//!    `/proc/sys/vm/drop_caches`).
//! 2. The memory store's overhead per entry at `--requests` blobs of `--small-size` bytes.
//! 3. A filesystem store under `--dir`, filled through the store API with `--requests` blobs of
//!    `--small-size` bytes (skipped when the directory already holds them), then reopened from
//!    its snapshot and without it: time to open, to the first answered lookup of 100 digests
//!    and to a fully loaded index, and the p50/p99 of such lookups (FindMissingBlobs' part in
//!    the store) and of whole reads of one blob (GetActionResult's part on a filesystem action
//!    cache), one each a millisecond, while the index loads. The restart from a snapshot of an
//!    untouched directory lists no prefix directory; "after puts" writes 1,000 blobs into the
//!    directory behind the snapshot's back first (as a crash after them would leave it), so
//!    that the directories they touched are listed.
//!
//! Parts 2 and 1 run first, and what they build stays alive until the end, so that the
//! allocator's earlier frees do not hide a later part's growth.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cairn_config::stores::{
    EvictionPolicy, FilesystemStore as FilesystemConfig, MemoryStore as MemoryConfig,
};
use cairn_config::ByteSize;
use cairn_core::{Digest, DigestFunction};
use cairn_store::filesystem::bench as index;
use cairn_store::filesystem::FilesystemStore;
use cairn_store::memory::MemoryStore;
use cairn_store::{Store, StoreExt};

use super::{report, secs};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn key(i: u64) -> Digest {
    DigestFunction::Sha256
        .compute(&i.to_le_bytes())
        .with_size(100)
}

fn blob(i: u64, size: usize) -> (Digest, Bytes) {
    let mut data = vec![0u8; size.max(8)];
    data[..8].copy_from_slice(&i.to_le_bytes());
    (DigestFunction::Sha256.compute(&data), data.into())
}

/// Drops `path` from the page cache.
fn uncache(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: the descriptor is open for the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise: {rc}");
    Ok(())
}

pub async fn run(n: usize, small: usize, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::current_dir()?.join("cairn-bench-fs-index"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let snapdir = dir.join("index-only");
    std::fs::create_dir_all(&snapdir)?;
    // What each measurement built stays alive until the end, so that no later one grows into
    // memory an earlier one freed (the allocator keeps it) and reads as smaller than it is.
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    keep.push(Box::new(memory_store(n as u64, small).await?));
    for entries in [n as u64, n as u64 * 10] {
        keep.push(Box::new(tokio::task::block_in_place(|| {
            index_alone(entries, &snapdir)
        })?));
    }
    filesystem_store(n as u64, small, &dir).await?;
    drop(keep);
    Ok(())
}

fn index_alone(n: u64, snapdir: &Path) -> anyhow::Result<Vec<index::Index>> {
    let before = rss_bytes();
    let began = Instant::now();
    let idx = index::Index::new(None);
    for i in 0..n {
        idx.insert(&key(i), 100);
    }
    let took = began.elapsed();
    let grew = rss_bytes().saturating_sub(before);
    report(
        &format!("index {n}:"),
        format_args!(
            "{:.1} bytes of RSS per entry ({} MB); {:.0} inserts/s",
            grew as f64 / n as f64,
            grew / 1_000_000,
            n as f64 / secs(took)
        ),
    );
    let began = Instant::now();
    index::write_snapshot(snapdir, &idx)?;
    let wrote = began.elapsed();
    let file = snapdir.join(index::SNAPSHOT_FILE);
    let size = std::fs::metadata(&file)?.len();
    let mut loads = Vec::new();
    let mut built = vec![idx];
    for cached in [true, false] {
        if !cached {
            uncache(&file)?;
        }
        let idx = index::Index::new(None);
        let began = Instant::now();
        let read = index::load_snapshot(snapdir, &idx).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(read == n, "the snapshot held {read} entries, not {n}");
        loads.push(began.elapsed());
        built.push(idx);
    }
    report(
        &format!("index {n} snapshot:"),
        format_args!(
            "{} MB, written in {:.2} s, loaded in {:.2} s (file cached), {:.2} s (file not cached)",
            size / 1_000_000,
            secs(wrote),
            secs(loads[0]),
            secs(loads[1])
        ),
    );
    std::fs::remove_file(&file)?;
    Ok(built)
}

async fn memory_store(n: u64, small: usize) -> anyhow::Result<MemoryStore> {
    let store = MemoryStore::new(&MemoryConfig {
        eviction_policy: None,
    });
    let before = rss_bytes();
    for i in 0..n {
        let (d, data) = blob(i, small);
        store.put_bytes(&d, data).await?;
    }
    let grew = rss_bytes().saturating_sub(before);
    report(
        &format!("memory store {n} x {small} B:"),
        format_args!(
            "{:.1} bytes of RSS per entry, {:.1} beyond the blob's own bytes",
            grew as f64 / n as f64,
            grew as f64 / n as f64 - small as f64
        ),
    );
    Ok(store)
}

fn fs_config(dir: &Path) -> FilesystemConfig {
    FilesystemConfig {
        content_path: dir.join("cas").display().to_string(),
        temp_path: Some(dir.join("tmp").display().to_string()),
        eviction_policy: Some(EvictionPolicy {
            max_bytes: ByteSize(1 << 40),
            ..Default::default()
        }),
        read_buffer_size: None,
        block_size: None,
        max_concurrent_writes: None,
        evict_page_cache: false,
    }
}

async fn filesystem_store(n: u64, small: usize, dir: &Path) -> anyhow::Result<()> {
    let cfg = fs_config(dir);
    let content = dir.join("cas");
    let store = Arc::new(FilesystemStore::open(&cfg).await?);
    store.wait_loaded().await;
    let have = store.index_state().entries;
    if have < n {
        let began = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let workers = 16u64;
        for w in 0..workers {
            let store = store.clone();
            tasks.spawn(async move {
                let mut i = have + w;
                while i < n {
                    let (d, data) = blob(i, small);
                    store.put_bytes(&d, data).await?;
                    i += workers;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        report(
            &format!("filesystem fill {}:", n - have),
            format_args!(
                "{:.1} s through the store API ({:.0} puts/s)",
                secs(began.elapsed()),
                (n - have) as f64 / secs(began.elapsed())
            ),
        );
    }
    let store = Arc::into_inner(store).context("the fill still holds the store")?;
    drop(store); // writes the snapshot
    let sample: Vec<Digest> = (0..100)
        .map(|i| blob(i * (n / 100).max(1), small).0)
        .collect();
    for (with_snapshot, label) in [
        (true, "snapshot cached"),
        (true, "snapshot not cached"),
        (true, "snapshot, 1,000 puts after it"),
        (false, "walk"),
    ] {
        let snapshot = content.join(index::SNAPSHOT_FILE);
        if !with_snapshot {
            std::fs::remove_file(&snapshot)?;
        } else if label == "snapshot not cached" {
            uncache(&snapshot)?;
        } else if label.contains("puts after") {
            // Written straight into place after the snapshot, as puts before a crash leave
            // them (the snapshot the last stop wrote does not list them).
            let snapshot_time = std::fs::metadata(&snapshot)?.modified()?;
            while std::time::SystemTime::now() < snapshot_time + Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for i in n..n + 1000 {
                let (d, data) = blob(i, small);
                let path = cairn_store::filesystem::blob_path(&content, &d);
                anyhow::ensure!(
                    !path.exists(),
                    "{} is left from a run that failed",
                    path.display()
                );
                std::fs::write(path, data)?;
            }
        }
        let began = Instant::now();
        let store = FilesystemStore::open(&cfg).await?;
        let opened = began.elapsed();
        let mut first = None;
        let mut during = Vec::new();
        let mut reads = Vec::new();
        let mut next = 0usize;
        loop {
            let loading = store.index_state().loading;
            let t = Instant::now();
            let sizes = store.has_many(&sample).await?;
            anyhow::ensure!(
                sizes.iter().all(Option::is_some),
                "a present blob was missed"
            );
            if first.is_none() {
                first = Some(began.elapsed());
            }
            if !loading {
                break;
            }
            during.push(t.elapsed());
            let d = &sample[next % sample.len()];
            next += 1;
            let t = Instant::now();
            let got = store.get_all(d, small + 1).await?;
            reads.push(t.elapsed());
            anyhow::ensure!(
                got.len() == small,
                "a read of {d} returned {} bytes",
                got.len()
            );
            // About a thousand FindMissingBlobs of 100 digests a second: a busy cache, not a
            // loop that would hold the index's lock against the loader.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        store.wait_loaded().await;
        let loaded = began.elapsed();
        during.sort();
        reads.sort();
        let pct = |v: &[Duration], p: usize| {
            v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
                * 1e3
        };
        report(
            &format!("filesystem restart {n} ({label}):"),
            format_args!(
                "open {:.3} s, first lookup answered {:.3} s, loaded {:.2} s ({} of 256 prefix \
                 directories listed); while loading: {} \
                 lookups of 100 digests p50 {:.2} ms, p99 {:.2} ms; {} reads of one blob p50 \
                 {:.2} ms, p99 {:.2} ms",
                secs(opened),
                secs(first.unwrap_or_default()),
                secs(loaded),
                store.dirs_listed(),
                during.len(),
                pct(&during, 50),
                pct(&during, 99),
                reads.len(),
                pct(&reads, 50),
                pct(&reads, 99),
            ),
        );
        anyhow::ensure!(
            store.index_state().entries >= n,
            "loaded {} entries",
            store.index_state().entries
        );
        drop(store);
        if label.contains("puts after") {
            // Gone again, so that the next run writes them anew.
            for i in n..n + 1000 {
                let (d, _) = blob(i, small);
                std::fs::remove_file(cairn_store::filesystem::blob_path(&content, &d))?;
            }
        }
    }
    Ok(())
}
