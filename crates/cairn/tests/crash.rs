//! Crash safety of the filesystem CAS: Cairn is SIGKILLed while 64 ByteStream uploads are in
//! flight, then restarted on the same data directory. Every blob it then claims to have must
//! read back whole and hash to its digest, every upload that was acknowledged before the kill
//! must have survived, and no torn temp file may be left behind.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{ReadRequest, WriteRequest};
use cairn_core::{Digest, DigestFunction};
use common::{Cairn, FILESYSTEM_CONFIG};
use futures::StreamExt;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

const UPLOADS: usize = 64;
const MIN_SIZE: usize = 100_000;
const MAX_SIZE: usize = 3_000_000;
const CHUNK: usize = 64 * 1024;
/// Pause between chunks, so that large uploads are still running when small ones are done.
const CHUNK_PAUSE: Duration = Duration::from_millis(3);
/// Kill once this many uploads have been acknowledged.
const KILL_AFTER: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_uploads_leaves_only_whole_blobs() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let blobs: Vec<Arc<Vec<u8>>> = (0..UPLOADS)
        .map(|i| {
            let size = MIN_SIZE + i * (MAX_SIZE - MIN_SIZE) / (UPLOADS - 1);
            Arc::new(common::data(size, 1000 + i as u64))
        })
        .collect();
    let digests: Vec<Digest> = blobs
        .iter()
        .map(|b| DigestFunction::Sha256.compute(b))
        .collect();

    let cairn = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    let channel = cairn.channel().await;

    // Start every upload at once; each reports its index on `done` when acknowledged.
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(UPLOADS);
    let mut uploads = JoinSet::new();
    for (i, (blob, digest)) in blobs.into_iter().zip(&digests).enumerate() {
        let client = ByteStreamClient::new(channel.clone());
        let resource = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            digest.hash_hex(),
            digest.size()
        );
        let done = done_tx.clone();
        uploads.spawn(async move {
            let result = upload(client, resource, blob).await;
            if result.is_ok() {
                let _ = done.send(i).await;
            }
            (i, result)
        });
    }
    drop(done_tx);

    for _ in 0..KILL_AFTER {
        tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .expect("uploads are too slow: no acknowledgement within 60s")
            .expect("every upload ended before enough were acknowledged");
    }
    let pid = cairn.child.id();
    cairn.kill9();
    eprintln!(
        "crash: killed cairn (pid {pid}) {:.1?} after start",
        started.elapsed()
    );

    // An upload acknowledged at any point, even if the answer reached us after the kill,
    // was committed by the server.
    let mut acknowledged = [false; UPLOADS];
    let results = tokio::time::timeout(Duration::from_secs(30), uploads.join_all())
        .await
        .expect("uploads did not end after the kill");
    for (i, result) in results {
        if let Ok(committed) = result {
            assert_eq!(
                committed,
                digests[i].size() as i64,
                "upload {i}: committed_size"
            );
            acknowledged[i] = true;
        }
    }
    let acknowledged_count = acknowledged.iter().filter(|a| **a).count();
    assert!(
        acknowledged_count < UPLOADS,
        "every upload finished before the kill: the test did not interrupt any upload"
    );
    let torn = count_files(&tmp.path().join("tmp"));
    eprintln!(
        "crash: {acknowledged_count} of {UPLOADS} uploads acknowledged; {torn} file(s) in the \
         temp directory at the kill"
    );

    let cairn = Cairn::start_with(tmp.path(), FILESYSTEM_CONFIG, None);
    for temp in ["tmp", "tmp-ac"] {
        let left = count_files(&tmp.path().join(temp));
        assert_eq!(left, 0, "{temp}/ should be empty after the restart");
    }

    let channel = cairn.channel().await;
    let missing = ContentAddressableStorageClient::new(channel.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: re::digest_function::Value::Sha256 as i32,
        })
        .await
        .expect("FindMissingBlobs after restart")
        .into_inner()
        .missing_blob_digests;
    let mut bytestream = ByteStreamClient::new(channel);
    let mut present = 0;
    for (i, digest) in digests.iter().enumerate() {
        let is_missing = missing.contains(&digest.to_proto());
        assert!(
            !(acknowledged[i] && is_missing),
            "upload {i} ({digest}) was acknowledged before the kill but is missing after restart"
        );
        let read = read_blob(&mut bytestream, digest).await;
        if is_missing {
            let status = read.expect_err("FindMissingBlobs says missing, yet Read succeeded");
            assert_eq!(
                status.code(),
                tonic::Code::NotFound,
                "upload {i} ({digest}): Read of a missing blob: {status}"
            );
            continue;
        }
        let bytes = read.unwrap_or_else(|s| panic!("upload {i} ({digest}): Read: {s}"));
        let got = DigestFunction::Sha256.compute(&bytes);
        assert_eq!(&got, digest, "upload {i}: the blob read back is not whole");
        present += 1;
    }
    eprintln!(
        "crash: {present} of {UPLOADS} blobs present after restart ({acknowledged_count} \
         required); took {:.1?}",
        started.elapsed()
    );
    cairn.kill9();
}

/// Writes `blob` in 64 KiB chunks with a short pause between them; returns the committed size.
async fn upload(
    mut client: ByteStreamClient<tonic::transport::Channel>,
    resource: String,
    blob: Arc<Vec<u8>>,
) -> Result<i64, tonic::Status> {
    let chunks = blob.len().div_ceil(CHUNK);
    let requests = futures::stream::iter(0..chunks).then(move |n| {
        let offset = n * CHUNK;
        let data = blob[offset..blob.len().min(offset + CHUNK)].to_vec();
        let resource_name = if n == 0 {
            resource.clone()
        } else {
            String::new()
        };
        async move {
            if n > 0 {
                tokio::time::sleep(CHUNK_PAUSE).await;
            }
            WriteRequest {
                resource_name,
                write_offset: offset as i64,
                finish_write: n + 1 == chunks,
                data,
            }
        }
    });
    let response = client.write(requests).await?;
    Ok(response.into_inner().committed_size)
}

async fn read_blob(
    client: &mut ByteStreamClient<tonic::transport::Channel>,
    digest: &Digest,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = client
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", digest.hash_hex(), digest.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::with_capacity(digest.size() as usize);
    while let Some(response) = stream.message().await? {
        bytes.extend_from_slice(&response.data);
    }
    Ok(bytes)
}

/// Number of entries in `dir`; a missing directory counts as empty.
fn count_files(dir: &Path) -> usize {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.count(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => panic!("read {}: {e}", dir.display()),
    }
}
