//! The REAPI services over a real gRPC connection to the real binary: happy paths and every
//! kind of bad input the issue names, each with its status and message.

mod common;

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use cairn_core::{Digest, DigestFunction};
use common::{data, Cairn};
use futures::StreamExt;
use prost::Message;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;

fn sha(d: &[u8]) -> Digest {
    SHA.compute(d)
}

struct Clients {
    cas: ContentAddressableStorageClient<tonic::transport::Channel>,
    ac: ActionCacheClient<tonic::transport::Channel>,
    bs: ByteStreamClient<tonic::transport::Channel>,
    caps: CapabilitiesClient<tonic::transport::Channel>,
}

async fn clients(c: &Cairn) -> Clients {
    let ch = c.channel().await;
    Clients {
        cas: ContentAddressableStorageClient::new(ch.clone()).max_decoding_message_size(64 << 20),
        ac: ActionCacheClient::new(ch.clone()),
        bs: ByteStreamClient::new(ch.clone()).max_decoding_message_size(64 << 20),
        caps: CapabilitiesClient::new(ch),
    }
}

fn upload(blob: &[u8], d: &Digest) -> re::batch_update_blobs_request::Request {
    re::batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: blob.to_vec(),
        compressor: 0,
    }
}

async fn batch_put(cl: &mut Clients, blobs: &[&[u8]]) {
    let requests = blobs.iter().map(|b| upload(b, &sha(b))).collect();
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r
        .responses
        .iter()
        .all(|r| r.status.as_ref().unwrap().code == 0));
}

async fn write_stream(
    bs: &mut ByteStreamClient<tonic::transport::Channel>,
    msgs: Vec<WriteRequest>,
) -> Result<i64, tonic::Status> {
    bs.write(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner().committed_size)
}

fn write_msgs(name: &str, blob: &[u8], chunk: usize) -> Vec<WriteRequest> {
    let mut msgs: Vec<WriteRequest> = blob
        .chunks(chunk.max(1))
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: (i * chunk) as i64,
            finish_write: false,
            data: c.to_vec(),
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(WriteRequest {
            resource_name: name.to_string(),
            ..Default::default()
        });
    }
    msgs.last_mut().unwrap().finish_write = true;
    msgs
}

async fn read_all(
    bs: &mut ByteStreamClient<tonic::transport::Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = bs
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend_from_slice(&m?.data);
    }
    Ok(out)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn capabilities_reflect_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let caps = cl
        .caps
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    for f in [DigestFunction::Sha256, DigestFunction::Blake3] {
        assert!(cache.digest_functions.contains(&f.to_proto()));
    }
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(cache.max_batch_total_size_bytes > 0);
    assert!(cache
        .supported_compressors
        .contains(&(re::compressor::Value::Zstd as i32)));
    assert!(caps.execution_capabilities.is_none());
    let e = cl
        .caps
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"nope\""), "{}", e.message());
}

#[tokio::test]
async fn cas_round_trips_and_reports_missing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let a = data(1000, 1);
    let b = data(5000, 2);
    batch_put(&mut cl, &[&a, &b]).await;
    let missing = sha(b"never uploaded");
    let r = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![
                sha(&a).to_proto(),
                missing.to_proto(),
                SHA.empty_digest().to_proto(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The empty blob is always present.
    assert_eq!(r.missing_blob_digests, vec![missing.to_proto()]);

    let r = cl
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![
                sha(&b).to_proto(),
                missing.to_proto(),
                SHA.empty_digest().to_proto(),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].data, b);
    assert_eq!(
        r.responses[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    assert_eq!(r.responses[2].status.as_ref().unwrap().code, 0);
    assert!(r.responses[2].data.is_empty());

    // zstd in both directions.
    let z = zstd::bulk::compress(&a, 3).unwrap();
    let blob = data(4000, 3);
    let zd = sha(&blob);
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(zd.to_proto()),
                data: zstd::bulk::compress(&blob, 3).unwrap(),
                compressor: re::compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].status.as_ref().unwrap().code, 0);
    let r = cl
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![zd.to_proto()],
            acceptable_compressors: vec![re::compressor::Value::Zstd as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = &r.responses[0];
    let plain = if got.compressor == re::compressor::Value::Zstd as i32 {
        zstd::bulk::decompress(&got.data, 10_000).unwrap()
    } else {
        got.data.clone()
    };
    assert_eq!(plain, blob);
    drop(z);
}

#[tokio::test]
async fn blake3_digests_work_when_named() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(3000, 4);
    let d = DigestFunction::Blake3.compute(&blob);
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![upload(&blob, &d)],
            digest_function: DigestFunction::Blake3.to_proto(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.responses[0].status.as_ref().unwrap().code, 0);
    // The same hash read as SHA-256 (the default for 64 hex digits) is a different blob.
    let r = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![d.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.missing_blob_digests.len(), 1);
    let name = format!("blobs/blake3/{}/{}", d.hash_hex(), d.size());
    assert_eq!(read_all(&mut cl.bs, &name, 0, 0).await.unwrap(), blob);
}

