//! The filesystem store's index at start-up, through the real binary: Cairn serves a content
//! directory of 100,000 blobs at once, answers FindMissingBlobs correctly while its index
//! loads, says how far the load is in `/status` and `/metrics`, writes its index snapshot when
//! stopped, and restarts from it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use common::{Cairn, FILESYSTEM_CONFIG};
use re::content_addressable_storage_client::ContentAddressableStorageClient;

const BLOBS: u32 = 100_000;
const LOAD_DEADLINE: Duration = Duration::from_secs(120);

fn blob(i: u32) -> (Digest, Vec<u8>) {
    let data = format!("indexed blob {i}").into_bytes();
    (DigestFunction::Sha256.compute(&data), data)
}

fn metric(body: &str, line_prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The `index` object of `stores/CAS` in `/status`.
async fn cas_index(c: &Cairn) -> serde_json::Value {
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["components"]["stores/CAS"]["index"].clone()
}

async fn missing(c: &Cairn, keys: &[Digest]) -> Vec<Digest> {
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    let answer = cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: keys.iter().map(Digest::to_proto).collect(),
            digest_function: re::digest_function::Value::Sha256 as i32,
        })
        .await
        .unwrap()
        .into_inner();
    answer
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto(re::digest_function::Value::Sha256 as i32, d).unwrap())
        .collect()
}

async fn wait_loaded(c: &Cairn) -> serde_json::Value {
    let deadline = Instant::now() + LOAD_DEADLINE;
    loop {
        let index = cas_index(c).await;
        if index["state"] == "loaded" {
            return index;
        }
        assert!(Instant::now() < deadline, "still loading: {index}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lay_out(content: &Path) {
    std::fs::create_dir_all(content).unwrap();
    for i in 0..BLOBS {
        let (d, data) = blob(i);
        std::fs::write(content.join(d.file_name()), data).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_while_the_index_loads_reports_progress_and_restarts_from_its_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("cas");
    lay_out(&content);
    // As on a machine that has been up a while: nothing left to write back.
    assert!(std::process::Command::new("sync")
        .status()
        .unwrap()
        .success());
    let sample: Vec<Digest> = (0..BLOBS).step_by(211).map(|i| blob(i).0).collect();
    let absent: Vec<Digest> = (0..20).map(|i| blob(BLOBS * 3 + i).0).collect();
    let asked: Vec<Digest> = sample.iter().chain(&absent).copied().collect();

    // No snapshot yet: the walk. Listening and answering come first.
    let began = Instant::now();
    let c = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    let listening = began.elapsed();
    let index = cas_index(&c).await;
    assert_eq!(index["state"], "loading", "{index}");
    // Listing the prefix directories, or moving the flat directory's blobs into them.
    assert!(
        index["phase"] == "walk" || index["phase"] == "migrate",
        "{index}"
    );
    let (_, metrics) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "nativelink_store_index_loading{store=\"CAS\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(missing(&c, &asked).await, absent);
    let answered = began.elapsed();
    let loaded = wait_loaded(&c).await;
    eprintln!(
        "walk of {BLOBS}: listening after {listening:?}, FindMissingBlobs answered after \
         {answered:?}, loaded after {:?}",
        began.elapsed()
    );
    assert_eq!(loaded["entries"], BLOBS, "{loaded}");
    let (_, metrics) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "nativelink_store_index_loading{store=\"CAS\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "nativelink_store_index_loaded_entries{store=\"CAS\"}"
        ),
        Some(BLOBS as f64)
    );
    assert_eq!(missing(&c, &asked).await, absent);

    // A blob uploaded now reaches the snapshot written when Cairn stops.
    let (new, data) = blob(BLOBS * 5);
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    cas.batch_update_blobs(re::BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![re::batch_update_blobs_request::Request {
            digest: Some(new.to_proto()),
            data,
            compressor: 0,
        }],
        digest_function: re::digest_function::Value::Sha256 as i32,
    })
    .await
    .unwrap();
    // The snapshot written after the walk (just after the index was declared loaded).
    let snapshot = content.join(".cairn-index");
    let deadline = Instant::now() + LOAD_DEADLINE;
    while !snapshot.exists() {
        assert!(Instant::now() < deadline, "no snapshot after the walk");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after_walk = std::fs::metadata(&snapshot).unwrap().modified().unwrap();
    assert!(c.terminate().success());
    assert!(std::fs::metadata(&snapshot).unwrap().modified().unwrap() > after_walk);

    // Restarted from the snapshot.
    let began = Instant::now();
    let c = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    let mut asked = asked.clone();
    asked.push(new);
    assert_eq!(missing(&c, &asked).await, absent);
    let answered = began.elapsed();
    let loaded = wait_loaded(&c).await;
    eprintln!(
        "from the snapshot: FindMissingBlobs answered after {answered:?}, loaded after {:?}",
        began.elapsed()
    );
    assert_eq!(loaded["entries"], BLOBS + 1, "{loaded}");
    assert!(c.terminate().success());
}

/// The files of the content directory's older places (an older Cairn's flat names, NativeLink's
/// `d/`) and of its prefix directories.
fn count_layouts(content: &Path) -> (usize, usize) {
    let (mut older, mut in_place) = (0, 0);
    for e in std::fs::read_dir(content).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.starts_with('.') {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            let n = std::fs::read_dir(e.path()).unwrap().count();
            if name == "d" {
                older += n;
            } else {
                in_place += n;
            }
        } else {
            older += 1;
        }
    }
    (older, in_place)
}

async fn read_blobs(c: &Cairn, keys: &[Digest]) -> Vec<Vec<u8>> {
    let mut cas = ContentAddressableStorageClient::new(c.channel().await);
    let answer = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: keys.iter().map(Digest::to_proto).collect(),
            acceptable_compressors: vec![],
            digest_function: re::digest_function::Value::Sha256 as i32,
        })
        .await
        .unwrap()
        .into_inner();
    answer
        .responses
        .into_iter()
        .map(|r| {
            assert_eq!(r.status.unwrap_or_default().code, 0);
            r.data
        })
        .collect()
}

