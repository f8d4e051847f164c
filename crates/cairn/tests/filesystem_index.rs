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
    assert_eq!(index["phase"], "walk", "{index}");
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
