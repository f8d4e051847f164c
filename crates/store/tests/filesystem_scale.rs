//! The filesystem store at the scale of a real cache, small enough for CI: 200,000 blobs laid
//! out on disk, restarted without an index snapshot (the walk), with one, with a stale one
//! (blobs removed and added behind its back), with a torn one; lookups, reads and
//! writes while the index loads; and a store filled through the API restarted from the
//! snapshot its drop wrote.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_config::stores::{EvictionPolicy, FilesystemStore as FilesystemConfig};
use cairn_config::ByteSize;
use cairn_core::{Code, Digest, DigestFunction};
use cairn_store::filesystem::{blob_path, FilesystemStore};
use cairn_store::{Store, StoreExt};

const BLOBS: u32 = 200_000;
const SNAPSHOT: &str = ".cairn-index";
/// Far beyond what loading 200,000 entries takes on a loaded CI machine.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

fn cfg(dir: &Path) -> FilesystemConfig {
    FilesystemConfig {
        content_path: dir.join("cas").display().to_string(),
        temp_path: Some(dir.join("tmp").display().to_string()),
        eviction_policy: Some(EvictionPolicy {
            max_bytes: ByteSize(10 << 30),
            ..Default::default()
        }),
        read_buffer_size: None,
        block_size: None,
        max_concurrent_writes: None,
        evict_page_cache: false,
    }
}

fn blob(i: u32) -> (Digest, Bytes) {
    let data = Bytes::from(format!("blob number {i}"));
    (DigestFunction::Sha256.compute(&data), data)
}

/// Writes blobs `range` straight into the content directory, in its prefix directories, as a
/// previous run left them.
fn lay_out(content: &Path, range: std::ops::Range<u32>) {
    for i in range {
        let (d, data) = blob(i);
        let path = blob_path(content, &d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &data).unwrap();
    }
}

async fn loaded(store: &FilesystemStore) {
    tokio::time::timeout(LOAD_DEADLINE, store.wait_loaded())
        .await
        .expect("the index loads");
    assert!(!store.index_state().loading);
}

/// Lookups, reads and a write right after the store opened: every blob on disk is found
/// whether or not the index holds it yet. Returns whether the index was still loading at the
/// first lookup.
async fn serve_while_loading(store: &FilesystemStore, present: &[u32], absent: &[u32]) -> bool {
    let keys: Vec<Digest> = present.iter().map(|&i| blob(i).0).collect();
    let loading = store.index_state().loading;
    let sizes = store.has_many(&keys).await.unwrap();
    for (k, s) in keys.iter().zip(&sizes) {
        assert_eq!(*s, Some(k.size()), "{k} is on disk");
    }
    for &i in present.iter().step_by(97) {
        let (d, data) = blob(i);
        assert_eq!(store.get_all(&d, 1 << 10).await.unwrap(), data, "{d}");
    }
    for &i in absent {
        let (d, _) = blob(i);
        assert_eq!(store.has(&d).await.unwrap(), None, "{d}");
        let e = store.get_all(&d, 1 << 10).await.unwrap_err();
        assert_eq!(e.code, Code::NotFound, "{d}: {e}");
    }
    let (d, data) = blob(BLOBS + 1_000_000);
    store.put_bytes(&d, data.clone()).await.unwrap();
    assert_eq!(store.get_all(&d, 1 << 10).await.unwrap(), data);
    loading
}

