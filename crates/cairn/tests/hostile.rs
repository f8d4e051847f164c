//! Hostile clients against the real binary: sizes that lie, batches past the limits, very
//! large requests, malformed names and offsets, abandoned uploads, stream floods, idle
//! connections, garbage messages, deep trees. Each gets a clear status; the server stays up,
//! its memory stays bounded (VmRSS is read before and after), and nothing is stored that
//! should not be.

mod common;

use std::io::Read as _;
use std::time::{Duration, Instant};

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::proto::google::bytestream::byte_stream_client::ByteStreamClient;
use cairn_core::proto::google::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use cairn_core::{Digest, DigestFunction};
use common::Cairn;
use futures::StreamExt;
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::Code;

const SHA: DigestFunction = DigestFunction::Sha256;

/// The memory CAS is 64 MB: anything that would buffer a lying size shows.
const CONFIG: &str = r#"{
  stores: {
    CAS: { memory: { eviction_policy: { max_bytes: "64mb" } } },
  },
  servers: [{
    listener: { http: {
      socket_address: "@ADDR@",
      advanced_http: { handshake_timeout: 1, max_connections: 64 },
    } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      bytestream: { cas_stores: { "": "CAS" }, persist_stream_on_disconnect_timeout: 1 },
      capabilities: [{ instance_name: "" }],
      health: {},
    },
  }],
}"#;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn lying(hash_of: &[u8], size: i64) -> re::Digest {
    re::Digest {
        hash: SHA.compute(hash_of).hash_hex(),
        size_bytes: size,
    }
}