/// A flat content directory of 100,000 blobs (half an older Cairn's names, half NativeLink
/// 1.6.6's `d/<hash>-<size>`) is moved into the prefix directories in the background while
/// Cairn serves; Cairn is SIGKILLed in the middle of the move and restarted: every blob is
/// found and whole, and none is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_in_the_middle_of_moving_a_flat_directory_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let content = tmp.path().join("cas");
    std::fs::create_dir_all(content.join("d")).unwrap();
    for i in 0..BLOBS {
        let (d, data) = blob(i);
        let path = if i % 2 == 0 {
            content.join(d.file_name())
        } else {
            content
                .join("d")
                .join(format!("{}-{}", d.hash_hex(), d.size()))
        };
        std::fs::write(path, data).unwrap();
    }
    assert!(std::process::Command::new("sync")
        .status()
        .unwrap()
        .success());
    let sample: Vec<Digest> = (0..BLOBS).step_by(211).map(|i| blob(i).0).collect();
    let absent: Vec<Digest> = (0..20).map(|i| blob(BLOBS * 3 + i).0).collect();
    let asked: Vec<Digest> = sample.iter().chain(&absent).copied().collect();

    let c = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    // Until the move is under way.
    let deadline = Instant::now() + LOAD_DEADLINE;
    loop {
        let index = cas_index(&c).await;
        assert_eq!(
            index["state"], "loading",
            "the move ended before the kill: {index}"
        );
        if index["phase"] == "migrate" && index["entries"].as_u64() >= Some(BLOBS as u64 / 20) {
            break;
        }
        assert!(Instant::now() < deadline, "{index}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Blobs not moved yet are found.
    assert_eq!(missing(&c, &asked).await, absent);
    let index = cas_index(&c).await;
    assert_eq!(
        index["state"], "loading",
        "the move ended before the kill: {index}"
    );
    c.kill9();
    let (older, in_place) = count_layouts(&content);
    eprintln!("killed with {in_place} blobs moved and {older} not");
    assert!(older > 0 && in_place > 0, "{older} {in_place}");
    assert!(!content.join(".cairn-layout").exists());

    let c = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    assert_eq!(missing(&c, &asked).await, absent);
    let loaded = wait_loaded(&c).await;
    assert_eq!(loaded["entries"], BLOBS, "{loaded}");
    assert_eq!(count_layouts(&content), (0, BLOBS as usize));
    assert!(content.join(".cairn-layout").exists());
    assert!(!content.join("d").exists());
    for chunk in sample.chunks(50) {
        let got = read_blobs(&c, chunk).await;
        for (d, data) in chunk.iter().zip(got) {
            assert_eq!(DigestFunction::Sha256.compute(&data), *d);
        }
    }
    assert_eq!(missing(&c, &asked).await, absent);
    assert!(c.terminate().success());
}

/// `cairn bench fs-serve` (the figures of BENCHMARKS.md's issue 14, part 3) at a small scale:
/// it fills a store through gRPC, restarts it from its snapshot, and after a kill -9 with puts
/// after the snapshot, with every answer checked.
#[test]
fn the_fs_serve_bench_fills_restarts_and_survives_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let addr = common::free_addr();
    let config = tmp.path().join("config.json5");
    std::fs::write(
        &config,
        FILESYSTEM_CONFIG
            .replace("@DIR@", &tmp.path().display().to_string())
            .replace("@ADDR@", &addr.to_string()),
    )
    .unwrap();
    let bench = |extra: &[&str]| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args([
                "bench",
                "fs-serve",
                "--requests",
                "3000",
                "--small-size",
                "100",
            ])
            .args(["--clients", "2", "--endpoint", &format!("grpc://{addr}")])
            .arg("--config")
            .arg(&config)
            .arg("--dir")
            .arg(tmp.path().join("bench"))
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let first = bench(&[]);
    assert!(first.contains("3000 of 3000 blobs were missing"), "{first}");
    assert!(first.contains("SIGTERM, exited"), "{first}");
    let restarted = bench(&["--stop", "kill", "--extra-puts", "500"]);
    assert!(restarted.contains("(3000 entries)"), "{restarted}");
    assert!(
        restarted.contains("stored blobs reported missing: 0; GetActionResult NOT_FOUND: 0"),
        "{restarted}"
    );
    assert!(!restarted.contains("fs-serve fill"), "{restarted}");
    let after_kill = bench(&[]);
    assert!(after_kill.contains("(3500 entries)"), "{after_kill}");
    assert!(
        after_kill.contains("stored blobs reported missing: 0; GetActionResult NOT_FOUND: 0"),
        "{after_kill}"
    );
    // The restart after the kill read the snapshot and the journal of the 500 puts since,
    // instead of listing the 200-odd directories they touched (the last renames before the
    // kill may have left their directories newer than the journal's last write).
    let log = std::fs::read_to_string(tmp.path().join("bench/server.log")).unwrap();
    let loaded = log
        .lines()
        .map(strip_ansi)
        .find(|l| l.contains("index loaded") && l.contains("/cas "))
        .unwrap_or_else(|| panic!("no index loaded line for the CAS:\n{log}"));
    let field = |name: &str| -> u64 {
        let at = loaded.find(&format!(" {name}=")).expect(name) + name.len() + 2;
        loaded[at..].split(' ').next().unwrap().parse().unwrap()
    };
    assert!(field("dirs_listed") <= 16, "{loaded}");
    assert!(
        field("journal_records") + field("journal_stat") >= 500,
        "{loaded}"
    );
}

/// `line` without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