async fn expect_exactly(store: &FilesystemStore, present: &[u32], absent: &[u32]) {
    let extra = 1; // the blob `serve_while_loading` wrote
    assert_eq!(
        store.index_state().entries,
        present.len() as u64 + extra,
        "{:?}",
        store.index_state()
    );
    let keys: Vec<Digest> = present.iter().map(|&i| blob(i).0).collect();
    for chunk in keys.chunks(10_000) {
        let sizes = store.has_many(chunk).await.unwrap();
        for (k, s) in chunk.iter().zip(sizes) {
            assert_eq!(s, Some(k.size()), "{k}");
        }
    }
    let keys: Vec<Digest> = absent.iter().map(|&i| blob(i).0).collect();
    assert!(store
        .has_many(&keys)
        .await
        .unwrap()
        .iter()
        .all(Option::is_none));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_blobs_restart_without_with_a_stale_and_with_a_torn_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    lay_out(&content, 0..BLOBS);
    let sample: Vec<u32> = (0..BLOBS).step_by(BLOBS as usize / 1000).collect();
    let never: Vec<u32> = (BLOBS * 2..BLOBS * 2 + 50).collect();
    let mut present: Vec<u32> = (0..BLOBS).collect();

    // 1. No snapshot: the walk. The store serves at once.
    let began = Instant::now();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    let opened = began.elapsed();
    assert!(
        serve_while_loading(&store, &sample, &never).await,
        "the walk of {BLOBS} files was over before the first lookup"
    );
    loaded(&store).await;
    eprintln!(
        "walk: open {opened:?}, loaded {:?} after open",
        began.elapsed()
    );
    // The first prefix directory told the walk the store's size: the table grew while it
    // held a few hundred entries (8-10 times from empty), then never again (growing one
    // entry at a time to 200,000 doubles it 17 times, the last rehashing 115,000 entries).
    let grows = store.index_table_grows();
    assert!(
        (1..=11).contains(&grows),
        "the index's table grew {grows} times during the walk"
    );
    expect_exactly(&store, &present, &never).await;
    drop(store); // writes the snapshot
    assert!(content.join(SNAPSHOT).exists());

    // 2. The snapshot, stale: after it was written, blobs were deleted (an eviction, a hand)
    // and others written (a put just before a crash).
    let removed: Vec<u32> = (0..BLOBS).step_by(1000).collect();
    for &i in &removed {
        std::fs::remove_file(blob_path(&content, &blob(i).0)).unwrap();
    }
    let added = BLOBS..BLOBS + 500;
    lay_out(&content, added.clone());
    present.retain(|i| i % 1000 != 0);
    present.extend(added.clone());
    // `serve_while_loading` wrote one more blob (the same each time).
    let began = Instant::now();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    let added_sample: Vec<u32> = added.clone().step_by(7).collect();
    let mut still_there = sample.clone();
    still_there.retain(|i| i % 1000 != 0);
    still_there.extend(&added_sample);
    let loading = serve_while_loading(&store, &still_there, &never).await;
    // A blob the snapshot lists but the disk lost: NOT_FOUND and gone from the index, at once.
    let (gone, _) = blob(removed[1]);
    let e = store.get_all(&gone, 1 << 10).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e}");
    assert_eq!(store.has(&gone).await.unwrap(), None);
    loaded(&store).await;
    eprintln!(
        "snapshot: loaded {:?} after open (loading at the first lookup: {loading})",
        began.elapsed()
    );
    let absent: Vec<u32> = removed.iter().copied().chain(never.clone()).collect();
    expect_exactly(&store, &present, &absent).await;
    drop(store);

    // 3. A torn snapshot (cut in the middle, as a crash during its write would leave it if it
    // were not renamed into place): the walk, with the same result. (A garbled one is refused
    // the same way: `snapshot.rs`'s tests flip bytes everywhere, and the test below writes
    // garbage.)
    let whole = std::fs::read(content.join(SNAPSHOT)).unwrap();
    std::fs::write(content.join(SNAPSHOT), &whole[..whole.len() / 2]).unwrap();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    assert!(serve_while_loading(&store, &still_there, &never).await);
    loaded(&store).await;
    assert_eq!(store.index_state().phase, "ready");
    expect_exactly(&store, &present, &absent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_filled_through_the_api_restarts_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000;
    let store = std::sync::Arc::new(FilesystemStore::open(&cfg(dir.path())).await.unwrap());
    loaded(&store).await;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..8u32 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(8) {
                let (d, data) = blob(i);
                store.put_bytes(&d, data).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // Used last: the hottest after the restart.
    let (hot, _) = blob(0);
    store.has(&hot).await.unwrap();
    let store = std::sync::Arc::into_inner(store).unwrap();
    drop(store);
    let content = dir.path().join("cas");
    assert!(content.join(SNAPSHOT).exists());

    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    loaded(&store).await;
    let state = store.index_state();
    assert_eq!(state.entries, n as u64, "{state:?}");
    for i in (0..n).step_by(13) {
        let (d, data) = blob(i);
        assert_eq!(store.get_all(&d, 1 << 10).await.unwrap(), data);
    }
    // A garbage file where the snapshot goes: walked instead, nothing lost.
    drop(store);
    std::fs::write(content.join(SNAPSHOT), b"not a snapshot at all").unwrap();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    loaded(&store).await;
    assert_eq!(store.index_state().entries, n as u64);
}

/// NativeLink 1.6.6's name of a digest's file (in its `d/` directory).
fn nativelink_name(d: &Digest) -> String {
    format!("{}-{}", d.hash_hex(), d.size())
}

/// The names directly in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    out.sort();
    out
}