#[tokio::test]
async fn batch_update_rejects_only_the_bad_blob() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let good = data(100, 5);
    let wrong_hash = sha(b"something else").with_size(100);
    let wrong_size = sha(&good).with_size(99);
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![
                upload(&good, &sha(&good)),
                upload(&good, &wrong_hash),
                upload(&good, &wrong_size),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = r
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32
        ]
    );
    assert!(r.responses[1]
        .status
        .as_ref()
        .unwrap()
        .message
        .contains("hashes to"));
    let r = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![sha(&good).to_proto(), wrong_hash.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.missing_blob_digests, vec![wrong_hash.to_proto()]);
}

#[tokio::test]
async fn malformed_digests_and_requests_get_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let cases: Vec<(re::Digest, i32, &str)> = vec![
        (
            re::Digest {
                hash: "xyz".into(),
                size_bytes: 1,
            },
            0,
            "hex digits",
        ),
        (
            re::Digest {
                hash: "zz".repeat(32),
                size_bytes: 1,
            },
            0,
            "hexadecimal",
        ),
        (
            re::Digest {
                hash: "ab".repeat(31),
                size_bytes: 1,
            },
            0,
            "hex digits",
        ),
        (
            re::Digest {
                hash: "ab".repeat(32),
                size_bytes: -5,
            },
            0,
            "negative",
        ),
        (
            re::Digest {
                hash: "ab".repeat(32),
                size_bytes: 1,
            },
            77,
            "not a known",
        ),
        (
            re::Digest {
                hash: "ab".repeat(32),
                size_bytes: 1,
            },
            re::digest_function::Value::Md5 as i32,
            "not supported",
        ),
    ];
    for (d, f, why) in cases {
        let e = cl
            .cas
            .find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![d.clone()],
                digest_function: f,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{d:?}");
        assert!(e.message().contains(why), "{d:?}: {}", e.message());
    }
    let e = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("unknown instance name \"elsewhere\""),
        "{}",
        e.message()
    );

    // Unsupported compressor in a batch: that blob fails.
    let blob = data(10, 6);
    let r = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(sha(&blob).to_proto()),
                data: blob.clone(),
                compressor: re::compressor::Value::Brotli as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let st = r.responses[0].status.as_ref().unwrap();
    assert_eq!(st.code, Code::InvalidArgument as i32);
    assert!(st.message.contains("not supported"), "{}", st.message);
    // The server is still serving.
    batch_put(&mut cl, &[&blob]).await;
}