fn cas(
    ch: &tonic::transport::Channel,
) -> ContentAddressableStorageClient<tonic::transport::Channel> {
    ContentAddressableStorageClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// The server still answers. Right after a test filled `max_connections`, a new connection
/// may be turned away until the server has seen the old ones go (as a real client would,
/// this retries), so the answer is awaited with a deadline.
async fn still_up(c: &Cairn) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answered = async {
            let ch = tonic::transport::Endpoint::from_shared(c.url())
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .ok()?;
            re::capabilities_client::CapabilitiesClient::new(ch)
                .get_capabilities(re::GetCapabilitiesRequest::default())
                .await
                .ok()
        }
        .await;
        if answered.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "the server stopped answering");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn lying_sizes_and_oversize_requests_get_clear_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    let pid = c.child.id();
    let ch = c.channel().await;
    let rss_before = rss_kib(pid);

    // The case that aborted the process: one zstd entry whose digest declares 2^62 bytes.
    let tiny = zstd::encode_all(&b"x"[..], 1).unwrap();
    let e = cas(&ch)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(lying(b"x", 1 << 62)),
                data: tiny.clone(),
                compressor: re::compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_batch_total_size_bytes"), "{e:?}");

    // Many small entries whose declared sizes add past the limit (and past u64 when summed
    // carelessly).
    let e = cas(&ch)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: (0..4)
                .map(|_| re::batch_update_blobs_request::Request {
                    digest: Some(lying(b"y", i64::MAX)),
                    data: b"y".to_vec(),
                    compressor: 0,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // A zstd bomb declared small: 64 MiB of zeros in a few KB, declared as 10 bytes.
    let bomb = zstd::encode_all(std::io::repeat(0).take(64 << 20), 3).unwrap();
    let r = cas(&ch)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(lying(b"0123456789", 10)),
                data: bomb.clone(),
                compressor: re::compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = r.responses[0].status.clone().unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32, "{status:?}");

    // The same bomb through ByteStream's compressed-blobs.
    let name = format!(
        "uploads/{}/compressed-blobs/zstd/{}/10",
        uuid::Uuid::new_v4(),
        SHA.compute(b"0123456789").hash_hex()
    );
    let e = ByteStreamClient::new(ch.clone())
        .write(futures::stream::iter(vec![WriteRequest {
            resource_name: name,
            write_offset: 0,
            finish_write: true,
            data: bomb,
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // BatchReadBlobs of blobs declared enormous.
    let e = cas(&ch)
        .batch_read_blobs(re::BatchReadBlobsRequest {
            digests: vec![lying(b"a", i64::MAX), lying(b"b", i64::MAX)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // ByteStream: negative and enormous offsets and limits, malformed names.
    let d = SHA.compute(b"present");
    cas(&ch)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: b"present".to_vec(),
                compressor: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let blob = format!("blobs/{}/{}", d.hash_hex(), d.size());
    for (name, offset, limit, code) in [
        (blob.clone(), -1, 0, Code::InvalidArgument),
        (blob.clone(), 0, -1, Code::InvalidArgument),
        (blob.clone(), i64::MAX, 0, Code::OutOfRange),
        ("blobs/zz/7".to_string(), 0, 0, Code::InvalidArgument),
        (
            format!("blobs/{}/-7", d.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            format!("blobs/{}/99999999999999999999999", d.hash_hex()),
            0,
            0,
            Code::InvalidArgument,
        ),
        (
            "\u{0}/../../etc/passwd".to_string(),
            0,
            0,
            Code::InvalidArgument,
        ),
        ("x".repeat(100_000), 0, 0, Code::InvalidArgument),
    ] {
        let r = ByteStreamClient::new(ch.clone())
            .read(ReadRequest {
                resource_name: name.clone(),
                read_offset: offset,
                read_limit: limit,
            })
            .await;
        let code_seen = match r {
            Err(e) => e.code(),
            Ok(s) => {
                let mut s = s.into_inner();
                match s.next().await {
                    Some(Err(e)) => e.code(),
                    other => panic!("{name:.60} {offset} {limit}: {other:?}"),
                }
            }
        };
        assert_eq!(code_seen, code, "{name:.60} offset {offset} limit {limit}");
    }

    // A write whose resource name declares more than the memory store holds: refused once
    // the bytes pass the store's bound, and nothing is kept.
    let big = vec![7u8; 65 << 20];
    let big_digest = SHA.compute(&big);
    let name = format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        big_digest.hash_hex(),
        big_digest.size()
    );
    let msgs: Vec<WriteRequest> = big
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i << 20) as i64,
            finish_write: (i + 1) << 20 >= big.len(),
            data: c.to_vec(),
        })
        .collect();
    drop(big);
    let e = ByteStreamClient::new(ch.clone())
        .write(futures::stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let missing = cas(&ch)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![big_digest.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);

    // FindMissingBlobs of 100,000 digests: answered, and all reported missing but one.
    let mut digests: Vec<re::Digest> = (0..100_000u32)
        .map(|i| SHA.compute(&i.to_le_bytes()).to_proto())
        .collect();
    digests.push(d.to_proto());
    let missing = cas(&ch)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: digests,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 100_000);

    still_up(&c).await;
    let rss_after = rss_kib(pid);
    eprintln!("RSS before {rss_before} KiB, after {rss_after} KiB");
    // The store is bounded at 64 MB and nothing large was kept: allow the store's bound, a
    // few in-flight messages and the allocator's slack, but not the lies (petabytes) or the
    // bomb (64 MiB per copy).
    assert!(
        rss_after < rss_before + 200 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[tokio::test]
async fn abandoned_and_reset_uploads_are_released() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    let ch = c.channel().await;
    let blob = vec![3u8; 4 << 20];
    let d = SHA.compute(&blob);
    let mut names = Vec::new();
    for _ in 0..50 {
        let name = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash_hex(),
            d.size()
        );
        // The first 512 KiB, then the client goes away (the stream is reset); 50 of them stay
        // within what the 64 MB memory store lets uploads in progress hold.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(WriteRequest {
            resource_name: name.clone(),
            write_offset: 0,
            finish_write: false,
            data: blob[..512 << 10].to_vec(),
        })
        .await
        .unwrap();
        let mut client = ByteStreamClient::new(ch.clone());
        let call = tokio::spawn(async move {
            client
                .write(tokio_stream_from(rx))
                .await
                .map(|r| r.into_inner())
        });
        // Wait until the server has taken the bytes, then reset the stream.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = ByteStreamClient::new(ch.clone())
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: name.clone(),
                })
                .await;
            if st.is_ok_and(|s| s.into_inner().committed_size == 512 << 10) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the upload never committed its bytes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        call.abort();
        drop(tx);
        names.push(name);
    }
    // persist_stream_on_disconnect_timeout is 1 s: every upload is then forgotten.
    let deadline = Instant::now() + Duration::from_secs(20);
    for name in &names {
        loop {
            let st = ByteStreamClient::new(ch.clone())
                .query_write_status(QueryWriteStatusRequest {
                    resource_name: name.clone(),
                })
                .await;
            match st {
                Err(e) if e.code() == Code::NotFound => break,
                _ => {}
            }
            assert!(Instant::now() < deadline, "{name} was never released");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Nothing half-written is in the CAS.
    let missing = cas(&ch)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: vec![d.to_proto()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.missing_blob_digests.len(), 1);
    still_up(&c).await;
}

/// `advanced_http.max_uploads`: past it, a new upload gets RESOURCE_EXHAUSTED naming the key,
/// while the uploads in progress go on and complete.
#[tokio::test]
async fn uploads_past_max_uploads_are_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(
        tmp.path(),
        &CONFIG.replace("max_connections: 64", "max_connections: 64, max_uploads: 2"),
        None,
    );
    let ch = c.channel().await;
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 1 << 20]).collect();
    let name = |b: &[u8]| {
        let d = SHA.compute(b);
        format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash_hex(),
            d.size()
        )
    };
    let first = |name: String, b: &[u8], finish: bool| WriteRequest {
        resource_name: name,
        write_offset: 0,
        finish_write: finish,
        data: b[..if finish { b.len() } else { 4096 }].to_vec(),
    };
    // Two uploads in progress: their first bytes taken, not finished.
    let mut open = Vec::new();
    for b in &blobs[..2] {
        let n = name(b);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(first(n.clone(), b, false)).await.unwrap();
        let mut client = ByteStreamClient::new(ch.clone());
        let call = tokio::spawn(async move { client.write(tokio_stream_from(rx)).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ByteStreamClient::new(ch.clone())
            .query_write_status(QueryWriteStatusRequest {
                resource_name: n.clone(),
            })
            .await
            .is_ok_and(|s| s.into_inner().committed_size == 4096)
        {
            assert!(Instant::now() < deadline, "the upload never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        open.push((tx, call, b.clone()));
    }
    let e = ByteStreamClient::new(ch.clone())
        .write(futures::stream::iter([first(
            name(&blobs[2]),
            &blobs[2],
            true,
        )]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_uploads"), "{e:?}");
    // The two go on and complete.
    for (tx, call, b) in open {
        tx.send(WriteRequest {
            resource_name: String::new(),
            write_offset: 4096,
            finish_write: true,
            data: b[4096..].to_vec(),
        })
        .await
        .unwrap();
        drop(tx);
        let r = call.await.unwrap().unwrap().into_inner();
        assert_eq!(r.committed_size, b.len() as i64);
    }
    still_up(&c).await;
}

fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<WriteRequest>,
) -> impl futures::Stream<Item = WriteRequest> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

#[tokio::test]
async fn idle_connections_are_closed_and_cannot_starve_others() {
    use tokio::io::AsyncReadExt;
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    // 64 connections (max_connections) that send nothing.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(c.addr).await.unwrap());
    }
    // Each is closed by the server once its handshake time (1 s) is up.
    for s in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("an idle connection was kept open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    still_up(&c).await;
    // Past the limit, a new connection is closed at once rather than queued.
    let mut over = Vec::new();
    let mut closed_at_once = 0;
    for _ in 0..80 {
        over.push(tokio::net::TcpStream::connect(c.addr).await.unwrap());
    }
    for s in over.iter_mut().skip(64) {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(900), s.read(&mut b)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once > 0,
        "connections past max_connections were kept"
    );
    drop(over);
    still_up(&c).await;
}

#[tokio::test]
async fn a_stream_flood_on_one_connection_is_served_within_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    let pid = c.child.id();
    let ch = c.channel().await;
    let before = rss_kib(pid);
    // 5,000 concurrent calls on one HTTP/2 connection (the server allows 1,000 streams at a
    // time; the rest wait in the client).
    let calls = (0..5000u32).map(|i| {
        let mut cas = cas(&ch);
        async move {
            cas.find_missing_blobs(re::FindMissingBlobsRequest {
                blob_digests: vec![SHA.compute(&i.to_le_bytes()).to_proto()],
                ..Default::default()
            })
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "{:?}", results.iter().find(|r| r.is_err()));
    let after = rss_kib(pid);
    eprintln!("stream flood: RSS before {before} KiB, after {after} KiB");
    assert!(after < before + 100 * 1024, "RSS {before} -> {after} KiB");
    still_up(&c).await;
}

/// A message with the right method but bytes that are not its message.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "2")]
    not_a_digest: Vec<u8>,
    #[prost(bytes = "vec", tag = "1")]
    not_utf8: Vec<u8>,
}

#[tokio::test]
async fn garbage_messages_are_invalid_argument() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    let ch = c.channel().await;
    for (method, msg) in [
        (
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
            Garbage {
                not_a_digest: vec![0xff; 64],
                not_utf8: vec![],
            },
        ),
        (
            "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
            Garbage {
                not_a_digest: vec![],
                not_utf8: vec![0xc3, 0x28],
            },
        ),
    ] {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await.unwrap();
        let codec: tonic_prost::ProstCodec<Garbage, re::FindMissingBlobsResponse> =
            tonic_prost::ProstCodec::default();
        let e = grpc
            .unary(
                tonic::Request::new(msg),
                http::uri::PathAndQuery::from_static(method),
                codec,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::InvalidArgument | Code::Internal),
            "{method}: {e:?}"
        );
    }
    // Garbage as ByteStream.Write bytes (the server's own framing path).
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let codec: tonic_prost::ProstCodec<Garbage, re::FindMissingBlobsResponse> =
        tonic_prost::ProstCodec::default();
    let r = grpc
        .client_streaming(
            tonic::Request::new(futures::stream::iter(vec![Garbage {
                not_a_digest: garbage,
                not_utf8: vec![0xff],
            }])),
            http::uri::PathAndQuery::from_static("/google.bytestream.ByteStream/Write"),
            codec,
        )
        .await;
    assert!(r.is_err(), "garbage Write was accepted");
    still_up(&c).await;
}

#[tokio::test]
async fn a_very_deep_directory_tree_pages_through_get_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Cairn::start_with(tmp.path(), CONFIG, None);
    let ch = c.channel().await;
    // A chain of 20,000 nested directories, uploaded leaf first.
    let mut child: Option<(Digest, Vec<u8>)> = None;
    let mut all = Vec::new();
    for i in 0..20_000u32 {
        let dir = re::Directory {
            directories: child
                .iter()
                .map(|(d, _)| re::DirectoryNode {
                    name: format!("d{i}"),
                    digest: Some(d.to_proto()),
                })
                .collect(),
            ..Default::default()
        };
        let bytes = dir.encode_to_vec();
        let d = SHA.compute(&bytes);
        all.push((d, bytes.clone()));
        child = Some((d, bytes));
    }
    for batch in all.chunks(2000) {
        cas(&ch)
            .batch_update_blobs(re::BatchUpdateBlobsRequest {
                requests: batch
                    .iter()
                    .map(|(d, b)| re::batch_update_blobs_request::Request {
                        digest: Some(d.to_proto()),
                        data: b.clone(),
                        compressor: 0,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let root = child.unwrap().0;
    let mut token = String::new();
    let mut seen = 0;
    loop {
        let mut s = cas(&ch)
            .get_tree(re::GetTreeRequest {
                root_digest: Some(root.to_proto()),
                page_size: i32::MAX,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.next().await.unwrap().unwrap();
        // The page size is capped whatever the client asks.
        assert!(first.directories.len() <= 10_000);
        seen += first.directories.len();
        token = first.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, 20_000);
    still_up(&c).await;
}

/// A front whose CAS is a `grpc` store on an upstream that stops reading (SIGSTOP): 64
/// clients each push a 16 MiB blob. The front takes a few messages of each upload (its
/// ByteStream buffer, 256 MiB per listener, is not what stops it: with 32 MiB the figures are
/// the same), then stops reading from its clients: its RSS grows by far less than what the
/// clients push. When the upstream
/// resumes, every upload completes and is stored whole (within a deadline: two budgets that
/// waited on each other once deadlocked here).
#[tokio::test]
async fn an_upstream_that_stops_reading_holds_the_front_to_its_upload_buffer() {
    const CLIENTS: usize = 64;
    const SIZE: usize = 16 << 20;
    let up_dir = tempfile::tempdir().unwrap();
    let upstream = Cairn::start_with(
        up_dir.path(),
        r#"{
  stores: { CAS: { memory: { eviction_policy: { max_bytes: "4gb" } } } },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#,
        None,
    );
    let front_dir = tempfile::tempdir().unwrap();
    let front = Cairn::start_with(
        front_dir.path(),
        &r#"{
  stores: { CAS: { grpc: { instance_name: "", endpoints: [{ address: "grpc://@UPSTREAM@" }], store_type: "cas" } } },
  servers: [{
    listener: { http: { socket_address: "@ADDR@" } },
    services: {
      cas: [{ instance_name: "", cas_store: "CAS" }],
      bytestream: [{ instance_name: "", cas_store: "CAS" }],
      capabilities: [{ instance_name: "" }],
    },
  }],
}"#
        .replace("@UPSTREAM@", &upstream.addr.to_string()),
        None,
    );
    let blobs: Vec<Vec<u8>> = (0..CLIENTS)
        .map(|i| common::data(SIZE, 1000 + i as u64))
        .collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| SHA.compute(b)).collect();
    let upload = |ch: tonic::transport::Channel,
                  blob: Vec<u8>,
                  d: Digest,
                  sent: std::sync::Arc<std::sync::atomic::AtomicU64>| async move {
        let name = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash_hex(),
            d.size()
        );
        let n = blob.len();
        let msgs = futures::stream::iter(
            (0..n)
                .step_by(1 << 20)
                .map(move |at| {
                    let end = (at + (1 << 20)).min(n);
                    WriteRequest {
                        resource_name: if at == 0 { name.clone() } else { String::new() },
                        write_offset: at as i64,
                        finish_write: end == n,
                        data: blob[at..end].to_vec(),
                    }
                })
                .collect::<Vec<_>>(),
        )
        .inspect(move |m| {
            sent.fetch_add(m.data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        });
        ByteStreamClient::new(ch)
            .write(msgs)
            .await
            .map(|r| r.into_inner().committed_size)
    };
    // One blob through first, so that the front's connection to the upstream is made and its
    // RSS is read warm.
    let ch = front.channel().await;
    let warm = common::data(SIZE, 999);
    let wd = SHA.compute(&warm);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    assert_eq!(
        upload(ch.clone(), warm, wd, sent.clone()).await.unwrap(),
        SIZE as i64
    );
    let pid = front.child.id();
    let before = rss_kib(pid);

    let stop = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &upstream.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    };
    stop("-STOP");
    sent.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(front.channel().await);
    }
    let calls: Vec<_> = blobs
        .into_iter()
        .zip(digests.iter().copied())
        .enumerate()
        .map(|(i, (b, d))| tokio::spawn(upload(channels[i % 4].clone(), b, d, sent.clone())))
        .collect();
    // Wait until the front stops taking bytes: nothing signals that, so the count of bytes
    // its clients got to send is watched until it has not moved for two seconds.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sent.load(std::sync::atomic::Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the clients never stopped sending"
        );
    }
    let during = rss_kib(pid);
    let taken = sent.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "front RSS {} MiB before, {} MiB with the upstream stopped; the clients sent {} MiB of {} MiB",
        before >> 10,
        during >> 10,
        taken >> 20,
        (CLIENTS * SIZE) >> 20
    );
    assert!(
        taken < (CLIENTS * SIZE) as u64,
        "the front took every byte while its upstream was stopped"
    );
    assert!(
        during < before + 512 * 1024,
        "the front's RSS grew by {} MiB with its upstream stopped",
        (during - before) >> 10
    );

    // The upstream resumes: every upload completes, whole.
    stop("-CONT");
    for c in calls {
        let committed = tokio::time::timeout(Duration::from_secs(300), c)
            .await
            .expect("an upload never completed after the upstream resumed")
            .unwrap()
            .unwrap();
        assert_eq!(committed, SIZE as i64);
    }
    let missing = cas(&ch)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            blob_digests: digests.iter().map(|d| d.to_proto()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.missing_blob_digests.is_empty());
    still_up(&front).await;
}