/// Every blob of `range` is in its prefix directory, whole, and none is left elsewhere.
fn all_in_place(content: &Path, range: std::ops::Range<u32>) {
    for i in range {
        let (d, data) = blob(i);
        assert_eq!(std::fs::read(blob_path(content, &d)).unwrap(), data, "{d}");
    }
    let stray: Vec<String> = names(content)
        .into_iter()
        .filter(|n| n.len() != 2 && !n.starts_with('.') && n != "s" && n != "README")
        .collect();
    assert!(stray.is_empty(), "left in the content directory: {stray:?}");
}

/// An existing flat directory of an older Cairn and of NativeLink 1.6.6 (`d/<hash>-<size>`,
/// and the flat `<hash>-<size>` of its earlier versions) is moved into the prefix directories
/// while the store serves; with a snapshot that indexes blobs not moved yet, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_blobs_of_older_layouts_are_moved_into_place_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    let temp = dir.path().join("tmp");
    for d in [
        content.join("d"),
        content.join("s"),
        temp.join("d"),
        temp.join("s"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    for i in 0..BLOBS {
        let (d, data) = blob(i);
        let path = match i % 4 {
            0 | 2 => content.join(d.file_name()),
            1 => content.join("d").join(nativelink_name(&d)),
            _ => content.join(nativelink_name(&d)),
        };
        std::fs::write(path, &data).unwrap();
    }
    // NativeLink's string keys and files that are not blobs are left alone.
    std::fs::write(content.join("s/a-string-key"), b"not Cairn's").unwrap();
    std::fs::write(content.join("README"), b"not a blob").unwrap();
    // A move cut short by a crash: both names of one file.
    let (half, _) = blob(0);
    let in_place = blob_path(&content, &half);
    std::fs::create_dir_all(in_place.parent().unwrap()).unwrap();
    std::fs::hard_link(content.join(half.file_name()), &in_place).unwrap();
    // NativeLink's torn uploads.
    std::fs::write(temp.join("d/partial"), b"torn").unwrap();

    let sample: Vec<u32> = (0..BLOBS).step_by(BLOBS as usize / 1000).collect();
    let never: Vec<u32> = (BLOBS * 2..BLOBS * 2 + 50).collect();
    let present: Vec<u32> = (0..BLOBS).collect();
    let began = Instant::now();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    assert!(!temp.join("d/partial").exists());
    assert!(
        serve_while_loading(&store, &sample, &never).await,
        "the move of {BLOBS} files was over before the first lookup"
    );
    loaded(&store).await;
    eprintln!("moved {BLOBS} blobs in {:?}", began.elapsed());
    expect_exactly(&store, &present, &never).await;
    all_in_place(&content, 0..BLOBS);
    assert!(!content.join("d").exists());
    assert_eq!(names(&content.join("s")), ["a-string-key"]);
    assert!(content.join(".cairn-layout").exists());
    drop(store);

    // An older Cairn's directory with its snapshot: the index knows blobs that are not in
    // place yet; reads and lookups find them at once.
    for i in 0..BLOBS {
        let (d, _) = blob(i);
        std::fs::rename(blob_path(&content, &d), content.join(d.file_name())).unwrap();
    }
    std::fs::remove_file(content.join(".cairn-layout")).unwrap();
    assert!(content.join(SNAPSHOT).exists());
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    serve_while_loading(&store, &sample, &never).await;
    loaded(&store).await;
    expect_exactly(&store, &present, &never).await;
    all_in_place(&content, 0..BLOBS);
    assert!(content.join(".cairn-layout").exists());
}

/// Sets the modification time of every prefix directory an hour back.
fn age_prefix_dirs(content: &Path) {
    let past = std::time::SystemTime::now() - Duration::from_secs(3600);
    for e in std::fs::read_dir(content).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            std::fs::File::open(e.path())
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
    }
}