#[tokio::test]
async fn oversize_batches_are_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let big = data(3 << 20, 7);
    let e = cl
        .cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![upload(&big, &sha(&big)), upload(&big, &sha(&big))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("max_batch_total_size_bytes"),
        "{}",
        e.message()
    );
    let e = cl
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![
                sha(&big).to_proto(),
                sha(b"x").with_size(3 << 20).to_proto(),
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn bytestream_reads_with_offset_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(3_000_000, 8);
    let d = sha(&blob);
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    assert_eq!(
        write_stream(&mut cl.bs, write_msgs(&name, &blob, 100_000))
            .await
            .unwrap(),
        d.size() as i64
    );
    let rname = format!("blobs/{}/{}", d.hash_hex(), d.size());
    assert_eq!(read_all(&mut cl.bs, &rname, 0, 0).await.unwrap(), blob);
    assert_eq!(
        read_all(&mut cl.bs, &rname, 1_000_000, 10).await.unwrap(),
        &blob[1_000_000..1_000_010]
    );
    assert_eq!(
        read_all(&mut cl.bs, &rname, 2_999_990, 0).await.unwrap(),
        &blob[2_999_990..]
    );
    assert!(read_all(&mut cl.bs, &rname, 3_000_000, 0)
        .await
        .unwrap()
        .is_empty());
    let e = read_all(&mut cl.bs, &rname, 3_000_001, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(e.message().contains("past the end"), "{}", e.message());
    let e = read_all(&mut cl.bs, &rname, -1, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = read_all(&mut cl.bs, &rname, 0, -1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // With an instance name.
    let mname = format!("main/blobs/{}/{}", d.hash_hex(), d.size());
    assert_eq!(
        read_all(&mut cl.bs, &mname, 0, 5).await.unwrap(),
        &blob[..5]
    );
    // Missing blob.
    let m = sha(b"absent");
    let e = read_all(
        &mut cl.bs,
        &format!("blobs/{}/{}", m.hash_hex(), m.size()),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Empty blob, always present.
    let em = SHA.empty_digest();
    assert!(
        read_all(&mut cl.bs, &format!("blobs/{}/0", em.hash_hex()), 0, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn bytestream_compressed_blobs_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob: Vec<u8> = (0..2_000_000u32).map(|i| (i % 97) as u8).collect();
    let d = sha(&blob);
    let z = zstd::bulk::compress(&blob, 3).unwrap();
    let name = format!(
        "uploads/{}/compressed-blobs/zstd/{}/{}",
        uuid(),
        d.hash_hex(),
        d.size()
    );
    write_stream(&mut cl.bs, write_msgs(&name, &z, 1000))
        .await
        .unwrap();
    let got = read_all(
        &mut cl.bs,
        &format!("compressed-blobs/zstd/{}/{}", d.hash_hex(), d.size()),
        0,
        0,
    )
    .await
    .unwrap();
    assert!(got.len() < blob.len() / 10);
    assert_eq!(zstd::stream::decode_all(&got[..]).unwrap(), blob);
    assert_eq!(
        read_all(
            &mut cl.bs,
            &format!("blobs/{}/{}", d.hash_hex(), d.size()),
            0,
            0
        )
        .await
        .unwrap(),
        blob
    );
    // An unsupported compressor is INVALID_ARGUMENT naming it.
    let e = read_all(
        &mut cl.bs,
        &format!("compressed-blobs/brotli/{}/{}", d.hash_hex(), d.size()),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("brotli"), "{}", e.message());
    // zstd bytes that decompress to something else are rejected and nothing is stored.
    let other = data(1000, 9);
    let od = sha(&other);
    let bad = zstd::bulk::compress(&data(1000, 10), 3).unwrap();
    let name = format!(
        "uploads/{}/compressed-blobs/zstd/{}/{}",
        uuid(),
        od.hash_hex(),
        od.size()
    );
    let e = write_stream(&mut cl.bs, write_msgs(&name, &bad, 100))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = read_all(
        &mut cl.bs,
        &format!("blobs/{}/{}", od.hash_hex(), od.size()),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn bytestream_write_rejects_mismatches_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(200_000, 11);
    let d = sha(&blob);
    let rname = format!("blobs/{}/{}", d.hash_hex(), d.size());

    // Wrong bytes for the digest.
    let mut wrong = blob.clone();
    wrong[150_000] ^= 1;
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    let e = write_stream(&mut cl.bs, write_msgs(&name, &wrong, 64 * 1024))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("does not match"), "{}", e.message());
    assert_eq!(
        read_all(&mut cl.bs, &rname, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );

    // Past the declared size.
    let mut longer = blob.clone();
    longer.extend_from_slice(b"extra");
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    let e = write_stream(&mut cl.bs, write_msgs(&name, &longer, 64 * 1024))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("past the declared size"),
        "{}",
        e.message()
    );

    // Finished short.
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    let e = write_stream(&mut cl.bs, write_msgs(&name, &blob[..1000], 500))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("digest says"), "{}", e.message());

    // Bad resource names.
    for (n, why) in [
        (format!("blobs/{}/{}", d.hash_hex(), d.size()), "uploads"),
        (
            format!("uploads/{}/blobs/{}/-3", uuid(), d.hash_hex()),
            "negative",
        ),
        (
            format!(
                "uploads/{}/compressed-blobs/lz4/{}/{}",
                uuid(),
                d.hash_hex(),
                d.size()
            ),
            "lz4",
        ),
        (
            format!(
                "nowhere/uploads/{}/blobs/{}/{}",
                uuid(),
                d.hash_hex(),
                d.size()
            ),
            "unknown instance",
        ),
    ] {
        let e = write_stream(&mut cl.bs, write_msgs(&n, &blob, 64 * 1024))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{n}");
        assert!(e.message().contains(why), "{n}: {}", e.message());
    }
    // Bad write offset.
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    let mut msgs = write_msgs(&name, &blob, 64 * 1024);
    msgs[1].write_offset += 7;
    let e = write_stream(&mut cl.bs, msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("write_offset"), "{}", e.message());

    assert_eq!(
        read_all(&mut cl.bs, &rname, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    // And the good upload still works.
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    write_stream(&mut cl.bs, write_msgs(&name, &blob, 64 * 1024))
        .await
        .unwrap();
    assert_eq!(read_all(&mut cl.bs, &rname, 0, 0).await.unwrap(), blob);
}

#[tokio::test]
async fn interrupted_upload_resumes_from_committed_offset() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(1_000_000, 12);
    let d = sha(&blob);
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    // First stream: 400 KB, then the stream ends without finish_write (the client went away).
    let mut first = write_msgs(&name, &blob[..400_000], 100_000);
    first.last_mut().unwrap().finish_write = false;
    let e = write_stream(&mut cl.bs, first).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let st = cl
        .bs
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.committed_size, st.complete), (400_000, false));
    // Resume, resending a little overlap (the server skips what it has).
    let msgs: Vec<WriteRequest> = vec![
        WriteRequest {
            resource_name: name.clone(),
            write_offset: 300_000,
            finish_write: false,
            data: blob[300_000..700_000].to_vec(),
        },
        WriteRequest {
            resource_name: String::new(),
            write_offset: 700_000,
            finish_write: true,
            data: blob[700_000..].to_vec(),
        },
    ];
    assert_eq!(write_stream(&mut cl.bs, msgs).await.unwrap(), 1_000_000);
    let st = cl
        .bs
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.committed_size, st.complete), (1_000_000, true));
    assert_eq!(
        read_all(
            &mut cl.bs,
            &format!("blobs/{}/{}", d.hash_hex(), d.size()),
            0,
            0
        )
        .await
        .unwrap(),
        blob
    );
    // Status of an upload nobody started.
    let other = sha(b"unknown upload");
    let e = cl
        .bs
        .query_write_status(QueryWriteStatusRequest {
            resource_name: format!(
                "uploads/{}/blobs/{}/{}",
                uuid(),
                other.hash_hex(),
                other.size()
            ),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn client_disconnecting_mid_write_leaves_nothing_and_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(2_000_000, 13);
    let d = sha(&blob);
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    {
        // A separate connection that we drop mid-stream.
        let mut bs = ByteStreamClient::new(c.channel().await);
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        tx.send(WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: false,
            data: blob[..500_000].to_vec(),
        })
        .await
        .unwrap();
        let call = tokio::spawn(async move { bs.write(tokio_stream_from(rx)).await });
        // The server reports the bytes it has taken; once it has them all, cut the client off.
        let mut committed = 0;
        for _ in 0..2000 {
            if let Ok(st) = cl
                .bs
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: name.clone(),
                })
                .await
            {
                committed = st.into_inner().committed_size;
                if committed == 500_000 {
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(committed, 500_000);
        call.abort();
        drop(tx);
    }
    let rname = format!("blobs/{}/{}", d.hash_hex(), d.size());
    assert_eq!(
        read_all(&mut cl.bs, &rname, 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    write_stream(&mut cl.bs, write_msgs(&name, &blob, 256 * 1024))
        .await
        .unwrap();
    assert_eq!(read_all(&mut cl.bs, &rname, 0, 0).await.unwrap(), blob);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<WriteRequest>,
) -> impl futures::Stream<Item = WriteRequest> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn concurrent_writes_of_the_same_blob_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(dir.path(), common::FILESYSTEM_CONFIG, None);
    let mut cl = clients(&c).await;
    let blob = data(3_000_000, 14);
    let d = sha(&blob);
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let mut bs = cl.bs.clone();
        let msgs = write_msgs(
            &format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size()),
            &blob,
            64 * 1024,
        );
        tasks.push(tokio::spawn(
            async move { write_stream(&mut bs, msgs).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), d.size() as i64);
    }
    assert_eq!(
        read_all(
            &mut cl.bs,
            &format!("blobs/{}/{}", d.hash_hex(), d.size()),
            0,
            0
        )
        .await
        .unwrap(),
        blob
    );
    // One blob file (in its prefix directory, beside the store's own `.cairn-*` files).
    let blobs: usize = std::fs::read_dir(dir.path().join("cas"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| std::fs::read_dir(p).unwrap().count())
        .sum();
    assert_eq!(blobs, 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn get_tree_pages_through_a_directory_tree() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    // root -> a, b; a -> c. Four directories.
    let leaf = |name: &str| re::Directory {
        files: vec![re::FileNode {
            name: name.into(),
            digest: Some(sha(name.as_bytes()).to_proto()),
            is_executable: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let c_dir = leaf("c.txt");
    let c_bytes = c_dir.encode_to_vec();
    let mut a_dir = leaf("a.txt");
    a_dir.directories.push(re::DirectoryNode {
        name: "c".into(),
        digest: Some(sha(&c_bytes).to_proto()),
    });
    let a_bytes = a_dir.encode_to_vec();
    let b_dir = leaf("b.txt");
    let b_bytes = b_dir.encode_to_vec();
    let root = re::Directory {
        directories: vec![
            re::DirectoryNode {
                name: "a".into(),
                digest: Some(sha(&a_bytes).to_proto()),
            },
            re::DirectoryNode {
                name: "b".into(),
                digest: Some(sha(&b_bytes).to_proto()),
            },
        ],
        ..Default::default()
    };
    let root_bytes = root.encode_to_vec();
    batch_put(&mut cl, &[&c_bytes, &a_bytes, &b_bytes, &root_bytes]).await;

    let all = |page_size: i32, token: String| {
        let mut cas = cl.cas.clone();
        let root_d = sha(&root_bytes).to_proto();
        async move {
            let mut s = cas
                .get_tree(re::GetTreeRequest {
                    root_digest: Some(root_d),
                    page_size,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut pages = Vec::new();
            while let Some(p) = s.next().await {
                pages.push(p?);
            }
            Ok::<_, tonic::Status>(pages)
        }
    };
    let pages = all(0, String::new()).await.unwrap();
    let dirs: Vec<re::Directory> = pages.iter().flat_map(|p| p.directories.clone()).collect();
    assert_eq!(
        dirs,
        vec![root.clone(), a_dir.clone(), b_dir.clone(), c_dir.clone()]
    );
    let pages = all(3, String::new()).await.unwrap();
    assert_eq!(pages[0].directories.len(), 3);
    assert!(!pages[0].next_page_token.is_empty());
    // Resume from the first page's token: only the rest comes back.
    let rest = all(3, pages[0].next_page_token.clone()).await.unwrap();
    assert_eq!(rest[0].directories, vec![c_dir]);
    assert!(rest.last().unwrap().next_page_token.is_empty());

    let e = all(2, "garbage".into()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut cas = cl.cas.clone();
    let e = cas
        .get_tree(re::GetTreeRequest {
            root_digest: Some(sha(b"no such dir").to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn action_cache_answers_only_complete_results() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let out = data(2000, 15);
    let stdout = b"compiler says hi".to_vec();
    let action = sha(b"an action");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/bin".into(),
            digest: Some(sha(&out).to_proto()),
            is_executable: true,
            ..Default::default()
        }],
        stdout_digest: Some(sha(&stdout).to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    cl.ac
        .update_action_result(re::UpdateActionResultRequest {
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let get = |mut ac: ActionCacheClient<tonic::transport::Channel>, d: Digest| async move {
        ac.get_action_result(re::GetActionResultRequest {
            action_digest: Some(d.to_proto()),
            ..Default::default()
        })
        .await
    };
    let e = get(cl.ac.clone(), action).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("not in the CAS"), "{}", e.message());
    batch_put(&mut cl, &[&out]).await;
    assert_eq!(
        get(cl.ac.clone(), action).await.unwrap_err().code(),
        Code::NotFound
    );
    batch_put(&mut cl, &[&stdout]).await;
    assert_eq!(
        get(cl.ac.clone(), action).await.unwrap().into_inner(),
        result
    );
    let e = get(cl.ac.clone(), sha(b"unknown action"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = cl
        .ac
        .get_action_result(re::GetActionResultRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn status_and_metrics_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let mut cl = clients(&c).await;
    let blob = data(1234, 16);
    batch_put(&mut cl, &[&blob]).await;
    cl.cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![sha(&blob).to_proto(), sha(b"absent").to_proto()],
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = cl
        .cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "bad".into(),
            ..Default::default()
        })
        .await;
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["components"]["stores/CAS"]["status"], "ok");
    // A cache miss is a request, not an error.
    let miss = cl
        .ac
        .get_action_result(re::GetActionResultRequest {
            action_digest: Some(sha(b"never ran").to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::NotFound);
    let (code, body) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("nativelink_requests_total{service=\"cas\",method=\"BatchUpdateBlobs\"} 1"),
        "{body}"
    );
    assert!(body.contains("nativelink_request_errors_total{service=\"cas\",method=\"FindMissingBlobs\",code=\"InvalidArgument\"} 1"), "{body}");
    assert!(
        body.contains("nativelink_request_duration_seconds_bucket"),
        "{body}"
    );
    assert!(
        body.contains("nativelink_store_size_bytes{store=\"CAS\"} 1234"),
        "{body}"
    );
    for want in [
        "nativelink_requests_total{service=\"ac\",method=\"GetActionResult\"} 1",
        "nativelink_cas_requests 2",
        "nativelink_cas_hits 1",
        "nativelink_cas_hit_rate 0.5",
        "nativelink_cache_operations_total{cache_type=\"CAS\",cache_operation_name=\"write\",cache_operation_result=\"success\"} 1",
        "nativelink_cache_operations_total{cache_type=\"CAS\",cache_operation_name=\"read\",cache_operation_result=\"hit\"} 1",
        "nativelink_cache_operations_total{cache_type=\"CAS\",cache_operation_name=\"read\",cache_operation_result=\"miss\"} 1",
        "nativelink_cache_size{cache_type=\"CAS\"} 1234",
        "nativelink_cache_operation_duration_seconds_bucket{",
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
    // The miss is not an error: the AC's error series exist from the start, at 0.
    let ac_errors: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("nativelink_request_errors_total{service=\"ac\""))
        .collect();
    assert!(!ac_errors.is_empty(), "{body}");
    assert!(ac_errors.iter().all(|l| l.ends_with(" 0")), "{ac_errors:?}");
}

/// Every series the guides' queries select exists at 0 on a fresh server, before any request:
/// requests and errors of every served method, execution results, store operations.
#[tokio::test]
async fn known_series_start_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let (code, body) = common::http_get(c.addr, "/metrics").await;
    assert_eq!(code, 200);
    for want in [
        "nativelink_requests_total{service=\"cas\",method=\"FindMissingBlobs\"} 0",
        "nativelink_requests_total{service=\"bytestream\",method=\"Write\"} 0",
        "nativelink_requests_total{service=\"ac\",method=\"GetActionResult\"} 0",
        "nativelink_request_errors_total{service=\"cas\",method=\"BatchUpdateBlobs\",code=\"Internal\"} 0",
        "nativelink_cache_operations_total{cache_type=\"CAS\",cache_operation_name=\"read\",cache_operation_result=\"hit\"} 0",
        "nativelink_cache_operations_total{cache_type=\"AC\",cache_operation_name=\"write\",cache_operation_result=\"error\"} 0",
        "nativelink_cache_operations_total{cache_type=\"CAS\",cache_operation_name=\"evict\",cache_operation_result=\"success\"} 0",
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
}

#[tokio::test]
async fn status_is_503_when_a_store_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(dir.path(), common::FILESYSTEM_CONFIG, None);
    // Renamed away in one step: the store writes its index snapshot and checkpoint in the
    // background, which a recursive removal could race with.
    std::fs::rename(dir.path().join("cas"), dir.path().join("cas-gone")).unwrap();
    let (code, body) = common::http_get(c.addr, "/status").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"failed\""), "{body}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start(dir.path());
    let addr = c.addr;
    let mut cl = clients(&c).await;
    let blob = data(1_000_000, 17);
    let d = sha(&blob);
    let name = format!("uploads/{}/blobs/{}/{}", uuid(), d.hash_hex(), d.size());
    // An upload in flight: half sent.
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
    tx.send(WriteRequest {
        resource_name: name.clone(),
        write_offset: 0,
        finish_write: false,
        data: blob[..500_000].to_vec(),
    })
    .await
    .unwrap();
    let mut bs = cl.bs.clone();
    let call = tokio::spawn(async move { bs.write(tokio_stream_from(rx)).await });
    let mut committed = 0;
    for _ in 0..2000 {
        let st = cl
            .bs
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        committed = st.map(|s| s.into_inner().committed_size).unwrap_or(0);
        if committed == 500_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(committed, 500_000);
    drop(cl);
    // SIGTERM, waited for on a blocking thread so this runtime keeps serving the client side.
    let exit = tokio::task::spawn_blocking(move || c.terminate());
    // Once the listener is closed, new connections are refused.
    let mut refused = false;
    for _ in 0..2000 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(refused, "the listener kept accepting after SIGTERM");
    // The in-flight upload still completes.
    tx.send(WriteRequest {
        resource_name: String::new(),
        write_offset: 500_000,
        finish_write: true,
        data: blob[500_000..].to_vec(),
    })
    .await
    .unwrap();
    drop(tx);
    assert_eq!(
        call.await.unwrap().unwrap().into_inner().committed_size,
        1_000_000
    );
    let status = exit.await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// A blob whose stored bytes no longer match its digest's size (a file truncated on disk) is
/// DATA_LOSS for BatchReadBlobs and ByteStream Read: it is never served as the blob. (The
/// filesystem store answers FindMissingBlobs from its index, which still has the size it
/// wrote; stores that report the stored length, such as Redis, make such a blob missing.)
#[tokio::test]
async fn a_truncated_blob_is_missing_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(dir.path(), common::FILESYSTEM_CONFIG, None);
    let mut cl = clients(&c).await;
    let blob = data(100_000, 77);
    let d = sha(&blob);
    batch_put(&mut cl, &[&blob]).await;
    // The blob's file under content_path, cut to half.
    fn find(dir: &std::path::Path, hash: &str) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p, hash) {
                    return Some(f);
                }
            } else if p.file_name()?.to_string_lossy().contains(hash) {
                return Some(p);
            }
        }
        None
    }
    let file = find(&dir.path().join("cas"), &d.hash_hex()).expect("the blob's file");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(50_000)
        .unwrap();

    let read = cl
        .cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![d.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = read.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::DataLoss as i32, "{status:?}");
    assert!(read.responses[0].data.is_empty());

    let mut stream = cl
        .bs
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash_hex(), d.size()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = 0usize;
    let err = loop {
        match stream.next().await {
            Some(Ok(r)) => got += r.data.len(),
            Some(Err(e)) => break e,
            None => panic!("the read ended cleanly after {got} bytes of a truncated blob"),
        }
    };
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(got < blob.len());
}
