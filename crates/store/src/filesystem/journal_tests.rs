//! Restarts after a crash read the snapshot and the journal (`journal.rs`) instead of listing
//! every directory changed since the snapshot, and still find exactly what is on disk.
//!
//! A crash is played by forgetting the store: none of its drop runs (no last snapshot), and
//! what it wrote stays in the files as a killed process leaves them.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cairn_config::stores::{EvictionPolicy, FilesystemStore as FilesystemConfig};
use cairn_core::{Digest, DigestFunction};

use super::{blob_path, journal, FilesystemStore};
use crate::{Store, StoreExt};

fn cfg(dir: &Path, max_count: u64) -> FilesystemConfig {
    FilesystemConfig {
        content_path: dir.join("cas").display().to_string(),
        temp_path: Some(dir.join("tmp").display().to_string()),
        eviction_policy: Some(EvictionPolicy {
            max_count,
            ..Default::default()
        }),
        read_buffer_size: None,
        block_size: None,
        max_concurrent_writes: None,
        evict_page_cache: false,
    }
}

fn blob(i: u32) -> (Digest, Bytes) {
    let data = Bytes::from(format!("journaled blob {i}"));
    (DigestFunction::Sha256.compute(&data), data)
}

async fn put(store: &FilesystemStore, range: std::ops::Range<u32>) {
    for i in range {
        let (d, data) = blob(i);
        store.put_bytes(&d, data).await.unwrap();
    }
}

async fn open_loaded(dir: &Path, max_count: u64) -> FilesystemStore {
    let store = FilesystemStore::open(&cfg(dir, max_count)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), store.wait_loaded())
        .await
        .expect("the index loads");
    store
}