/// A restart from the snapshot of a directory that nothing changed since lists no prefix
/// directory (a restart of ten million blobs costs the snapshot's read and 256 stats), and one
/// whose blobs were written or deleted behind the snapshot's back (puts before a crash, an
/// eviction after the snapshot, a hand) lists the directories they touched and finds exactly
/// what is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_a_snapshot_lists_only_the_prefix_directories_changed_since() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    let n = 20_000;
    lay_out(&content, 0..n);
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    loaded(&store).await;
    assert_eq!(store.dirs_listed(), 256);
    drop(store); // the snapshot
                 // As if the blobs had been written long before the snapshot.
    age_prefix_dirs(&content);

    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    loaded(&store).await;
    assert_eq!(store.dirs_listed(), 0);
    assert_eq!(store.index_state().entries, n as u64);
    drop(store);
    age_prefix_dirs(&content);

    // Behind the snapshot's back: 30 blobs deleted, 20 written.
    let gone: Vec<u32> = (0..30).map(|i| i * 500).collect();
    for &i in &gone {
        std::fs::remove_file(blob_path(&content, &blob(i).0)).unwrap();
    }
    lay_out(&content, n..n + 20);
    let touched: std::collections::BTreeSet<String> = gone
        .iter()
        .copied()
        .chain(n..n + 20)
        .map(|i| blob(i).0.hash_hex()[..2].to_string())
        .collect();
    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    loaded(&store).await;
    assert_eq!(store.dirs_listed(), touched.len() as u64);
    let present: Vec<Digest> = (0..n + 20)
        .filter(|i| !gone.contains(i))
        .map(|i| blob(i).0)
        .collect();
    assert_eq!(store.index_state().entries, present.len() as u64);
    for chunk in present.chunks(5_000) {
        assert!(store
            .has_many(chunk)
            .await
            .unwrap()
            .iter()
            .all(Option::is_some));
    }
    for &i in &gone {
        assert_eq!(store.has(&blob(i).0).await.unwrap(), None);
    }
}

/// NativeLink's names do not say the digest function (it serves one file for either): its
/// BLAKE3 blobs are found by their BLAKE3 digests, before the move and after it, and filed
/// under the function their bytes hash to; a file that is neither function's hash of its
/// bytes (an action result) stays under SHA-256, NativeLink's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nativelink_blake3_blobs_are_filed_under_the_function_their_bytes_hash_to() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("cas");
    std::fs::create_dir_all(content.join("d")).unwrap();
    let mut blobs = Vec::new();
    for i in 0..2_000u32 {
        let data = Bytes::from(format!("nativelink blob {i}"));
        let function = if i % 2 == 0 {
            DigestFunction::Blake3
        } else {
            DigestFunction::Sha256
        };
        let d = function.compute(&data);
        let path = if i % 3 == 0 {
            content.join(nativelink_name(&d))
        } else {
            content.join("d").join(nativelink_name(&d))
        };
        std::fs::write(path, &data).unwrap();
        blobs.push((d, data));
    }
    let result = Digest::new(DigestFunction::Sha256, &[7; 32], 12);
    std::fs::write(
        content.join("d").join(nativelink_name(&result)),
        b"result bytes",
    )
    .unwrap();

    let store = FilesystemStore::open(&cfg(dir.path())).await.unwrap();
    // Right after the start, whether moved yet or not.
    for (d, data) in blobs.iter().step_by(7) {
        assert_eq!(store.has(d).await.unwrap(), Some(d.size()), "{d}");
        assert_eq!(store.get_all(d, 1 << 10).await.unwrap(), *data, "{d}");
    }
    loaded(&store).await;
    assert_eq!(store.index_state().entries, blobs.len() as u64 + 1);
    for (d, data) in &blobs {
        assert_eq!(std::fs::read(blob_path(&content, d)).unwrap(), *data, "{d}");
        assert_eq!(store.has(d).await.unwrap(), Some(d.size()), "{d}");
    }
    assert_eq!(
        std::fs::read(blob_path(&content, &result)).unwrap(),
        b"result bytes"
    );
    assert!(!content.join("d").exists());
    assert!(content.join(".cairn-layout").exists());
}