/// Plays a crash: waits until nothing is evicting any more, then forgets the store.
async fn crash(store: FilesystemStore) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.blobs.index.over_limit() || !store.blobs.evictor_idle() {
        assert!(
            std::time::Instant::now() < deadline,
            "the evictor stays busy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::mem::forget(store);
}

/// The store holds exactly the blobs `present` (readable, whole) and none of `absent`.
async fn expect_exactly(store: &FilesystemStore, present: &[u32], absent: &[Digest]) {
    let keys: Vec<Digest> = present.iter().map(|&i| blob(i).0).collect();
    let sizes = store.has_many(&keys).await.unwrap();
    for ((k, s), i) in keys.iter().zip(sizes).zip(present) {
        assert_eq!(s, Some(k.size()), "blob {i}: {k}");
    }
    assert_eq!(
        store.index_state().entries,
        present.len() as u64,
        "{:?}",
        store.index_state()
    );
    for &i in present.iter().step_by(101) {
        let (d, data) = blob(i);
        assert_eq!(store.get_all(&d, 1 << 10).await.unwrap(), data);
    }
    for k in absent {
        assert_eq!(store.has(k).await.unwrap(), None, "{k}");
    }
}

/// The `n` least recently used blobs, which the next `n` puts evict.
fn coldest(store: &FilesystemStore, n: usize) -> Vec<Digest> {
    let order = store.blobs.index.order();
    let mut out = Vec::new();
    store
        .blobs
        .index
        .read_slots(&order[order.len() - n..], &mut out);
    out.into_iter().map(|(d, _)| d).collect()
}

/// `present` without the blobs `evicted`.
fn without(present: &[u32], evicted: &[Digest]) -> Vec<u32> {
    present
        .iter()
        .copied()
        .filter(|&i| !evicted.contains(&blob(i).0))
        .collect()
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::open(path).unwrap().set_modified(t).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restart_reads_the_journal_instead_of_listing_the_directories() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    let keep = 4_000u64;

    // 1. A snapshot, then puts (evicting the oldest past `max_count`), vouched for by the
    //    journal's done mark after the flush, then a crash.
    let store = open_loaded(dir.path(), keep).await;
    put(&store, 0..3_000).await;
    assert!(store.write_snapshot().await.unwrap().is_some());
    put(&store, 3_000..5_000).await;
    store.blobs.journal_mark_done();
    crash(store).await;
    let store = open_loaded(dir.path(), keep).await;
    assert_eq!(store.dirs_listed(), 0, "every change is in the journal");
    let (applied, stat) = store.journal_replayed();
    assert_eq!(stat, 0, "every record was vouched for");
    assert!(
        applied >= 3_000,
        "2,000 puts and 1,000 evictions: {applied}"
    );
    let evicted: Vec<Digest> = (0..1_000).map(|i| blob(i).0).collect();
    let present: Vec<u32> = (1_000..5_000).collect();
    expect_exactly(&store, &present, &evicted).await;
    for d in &evicted {
        assert!(!blob_path(&content, d).exists(), "{d} was evicted");
    }

    // 2. A crash with operations in flight: a put whose record was written and whose rename
    //    never happened, one whose rename happened after the journal's last write, and a
    //    blob deleted by hand after the crash. The records no mark vouches for are checked
    //    on disk, and only those.
    let evicted = coldest(&store, 500);
    put(&store, 5_000..5_500).await;
    let mut present = without(&present, &evicted);
    present.extend(5_000..5_500);
    let (ghost, _) = blob(1_000_000);
    std::mem::forget(store.blobs.journal_added(&ghost, ghost.size()));
    let (late, late_data) = blob(1_000_001);
    std::mem::forget(store.blobs.journal_added(&late, late.size()));
    store.blobs.journal_mark_done();
    crash(store).await;
    std::fs::write(blob_path(&content, &late), &late_data).unwrap();
    present.push(1_000_001);
    let by_hand = present.remove(0);
    let by_hand_path = blob_path(&content, &blob(by_hand).0);
    std::fs::remove_file(&by_hand_path).unwrap();
    // The file system's clock may not have ticked since the journal's last write.
    set_mtime(
        by_hand_path.parent().unwrap(),
        SystemTime::now() + Duration::from_secs(120),
    );
    let store = open_loaded(dir.path(), keep).await;
    assert!(
        (1..=2).contains(&store.dirs_listed()),
        "the directory changed by hand, and maybe the late rename's: {}",
        store.dirs_listed()
    );
    assert_eq!(store.journal_replayed().1, 2, "the ghost and the late one");
    let gone = [ghost, blob(by_hand).0, evicted[0], evicted[499]];
    expect_exactly(&store, &present, &gone).await;

    // 3. A clean stop leaves one journal file, empty, and a restart lists nothing (the hand's
    //    directory back to a time before it).
    set_mtime(
        by_hand_path.parent().unwrap(),
        SystemTime::now() - Duration::from_secs(3600),
    );
    drop(store);
    let files = journal::files(&content);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::metadata(&files[0].1).unwrap().len(), 0);
    let store = open_loaded(dir.path(), keep).await;
    assert_eq!(store.dirs_listed(), 0);
    expect_exactly(&store, &present, &gone).await;

    // 4. A torn journal is not used: the directories changed since the snapshot are listed,
    //    and the store still holds exactly what is on disk.
    let evicted = coldest(&store, 100);
    put(&store, 6_000..6_100).await;
    let mut present = without(&present, &evicted);
    present.extend(6_000..6_100);
    crash(store).await;
    let (_, last) = journal::files(&content).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&last, bytes).unwrap();
    let store = open_loaded(dir.path(), keep).await;
    assert!(store.dirs_listed() > 0);
    expect_exactly(&store, &present, &evicted).await;
}

/// A journal that grows long gets a snapshot before the periodic one: a crash restart never
/// reads more than two generations of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_journal_brings_a_snapshot_early() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    let store = open_loaded(dir.path(), 0).await;
    put(&store, 0..11).await;
    // Once the loader wrote its snapshot and ended, nothing else starts a generation.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !store.loader.as_ref().unwrap().is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the loader never ends"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = journal::files(&content).last().unwrap().0;
    // As many records as 64 Ki evictions write (of blobs this store never held).
    let keys: Vec<Digest> = (0..super::load::JOURNAL_RECORDS_MIN as u32)
        .map(|i| DigestFunction::Sha256.compute(&i.to_be_bytes()))
        .collect();
    store.blobs.journal_removed(&keys);
    // The snapshot comes (its file is renamed into place whole) naming the next generation.
    let named = || {
        super::snapshot::Reader::open(&content)
            .ok()
            .flatten()
            .map(|r| (r.generation(), r.expected()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while named().map(|n| n.0) != Some(before + 1) {
        assert!(std::time::Instant::now() < deadline, "no snapshot came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!store.blobs.snapshot_due());
    assert_eq!(named(), Some((before + 1, 11)), "it holds the eleven blobs");
    // Nothing was in flight: the files before its generation are gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while journal::files(&content).len() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            journal::files(&content)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(journal::files(&content)[0].0, before + 1);
}
